"""A task's directories and runtime environment, as Nomad's client builds them.  Pure.

Directories (Nomad's allocdir, no chroot: the paths are the host's):

    <alloc root>/<alloc id>/alloc/{data,logs,tmp}     shared by the allocation's tasks
    <alloc root>/<alloc id>/<task>/{local,secrets,tmp} the task's own; its working dir
                                                      is <alloc root>/<alloc id>/<task>

The environment (client/taskenv/env.go `buildEnv`), in this order, later
entries winning: NOMAD_ALLOC_DIR, NOMAD_TASK_DIR (`local`), NOMAD_SECRETS_DIR;
NOMAD_CPU_LIMIT, NOMAD_MEMORY_LIMIT (and NOMAD_MEMORY_MAX_LIMIT when set);
NOMAD_ALLOC_ID, NOMAD_SHORT_ALLOC_ID (its first 8 characters), NOMAD_ALLOC_NAME,
NOMAD_GROUP_NAME, NOMAD_ALLOC_INDEX, NOMAD_TASK_NAME, NOMAD_JOB_ID, NOMAD_JOB_NAME,
NOMAD_DC, NOMAD_NAMESPACE, NOMAD_REGION; the port variables (netsetup.env); then
NOMAD_META_<key> and NOMAD_META_<KEY> for the job's, group's and task's meta merged
(task over group over job, Nomad's CombinedTaskMeta), interpolated; then the task's
`env`, interpolated against all of the above.  Keys starting with NOMAD_ADDR_,
NOMAD_IP_, NOMAD_PORT_, NOMAD_HOST_PORT_ or NOMAD_META_ are cleaned as Nomad does.

What the process gets (:func:`process_env`) is the agent's own environment
minus Nomad's default denylist (client `env.denylist`: Consul, Vault and cloud
credentials) and waypost's and Nomad's tokens, under the runtime environment.

Interpolation (:func:`interpolate`) is Nomad's helper/args.ReplaceEnv: every
`${name}` (letters, digits, `_`, `-`, `.`) whose name is set is replaced, any
other is left as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from netsetup.env import clean_env_var

NOMAD_REGION = "global"  # Nomad's default region
# Nomad's host.DefaultEnvDenyList, plus the tokens of the agent's own clients.
ENV_DENYLIST = frozenset(
    {"CONSUL_TOKEN", "CONSUL_HTTP_TOKEN", "VAULT_TOKEN", "NOMAD_LICENSE"}
    | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    | {"GOOGLE_APPLICATION_CREDENTIALS", "NOMAD_TOKEN", "WAYPOST_TOKEN"}
)
_CLEANED = ("NOMAD_ADDR_", "NOMAD_IP_", "NOMAD_PORT_", "NOMAD_HOST_PORT_", "NOMAD_META_")
_VARIABLE = re.compile(r"\$\{([a-zA-Z0-9_\-.]+)\}")
SHARED_DIRS = ("data", "logs", "tmp")
TASK_DIRS = ("local", "secrets", "tmp")


@dataclass(frozen=True, slots=True)
class AllocDirs:
    """Where an allocation's files are."""

    root: PurePath  # <alloc root>/<alloc id>

    @property
    def shared(self) -> PurePath:
        return self.root / "alloc"

    @property
    def logs(self) -> PurePath:
        return self.shared / "logs"

    def task(self, name: str) -> PurePath:
        return self.root / name

    def all_for(self, tasks: Sequence[str]) -> list[PurePath]:
        """Every directory to make, parents first."""
        out = [self.root, self.shared, *(self.shared / d for d in SHARED_DIRS)]
        for name in tasks:
            out += [self.task(name), *(self.task(name) / d for d in TASK_DIRS)]
        return out


def alloc_dirs(alloc_root: str, alloc_id: str) -> AllocDirs:
    return AllocDirs(PurePath(alloc_root) / alloc_id)


@dataclass(frozen=True, slots=True)
class TaskIdentity:
    """Who a task is, for its environment."""

    alloc_id: str
    alloc_name: str
    alloc_index: int
    job_id: str
    job_name: str
    group: str
    task: str
    datacenter: str
    namespace: str = "default"
    region: str = NOMAD_REGION


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Nomad's ReplaceEnv: `${name}` replaced when `name` is in `env`, else left as is."""
    if "${" not in text:
        return text
    return _VARIABLE.sub(lambda m: env.get(m[1], m[0]), text)


def runtime_env(
    who: TaskIdentity,
    dirs: AllocDirs,
    *,
    cpu: int,
    memory: int,
    memory_max: int = 0,
    ports: Mapping[str, str],
    meta: Sequence[Mapping[str, str]] = (),
    env: Mapping[str, str] | None = None,
    host: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The task's runtime environment (see the module docstring).

    `ports` are netsetup's port variables; `meta` the job's, group's and task's
    meta, lowest first; `env` the task's own; `host` the agent's environment, used
    only to interpolate (its variables are added by :func:`process_env`).
    """
    task_dir = dirs.task(who.task)
    out = {
        "NOMAD_ALLOC_DIR": str(dirs.shared),
        "NOMAD_TASK_DIR": str(task_dir / "local"),
        "NOMAD_SECRETS_DIR": str(task_dir / "secrets"),
        "NOMAD_CPU_LIMIT": str(cpu),
        "NOMAD_MEMORY_LIMIT": str(memory),
        "NOMAD_ALLOC_ID": who.alloc_id,
        "NOMAD_SHORT_ALLOC_ID": who.alloc_id[:8],
        "NOMAD_ALLOC_NAME": who.alloc_name,
        "NOMAD_GROUP_NAME": who.group,
        "NOMAD_ALLOC_INDEX": str(who.alloc_index),
        "NOMAD_TASK_NAME": who.task,
        "NOMAD_JOB_ID": who.job_id,
        "NOMAD_JOB_NAME": who.job_name,
        "NOMAD_DC": who.datacenter,
        "NOMAD_NAMESPACE": who.namespace,
        "NOMAD_REGION": who.region,
    }
    if memory_max:
        out["NOMAD_MEMORY_MAX_LIMIT"] = str(memory_max)
    out.update(ports)
    combined: dict[str, str] = {}
    for layer in meta:
        combined.update(layer)
    lookup = {**(host or {}), **out}
    for key, value in combined.items():
        value = interpolate(value, lookup)
        out[interpolate("NOMAD_META_" + key.upper(), lookup)] = value
        out[interpolate("NOMAD_META_" + key, lookup)] = value
    for key, value in (env or {}).items():
        out[key] = interpolate(value, {**(host or {}), **out})
    return {_clean(key): value for key, value in out.items()}


def _clean(key: str) -> str:
    return clean_env_var(key) if key.startswith(_CLEANED) else key


def process_env(runtime: Mapping[str, str], host: Mapping[str, str]) -> dict[str, str]:
    """What the process is started with: the filtered host environment under `runtime`."""
    out = {k: v for k, v in host.items() if k not in ENV_DENYLIST}
    out.update(runtime)
    return out
