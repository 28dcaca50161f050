"""HCL jobspecs into Nomad's API JSON (discovery.jobspec, through the real python-hcl2
in discovery.hclfile), and the warnings discovery.jobs gives for ignored fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from discovery.errors import ConfigError
from discovery.hclfile import hcl_to_json, parse_jobspec
from discovery.jobs import parse_job
from discovery.jobspec import canonicalize

ROOT = Path(__file__).resolve().parents[2]
S = 10**9  # a second in nanoseconds


def _job(body: str, group: str = "", task: str = 'driver = "raw_exec"\nconfig { command = "x" }'):
    """A jobspec of one group "g" and one task "t" around the given HCL."""
    return f'job "j" {{\n{body}\ngroup "g" {{\n{group}\ntask "t" {{\n{task}\n}}\n}}\n}}\n'


def _group(text: str) -> dict[str, Any]:
    group: dict[str, Any] = hcl_to_json(text)["Job"]["TaskGroups"][0]
    return group


def _task(text: str) -> dict[str, Any]:
    task: dict[str, Any] = _group(text)["Tasks"][0]
    return task


# (the HCL inside a group, the JSON key of the group, what it becomes)
GROUP_CASES = [
    ("count = 3", "Count", 3),
    ('meta { a = "1"\n b = 2 }', "Meta", {"a": "1", "b": "2"}),
    ('meta = { "a.b" = "x" }', "Meta", {"a.b": "x"}),
    (
        'network {\n port "http" {}\n}',
        "Networks",
        [{"DynamicPorts": [{"Label": "http"}]}],
    ),
    (
        'network {\n mode = "bridge"\n port "http" { to = 3000 }\n}',
        "Networks",
        [{"Mode": "bridge", "DynamicPorts": [{"Label": "http", "To": 3000}]}],
    ),
    (
        'network {\n port "http" {\n static = 8080\n to = 80\n }\n port "admin" {}\n}',
        "Networks",
        [
            {
                "ReservedPorts": [{"Label": "http", "Value": 8080, "To": 80}],
                "DynamicPorts": [{"Label": "admin"}],
            }
        ],
    ),
    (
        'network {\n port "a" { host_network = "public" }\n}',
        "Networks",
        [{"DynamicPorts": [{"Label": "a", "HostNetwork": "public"}]}],
    ),
    (
        'network {\n dns {\n servers = ["1.1.1.1"]\n searches = ["x"]\n'
        ' options = ["ndots:2"]\n}\n}',
        "Networks",
        [{"DNS": {"Servers": ["1.1.1.1"], "Searches": ["x"], "Options": ["ndots:2"]}}],
    ),
    (
        'restart {\n attempts = 3\n interval = "5m"\n delay = "2s"\n mode = "delay"\n}',
        "RestartPolicy",
        {"Attempts": 3, "Interval": 300 * S, "Delay": 2 * S, "Mode": "delay"},
    ),
    (
        'service {\n name = "web"\n port = "http"\n tags = ["a", "b"]\n meta { v = "1" }\n'
        ' address_mode = "host"\n provider = "nomad"\n}',
        "Services",
        [
            {
                "Name": "web",
                "PortLabel": "http",
                "Tags": ["a", "b"],
                "Meta": {"v": "1"},
                "AddressMode": "host",
                "Provider": "nomad",
            }
        ],
    ),
    ('service {\n name = "n"\n port = 8080\n}', "Services", [{"Name": "n", "PortLabel": "8080"}]),
    (
        'service {\n name = "web"\n check {\n name = "alive"\n type = "http"\n path = "/health"\n'
        ' method = "GET"\n interval = "10s"\n timeout = "2s"\n port = "admin"\n'
        ' protocol = "https"\n header { X-Probe = ["v", "w"] }\n }\n}',
        "Services",
        [
            {
                "Name": "web",
                "Checks": [
                    {
                        "Name": "alive",
                        "Type": "http",
                        "Path": "/health",
                        "Method": "GET",
                        "Interval": 10 * S,
                        "Timeout": 2 * S,
                        "PortLabel": "admin",
                        "Protocol": "https",
                        "Header": {"X-Probe": ["v", "w"]},
                    }
                ],
            }
        ],
    ),
    ("update { max_parallel = 2 }", "Update", {"MaxParallel": 2}),
    ('reschedule { delay = "30s" }', "ReschedulePolicy", {"Delay": "30s"}),
]


@pytest.mark.parametrize(("hcl", "key", "expected"), GROUP_CASES)
def test_group_blocks_become_nomads_json(hcl: str, key: str, expected: object) -> None:
    assert _group(_job("", hcl))[key] == expected


TASK_CASES = [
    ('driver = "exec"', "Driver", "exec"),
    ('user = "nobody"', "User", "nobody"),
    (
        'config {\n command = "python3"\n args = ["-m", "http.server"]\n}',
        "Config",
        {"command": "python3", "args": ["-m", "http.server"]},
    ),
    ('env { A = "1"\n B = 2 }', "Env", {"A": "1", "B": "2"}),
    ('env = { "A.B" = "x" }', "Env", {"A.B": "x"}),
    ('meta { m = "v" }', "Meta", {"m": "v"}),
    (
        "resources {\n cpu = 200\n memory = 128\n memory_max = 256\n}",
        "Resources",
        {"CPU": 200, "MemoryMB": 128, "MemoryMaxMB": 256},
    ),
    (
        "logs {\n max_files = 3\n max_file_size = 5\n}",
        "LogConfig",
        {"MaxFiles": 3, "MaxFileSizeMB": 5},
    ),
    ('kill_timeout = "7s"', "KillTimeout", 7 * S),
    ('kill_signal = "SIGTERM"', "KillSignal", "SIGTERM"),
    ("restart { attempts = 1 }", "RestartPolicy", {"Attempts": 1}),
    (
        'service {\n name = "s"\n port = "http"\n}',
        "Services",
        [{"Name": "s", "PortLabel": "http"}],
    ),
    ('template { data = "x" }', "Templates", [{"Data": "x"}]),
    (
        'constraint {\n attribute = "${attr.kernel.name}"\n value = "linux"\n}',
        "Constraints",
        [{"LTarget": "${attr.kernel.name}", "RTarget": "linux"}],
    ),
]


@pytest.mark.parametrize(("hcl", "key", "expected"), TASK_CASES)
def test_task_blocks_become_nomads_json(hcl: str, key: str, expected: object) -> None:
    prefix = "" if hcl.startswith("driver") else 'driver = "raw_exec"\n'
    task = _task(_job("", "", prefix + hcl))
    assert task[key] == expected


def test_the_job_block() -> None:
    text = _job('type = "service"\ndatacenters = ["dc1"]\nmeta { owner = "ops" }')
    job = hcl_to_json(text)["Job"]
    assert (job["ID"], job["Name"], job["Type"]) == ("j", "j", "service")
    assert (job["Datacenters"], job["Meta"]) == (["dc1"], {"owner": "ops"})
    assert hcl_to_json(_job('name = "other"'))["Job"]["Name"] == "other"
    assert _task(text) == {"Name": "t", "Driver": "raw_exec", "Config": {"command": "x"}}


def test_a_task_outside_a_group_is_a_group_of_its_own() -> None:
    job = hcl_to_json('job "j" {\n task "solo" {\n driver = "raw_exec"\n}\n}\n')["Job"]
    assert job["TaskGroups"] == [
        {"Name": "solo", "Tasks": [{"Name": "solo", "Driver": "raw_exec"}]}
    ]


VARIABLES = """
variable "port" {
  type    = number
  default = 8080
}
variable "tags" { default = ["a", "b"] }
variable "name" {
  description = "the service"
  default     = "web"
}
locals {
  label = "${var.name}-${local.suffix}"
  suffix = "v1"
  all = local.tags
  tags = var.tags
}
"""


def test_variables_and_locals() -> None:
    group = 'network {\n port "http" { static = var.port }\n}\nservice {\n name = local.label\n'
    group += ' tags = local.all\n meta { port = "${var.port}" }\n}'
    data = _group(VARIABLES + _job("", group))
    assert data["Networks"][0]["ReservedPorts"] == [{"Label": "http", "Value": 8080}]
    assert data["Services"] == [{"Name": "web-v1", "Tags": ["a", "b"], "Meta": {"port": "8080"}}]
    over = hcl_to_json(VARIABLES + _job("", group), variables={"port": "9090", "name": "api"})
    group_json = over["Job"]["TaskGroups"][0]
    assert group_json["Networks"][0]["ReservedPorts"][0]["Value"] == 9090  # "9090" as a number
    assert group_json["Services"][0]["Name"] == "api-v1"


def test_a_variables_file_and_a_variables_block() -> None:
    text = 'variables { n = 2 }\nvariable "m" {}\n' + _job("", "count = var.n\nmeta { m = var.m }")
    spec = parse_jobspec(text, variables_text='m = "x"\nn = 4\n')
    assert _group_of(spec.body) == (4, {"m": "x"})


def _group_of(body: dict[str, Any]) -> tuple[object, object]:
    group = body["Job"]["TaskGroups"][0]
    return group["Count"], group["Meta"]


def test_heredocs_and_escapes() -> None:
    task = 'driver = "raw_exec"\nconfig {\n command = "sh"\n args = ["-c", <<-EOF\n'
    task += '    echo "${var.name}" \\n $${HOME}\n      indented ${NOMAD_PORT_http}\n    EOF\n'
    task += ', <<EOF\nplain ${var.name}\nEOF\n, "tab\\there $${x} ${NOMAD_ALLOC_ID}"]\n}'
    args = _task(VARIABLES + _job("", "", task))["Config"]["args"]
    assert args == [
        "-c",
        'echo "web" \\n ${HOME}\n  indented ${NOMAD_PORT_http}\n',
        "plain web\n",
        "tab\there ${x} ${NOMAD_ALLOC_ID}",
    ]


RUNTIME = [
    '"${NOMAD_PORT_http}"',
    '"${NOMAD_IP_http}:${NOMAD_PORT_http}"',
    '"${attr.kernel.name}"',
    '"${node.unique.id}"',
    '"${meta.rack}"',
    '"${NOMAD_META_x}"',
]


@pytest.mark.parametrize("value", RUNTIME)
def test_runtime_interpolations_are_left_as_written(value: str) -> None:
    task = _task(_job("", "", f'driver = "raw_exec"\nenv {{ X = {value} }}'))
    assert task["Env"]["X"] == json.loads(value)


def test_a_bare_runtime_reference_is_written_back_as_interpolation() -> None:
    task = _task(_job("", "", "driver = NOMAD_X\nuser = attr.a.b"))
    assert (task["Driver"], task["User"]) == ("${NOMAD_X}", "${attr.a.b}")


# (the HCL of a file, its line in error, the key path, a piece of the message)
ERRORS = [
    (_job("", 'count = upper("x")'), 4, "job.j.group.g.count", "a function call"),
    (_job("", "count = true ? 1 : 2"), 4, "job.j.group.g.count", "a conditional"),
    (_job("", "meta { a = 1 + 2 }"), 4, "job.j.group.g.meta.a", "an operator"),
    (_job("", "meta = { for k in [1] : k => k }"), 4, "job.j.group.g.meta", "a for expression"),
    (_job("", 'meta { a = "%{ if true }x%{ endif }" }'), 4, "job.j.group.g.meta.a", "directive"),
    (_job("", "count = var.nope"), 4, "job.j.group.g.count", "no variable 'nope'"),
    (_job("", "count = local.nope"), 4, "job.j.group.g.count", "no local 'nope'"),
    (_job("", "cuont = 1"), 4, "job.j.group.g.cuont", "unknown attribute"),
    (_job("", "netwrok {}"), 4, "job.j.group.g.netwrok", "unknown block"),
    (_job("", 'count = "three"'), 4, "job.j.group.g.count", "whole number"),
    (_job("", "network = 1"), 4, "job.j.group.g.network", "is a block"),
    (_job("", "restart {}\nrestart {}"), 5, "job.j.group.g.restart", "only one restart"),
    (_job("", "count = 1\ncount = 2"), 5, "job.j.group.g.count", "defined twice"),
    (_job("", "network {\n port {}\n}"), 5, "job.j.group.g.network.port", "one label"),
    (
        _job("", 'service {\n check {\n header { X = "v" }\n }\n}'),
        6,
        "job.j.group.g.service.check.header.X",
        "list of strings",
    ),
    (_job("", "", 'kill_timeout = "5 seconds"'), 6, "job.j.group.g.task.t.kill_timeout", "not a"),
    ('variable "v" {}\n' + _job(""), 1, "variable.v", "no default"),
    ("locals {\n a = local.b\n b = local.a\n}\n" + _job("", "count = local.a"), 3, "locals.b", ""),
    ('job "a" {}\njob "b" {}', 2, "job", "only one job"),
    ('group "g" {}', 1, "group", "unknown block"),
    ('job "j" {\n count = \n}', 2, "", "syntax error"),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), ERRORS)
def test_errors_name_the_file_the_line_and_the_key(
    text: str, line: int, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_jobspec(text, "web.nomad")
    err = caught.value
    assert (err.path, err.line, err.key) == ("web.nomad", line, key), str(err)
    assert message in err.message
    assert str(err).startswith(f"web.nomad:{line}: {key + ': ' if key else ''}")


def test_no_job_and_undeclared_overrides_are_errors() -> None:
    with pytest.raises(ConfigError, match="no job block"):
        parse_jobspec('variable "x" { default = 1 }\n')
    with pytest.raises(ConfigError, match="'y' is given a value but not declared"):
        parse_jobspec(_job(""), variables={"y": 1})


def test_locate_maps_a_json_path_back_to_its_line() -> None:
    text = _job("", 'network {\n port "a" {}\n port "b" { static = 9 }\n}')
    spec = parse_jobspec(text, "x.hcl")
    assert spec.locate("Job.TaskGroups[0].Networks[0].ReservedPorts[0].Value") == (
        6,
        "job.j.group.g.network.port.b.static",
    )
    assert spec.locate("Job.TaskGroups[0].Networks[0].DynamicPorts[0].Label")[0] == 5
    assert spec.locate("Job.TaskGroups[0].Tasks[0].Config.command") == (
        10,
        "job.j.group.g.task.t.config.command",
    )
    assert spec.locate("Nowhere") == (None, "")


def test_the_hcl_example_is_the_json_example() -> None:
    hcl = hcl_to_json((ROOT / "examples/web.nomad.hcl").read_text())
    expected = parse_job(json.loads((ROOT / "examples/web.job.json").read_text()))
    assert parse_job(hcl) == expected
    assert parse_job(hcl).warnings == ()


@pytest.mark.parametrize("name", ["dynamic-port", "static-port", "bridge"])
def test_the_networking_guide_examples_parse_as_jobs(name: str) -> None:
    spec = parse_job(hcl_to_json((ROOT / f"examples/{name}.nomad.hcl").read_text()))
    assert spec.id == name and spec.warnings == ()


def test_canonicalize_fills_nomads_defaults_of_what_waypost_runs() -> None:
    job = canonicalize(hcl_to_json(_job(""))["Job"])
    group = job["TaskGroups"][0]
    assert (job["Type"], group["Count"], group["RestartPolicy"]["Delay"]) == ("service", 1, 15 * S)
    assert group["Tasks"][0]["KillTimeout"] == 5 * S
    assert parse_job(job).warnings == ()


# -- warnings for ignored fields (discovery.jobs) ------------------------------------

TASK = {"Name": "t", "Driver": "raw_exec", "Config": {"command": "x"}}


def _body(job: dict[str, Any] | None = None, group: dict[str, Any] | None = None) -> Any:
    return {
        "Job": {
            "ID": "j",
            **(job or {}),
            "TaskGroups": [{"Name": "g", **(group or {}), "Tasks": [dict(TASK)]}],
        }
    }


def test_ignored_fields_with_a_value_are_warned_about() -> None:
    body = _body({"Datacenters": ["dc1"]}, {"Update": {"MaxParallel": 1}})
    body["Job"]["TaskGroups"][0]["Tasks"][0]["Resources"] = {"DiskMB": 300}
    assert parse_job(body).warnings == (
        "Job.Datacenters: ignored (means nothing on one host)",
        "Job.TaskGroups[0].Update: ignored (means nothing on one host)",
        "Job.TaskGroups[0].Tasks[0].Resources.DiskMB: ignored (means nothing on one host)",
    )


@pytest.mark.parametrize("empty", [None, [], {}, "", 0, False, {"Stagger": 0, "AutoRevert": False}])
def test_empty_ignored_fields_are_not(empty: object) -> None:
    assert parse_job(_body({"Datacenters": empty}, {"Update": empty})).warnings == ()


def test_nomads_bookkeeping_is_not_warned_about_and_warnings_do_not_change_the_job() -> None:
    quiet = _body({"Status": "running", "Version": 3, "CreateIndex": 10})
    assert parse_job(quiet).warnings == ()
    assert parse_job(_body({"Priority": 70})) == parse_job(_body())
