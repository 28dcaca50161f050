"""The update plan (discovery.jobplan): in place or destructive, as a table; Nomad's plan shape."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from discovery.jobplan import (
    DESTRUCTIVE,
    IGNORE,
    IN_PLACE,
    STOP,
    Running,
    plan_update,
    render_plan,
)
from discovery.jobs import parse_job


def job(**group: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Name": "g",
        "Count": 2,
        "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": "http"}]}],
        "RestartPolicy": {"Attempts": 2, "Delay": "1s"},
        "Services": [{"Name": "web", "PortLabel": "http", "Tags": ["a"], "Meta": {"k": "v"}}],
        "Tasks": [
            {
                "Name": "t",
                "Driver": "raw_exec",
                "Config": {"command": "sleep", "args": ["300"]},
                "Env": {"A": "1"},
                "Resources": {"CPU": 100, "MemoryMB": 300},
            }
        ],
    }
    base.update(group)
    return {"Job": {"ID": "web", "TaskGroups": [base]}}


def edit(path: str, value: Any, **group: Any) -> dict[str, Any]:
    """job(**group) with the value at `path` (dotted, under the group) replaced."""
    out = copy.deepcopy(job(**group))
    target: Any = out["Job"]["TaskGroups"][0]
    *parents, last = path.split(".")
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return out


RUNNING = [Running("a0", "g", 0), Running("a1", "g", 1)]

CASES = [
    # (what changed, the new job, the action of the running allocations, placed indexes)
    ("nothing", job(), IGNORE, ()),
    ("a tag", edit("Services.0.Tags", ["b"]), IN_PLACE, ()),
    ("service meta", edit("Services.0.Meta", {"k": "w"}), IN_PLACE, ()),
    ("a check", edit("Services.0.Checks", [{"Type": "tcp", "Interval": "5s"}]), IN_PLACE, ()),
    ("restart policy", edit("RestartPolicy", {"Attempts": 5}), IN_PLACE, ()),
    ("kill timeout", edit("Tasks.0.KillTimeout", "9s"), IN_PLACE, ()),
    ("count up", job(Count=3), IN_PLACE, (2,)),
    ("command", edit("Tasks.0.Config", {"command": "sleep", "args": ["301"]}), DESTRUCTIVE, ()),
    ("env", edit("Tasks.0.Env", {"A": "2"}), DESTRUCTIVE, ()),
    ("resources", edit("Tasks.0.Resources", {"CPU": 200, "MemoryMB": 300}), DESTRUCTIVE, ()),
    ("user", edit("Tasks.0.User", "nobody"), DESTRUCTIVE, ()),
    ("driver", edit("Tasks.0.Driver", "exec"), DESTRUCTIVE, ()),
    ("task meta", edit("Tasks.0.Meta", {"x": "1"}), DESTRUCTIVE, ()),
    ("group meta", job(Meta={"x": "1"}), DESTRUCTIVE, ()),
    ("network mode", edit("Networks.0.Mode", "bridge"), DESTRUCTIVE, ()),
    ("a port", edit("Networks.0.DynamicPorts", [{"Label": "http", "To": 8080}]), DESTRUCTIVE, ()),
]


@pytest.mark.parametrize(("what", "new", "action", "place"), CASES, ids=[c[0] for c in CASES])
def test_the_action_of_each_running_allocation(
    what: str, new: dict[str, Any], action: str, place: tuple[int, ...]
) -> None:
    plan = plan_update(parse_job(job()), RUNNING, parse_job(new))
    (group,) = plan.groups
    assert [c.action for c in group.changes] == [action, action], what
    assert group.place == place
    assert plan.changed == (what != "nothing")
    assert bool(group.reasons) == (action == DESTRUCTIVE)


def test_count_down_stops_the_highest_indexes() -> None:
    running = [Running(f"a{i}", "g", i) for i in range(4)]
    plan = plan_update(parse_job(job(Count=4)), running, parse_job(job(Count=2)))
    assert [(c.index, c.action) for c in plan.groups[0].changes] == [
        (0, IN_PLACE),
        (1, IN_PLACE),
        (2, STOP),
        (3, STOP),
    ]
    assert plan.touches_allocations


def test_a_destructive_update_with_a_smaller_count_replaces_the_kept_indexes_only() -> None:
    new = edit("Tasks.0.Env", {"A": "2"}, Count=1)
    plan = plan_update(parse_job(job()), RUNNING, parse_job(new))
    group = plan.groups[0]
    assert [c.action for c in group.changes] == [DESTRUCTIVE, STOP]
    assert group.new_indexes == (0,)


def test_a_first_register_and_a_missing_index_are_placed() -> None:
    first = plan_update(None, [], parse_job(job()))
    assert first.groups[0].place == (0, 1) and first.groups[0].changes == ()
    gap = plan_update(parse_job(job()), [Running("a1", "g", 1)], parse_job(job()))
    assert gap.groups[0].place == (0,)


def test_a_removed_group_stops_and_an_added_one_places() -> None:
    old = parse_job(job())
    new_raw = job(Name="h")
    plan = plan_update(old, RUNNING, parse_job(new_raw))
    by_name = {g.name: g for g in plan.groups}
    assert by_name["h"].place == (0, 1)
    assert [c.action for c in by_name["g"].changes] == [STOP, STOP]


def test_the_job_name_and_meta_are_destructive_for_every_group() -> None:
    new = job()
    new["Job"]["Meta"] = {"owner": "x"}
    plan = plan_update(parse_job(job()), RUNNING, parse_job(new))
    assert plan.groups[0].reasons == ("the job's meta (NOMAD_META_*)",)


def test_render_plan_is_nomads_job_plan_response() -> None:
    old, new = parse_job(job()), parse_job(edit("Services.0.Tags", ["b"], Count=3))
    plan = plan_update(old, RUNNING, new)
    body = render_plan(plan, old, new, job_modify_index=7, diff=True)
    assert body["Annotations"]["DesiredTGUpdates"]["g"] == {
        "Ignore": 0,
        "Place": 1,
        "Migrate": 0,
        "Stop": 0,
        "InPlaceUpdate": 2,
        "DestructiveUpdate": 0,
        "Canary": 0,
        "Preemptions": 0,
    }
    assert body["JobModifyIndex"] == 7
    assert body["Diff"]["Type"] == "Edited"
    (group,) = body["Diff"]["TaskGroups"]
    assert group["Type"] == "Edited"
    names = {f["Name"] for f in group["Fields"]}
    assert "Count" in names and any(n.startswith("Services") for n in names)
    assert [a["Action"] for a in body["Allocations"]] == [IN_PLACE, IN_PLACE, "create"]
    unchanged = render_plan(plan_update(old, RUNNING, old), old, old, job_modify_index=7, diff=True)
    assert unchanged["Diff"]["Type"] == "None"
    assert render_plan(plan, old, new, job_modify_index=7, diff=False)["Diff"] is None
