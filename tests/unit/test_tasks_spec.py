"""discovery.tasks.spec: a task and its restart policy from Nomad's JSON, and back.  Pure.

The defaults are written out as numbers from Nomad's structs (DefaultResources,
DefaultLogConfig, DefaultKillTimeout, DefaultServiceJobRestartPolicy), not read
from the module's constants, so a changed default fails here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from discovery.errors import ValidationError
from discovery.jobs import parse_job
from discovery.tasks.spec import (
    LogConfig,
    RestartPolicy,
    TaskSpec,
    parse_restart,
    parse_task,
    render_restart,
    render_task,
)

P = "Job.TaskGroups[0].Tasks[0]"
MINIMAL: dict[str, Any] = {"Name": "web", "Driver": "raw_exec", "Config": {"command": "sleep"}}
NS = 10**9  # nanoseconds in a second: Nomad's API durations

FULL: dict[str, Any] = {
    "Name": "server",
    "Driver": "exec",
    "Config": {"command": "/usr/bin/python3", "args": ["-m", "http.server", "${NOMAD_PORT_http}"]},
    "Env": {"PORT": "${NOMAD_PORT_http}", "MODE": "prod"},
    "User": "nobody",
    "Meta": {"team": "core", "tier": "1"},
    "Resources": {"CPU": 250, "MemoryMB": 128, "MemoryMaxMB": 256},
    "KillTimeout": 20 * NS,
    "KillSignal": "SIGTERM",
    "LogConfig": {"MaxFiles": 3, "MaxFileSizeMB": 2, "Disabled": True},
    "RestartPolicy": {"Attempts": 5, "Interval": 600 * NS, "Delay": "30s", "Mode": "delay"},
}
FULL_SPEC = TaskSpec(
    name="server",
    command="/usr/bin/python3",
    args=("-m", "http.server", "${NOMAD_PORT_http}"),
    driver="exec",
    env=(("MODE", "prod"), ("PORT", "${NOMAD_PORT_http}")),
    user="nobody",
    meta=(("team", "core"), ("tier", "1")),
    cpu=250,
    memory=128,
    memory_max=256,
    kill_timeout=20.0,
    kill_signal="SIGTERM",
    logs=LogConfig(max_files=3, max_file_size_mb=2, disabled=True),
    restart=RestartPolicy(attempts=5, interval=600.0, delay=30.0, mode="delay"),
)


def task(**changes: Any) -> dict[str, Any]:
    """MINIMAL with `changes`; a value of None removes the key."""
    out = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# -- every field -------------------------------------------------------------------


def test_every_field_is_read() -> None:
    assert parse_task(FULL, P) == FULL_SPEC


def test_defaults_are_nomads() -> None:
    spec = parse_task(MINIMAL, P)
    assert spec == TaskSpec(name="web", command="sleep", driver="raw_exec")
    assert (spec.args, spec.env, spec.user, spec.meta) == ((), (), "", ())
    assert (spec.cpu, spec.memory, spec.memory_max) == (100, 300, 0)  # MHz, MB
    assert (spec.kill_timeout, spec.kill_signal, spec.signal_number) == (5.0, "SIGINT", 2)
    assert spec.logs == LogConfig(max_files=10, max_file_size_mb=10, disabled=False)
    assert spec.logs.max_file_size == 10 * 1024 * 1024
    assert spec.restart is None  # the group's applies


@pytest.mark.parametrize("raw", [None, {}])
def test_restart_policy_defaults_are_nomads_for_service_jobs(raw: object) -> None:
    policy = parse_restart(raw, f"{P}.RestartPolicy")
    assert (policy.attempts, policy.interval, policy.delay, policy.mode) == (
        2,
        1800.0,
        15.0,
        "fail",
    )
    assert policy == RestartPolicy()


@pytest.mark.parametrize("driver", ["exec", "raw_exec"])
def test_both_drivers_are_accepted(driver: str) -> None:
    assert parse_task(task(Driver=driver), P).driver == driver


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (20 * NS, 20.0),  # Nomad's API: integer nanoseconds
        (250_000_000, 0.25),
        (0, 0.0),
        ("20s", 20.0),  # a Go duration string
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("1h", 3600.0),  # the upper bound itself
        (3600 * NS, 3600.0),
    ],
)
def test_kill_timeout(raw: object, seconds: float) -> None:
    assert parse_task(task(KillTimeout=raw), P).kill_timeout == seconds


@pytest.mark.parametrize(
    ("raw", "name", "number"),
    [
        ("SIGTERM", "SIGTERM", 15),
        ("sigterm", "SIGTERM", 15),
        ("SIGKILL", "SIGKILL", 9),
        ("SIGHUP", "SIGHUP", 1),
        ("SIGUSR1", "SIGUSR1", 10),
        ("", "SIGINT", 2),  # empty is the default, as in Nomad
    ],
)
def test_kill_signal(raw: str, name: str, number: int) -> None:
    spec = parse_task(task(KillSignal=raw), P)
    assert (spec.kill_signal, spec.signal_number) == (name, number)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"CPU": 500}, (500, 300, 0)),
        ({"MemoryMB": 64}, (100, 64, 0)),
        ({"MemoryMB": 64, "MemoryMaxMB": 128}, (100, 64, 128)),
        ({"CPU": 1, "MemoryMB": 10}, (1, 10, 0)),  # Nomad's MinResources
        ({"CPU": None, "MemoryMB": None}, (100, 300, 0)),  # nulls: the defaults
        ({"DiskMB": 300, "IOPS": 0, "Cores": 0, "Devices": None}, (100, 300, 0)),  # ignored
        ({"NUMA": None, "SecretsMB": 0}, (100, 300, 0)),
    ],
)
def test_resources(raw: dict[str, Any], expected: tuple[int, int, int]) -> None:
    spec = parse_task(task(Resources=raw), P)
    assert (spec.cpu, spec.memory, spec.memory_max) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, LogConfig(10, 10, False)),
        ({"MaxFiles": 1}, LogConfig(1, 10, False)),
        ({"MaxFileSizeMB": 50}, LogConfig(10, 50, False)),
        ({"Disabled": True}, LogConfig(10, 10, True)),
        ({"Disabled": False, "Enabled": True}, LogConfig(10, 10, False)),  # Enabled: ignored
        ({"MaxFiles": 1000, "MaxFileSizeMB": 4096}, LogConfig(1000, 4096, False)),
    ],
)
def test_log_config(raw: dict[str, Any], expected: LogConfig) -> None:
    assert parse_task(task(LogConfig=raw), P).logs == expected


def test_log_file_size_is_in_mebibytes() -> None:
    assert LogConfig(max_file_size_mb=3).max_file_size == 3 * 1048576


def test_env_and_meta_are_sorted_pairs() -> None:
    spec = parse_task(task(Env={"B": "2", "A": "1", "C": ""}, Meta={"z": "9", "a": "0"}), P)
    assert spec.env == (("A", "1"), ("B", "2"), ("C", ""))
    assert spec.meta == (("a", "0"), ("z", "9"))


def test_nulls_read_as_absent() -> None:
    keys = ("Env", "User", "Meta", "Resources", "KillTimeout", "KillSignal", "LogConfig")
    raw = MINIMAL | dict.fromkeys((*keys, "RestartPolicy"))
    assert parse_task(raw, P) == TaskSpec(name="web", command="sleep", driver="raw_exec")


def test_args_null_is_no_args() -> None:
    assert parse_task(task(Config={"command": "sleep", "args": None}), P).args == ()


# -- restart policies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"Attempts": 0}, RestartPolicy(0, 1800.0, 15.0, "fail")),
        ({"Attempts": 10, "Interval": "5m"}, RestartPolicy(10, 300.0, 15.0, "fail")),
        ({"Delay": 1 * NS}, RestartPolicy(2, 1800.0, 1.0, "fail")),
        ({"Mode": "delay", "Delay": "30m"}, RestartPolicy(2, 1800.0, 1800.0, "delay")),
        ({"Mode": "", "Attempts": None}, RestartPolicy()),
        ({"RenderTemplates": True}, RestartPolicy()),  # ignored
    ],
)
def test_parse_restart(raw: dict[str, Any], expected: RestartPolicy) -> None:
    assert parse_restart(raw, "RestartPolicy") == expected


def test_parse_restart_keeps_what_is_absent_from_its_base() -> None:
    base = RestartPolicy(attempts=3, interval=60.0, delay=5.0, mode="delay")
    assert parse_restart({"Attempts": 7}, "p", base) == RestartPolicy(7, 60.0, 5.0, "delay")
    assert parse_restart(None, "p", base) == base


def test_a_tasks_restart_policy_is_its_own() -> None:
    raw = task(RestartPolicy={"Attempts": 4, "Interval": "10m", "Delay": "1s", "Mode": "fail"})
    assert parse_task(raw, P).restart == RestartPolicy(4, 600.0, 1.0, "fail")


def test_a_tasks_partial_restart_policy_is_merged_over_the_groups() -> None:
    group = {
        "Name": "api",
        "RestartPolicy": {"Attempts": 5, "Interval": "10m", "Delay": "1m", "Mode": "delay"},
        "Tasks": [task(RestartPolicy={"Attempts": 1})],
    }
    spec = parse_job({"Job": {"ID": "web", "TaskGroups": [group]}}).groups[0]
    assert spec.restart_of(spec.tasks[0]) == RestartPolicy(1, 600.0, 60.0, "delay")


# -- round trips ---------------------------------------------------------------------


def test_render_task_is_nomads_shape() -> None:
    assert render_task(FULL_SPEC) == {
        "Name": "server",
        "Driver": "exec",
        "User": "nobody",
        "Config": {
            "command": "/usr/bin/python3",
            "args": ["-m", "http.server", "${NOMAD_PORT_http}"],
        },
        "Env": {"MODE": "prod", "PORT": "${NOMAD_PORT_http}"},
        "Meta": {"team": "core", "tier": "1"},
        "Resources": {"CPU": 250, "MemoryMB": 128, "MemoryMaxMB": 256},
        "KillTimeout": 20_000_000_000,
        "KillSignal": "SIGTERM",
        "LogConfig": {"MaxFiles": 3, "MaxFileSizeMB": 2, "Disabled": True},
        "RestartPolicy": {
            "Attempts": 5,
            "Interval": 600_000_000_000,
            "Delay": 30_000_000_000,
            "Mode": "delay",
            "RenderTemplates": False,
        },
    }


def test_render_task_without_its_own_restart_policy_has_none() -> None:
    assert "RestartPolicy" not in render_task(parse_task(MINIMAL, P))


@pytest.mark.parametrize(
    "raw",
    [
        MINIMAL,
        FULL,
        task(KillTimeout="250ms", KillSignal="sighup"),
        task(Config={"command": "/bin/sh", "args": ["-c", "echo 'a b'", ""]}),
        task(RestartPolicy={"Attempts": 0}, LogConfig={"MaxFiles": 1}),
        task(Env={"A": "${B}", "B": "x=y"}, User="www-data", Resources={"CPU": 7}),
    ],
    ids=["minimal", "full", "durations", "args", "restart", "env"],
)
def test_parse_render_round_trip(raw: dict[str, Any]) -> None:
    spec = parse_task(raw, P)
    assert parse_task(render_task(spec), P) == spec


@pytest.mark.parametrize(
    "policy",
    [
        RestartPolicy(),
        RestartPolicy(0, 1.0, 0.0, "fail"),
        RestartPolicy(7, 90.5, 0.25, "delay"),
    ],
)
def test_restart_round_trip(policy: RestartPolicy) -> None:
    rendered = render_restart(policy)
    assert isinstance(rendered["Interval"], int)
    assert parse_restart(rendered, "p") == policy


# -- bad inputs ----------------------------------------------------------------------


BAD: list[tuple[str, object, str]] = [
    ("not an object", "web", P),
    ("no name", task(Name=None), f"{P}.Name"),
    ("empty name", task(Name=""), f"{P}.Name"),
    ("name starts with -", task(Name="-web"), f"{P}.Name"),
    ("name with /", task(Name="a/b"), f"{P}.Name"),
    ("name with space", task(Name="a b"), f"{P}.Name"),
    ("name of 129", task(Name="a" * 129), f"{P}.Name"),
    ("name not a string", task(Name=7), f"{P}.Name"),
    ("no driver", task(Driver=None), f"{P}.Driver"),
    ("docker", task(Driver="docker"), f"{P}.Driver"),
    ("driver case", task(Driver="EXEC"), f"{P}.Driver"),
    ("driver not a string", task(Driver=["exec"]), f"{P}.Driver"),
    ("no config", task(Config=None), f"{P}.Config"),
    ("config a string", task(Config="sleep"), f"{P}.Config"),
    ("no command", task(Config={}), f"{P}.Config.command"),
    ("empty command", task(Config={"command": ""}), f"{P}.Config.command"),
    ("command not a string", task(Config={"command": ["sleep"]}), f"{P}.Config.command"),
    ("NUL in command", task(Config={"command": "a\x00b"}), f"{P}.Config.command"),
    ("args a string", task(Config={"command": "x", "args": "60"}), f"{P}.Config.args"),
    ("arg a number", task(Config={"command": "x", "args": ["a", 60]}), f"{P}.Config.args[1]"),
    ("NUL in arg", task(Config={"command": "x", "args": ["a\x00"]}), f"{P}.Config.args"),
    ("image", task(Config={"command": "x", "image": "redis"}), f"{P}.Config.image"),
    ("pid_mode", task(Config={"command": "x", "pid_mode": "host"}), f"{P}.Config.pid_mode"),
    ("env a list", task(Env=["A=1"]), f"{P}.Env"),
    ("env value a number", task(Env={"A": 1}), f"{P}.Env.A"),
    ("env name with =", task(Env={"A=B": "1"}), f"{P}.Env.A=B"),
    ("env name with NUL", task(Env={"A\x00": "1"}), f"{P}.Env.A\x00"),
    ("env name empty", task(Env={"": "1"}), f"{P}.Env."),
    ("meta a list", task(Meta=["a"]), f"{P}.Meta"),
    ("meta value a bool", task(Meta={"k": True}), f"{P}.Meta.k"),
    ("user a number", task(User=0), f"{P}.User"),
    ("resources a number", task(Resources=100), f"{P}.Resources"),
    ("cpu 0", task(Resources={"CPU": 0}), f"{P}.Resources.CPU"),
    ("cpu a string", task(Resources={"CPU": "100"}), f"{P}.Resources.CPU"),
    ("cpu a bool", task(Resources={"CPU": True}), f"{P}.Resources.CPU"),
    ("cpu a float", task(Resources={"CPU": 100.0}), f"{P}.Resources.CPU"),
    ("memory 9", task(Resources={"MemoryMB": 9}), f"{P}.Resources.MemoryMB"),
    ("memory max a string", task(Resources={"MemoryMaxMB": "1G"}), f"{P}.Resources.MemoryMaxMB"),
    ("resources Memory", task(Resources={"Memory": 100}), f"{P}.Resources.Memory"),
    ("kill timeout negative", task(KillTimeout=-1), f"{P}.KillTimeout"),
    ("kill timeout a float", task(KillTimeout=1.5), f"{P}.KillTimeout"),
    ("kill timeout a bool", task(KillTimeout=True), f"{P}.KillTimeout"),
    ("kill timeout no unit", task(KillTimeout="5"), f"{P}.KillTimeout"),
    ("kill timeout words", task(KillTimeout="5 seconds"), f"{P}.KillTimeout"),
    ("kill timeout over an hour", task(KillTimeout=3601 * NS), f"{P}.KillTimeout"),
    ("kill timeout 2h", task(KillTimeout="2h"), f"{P}.KillTimeout"),
    ("kill signal unknown", task(KillSignal="SIGFOO"), f"{P}.KillSignal"),
    ("kill signal a number", task(KillSignal=15), f"{P}.KillSignal"),
    ("kill signal without SIG", task(KillSignal="TERM"), f"{P}.KillSignal"),
    ("log config a list", task(LogConfig=[]), f"{P}.LogConfig"),
    ("max files 0", task(LogConfig={"MaxFiles": 0}), f"{P}.LogConfig.MaxFiles"),
    ("max files 1001", task(LogConfig={"MaxFiles": 1001}), f"{P}.LogConfig.MaxFiles"),
    ("max size 0", task(LogConfig={"MaxFileSizeMB": 0}), f"{P}.LogConfig.MaxFileSizeMB"),
    ("max size 4097", task(LogConfig={"MaxFileSizeMB": 4097}), f"{P}.LogConfig.MaxFileSizeMB"),
    ("disabled a string", task(LogConfig={"Disabled": "yes"}), f"{P}.LogConfig.Disabled"),
    ("disabled 1", task(LogConfig={"Disabled": 1}), f"{P}.LogConfig.Disabled"),
    ("log config Enable", task(LogConfig={"Enable": True}), f"{P}.LogConfig.Enable"),
    ("restart a string", task(RestartPolicy="fail"), f"{P}.RestartPolicy"),
    ("restart mode", task(RestartPolicy={"Mode": "never"}), f"{P}.RestartPolicy.Mode"),
    ("attempts -1", task(RestartPolicy={"Attempts": -1}), f"{P}.RestartPolicy.Attempts"),
    ("attempts a string", task(RestartPolicy={"Attempts": "2"}), f"{P}.RestartPolicy.Attempts"),
    ("interval 0", task(RestartPolicy={"Interval": 0}), f"{P}.RestartPolicy.Interval"),
    ("interval bad", task(RestartPolicy={"Interval": "soon"}), f"{P}.RestartPolicy.Interval"),
    ("delay negative", task(RestartPolicy={"Delay": -5}), f"{P}.RestartPolicy.Delay"),
    (
        "delay over interval in mode delay",
        task(RestartPolicy={"Mode": "delay", "Interval": "30m", "Delay": "31m"}),
        f"{P}.RestartPolicy.Delay",
    ),
    ("restart Tries", task(RestartPolicy={"Tries": 3}), f"{P}.RestartPolicy.Tries"),
    ("unknown task field", task(Nmae="web"), f"{P}.Nmae"),
    ("lowercase key", task(driver="exec"), f"{P}.driver"),
    ("Services without known", task(Services=[]), f"{P}.Services"),
    ("Templates", task(Templates=[{"DestPath": "local/x"}]), f"{P}.Templates"),
    ("Artifacts", task(Artifacts=[{"GetterSource": "x"}]), f"{P}.Artifacts"),
    ("Lifecycle", task(Lifecycle={"Hook": "prestart"}), f"{P}.Lifecycle"),
]


@pytest.mark.parametrize(("raw", "field"), [(r, f) for _, r, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_names_its_json_path(raw: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(raw, P)
    assert err.value.field == field


def test_a_wrong_driver_names_the_task_and_the_driver() -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(task(Name="cache", Driver="docker"), P)
    assert "'cache'" in err.value.message
    assert "'docker'" in err.value.message
    assert str(err.value).startswith(f"{P}.Driver: ")


def test_no_driver_says_so() -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(task(Name="cache", Driver=None), P)
    assert "'cache'" in err.value.message
    assert "no driver" in err.value.message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (task(Nmae="web"), "unknown field"),
        (
            task(Config={"command": "x", "image": "redis"}),
            "is not supported by waypost's exec driver",
        ),
        (task(Templates=[{"DestPath": "local/x"}]), "is not supported by waypost"),
        (task(Lifecycle={}), "is not supported by waypost"),
    ],
)
def test_unknown_and_unsupported_fields_say_which(raw: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(raw, P)
    assert err.value.message == message


def test_the_callers_known_fields_are_allowed() -> None:
    raw = task(Services=[{"Name": "web"}])
    assert parse_task(raw, P, known=frozenset({"Services"})).name == "web"


IGNORED: dict[str, object] = {
    "Constraints": [{"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="}],
    "Affinities": None,
    "Leader": False,
    "ShutdownDelay": 0,
    "Kind": "",
    "ScalingPolicies": None,
    "Identity": None,
    "Identities": None,
    "Consul": None,
    "Actions": None,
    "Schedule": None,
    "KillTimeoutHCL": "",
}


@pytest.mark.parametrize(("key", "value"), IGNORED.items(), ids=IGNORED.keys())
def test_ignored_nomad_fields_are_accepted(key: str, value: object) -> None:
    assert parse_task(task() | {key: value}, P) == parse_task(MINIMAL, P)


def test_all_ignored_fields_together_are_accepted() -> None:
    assert parse_task(task() | IGNORED, P) == parse_task(MINIMAL, P)


EXPORTED_NULLS: dict[str, dict[str, Any]] = {
    "unsupported fields": dict.fromkeys(
        ("Templates", "Artifacts", "Vault", "VolumeMounts", "Lifecycle", "DispatchPayload")
    ),
    "empty lists": {"Templates": [], "Artifacts": [], "VolumeMounts": []},
    "Resources.Networks": {"Resources": {"CPU": 100, "MemoryMB": 300, "Networks": None}},
}


@pytest.mark.parametrize("extra", EXPORTED_NULLS.values(), ids=EXPORTED_NULLS.keys())
def test_a_task_as_nomad_exports_it_is_accepted(extra: dict[str, Any]) -> None:
    assert parse_task(task() | extra, P) == parse_task(MINIMAL, P)


@pytest.mark.parametrize("name", ["web\n", "a" * 128 + "\n"], ids=["short", "longest"])
def test_a_name_with_a_trailing_newline_is_refused(name: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(task(Name=name), P)
    assert err.value.field == f"{P}.Name"


def test_the_longest_name_is_accepted() -> None:
    assert parse_task(task(Name="a" * 128), P).name == "a" * 128


@pytest.mark.parametrize("name", ["web", "Web-1", "a.b_c", "0", "x" * 128])
def test_good_names(name: str) -> None:
    assert parse_task(task(Name=name), P).name == name


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (task(Env={"A": "x\x00y"}), f"{P}.Env.A"),
        (task(Meta={"k": "x\x00y"}), f"{P}.Meta.k"),
    ],
    ids=["env", "meta"],
)
def test_nul_in_env_and_meta_values_is_refused(raw: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(raw, P)
    assert err.value.field == field


def test_memory_max_below_memory_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        parse_task(task(Resources={"MemoryMB": 128, "MemoryMaxMB": 64}), P)
    assert err.value.field == f"{P}.Resources.MemoryMaxMB"
