"""What a new version of a job does to its allocations, as Nomad's reconciler decides.  Pure.

:func:`plan_update` compares the running version of a job with the new one,
group by group, and gives each running allocation its action and each group the
indexes to place:

    ignore              the job did not change
    in-place update     the group's tasks and network are the same: the allocation keeps
                        its id, ports, namespace and processes; its services, tags,
                        meta, checks (and the job version it runs) are updated
    destructive update  a task's driver, config, env, user, resources, logs, the
                        environment's meta or the network changed: a new allocation
                        takes its index first, then it is stopped
    stop                its index is past the new count, or its group is gone
    place               (per group) an index of the new count that nothing runs

As in Nomad (scheduler/util.go tasksUpdated): what a task is started with is
destructive; services, checks, the restart policy and the kill timeout are not
(the running tasks keep their restart policy and kill timeout until they are
replaced: they were started with them).  The job's name and meta are part of
every task's environment (NOMAD_JOB_NAME, NOMAD_META_*), computed once, so a
change to them is destructive for every group.

:func:`render_plan` gives Nomad's JobPlanResponse shape (Annotations.DesiredTGUpdates
per group, a Diff of Type Added/Deleted/Edited/None with the changed fields), plus
waypost's `Allocations`: the action of each allocation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from discovery.jobs import GroupSpec, JobSpec, alloc_name, render_job

IGNORE = "ignore"
IN_PLACE = "in-place update"
DESTRUCTIVE = "destructive update"
STOP = "stop"
PLACE = "create"


@dataclass(frozen=True, slots=True)
class Running:
    """A running allocation of the job's current version."""

    id: str
    group: str
    index: int


@dataclass(frozen=True, slots=True)
class AllocChange:
    id: str
    name: str
    group: str
    index: int
    action: str


@dataclass(frozen=True, slots=True)
class GroupPlan:
    name: str
    place: tuple[int, ...]  # indexes to create (new allocations, also for destructive ones)
    changes: tuple[AllocChange, ...]  # the running allocations of this group
    reasons: tuple[str, ...] = ()  # why destructive

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)

    @property
    def new_indexes(self) -> tuple[int, ...]:
        """Every index that gets a new allocation: placed, or replacing one."""
        replaced = [c.index for c in self.changes if c.action == DESTRUCTIVE]
        return tuple(sorted({*self.place, *replaced}))


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    job_id: str
    groups: tuple[GroupPlan, ...]
    changed: bool  # False: the same spec again (a no-op)

    def of(self, group: str) -> GroupPlan | None:
        for plan in self.groups:
            if plan.name == group:
                return plan
        return None

    def actions(self, action: str) -> list[AllocChange]:
        return [c for g in self.groups for c in g.changes if c.action == action]

    @property
    def touches_allocations(self) -> bool:
        """Allocations would be created or destroyed (Nomad's `job plan` exit code 1)."""
        return any(g.place or g.count(DESTRUCTIVE) or g.count(STOP) for g in self.groups)


def destructive_reasons(
    old: JobSpec, new: JobSpec, old_group: GroupSpec, group: GroupSpec
) -> list[str]:
    """Why the allocations of `group` cannot be updated in place ([] when they can)."""
    reasons = []
    if old.name != new.name:
        reasons.append("the job's name (NOMAD_JOB_NAME)")
    if old.meta != new.meta:
        reasons.append("the job's meta (NOMAD_META_*)")
    if old_group.meta != group.meta:
        reasons.append("the group's meta (NOMAD_META_*)")
    if old_group.network != group.network:
        reasons.append("the network")
    old_tasks = {t.name: t for t in old_group.tasks}
    new_tasks = {t.name: t for t in group.tasks}
    if list(old_tasks) != list(new_tasks):
        reasons.append("the tasks (added, removed or renamed)")
        return reasons
    in_place = {"restart", "kill_timeout", "kill_signal"}
    for name, task in new_tasks.items():
        before = old_tasks[name]
        for f in fields(task):
            if f.name not in in_place and getattr(before, f.name) != getattr(task, f.name):
                reasons.append(f"task {name!r}: {f.name}")
    return reasons


def plan_update(old: JobSpec | None, running: Iterable[Running], new: JobSpec) -> UpdatePlan:
    """What running `new` does to the `running` allocations of `old` (see the docstring)."""
    by_group: dict[str, list[Running]] = {}
    for alloc in sorted(running, key=lambda a: (a.group, a.index)):
        by_group.setdefault(alloc.group, []).append(alloc)
    changed = old != new
    plans: list[GroupPlan] = []
    for group in new.groups:
        allocs = by_group.pop(group.name, [])
        reasons: list[str] = []
        if old is not None and changed:
            try:
                old_group = old.group(group.name)
            except KeyError:
                old_group = None
            if old_group is not None:
                reasons = destructive_reasons(old, new, old_group, group)
        if not changed:
            keep = IGNORE
        elif reasons:
            keep = DESTRUCTIVE
        else:
            keep = IN_PLACE
        changes = []
        held = set()
        for alloc in allocs:
            # one allocation per index: a second one at an index (not expected) is stopped
            action = keep if alloc.index < group.count and alloc.index not in held else STOP
            held.add(alloc.index)
            name = alloc_name(new.id, group.name, alloc.index)
            changes.append(AllocChange(alloc.id, name, group.name, alloc.index, action))
        place = tuple(i for i in range(group.count) if i not in held)
        plans.append(GroupPlan(group.name, place, tuple(changes), tuple(reasons)))
    for name, allocs in sorted(by_group.items()):  # groups the new version does not have
        changes = [
            AllocChange(a.id, alloc_name(new.id, name, a.index), name, a.index, STOP)
            for a in allocs
        ]
        plans.append(GroupPlan(name, (), tuple(changes), ("the group is gone",)))
    return UpdatePlan(new.id, tuple(plans), changed)


# -- Nomad's JobPlanResponse ------------------------------------------------------------------


def _tg_updates(plan: GroupPlan) -> dict[str, int]:
    """Nomad's DesiredUpdates of one group."""
    destructive = plan.count(DESTRUCTIVE)
    return {
        "Ignore": plan.count(IGNORE),
        "Place": len(plan.place),
        "Migrate": 0,
        "Stop": plan.count(STOP),
        "InPlaceUpdate": plan.count(IN_PLACE),
        "DestructiveUpdate": destructive,
        "Canary": 0,
        "Preemptions": 0,
    }


def _field_diffs(old: Any, new: Any, prefix: str = "") -> list[dict[str, str]]:
    """Nomad-like FieldDiffs between two rendered JSON values (flattened, sorted)."""
    out: list[dict[str, str]] = []
    if isinstance(old, dict) or isinstance(new, dict):
        old_d = old if isinstance(old, dict) else {}
        new_d = new if isinstance(new, dict) else {}
        for key in sorted(set(old_d) | set(new_d)):
            if key == "TaskGroups":
                continue
            out += _field_diffs(old_d.get(key), new_d.get(key), f"{prefix}{key}.")
        return out
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and any(isinstance(v, dict) for v in (*old, *new))
    ):  # lists of objects (services, checks, tasks): element by element
        for i in range(max(len(old), len(new))):
            before = old[i] if i < len(old) else None
            after = new[i] if i < len(new) else None
            out += _field_diffs(before, after, f"{prefix.rstrip('.')}[{i}].")
        return out
    if old == new:
        return out
    kind = "Added" if old is None else "Deleted" if new is None else "Edited"
    name = prefix.rstrip(".")
    out.append({"Type": kind, "Name": name, "Old": _text(old), "New": _text(new)})
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _diff(old: JobSpec | None, new: JobSpec) -> dict[str, Any]:
    new_json = render_job(new)
    old_json = render_job(old) if old is not None else None
    old_groups = {g["Name"]: g for g in (old_json or {}).get("TaskGroups", [])}
    groups = []
    for group in new_json["TaskGroups"]:
        before = old_groups.pop(group["Name"], None)
        fields_ = _field_diffs(before, group)
        kind = "Added" if before is None else "Edited" if fields_ else "None"
        groups.append({"Type": kind, "Name": group["Name"], "Fields": fields_})
    for name, before in sorted(old_groups.items()):
        groups.append({"Type": "Deleted", "Name": name, "Fields": _field_diffs(before, None)})
    job_fields = _field_diffs(old_json, new_json)
    if old_json is None:
        kind = "Added"
    elif job_fields or any(g["Type"] != "None" for g in groups):
        kind = "Edited"
    else:
        kind = "None"
    return {"Type": kind, "ID": new.id, "Fields": job_fields, "TaskGroups": groups}


def render_plan(
    plan: UpdatePlan,
    old: JobSpec | None,
    new: JobSpec,
    *,
    job_modify_index: int,
    diff: bool,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Nomad's JobPlanResponse for `plan`, plus waypost's per-allocation `Allocations`."""
    allocations: list[dict[str, Any]] = []
    for group in plan.groups:
        allocations += [
            {"ID": c.id, "Name": c.name, "TaskGroup": c.group, "Action": c.action}
            for c in group.changes
        ]
        allocations += [
            {"ID": "", "Name": alloc_name(new.id, group.name, i), "TaskGroup": group.name,
             "Action": PLACE}
            for i in group.place
        ]  # fmt: skip
    return {
        "Annotations": {
            "DesiredTGUpdates": {g.name: _tg_updates(g) for g in plan.groups},
            "PreemptedAllocs": None,
        },
        "FailedTGAllocs": None,
        "JobModifyIndex": job_modify_index,
        "CreatedEvals": None,
        "Diff": _diff(old, new) if diff else None,
        "NextPeriodicLaunch": "0001-01-01T00:00:00Z",
        "Warnings": "\n".join(warnings),
        "Allocations": allocations,
        "DestructiveReasons": {g.name: list(g.reasons) for g in plan.groups if g.reasons},
    }
