"""A group's tasks as Nomad's API JSON gives them, and their policies.  Pure: no I/O.

    parse_task(raw, path)        `Tasks[i]` -> TaskSpec (ValidationError naming the path)
    parse_restart(raw, path)     `RestartPolicy` -> RestartPolicy (None: Nomad's defaults)
    render_task / render_restart the inverses, in Nomad's shape (durations in nanoseconds)

The subset of Nomad's Task (api/tasks.go) the exec driver uses: `Name`, `Driver`
(exec or raw_exec: both run the command on the host's filesystem, as Nomad's
raw_exec does), `Config` (`command`, `args`), `Env`, `User`, `Meta`, `Resources`
(`CPU` MHz, `MemoryMB`, `MemoryMaxMB`), `KillTimeout`, `KillSignal`, `LogConfig`
(`MaxFiles`, `MaxFileSizeMB`, `Disabled`), `RestartPolicy` (a task's own, over the
group's) and `Services` (read by discovery.jobs).  Defaults are Nomad's
(structs.DefaultResources, DefaultLogConfig, DefaultKillTimeout,
DefaultServiceJobRestartPolicy): 100 MHz, 300 MB, 10 files of 10 MB, 5 s, SIGINT,
2 attempts in 30 m with a 15 s delay, mode fail.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from discovery.errors import ValidationError
from discovery.model import check_int
from discovery.nomadjson import UNSUPPORTED, JsonObject, ns

DRIVERS = ("exec", "raw_exec")
DEFAULT_CPU = 100  # MHz (Nomad's DefaultResources)
DEFAULT_MEMORY = 300  # MB
DEFAULT_KILL_TIMEOUT = 5.0  # seconds
DEFAULT_KILL_SIGNAL = "SIGINT"
MAX_ARGS = 1024
MAX_ENV = 1024
MAX_META = 256
MAX_TASKS = 32  # per group
MAX_KILL_TIMEOUT = 3600.0  # an hour: a stop must end
RESTART_MODES = ("fail", "delay")
# Task names go into paths (<alloc dir>/<task>), log file names and NOMAD_TASK_NAME.
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[^=\x00]+")

_IGNORED_TASK = frozenset(
    {"Constraints", "Affinities", "Leader", "ShutdownDelay", "Kind", "ScalingPolicies"}
    | {"Identity", "Identities", "Consul", "Actions", "Schedule"}
    | {"KillTimeoutHCL"}
)
_IGNORED_RESOURCES = frozenset({"DiskMB", "IOPS", "Devices", "NUMA", "SecretsMB", "Cores"})
_CONFIG_KEYS = frozenset({"command", "args"})


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Nomad's `restart` block; durations in seconds."""

    attempts: int = 2
    interval: float = 1800.0
    delay: float = 15.0
    mode: str = "fail"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Nomad's `logs` block."""

    max_files: int = 10
    max_file_size_mb: int = 10
    disabled: bool = False

    @property
    def max_file_size(self) -> int:
        return self.max_file_size_mb << 20


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a group."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    driver: str = "raw_exec"
    env: tuple[tuple[str, str], ...] = ()
    user: str = ""  # "" is the agent's own user
    meta: tuple[tuple[str, str], ...] = ()
    cpu: int = DEFAULT_CPU
    memory: int = DEFAULT_MEMORY
    memory_max: int = 0
    kill_timeout: float = DEFAULT_KILL_TIMEOUT
    kill_signal: str = DEFAULT_KILL_SIGNAL
    logs: LogConfig = LogConfig()
    restart: RestartPolicy | None = None  # the task's own; None: the group's

    @property
    def signal_number(self) -> int:
        return int(signal.Signals[self.kill_signal])


def parse_restart(
    raw: object,
    path: str,
    base: RestartPolicy | None = None,
    warnings: list[str] | None = None,
) -> RestartPolicy:
    """`RestartPolicy` over `base` (Nomad's default for service jobs); absent keys keep it.
    Ignored keys with a value are reported on `warnings` (discovery.nomadjson)."""
    policy = base or RestartPolicy()
    if raw is None:
        return policy
    obj = JsonObject(
        raw,
        path,
        {"Attempts", "Interval", "Delay", "Mode"},
        frozenset({"RenderTemplates"}),
        warnings=warnings,
    )
    attempts = obj.get("Attempts")
    if attempts is not None:
        policy = replace(policy, attempts=check_int(attempts, obj.at("Attempts"), 0, 10_000))
    mode = obj.text("Mode") or policy.mode
    if mode not in RESTART_MODES:
        raise ValidationError(obj.at("Mode"), f"{mode!r}: must be fail or delay")
    interval = obj.seconds("Interval", policy.interval)
    delay = obj.seconds("Delay", policy.delay)
    if interval <= 0:
        raise ValidationError(obj.at("Interval"), "must be longer than 0s")
    if mode == "delay" and delay > interval:
        raise ValidationError(obj.at("Delay"), "must not be longer than Interval in mode delay")
    return replace(policy, interval=interval, delay=delay, mode=mode)


def render_restart(policy: RestartPolicy) -> dict[str, Any]:
    return {
        "Attempts": policy.attempts,
        "Interval": ns(policy.interval),
        "Delay": ns(policy.delay),
        "Mode": policy.mode,
        "RenderTemplates": False,
    }


def parse_task(
    raw: object,
    path: str,
    *,
    known: frozenset[str] = frozenset(),
    restart: RestartPolicy | None = None,
    warnings: list[str] | None = None,
) -> TaskSpec:
    """One `Tasks[]` entry; `known` are more keys the caller reads itself (`Services`).
    Ignored keys with a value are reported on `warnings` (discovery.nomadjson).

    A task's own `RestartPolicy` is merged over `restart`, the group's (Nomad's
    Task.Canonicalize): `{"Attempts": 1}` keeps the group's interval, delay and mode.
    """
    keys = {"Name", "Driver", "Config", "Env", "User", "Meta", "Resources"}
    keys |= {"KillTimeout", "KillSignal", "LogConfig", "RestartPolicy"}
    obj = JsonObject(raw, path, keys | known, _IGNORED_TASK, warnings=warnings)
    name = obj.text("Name")
    if not _TASK_NAME.fullmatch(name):
        raise ValidationError(
            obj.at("Name"),
            f"{name!r} is not a task name (1-128 of letters, digits, '_', '.', '-',"
            " starting with a letter or digit)",
        )
    driver = obj.text("Driver")
    if driver not in DRIVERS:
        shown = repr(driver) if driver else "no driver"
        raise ValidationError(
            obj.at("Driver"), f"task {name!r}: {shown}; waypost runs the exec and raw_exec drivers"
        )
    command, args = _parse_config(obj.get("Config"), obj.at("Config"))
    env = obj.string_map("Env", MAX_ENV)
    for key, _ in env:
        if not _ENV_NAME.fullmatch(key):
            raise ValidationError(f"{obj.at('Env')}.{key}", "is not an environment variable name")
    cpu, memory, memory_max = _parse_resources(obj.get("Resources"), obj.at("Resources"), warnings)
    kill_timeout = obj.seconds("KillTimeout", DEFAULT_KILL_TIMEOUT)
    if kill_timeout > MAX_KILL_TIMEOUT:
        raise ValidationError(obj.at("KillTimeout"), f"must be at most {MAX_KILL_TIMEOUT:.0f}s")
    kill_signal = obj.text("KillSignal") or DEFAULT_KILL_SIGNAL
    if kill_signal.upper() not in signal.Signals.__members__:
        raise ValidationError(obj.at("KillSignal"), f"{kill_signal!r} is not a signal name")
    restart_raw = obj.get("RestartPolicy")
    return TaskSpec(
        name=name,
        command=command,
        args=args,
        driver=driver,
        env=env,
        user=obj.text("User"),
        meta=obj.string_map("Meta", MAX_META),
        cpu=cpu,
        memory=memory,
        memory_max=memory_max,
        kill_timeout=kill_timeout,
        kill_signal=kill_signal.upper(),
        logs=_parse_logs(obj.get("LogConfig"), obj.at("LogConfig"), warnings),
        restart=None
        if restart_raw is None
        else parse_restart(restart_raw, obj.at("RestartPolicy"), restart, warnings),
    )


def _parse_config(raw: object, path: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise ValidationError(path, 'must be an object with "command" (and "args")')
    for key in raw:
        if key not in _CONFIG_KEYS:
            raise ValidationError(f"{path}.{key}", "is not supported by waypost's exec driver")
    obj = JsonObject(raw, path, _CONFIG_KEYS)
    command = obj.text("command")
    if not command or "\x00" in command:
        raise ValidationError(obj.at("command"), "is required")
    args = obj.strings("args", MAX_ARGS)
    if any("\x00" in a for a in args):
        raise ValidationError(obj.at("args"), "must not contain NUL characters")
    return command, args


def _parse_resources(
    raw: object, path: str, warnings: list[str] | None = None
) -> tuple[int, int, int]:
    if raw is None:
        return DEFAULT_CPU, DEFAULT_MEMORY, 0
    # Resources.Networks is Nomad's deprecated task-level network: null when unused.
    obj = JsonObject(
        raw,
        path,
        {"CPU", "MemoryMB", "MemoryMaxMB"},
        _IGNORED_RESOURCES,
        UNSUPPORTED | {"Networks"},
        warnings=warnings,
    )
    cpu_raw, memory_raw, max_raw = obj.get("CPU"), obj.get("MemoryMB"), obj.get("MemoryMaxMB")
    cpu = DEFAULT_CPU if cpu_raw is None else check_int(cpu_raw, obj.at("CPU"), 1, 1 << 30)
    memory = (
        DEFAULT_MEMORY
        if memory_raw is None
        else check_int(memory_raw, obj.at("MemoryMB"), 10, 1 << 30)
    )
    memory_max = 0 if max_raw is None else check_int(max_raw, obj.at("MemoryMaxMB"), 0, 1 << 30)
    if memory_max and memory_max < memory:
        # Nomad's Resources.Validate: the hard limit cannot sit under the reservation.
        raise ValidationError(
            obj.at("MemoryMaxMB"),
            f"{memory_max} must be at least MemoryMB ({memory}), or 0 for no limit over it",
        )
    return cpu, memory, memory_max


def _parse_logs(raw: object, path: str, warnings: list[str] | None = None) -> LogConfig:
    if raw is None:
        return LogConfig()
    obj = JsonObject(
        raw,
        path,
        {"MaxFiles", "MaxFileSizeMB", "Disabled"},
        frozenset({"Enabled"}),
        warnings=warnings,
    )
    files, size = obj.get("MaxFiles"), obj.get("MaxFileSizeMB")
    disabled = obj.get("Disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise ValidationError(obj.at("Disabled"), "must be true or false")
    return LogConfig(
        max_files=10 if files is None else check_int(files, obj.at("MaxFiles"), 1, 1000),
        max_file_size_mb=10 if size is None else check_int(size, obj.at("MaxFileSizeMB"), 1, 4096),
        disabled=bool(disabled),
    )


def render_task(task: TaskSpec) -> dict[str, Any]:
    """`task` in Nomad's shape (the inverse of :func:`parse_task`, without Services)."""
    out: dict[str, Any] = {
        "Name": task.name,
        "Driver": task.driver,
        "User": task.user,
        "Config": {"command": task.command, "args": list(task.args)},
        "Env": dict(task.env),
        "Meta": dict(task.meta),
        "Resources": {"CPU": task.cpu, "MemoryMB": task.memory, "MemoryMaxMB": task.memory_max},
        "KillTimeout": ns(task.kill_timeout),
        "KillSignal": task.kill_signal,
        "LogConfig": {
            "MaxFiles": task.logs.max_files,
            "MaxFileSizeMB": task.logs.max_file_size_mb,
            "Disabled": task.logs.disabled,
        },
    }
    if task.restart is not None:
        out["RestartPolicy"] = render_restart(task.restart)
    return out
