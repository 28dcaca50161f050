"""discovery.tasks.env: a task's directories and runtime environment.  Pure.

The expected variables are written out by hand from Nomad's runtime environment
docs (https://developer.hashicorp.com/nomad/docs/runtime/environment) and
client/taskenv/env.go (`buildEnv`, the key cleaning, helper/args.ReplaceEnv),
so a missing, extra or renamed variable fails.
"""

from __future__ import annotations

from pathlib import PurePath

import pytest

from discovery.tasks.env import (
    AllocDirs,
    TaskIdentity,
    alloc_dirs,
    interpolate,
    process_env,
    runtime_env,
)

ALLOC_ID = "6d2c9a8e-1f3b-4c5d-8e9f-0a1b2c3d4e5f"
ROOT = "/var/lib/waypost/allocs"
WHO = TaskIdentity(
    alloc_id=ALLOC_ID,
    alloc_name="web.api[2]",
    alloc_index=2,
    job_id="web",
    job_name="Web Site",
    group="api",
    task="server",
    datacenter="dc1",
)
DIRS = alloc_dirs(ROOT, ALLOC_ID)
PORTS = {
    "NOMAD_PORT_http": "8080",
    "NOMAD_HOST_PORT_http": "24561",
    "NOMAD_ADDR_http": "10.0.0.5:24561",
    "NOMAD_IP_http": "10.0.0.5",
}

# Every variable of a task with no ports, meta or env of its own, and no memory_max.
BASE = {
    "NOMAD_ALLOC_DIR": f"{ROOT}/{ALLOC_ID}/alloc",
    "NOMAD_TASK_DIR": f"{ROOT}/{ALLOC_ID}/server/local",
    "NOMAD_SECRETS_DIR": f"{ROOT}/{ALLOC_ID}/server/secrets",
    "NOMAD_CPU_LIMIT": "250",
    "NOMAD_MEMORY_LIMIT": "128",
    "NOMAD_ALLOC_ID": ALLOC_ID,
    "NOMAD_SHORT_ALLOC_ID": "6d2c9a8e",
    "NOMAD_ALLOC_NAME": "web.api[2]",
    "NOMAD_ALLOC_INDEX": "2",
    "NOMAD_TASK_NAME": "server",
    "NOMAD_GROUP_NAME": "api",
    "NOMAD_JOB_ID": "web",
    "NOMAD_JOB_NAME": "Web Site",
    "NOMAD_DC": "dc1",
    "NOMAD_REGION": "global",
    "NOMAD_NAMESPACE": "default",
}


def env_of(
    *,
    memory_max: int = 0,
    ports: dict[str, str] | None = None,
    meta: tuple[dict[str, str], ...] = (),
    env: dict[str, str] | None = None,
    host: dict[str, str] | None = None,
    who: TaskIdentity = WHO,
) -> dict[str, str]:
    return runtime_env(
        who,
        DIRS,
        cpu=250,
        memory=128,
        memory_max=memory_max,
        ports=ports or {},
        meta=meta,
        env=env,
        host=host,
    )


# -- the runtime environment ---------------------------------------------------------


def test_every_variable_of_a_plain_task() -> None:
    assert env_of() == BASE


@pytest.mark.parametrize(("key", "value"), BASE.items(), ids=BASE.keys())
def test_nomads_variable(key: str, value: str) -> None:
    assert env_of(ports=PORTS, meta=({"a": "b"},), env={"X": "1"})[key] == value


def test_memory_max_limit_only_when_set() -> None:
    assert "NOMAD_MEMORY_MAX_LIMIT" not in env_of(memory_max=0)
    assert env_of(memory_max=512) == BASE | {"NOMAD_MEMORY_MAX_LIMIT": "512"}


def test_namespace_and_region_are_the_identitys() -> None:
    who = TaskIdentity(
        alloc_id="abc",  # shorter than 8: all of it
        alloc_name="j.g[0]",
        alloc_index=0,
        job_id="j",
        job_name="j",
        group="g",
        task="t",
        datacenter="eu-west",
        namespace="prod",
        region="europe",
    )
    env = env_of(who=who)
    assert (env["NOMAD_NAMESPACE"], env["NOMAD_REGION"], env["NOMAD_DC"]) == (
        "prod",
        "europe",
        "eu-west",
    )
    assert (env["NOMAD_SHORT_ALLOC_ID"], env["NOMAD_ALLOC_INDEX"]) == ("abc", "0")
    assert env["NOMAD_TASK_DIR"] == f"{ROOT}/{ALLOC_ID}/t/local"


def test_port_variables_are_passed_through() -> None:
    assert env_of(ports=PORTS) == BASE | PORTS


def test_port_variable_names_are_cleaned() -> None:
    env = env_of(ports={"NOMAD_PORT_my-port": "80", "NOMAD_ADDR_my-port": "10.0.0.5:80"})
    assert env == BASE | {"NOMAD_PORT_my_port": "80", "NOMAD_ADDR_my_port": "10.0.0.5:80"}


# -- meta ----------------------------------------------------------------------------


def test_meta_as_given_and_upper_cased() -> None:
    env = env_of(meta=({"version": "1.2", "Owner": "ops"},))
    assert env == BASE | {
        "NOMAD_META_version": "1.2",
        "NOMAD_META_VERSION": "1.2",
        "NOMAD_META_Owner": "ops",
        "NOMAD_META_OWNER": "ops",
    }


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (({"k": "job"},), "job"),
        (({"k": "job"}, {"k": "group"}), "group"),
        (({"k": "job"}, {"k": "group"}, {"k": "task"}), "task"),
        (({"k": "job"}, {}, {"k": "task"}), "task"),
        (({"k": "job"}, {"k": "group"}, {}), "group"),
        (({}, {}, {"k": "task"}), "task"),
    ],
    ids=["job", "group-over-job", "task-over-all", "task-over-job", "group-kept", "task-only"],
)
def test_meta_task_over_group_over_job(layers: tuple[dict[str, str], ...], expected: str) -> None:
    env = env_of(meta=layers)
    assert (env["NOMAD_META_k"], env["NOMAD_META_K"]) == (expected, expected)


def test_meta_of_every_layer_is_merged() -> None:
    env = env_of(meta=({"job_only": "j"}, {"group_only": "g"}, {"task_only": "t"}))
    assert {k: v for k, v in env.items() if k.startswith("NOMAD_META_")} == {
        "NOMAD_META_job_only": "j",
        "NOMAD_META_JOB_ONLY": "j",
        "NOMAD_META_group_only": "g",
        "NOMAD_META_GROUP_ONLY": "g",
        "NOMAD_META_task_only": "t",
        "NOMAD_META_TASK_ONLY": "t",
    }


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("my-key", ("NOMAD_META_my_key", "NOMAD_META_MY_KEY")),
        ("a.b", ("NOMAD_META_a.b", "NOMAD_META_A.B")),
        ("with space", ("NOMAD_META_with_space", "NOMAD_META_WITH_SPACE")),
        ("1st", ("NOMAD_META_1st", "NOMAD_META_1ST")),  # digits are fine past the start
        ("clé", ("NOMAD_META_cl__", "NOMAD_META_CL__")),  # CleanEnvVar works on bytes
        ("a/b:c", ("NOMAD_META_a_b_c", "NOMAD_META_A_B_C")),
    ],
)
def test_meta_keys_are_cleaned(key: str, names: tuple[str, str]) -> None:
    env = env_of(meta=({key: "v"},))
    assert {k for k in env if k.startswith("NOMAD_META_")} == set(names)
    assert all(env[name] == "v" for name in names)


def test_meta_values_are_interpolated() -> None:
    env = env_of(ports=PORTS, meta=({"url": "http://${NOMAD_ADDR_http}/${NOMAD_TASK_NAME}"},))
    assert env["NOMAD_META_url"] == "http://10.0.0.5:24561/server"
    assert env["NOMAD_META_URL"] == "http://10.0.0.5:24561/server"


# -- the task's env ------------------------------------------------------------------


def test_task_env_is_interpolated_against_the_runtime_env() -> None:
    env = env_of(
        ports=PORTS,
        meta=({"version": "7"},),
        env={
            "LISTEN": "0.0.0.0:${NOMAD_PORT_http}",
            "DATA": "${NOMAD_ALLOC_DIR}/data",
            "VERSION": "v${NOMAD_META_version}",
            "UNSET": "${NOT_SET}",
            "PLAIN": "$NOMAD_PORT_http",
        },
    )
    assert env == BASE | PORTS | {
        "NOMAD_META_version": "7",
        "NOMAD_META_VERSION": "7",
        "LISTEN": "0.0.0.0:8080",
        "DATA": f"{ROOT}/{ALLOC_ID}/alloc/data",
        "VERSION": "v7",
        "UNSET": "${NOT_SET}",
        "PLAIN": "$NOMAD_PORT_http",
    }


def test_task_env_overrides_the_runtime_env() -> None:
    env = env_of(ports=PORTS, env={"NOMAD_TASK_NAME": "mine", "NOMAD_PORT_http": "9"})
    assert (env["NOMAD_TASK_NAME"], env["NOMAD_PORT_http"]) == ("mine", "9")


def test_host_env_interpolates_but_is_not_added() -> None:
    env = env_of(env={"GREETING": "hi ${USER}"}, host={"USER": "alice", "HOME": "/home/a"})
    assert env["GREETING"] == "hi alice"
    assert "USER" not in env
    assert "HOME" not in env


def test_the_runtime_env_wins_over_the_host_env_in_interpolation() -> None:
    env = env_of(env={"JOB": "${NOMAD_JOB_ID}"}, host={"NOMAD_JOB_ID": "from-host"})
    assert env["JOB"] == "web"


def test_task_env_names_with_nomads_prefixes_are_cleaned_others_kept() -> None:
    env = env_of(env={"NOMAD_META_my-key": "m", "MY-VAR": "x", "a.b": "y"})
    assert env == BASE | {"NOMAD_META_my_key": "m", "MY-VAR": "x", "a.b": "y"}


# -- interpolation -------------------------------------------------------------------


VARS = {"NOMAD_PORT_http": "8080", "A": "1", "B": "2", "a.b": "dot", "my-port": "dash", "E": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${NOMAD_PORT_http}", "8080"),
        ("port=${NOMAD_PORT_http}!", "port=8080!"),
        ("${FOO}", "${FOO}"),  # unknown: left as written
        ("$FOO", "$FOO"),  # no braces: not a variable
        ("$A", "$A"),
        ("${A}-${B}-${A}", "1-2-1"),
        ("${A}${FOO}${B}", "1${FOO}2"),
        ("${a.b}", "dot"),
        ("${my-port}", "dash"),
        ("${E}", ""),  # set to empty is set
        ("${}", "${}"),
        ("${A B}", "${A B}"),  # a space is not part of a name
        ("${A", "${A"),
        ("$${A}", "$1"),  # no escaping, as in Nomad
        ("${${A}}", "${1}"),  # one pass, innermost match
        ("", ""),
        ("no variables", "no variables"),
    ],
)
def test_interpolate(text: str, expected: str) -> None:
    assert interpolate(text, VARS) == expected


def test_interpolate_does_not_expand_what_it_put_in() -> None:
    assert interpolate("${X}", {"X": "${Y}", "Y": "no"}) == "${Y}"


# -- what the process gets -----------------------------------------------------------


DENIED = [
    "CONSUL_TOKEN",
    "CONSUL_HTTP_TOKEN",
    "VAULT_TOKEN",
    "NOMAD_LICENSE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "NOMAD_TOKEN",
    "WAYPOST_TOKEN",
]


@pytest.mark.parametrize("name", DENIED)
def test_process_env_drops_the_denylist(name: str) -> None:
    host = {"PATH": "/usr/bin", name: "secret"}
    assert process_env({"NOMAD_TASK_NAME": "server"}, host) == {
        "PATH": "/usr/bin",
        "NOMAD_TASK_NAME": "server",
    }


def test_process_env_keeps_the_rest_of_the_host_env() -> None:
    host = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "CONSUL_HTTP_ADDR": "x:8500"}
    assert process_env({}, host) == host


def test_process_env_runtime_wins_over_host() -> None:
    host = {"PATH": "/usr/bin", "NOMAD_TASK_NAME": "host", "TZ": "UTC"}
    runtime = {"NOMAD_TASK_NAME": "server", "TZ": "Europe/Paris"}
    assert process_env(runtime, host) == {
        "PATH": "/usr/bin",
        "NOMAD_TASK_NAME": "server",
        "TZ": "Europe/Paris",
    }


def test_a_task_may_set_a_denylisted_name_itself() -> None:
    out = process_env({"VAULT_TOKEN": "the-tasks"}, {"VAULT_TOKEN": "the-agents"})
    assert out == {"VAULT_TOKEN": "the-tasks"}


def test_process_env_of_a_whole_runtime_env() -> None:
    runtime = env_of(env={"X": "${HOME}"}, host={"HOME": "/root"})
    out = process_env(runtime, {"HOME": "/root", "NOMAD_TOKEN": "t", "PATH": "/bin"})
    assert out == BASE | {"X": "/root", "HOME": "/root", "PATH": "/bin"}


# -- directories ---------------------------------------------------------------------


def test_alloc_dirs_paths() -> None:
    dirs = alloc_dirs("/srv/allocs", "abc")
    assert dirs == AllocDirs(PurePath("/srv/allocs/abc"))
    assert (dirs.root, dirs.shared, dirs.logs, dirs.task("web")) == (
        PurePath("/srv/allocs/abc"),
        PurePath("/srv/allocs/abc/alloc"),
        PurePath("/srv/allocs/abc/alloc/logs"),
        PurePath("/srv/allocs/abc/web"),
    )


def test_all_for_lists_every_directory_parents_first() -> None:
    dirs = alloc_dirs("/srv/allocs", "abc")
    expected = [
        "/srv/allocs/abc",
        "/srv/allocs/abc/alloc",
        "/srv/allocs/abc/alloc/data",
        "/srv/allocs/abc/alloc/logs",
        "/srv/allocs/abc/alloc/tmp",
        "/srv/allocs/abc/web",
        "/srv/allocs/abc/web/local",
        "/srv/allocs/abc/web/secrets",
        "/srv/allocs/abc/web/tmp",
        "/srv/allocs/abc/db",
        "/srv/allocs/abc/db/local",
        "/srv/allocs/abc/db/secrets",
        "/srv/allocs/abc/db/tmp",
    ]
    assert dirs.all_for(["web", "db"]) == [PurePath(p) for p in expected]


@pytest.mark.parametrize("tasks", [[], ["web"], ["a", "b", "c"]])
def test_all_for_makes_each_parent_before_its_children(tasks: list[str]) -> None:
    dirs = alloc_dirs("/srv/allocs", "abc")
    made = dirs.all_for(tasks)
    assert made[0] == dirs.root
    assert len(set(made)) == len(made)
    for i, path in enumerate(made[1:], start=1):
        assert path.parent in made[:i]
    assert dirs.logs in made
    assert all(dirs.task(t) / "local" in made for t in tasks)


def test_the_env_directories_are_among_those_made() -> None:
    made = DIRS.all_for(["server"])
    env = env_of()
    for key in ("NOMAD_ALLOC_DIR", "NOMAD_TASK_DIR", "NOMAD_SECRETS_DIR"):
        assert PurePath(env[key]) in made
