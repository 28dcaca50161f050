"""Jobs and allocations as the registry publishes them, and their stored form.  Pure: no I/O.

:class:`Job` (a job spec, its version and whether it was stopped) and
:class:`Allocation` (one instance of a group: its ids, its network as netsetup
set it up, each task's runtime environment, computed once at setup, and state)
are the records :mod:`discovery.allocations` writes and the registry publishes in
its snapshots (``snapshot.jobs``, ``snapshot.allocations``), so every read of
jobs and allocations is a function of one snapshot and a blocking query
(`?index=`) waits on the keys below like a catalog read on a service.

Watch keys (never a service name: they start with NUL): :data:`JOBS_KEY` (any
job), :func:`job_key` (one job and its allocations), :data:`ALLOCS_KEY` (any
allocation), :func:`alloc_key` (one allocation).

    render_job_record / parse_job_record      the stored JSON text of a Job
    render_alloc_record / parse_alloc_record  the stored JSON text of an Allocation
    job_status(job, allocs)                   Nomad's job Status
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from discovery.jobs import JobSpec, parse_job, render_job
from discovery.tasks.state import TaskState, client_status, parse_state, render_state
from netsetup.spec import AllocNetwork, parse_result, render_result

JOBS_KEY = "\x00jobs"
ALLOCS_KEY = "\x00allocs"
RUN, STOP = "run", "stop"  # Nomad's DesiredStatus


def job_key(job_id: str) -> str:
    return "\x00job:" + job_id


def alloc_key(alloc_id: str) -> str:
    return "\x00alloc:" + alloc_id


@dataclass(frozen=True, slots=True)
class Job:
    """A registered job.  `stop`: deregistered but not purged (Nomad's Stop, Status dead)."""

    spec: JobSpec
    version: int = 0
    stop: bool = False
    submit_time: int = 0  # Unix nanoseconds of the register that made this version
    # Registry indexes, set by the registry (Nomad's CreateIndex, ModifyIndex), and the
    # index of the last register that changed the spec (JobModifyIndex).
    create_index: int = field(default=0, compare=False)
    modify_index: int = field(default=0, compare=False)
    job_modify_index: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True, slots=True)
class Allocation:
    """One allocation of a job's group."""

    id: str
    name: str  # Nomad's "<job>.<group>[<index>]"
    job_id: str
    group: str
    index: int
    job_version: int = 0
    desired: str = RUN
    desired_description: str = ""
    network: AllocNetwork | None = None  # None until set up (and in host mode without ports)
    tasks: tuple[tuple[str, TaskState], ...] = ()  # by task, in the group's order
    env: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # task -> runtime env
    create_time: int = 0  # Unix nanoseconds
    modify_time: int = 0
    create_index: int = field(default=0, compare=False)
    modify_index: int = field(default=0, compare=False)

    def task(self, name: str) -> TaskState:
        for task, state in self.tasks:
            if task == name:
                return state
        raise KeyError(name)

    def task_env(self, name: str) -> dict[str, str]:
        for task, env in self.env:
            if task == name:
                return dict(env)
        raise KeyError(name)

    @property
    def client_status(self) -> str:
        """Nomad's ClientStatus, from the tasks' states."""
        return client_status(state for _, state in self.tasks)

    @property
    def terminal(self) -> bool:
        """Stopped or failed: nothing of it will run again.  (All tasks dead with the
        allocation still to run is an agent stopped in --dev: it starts them again.)"""
        return self.desired == STOP or self.client_status == "failed"


def job_status(job: Job, allocs: Iterable[Allocation]) -> str:
    """Nomad's job Status: dead once stopped (or with nothing left to run), running
    while an allocation runs, else pending."""
    live = [a for a in allocs if a.job_id == job.id and not a.terminal]
    if job.stop or (not live and sum(g.count for g in job.spec.groups) == 0):
        return "dead"
    if any(a.client_status == "running" for a in live):
        return "running"
    return "pending" if live else "dead"


def allocs_of(allocations: Mapping[str, Allocation], job_id: str) -> list[Allocation]:
    """The allocations of `job_id`, by group and index, newest version first."""
    found = [a for a in allocations.values() if a.job_id == job_id]
    return sorted(found, key=lambda a: (a.group, a.index, -a.job_version, a.id))


# -- stored form ---------------------------------------------------------------------


def render_job_record(job: Job) -> str:
    doc = {
        "Job": render_job(job.spec),
        "Version": job.version,
        "Stop": job.stop,
        "SubmitTime": job.submit_time,
        "CreateIndex": job.create_index,
        "JobModifyIndex": job.job_modify_index,
    }
    return json.dumps(doc, sort_keys=True)


def parse_job_record(text: str) -> Job:
    """Error handling: ValueError, KeyError, TypeError or ValidationError when it does not parse."""
    doc = json.loads(text)
    return Job(
        spec=parse_job(doc["Job"]),
        version=int(doc["Version"]),
        stop=bool(doc["Stop"]),
        submit_time=int(doc["SubmitTime"]),
        create_index=int(doc.get("CreateIndex", 0)),
        job_modify_index=int(doc.get("JobModifyIndex", 0)),
    )


def render_alloc_record(alloc: Allocation) -> str:
    doc: dict[str, Any] = {
        "ID": alloc.id,
        "Name": alloc.name,
        "JobID": alloc.job_id,
        "TaskGroup": alloc.group,
        "Index": alloc.index,
        "JobVersion": alloc.job_version,
        "Desired": alloc.desired,
        "DesiredDescription": alloc.desired_description,
        "Network": None if alloc.network is None else render_result(alloc.network),
        "Tasks": [[name, render_state(state)] for name, state in alloc.tasks],
        "Env": [[name, [list(kv) for kv in env]] for name, env in alloc.env],
        "CreateTime": alloc.create_time,
        "ModifyTime": alloc.modify_time,
        "CreateIndex": alloc.create_index,
    }
    return json.dumps(doc, sort_keys=True)


def parse_alloc_record(text: str) -> Allocation:
    """Error handling: ValueError, KeyError, TypeError (or netsetup's SpecError) when damaged."""
    doc = json.loads(text)
    network = doc["Network"]
    desired = str(doc["Desired"])
    if desired not in (RUN, STOP):
        raise ValueError(f"unknown desired status {desired!r}")
    return Allocation(
        id=str(doc["ID"]),
        name=str(doc["Name"]),
        job_id=str(doc["JobID"]),
        group=str(doc["TaskGroup"]),
        index=int(doc["Index"]),
        job_version=int(doc["JobVersion"]),
        desired=desired,
        desired_description=str(doc["DesiredDescription"]),
        network=None if network is None else parse_result(network),
        tasks=tuple((str(name), parse_state(state)) for name, state in doc["Tasks"]),
        env=tuple((str(name), tuple((str(k), str(v)) for k, v in env)) for name, env in doc["Env"]),
        create_time=int(doc["CreateTime"]),
        modify_time=int(doc["ModifyTime"]),
        create_index=int(doc.get("CreateIndex", 0)),
    )
