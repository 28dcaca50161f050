"""discovery.jobs: parsing Nomad's job JSON, planning allocations and service instances."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.errors import ValidationError
from discovery.jobs import (
    MAX_ALLOCS,
    MAX_COUNT,
    JobSpec,
    alloc_addresses,
    parse_job,
    plan_allocs,
    plan_instances,
    render_job,
    service_id,
    task_check_id,
)
from discovery.model import CheckKind, Health
from netsetup.spec import AllocNetwork, PortMapping

ROOT = Path(__file__).resolve().parents[2]
TASK = {"Name": "server", "Driver": "raw_exec", "Config": {"command": "sleep", "args": ["60"]}}


def job(**changes: Any) -> dict[str, Any]:
    """A valid job body; `changes` replace keys of its first group."""
    group: dict[str, Any] = {
        "Name": "web",
        "Count": 1,
        "Networks": [
            {
                "Mode": "host",
                "ReservedPorts": [{"Label": "admin", "Value": 9000}],
                "DynamicPorts": [{"Label": "http", "To": 8080}],
            }
        ],
        "Services": [
            {
                "Name": "web",
                "PortLabel": "http",
                "Tags": ["a", "b"],
                "Meta": {"version": "1"},
                "Checks": [{"Type": "tcp", "Interval": 10_000_000_000, "Timeout": "2s"}],
            }
        ],
        "Tasks": [TASK],
    }
    group.update(changes)
    return {"Job": {"ID": "web", "Name": "web", "Type": "service", "TaskGroups": [group]}}


def test_the_example_job_parses() -> None:
    spec = parse_job(json.loads((ROOT / "examples/web.job.json").read_text()))
    group = spec.group("web")
    assert (spec.id, group.count, group.network.mode) == ("web", 3, "host")
    assert [p.label for p in group.network.ports] == ["http"]
    check = group.services[0].checks[0]
    assert (check.kind, check.path, check.interval) == (CheckKind.HTTP, "/", 2.0)


def test_parse_job_reads_every_implemented_field() -> None:
    spec = parse_job(job())
    group = spec.groups[0]
    admin, http = group.network.ports
    assert (admin.label, admin.static, http.label, http.static, http.to) == (
        "admin",
        9000,
        "http",
        None,
        8080,
    )
    svc = group.services[0]
    assert (svc.name, svc.port_label, svc.tags, svc.meta) == (
        "web",
        "http",
        ("a", "b"),
        (("version", "1"),),
    )
    check = svc.checks[0]
    assert (check.kind, check.interval, check.timeout) == (CheckKind.TCP, 10.0, 2.0)


def test_a_bare_job_is_accepted_too() -> None:
    assert parse_job(job()["Job"]) == parse_job(job())


def test_documented_nomad_fields_are_ignored() -> None:
    body = job(Constraints=[], EphemeralDisk={"SizeMB": 300}, ShutdownDelay=0)
    body["Job"].update(Datacenters=["dc1"], Priority=50, Constraints=[])
    body["EnforceIndex"] = False
    assert parse_job(body) == parse_job(job())


def test_tasks_meta_and_restart_policy_are_read() -> None:
    task = {**TASK, "Meta": {"t": "1"}, "Env": {"A": "b"}}
    body = job(Tasks=[task], Meta={"g": "2"}, RestartPolicy={"Attempts": 5, "Mode": "delay"})
    body["Job"]["Meta"] = {"j": "3"}
    spec = parse_job(body)
    group = spec.groups[0]
    (server,) = group.tasks
    assert (server.name, server.command, server.args, server.env) == (
        "server",
        "sleep",
        ("60",),
        (("A", "b"),),
    )
    assert (spec.meta, group.meta, server.meta) == ((("j", "3"),), (("g", "2"),), (("t", "1"),))
    assert (group.restart.attempts, group.restart.mode, group.restart.delay) == (5, "delay", 15.0)
    assert group.restart_of(server) is group.restart


def test_a_group_needs_a_task_and_a_driver_it_can_run() -> None:
    with pytest.raises(ValidationError, match="needs at least one task") as caught:
        parse_job(job(Tasks=[]))
    assert caught.value.field == "Job.TaskGroups[0].Tasks"
    with pytest.raises(ValidationError, match="'docker'") as caught:
        parse_job(job(Tasks=[{**TASK, "Driver": "docker"}]))
    assert caught.value.field == "Job.TaskGroups[0].Tasks[0].Driver"
    assert "'server'" in caught.value.message
    with pytest.raises(ValidationError, match="duplicate task"):
        parse_job(job(Tasks=[TASK, TASK]))


def test_task_services_belong_to_their_task() -> None:
    service = {"Name": "api", "PortLabel": "http"}
    spec = parse_job(job(Tasks=[{**TASK, "Services": [service]}]))
    group = spec.groups[0]
    assert [(s.name, s.task) for s in group.services] == [("web", ""), ("api", "server")]
    alloc = plan_allocs(spec, lambda: "a")[0]
    _, api = plan_instances(alloc, group, _network("a"), "n")
    assert api.id == "_nomad-task-a-server-api-http"
    assert [c.kind for c in api.checks] == [CheckKind.TASK]
    assert render_job(spec)["TaskGroups"][0]["Tasks"][0]["Services"][0]["Name"] == "api"
    assert parse_job(render_job(spec)) == spec


def _with(path: list[object], value: object) -> dict[str, Any]:
    body = job()
    target: Any = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


G = ["Job", "TaskGroups", 0]
NET = [*G, "Networks", 0]
SVC = [*G, "Services", 0]
CHECK = [*SVC, "Checks", 0]

BAD = [
    # (where to put the value, the value, the field the error must name)
    (["Job", "ID"], "", "Job.ID"),
    (["Job", "ID"], "a b", "Job.ID"),
    (["Job", "ID"], "web\n", "Job.ID"),
    (["Job", "ID"], 7, "Job.ID"),
    (["Job", "Type"], "batch", "Job.Type"),
    (["Job", "Namespace"], "prod", "Job.Namespace"),
    (["Job", "TaskGroups"], [], "Job.TaskGroups"),
    (["Job", "TaskGroups"], {}, "Job.TaskGroups"),
    (["Job", "Tsakgroups"], [], "Job.Tsakgroups"),
    ([*G, "Count"], -1, "Job.TaskGroups[0].Count"),
    ([*G, "Count"], MAX_COUNT + 1, "Job.TaskGroups[0].Count"),
    ([*G, "Count"], "3", "Job.TaskGroups[0].Count"),
    ([*G, "Count"], True, "Job.TaskGroups[0].Count"),
    # A static port (admin: 9000) on one host: for one allocation only.
    ([*G, "Count"], 2, "Job.TaskGroups[0].Networks[0].ReservedPorts[0].Value"),
    (
        [*NET, "ReservedPorts"],
        [{"Label": "admin", "Value": 9000}, {"Label": "admin2", "Value": 9000}],
        "Job.TaskGroups[0].Networks[0].ReservedPorts[1].Value",
    ),
    ([*G, "Name"], "web[0]", "Job.TaskGroups[0].Name"),
    ([*G, "Networks"], [{}, {}], "Job.TaskGroups[0].Networks"),
    ([*NET, "Mode"], "cni/mynet", "Job.TaskGroups[0].Networks[0].Mode"),
    ([*NET, "DNS"], {"Servers": ["x"]}, "Job.TaskGroups[0].Networks[0].DNS.Servers[0]"),
    ([*NET, "DynamicPorts", 0, "Label"], "", "Job.TaskGroups[0].Networks[0].DynamicPorts[0].Label"),
    (
        [*NET, "DynamicPorts", 0, "Label"],
        "admin",
        "Job.TaskGroups[0].Networks[0].DynamicPorts[0].Label",
    ),
    (
        [*NET, "DynamicPorts", 0, "Lable"],
        "x",
        "Job.TaskGroups[0].Networks[0].DynamicPorts[0].Lable",
    ),
    ([*NET, "DynamicPorts", 0, "To"], -2, "Job.TaskGroups[0].Networks[0].DynamicPorts[0].To"),
    (
        [*NET, "ReservedPorts", 0, "Value"],
        0,
        "Job.TaskGroups[0].Networks[0].ReservedPorts[0].Value",
    ),
    (
        [*NET, "ReservedPorts", 0, "Value"],
        70000,
        "Job.TaskGroups[0].Networks[0].ReservedPorts[0].Value",
    ),
    ([*SVC, "Name"], "web_1", "Job.TaskGroups[0].Services[0].Name"),
    ([*SVC, "PortLabel"], "nope", "Job.TaskGroups[0].Services[0].PortLabel"),
    ([*SVC, "PortLabel"], 0, "Job.TaskGroups[0].Services[0].PortLabel"),
    ([*SVC, "AddressMode"], "driver", "Job.TaskGroups[0].Services[0].AddressMode"),
    ([*SVC, "AddressMode"], "alloc", "Job.TaskGroups[0].Services[0].AddressMode"),
    ([*SVC, "Tags"], "a", "Job.TaskGroups[0].Services[0].Tags"),
    ([*SVC, "Meta"], {"bad key": "x"}, "Job.TaskGroups[0].Services[0].Meta.bad key"),
    ([*SVC, "Connect"], {}, "Job.TaskGroups[0].Services[0].Connect"),
    ([*SVC, "Servics"], [], "Job.TaskGroups[0].Services[0].Servics"),
    ([*CHECK, "Type"], "script", "Job.TaskGroups[0].Services[0].Checks[0].Type"),
    ([*CHECK, "Interval"], "soon", "Job.TaskGroups[0].Services[0].Checks[0].Interval"),
    ([*CHECK, "Interval"], -5, "Job.TaskGroups[0].Services[0].Checks[0].Interval"),
    ([*CHECK, "Interval"], 0, "Job.TaskGroups[0].Services[0].Checks[0].Interval"),
    ([*CHECK, "PortLabel"], "nope", "Job.TaskGroups[0].Services[0].Checks[0].PortLabel"),
    ([*CHECK, "InitialStatus"], "ok", "Job.TaskGroups[0].Services[0].Checks[0].InitialStatus"),
]


@pytest.mark.parametrize(
    ("path", "value", "field"), BAD, ids=[b[2] + "=" + repr(b[1]) for b in BAD]
)
def test_bad_input_names_the_json_path(path: list[object], value: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_job(_with(path, value))
    assert caught.value.field == field


def _two_groups(count: int, value: int, host_network: str = "") -> dict[str, Any]:
    body = job()
    other = copy.deepcopy(body["Job"]["TaskGroups"][0])
    other["Name"], other["Count"] = "other", count
    other["Networks"][0]["ReservedPorts"] = [
        {"Label": "admin", "Value": value, "HostNetwork": host_network}
    ]
    body["Job"]["TaskGroups"].append(other)
    return body


def test_a_static_port_twice_in_a_job_is_refused_unless_it_cannot_clash() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_job(_two_groups(1, 9000))
    assert caught.value.field == "Job.TaskGroups[1].Networks[0].ReservedPorts[0].Value"
    assert "group 'web'" in caught.value.message
    assert len(parse_job(_two_groups(0, 9000)).groups) == 2  # no allocation: no clash
    assert len(parse_job(_two_groups(1, 9001)).groups) == 2
    assert len(parse_job(_two_groups(1, 9000, "public")).groups) == 2  # another address


def test_a_job_has_at_most_max_allocs_allocations_in_all() -> None:
    body = _two_groups(MAX_ALLOCS, 9001)
    body["Job"]["TaskGroups"][1]["Networks"] = DYNAMIC_ONLY
    with pytest.raises(ValidationError) as caught:
        parse_job(body)
    assert caught.value.field == "Job.TaskGroups"
    body["Job"]["TaskGroups"][1]["Count"] = MAX_ALLOCS - 1
    assert sum(g.count for g in parse_job(body).groups) == MAX_ALLOCS


@pytest.mark.parametrize(
    ("check", "field"),
    [
        ({"Type": "http", "Interval": "5s"}, "Path"),
        ({"Type": "ttl"}, "TTL"),
        ({"Type": "http", "Path": "/", "Interval": "5s", "Protocol": "ftp"}, "Protocol"),
    ],
)
def test_bad_checks(check: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_job(_with([*SVC, "Checks"], [check]))
    assert caught.value.field == f"Job.TaskGroups[0].Services[0].Checks[0].{field}"


def test_durations_are_nanoseconds_or_go_strings() -> None:
    as_int = parse_job(_with([*CHECK, "Interval"], 1_500_000_000))
    as_str = parse_job(_with([*CHECK, "Interval"], "1.5s"))
    assert as_int == as_str
    assert as_int.groups[0].services[0].checks[0].interval == 1.5


def test_a_ttl_check_takes_its_interval_as_ttl_when_no_ttl_is_given() -> None:
    spec = parse_job(_with([*SVC, "Checks"], [{"Type": "ttl", "Interval": "30s"}]))
    assert spec.groups[0].services[0].checks[0].ttl == 30.0


def test_duplicate_groups_and_services_are_rejected() -> None:
    body = job()
    body["Job"]["TaskGroups"].append(copy.deepcopy(body["Job"]["TaskGroups"][0]))
    with pytest.raises(ValidationError, match="duplicate group") as caught:
        parse_job(body)
    assert caught.value.field == "Job.TaskGroups[1].Name"
    body = job()
    services = body["Job"]["TaskGroups"][0]["Services"]
    services.append(copy.deepcopy(services[0]))
    with pytest.raises(ValidationError):
        parse_job(body)


def test_count_defaults_to_one_and_networks_to_host_mode() -> None:
    spec = parse_job({"Job": {"ID": "j", "TaskGroups": [{"Name": "g", "Tasks": [TASK]}]}})
    assert spec.groups[0].count == 1
    assert spec.groups[0].network.mode == "host"
    assert spec.groups[0].network.ports == ()


# -- planning ----------------------------------------------------------------------------


def _network(alloc_id: str, mode: str = "host") -> AllocNetwork:
    ports = (
        PortMapping("admin", "192.0.2.1", 9000, 9000),
        PortMapping("http", "192.0.2.1", 21000, 8080),
    )
    if mode == "host":
        return AllocNetwork(alloc_id, "host", "192.0.2.1", ports)
    return AllocNetwork(
        alloc_id, "bridge", "192.0.2.1", ports, "/var/run/netns/x", "172.26.64.2", "", "eth0"
    )


DYNAMIC_ONLY = [{"DynamicPorts": [{"Label": "http"}]}]


def test_plan_allocs_names_them_like_nomad() -> None:
    ids = iter(["a1", "a2"])
    allocs = plan_allocs(parse_job(job(Count=2, Networks=DYNAMIC_ONLY)), lambda: next(ids))
    assert [(a.id, a.name, a.index) for a in allocs] == [
        ("a1", "web.web[0]", 0),
        ("a2", "web.web[1]", 1),
    ]


def test_plan_allocs_makes_uuids() -> None:
    allocs = plan_allocs(parse_job(job(Count=3, Networks=DYNAMIC_ONLY)))
    assert len({a.id for a in allocs}) == 3
    assert all(len(a.id) == 36 for a in allocs)


@pytest.mark.parametrize(
    ("mode", "address_mode", "port_label", "expected"),
    [
        ("host", "auto", "http", ("192.0.2.1", 21000)),
        ("host", "host", "http", ("192.0.2.1", 21000)),
        ("bridge", "auto", "http", ("192.0.2.1", 21000)),
        ("bridge", "alloc", "http", ("172.26.64.2", 8080)),
        ("host", "auto", "7000", ("192.0.2.1", 7000)),
        ("bridge", "alloc", "7000", ("172.26.64.2", 7000)),
        ("host", "auto", "", ("192.0.2.1", 0)),
    ],
)
def test_service_addresses_follow_nomads_rules(
    mode: str, address_mode: str, port_label: str, expected: tuple[str, int]
) -> None:
    body = _with([*SVC, "AddressMode"], address_mode)
    body["Job"]["TaskGroups"][0]["Networks"][0]["Mode"] = mode
    body["Job"]["TaskGroups"][0]["Services"][0]["PortLabel"] = port_label
    body["Job"]["TaskGroups"][0]["Services"][0]["Checks"] = [{"Type": "ttl", "TTL": "9s"}]
    spec = parse_job(body)
    alloc = plan_allocs(spec, lambda: "alloc-1")[0]
    (inst,) = plan_instances(alloc, spec.groups[0], _network("alloc-1", mode), "node1")
    assert (inst.address, inst.port) == expected
    assert inst.id == service_id("alloc-1", "web", "web", port_label)
    assert (inst.alloc_id, inst.source, inst.node) == ("alloc-1", "job", "node1")


def test_instances_carry_tags_meta_ports_and_checks() -> None:
    spec = parse_job(job())
    alloc = plan_allocs(spec, lambda: "a")[0]
    (inst,) = plan_instances(alloc, spec.groups[0], _network("a"), "n")
    assert inst.id == "_nomad-task-a-group-web-web-http"
    assert (inst.alloc_id, inst.job_id, inst.source) == ("a", "web", "job")
    assert inst.tags == ("a", "b")
    assert dict(inst.meta) == {"version": "1"}
    assert dict(inst.ports) == {"admin": 9000, "http": 21000}
    check, task = inst.checks
    assert (check.id, check.kind, check.target) == (
        f"service:{inst.id}",
        CheckKind.TCP,
        "192.0.2.1:21000",
    )
    # Every job instance has its task check, critical until the task runs.
    assert (task.id, task.kind, task.status) == (
        task_check_id(inst.id),
        CheckKind.TASK,
        Health.CRITICAL,
    )
    assert task.name == 'Nomad task "server"'
    assert inst.health is Health.CRITICAL  # a new check is critical until it passes


def test_http_check_targets_and_initial_status() -> None:
    checks = [
        {"Type": "http", "Path": "/health", "Interval": "5s", "InitialStatus": "passing"},
        {"Type": "http", "Path": "/", "Interval": "5s", "PortLabel": "admin", "Protocol": "https"},
    ]
    spec = parse_job(_with([*SVC, "Checks"], checks))
    alloc = plan_allocs(spec, lambda: "a")[0]
    (inst,) = plan_instances(alloc, spec.groups[0], _network("a"), "n")
    assert [(c.id.rsplit(":", 1)[-1], c.target) for c in inst.checks[:2]] == [
        ("1", "http://192.0.2.1:21000/health"),
        ("2", "https://192.0.2.1:9000/"),
    ]
    assert inst.checks[0].status is Health.PASSING


def test_alloc_addresses() -> None:
    assert alloc_addresses(_network("a")) == ("192.0.2.1",)
    assert alloc_addresses(_network("a", "bridge")) == ("172.26.64.2",)


# -- round trip ------------------------------------------------------------------------------

_labels = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    labels = draw(st.lists(_labels, min_size=0, max_size=4, unique=True))
    statics = draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels)))
    ports = [
        {"Label": lab, "Value": 1000 + i, "To": draw(st.integers(-1, 65535))}
        if static
        else {"Label": lab, "To": draw(st.integers(0, 65535))}
        for i, (lab, static) in enumerate(zip(labels, statics, strict=True))
    ]
    services = [
        {
            "Name": draw(_labels),
            "PortLabel": lab,
            "Tags": draw(st.lists(_labels, max_size=3)),
            "Checks": [{"Type": "tcp", "Interval": draw(st.integers(1, 10**12))}],
        }
        for lab in labels[:2]
    ]
    group = {
        "Name": draw(_labels),
        "Count": draw(st.integers(0, 1 if any(statics) else MAX_COUNT)),
        "Networks": [
            {
                "Mode": draw(st.sampled_from(["host", "bridge"])),
                "ReservedPorts": [p for p in ports if "Value" in p],
                "DynamicPorts": [p for p in ports if "Value" not in p],
            }
        ],
        "Services": [
            s for i, s in enumerate(services) if s["Name"] not in {x["Name"] for x in services[:i]}
        ],
        "Tasks": [{**TASK, "Env": draw(st.dictionaries(_labels, _labels, max_size=3))}],
    }
    return {"Job": {"ID": draw(_labels), "TaskGroups": [group]}}


@given(bodies())
def test_render_job_round_trips(body: dict[str, Any]) -> None:
    spec = parse_job(body)
    assert isinstance(spec, JobSpec)
    rendered = render_job(spec)
    assert parse_job(rendered) == spec
    assert parse_job(json.loads(json.dumps(rendered))) == spec


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_arbitrary_json_is_a_job_or_a_validation_error(body: object) -> None:
    try:
        parse_job(body)
    except ValidationError as err:
        assert err.field
