"""Jobs and allocations over HTTP, in Nomad's JSON shapes.  Pure: no I/O.

    POST|PUT /v1/jobs               register a job ({"Job": {...}}, Nomad's body); runs it
    POST|PUT /v1/job/:id            the same, for that id (python-nomad's register_job)
    GET    /v1/jobs                 [JobListStub]                 ?prefix=
    GET    /v1/job/:id              the job (Nomad's fields waypost implements) + Status
    GET    /v1/job/:id/allocations  [AllocListStub] of that job
    GET    /v1/job/:id/summary      Nomad's JobSummary (allocations per group and status)
    DELETE /v1/job/:id              deregister: services out, tasks stopped, network down;
                                    the job stays listed as dead (Stop), `?purge=true` forgets it
    POST   /v1/job/:id/plan         what registering the job would do, allocation by
                                    allocation (discovery.jobplan), changing nothing
    GET    /v1/job/:id/evaluations  the job's evaluations (one per register and deregister)
    GET    /v1/evaluation/:id       one evaluation (the EvalID of a register or deregister)
    GET    /v1/evaluations          every evaluation                ?prefix=
    GET    /v1/regions              ["global"]
    GET    /v1/allocations          [AllocListStub]               ?prefix=
    GET    /v1/allocation/:id       the allocation: Nomad's TaskStates, AllocatedResources
                                    (ports with Label, Value, To, HostIP), NetworkStatus,
                                    plus waypost's `Network` (mode, IPs, namespace path,
                                    veth) and `Env` (each task's runtime environment)

Every read is a function of one registry snapshot and a blocking query
(`?index=&wait=`, X-Nomad-Index) that wakes when what it shows changes: a job
read on that job and its allocations (discovery.workload.job_key), a list on
any job or allocation, an allocation read on that allocation.

Evaluations are Nomad's record of a scheduling decision: here each one is
complete as soon as it is made (the register or deregister ran), `TriggeredBy`
job-register or job-deregister.  They are kept in memory, the last
:data:`MAX_EVALS`, as Nomad garbage-collects them: an agent restart forgets them.

Writes need a write token when ACLs are on.  Bad input is a 400 naming the JSON
path (`Job.TaskGroups[0].Count`), an unknown id a 404, a port or address that
cannot be had a 409, a host that cannot do it (bridge mode without root) a 500
saying so; in every case nothing of the request is left applied.  A job whose
stored record could not be read at start is listed with Status "dead" and the
reason in StatusDescription; DELETE forgets it.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from discovery.acl import Access
from discovery.allocations import JobFailed, JobRunner
from discovery.api import ApiContext, ApiError, ApiRequest, ApiResponse, Route, decode_json
from discovery.api_consul_node import node_id
from discovery.errors import NotFoundError, StateError, ValidationError
from discovery.jobplan import render_plan
from discovery.jobs import NAMESPACE, JobSpec, parse_job, render_job
from discovery.registry import Snapshot
from discovery.tasks.state import render_task_state
from discovery.workload import (
    ALLOCS_KEY,
    JOBS_KEY,
    Allocation,
    Job,
    alloc_key,
    allocs_of,
    job_key,
    job_status,
)
from netsetup.errors import AllocExists, PortError, SubnetExhausted

Json = dict[str, Any]
CONFLICT = 409  # a port or an address is taken
FAILED = 500
PRIORITY = 50  # Nomad's default job priority
MAX_EVALS = 1000  # evaluations kept (the oldest go first)
REGION = "global"
MIN_PREFIX = 2  # an allocation id prefix shorter than this names nothing (Nomad's CLI rule)
_DESCRIPTIONS = {
    "pending": "No tasks have started",
    "running": "Tasks are running",
    "complete": "All tasks have completed",
    "failed": "Failed due to unhealthy allocations",
}
_SUMMARY_KEYS = {"pending": "Starting", "running": "Running", "complete": "Complete"}


def render_job_stub(job: Job, snap: Snapshot, datacenter: str) -> Json:
    return {
        "ID": job.id,
        "ParentID": "",
        "Name": job.spec.name,
        "Namespace": NAMESPACE,
        "Datacenters": [datacenter],
        "Type": "service",
        "Priority": PRIORITY,
        "Periodic": False,
        "ParameterizedJob": False,
        "Stop": job.stop,
        "Status": job_status(job, snap.allocations.values()),
        "StatusDescription": "",
        "JobSummary": render_summary(job, snap),
        "CreateIndex": job.create_index,
        "ModifyIndex": job.modify_index,
        "JobModifyIndex": job.job_modify_index,
        "SubmitTime": job.submit_time,
        "Version": job.version,
    }


def render_dead_stub(job_id: str, reason: str) -> Json:
    """A job whose record could not be read at start: not running, nothing served."""
    return {
        "ID": job_id,
        "Name": job_id,
        "Namespace": NAMESPACE,
        "Type": "service",
        "Stop": False,
        "Status": "dead",
        "StatusDescription": reason,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "JobModifyIndex": 0,
    }


def render_summary(job: Job, snap: Snapshot) -> Json:
    """Nomad's JobSummary: per group, how many allocations are in each state."""
    groups = {
        g.name: dict.fromkeys(
            ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown"), 0
        )
        for g in job.spec.groups
    }
    for alloc in allocs_of(snap.allocations, job.id):
        counts = groups.get(alloc.group)
        if counts is not None:
            status = alloc.client_status
            counts[_SUMMARY_KEYS.get(status, "Failed")] += 1
    return {
        "JobID": job.id,
        "Namespace": NAMESPACE,
        "Summary": groups,
        "Children": {"Pending": 0, "Running": 0, "Dead": 0},
        "CreateIndex": job.create_index,
        "ModifyIndex": job.modify_index,
    }


def render_job_detail(job: Job, snap: Snapshot, datacenter: str) -> Json:
    return {
        **render_job(job.spec),
        **render_job_stub(job, snap, datacenter),
    }


def render_alloc_stub(alloc: Allocation, node: str) -> Json:
    status = alloc.client_status
    return {
        "ID": alloc.id,
        "EvalID": "",
        "Name": alloc.name,
        "Namespace": NAMESPACE,
        "NodeID": node_id(node),
        "NodeName": node,
        "JobID": alloc.job_id,
        "JobVersion": alloc.job_version,
        "TaskGroup": alloc.group,
        "DesiredStatus": alloc.desired,
        "DesiredDescription": alloc.desired_description,
        "ClientStatus": status,
        "ClientDescription": _DESCRIPTIONS.get(status, ""),
        "TaskStates": {name: render_task_state(state) for name, state in alloc.tasks},
        "CreateIndex": alloc.create_index,
        "ModifyIndex": alloc.modify_index,
        "AllocModifyIndex": alloc.create_index,
        "CreateTime": alloc.create_time,
        "ModifyTime": alloc.modify_time,
    }


def render_alloc(alloc: Allocation, job: Job | None, snap: Snapshot, node: str) -> Json:
    """Nomad's Allocation (the fields waypost has) plus `Network`, `Services` and `Env`."""
    out = render_alloc_stub(alloc, node)
    net = alloc.network
    if job is not None:
        out["Job"] = render_job(job.spec)
    out["Env"] = {name: dict(env) for name, env in alloc.env}
    services = [i.id for i in snap.instances.values() if i.alloc_id == alloc.id]
    out["Services"] = sorted(services)
    if net is None:
        return out
    ports = [
        {"Label": p.label, "Value": p.host_port, "To": p.alloc_port, "HostIP": p.host_ip}
        for p in net.ports
    ]
    statics: set[str] = set()
    if job is not None:
        group = next((g for g in job.spec.groups if g.name == alloc.group), None)
        if group is not None:
            statics = {p.label for p in group.network.ports if p.static is not None}
    short = [{"Label": p["Label"], "Value": p["Value"], "To": p["To"]} for p in ports]
    out["AllocatedResources"] = {
        "Shared": {
            "Networks": [
                {
                    "Mode": net.mode,
                    "IP": net.host_ip,
                    "ReservedPorts": [p for p in short if p["Label"] in statics],
                    "DynamicPorts": [p for p in short if p["Label"] not in statics],
                }
            ],
            "Ports": ports,
        }
    }
    out["NetworkStatus"] = {
        "InterfaceName": net.interface,
        "Address": net.alloc_ip,
        "AddressIPv6": net.alloc_ip6,
    }
    out["Network"] = {
        "Mode": net.mode,
        "HostIP": net.host_ip,
        "AllocIP": net.alloc_ip,
        "AllocIPv6": net.alloc_ip6,
        "Namespace": net.netns,
        "Interface": net.interface,
        "HostVeth": net.host_veth,
        "Bridge": net.bridge,
    }
    return out


def _decode(body: bytes) -> object:
    if not body:
        raise ApiError(400, 'body: a job is required ({"Job": {...}})', "body")
    try:
        return decode_json(body)  # the API's one decoder (depth and digit limits)
    except ValidationError as err:
        raise ApiError.invalid(err) from None


def _failed(err: JobFailed) -> ApiError:
    conflict = isinstance(err.cause, PortError | SubnetExhausted | AllocExists)
    return ApiError(CONFLICT if conflict else FAILED, str(err), "")


def parse_bool(value: str | None, name: str) -> bool:
    """A query flag as Go's strconv.ParseBool reads it (Nomad's `?purge=`, `?follow=`)."""
    if value is None or value == "":
        return False
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ApiError(400, f"{name}: {value!r} is not a boolean", name)


def _prefixed(items: Mapping[str, Any], req: ApiRequest) -> list[str]:
    prefix = req.arg("prefix") or ""
    return sorted(k for k in items if k.startswith(prefix))


def routes(
    runner: JobRunner,
    node: str,
    datacenter: str = "dc1",
    *,
    host_networks: Sequence[str] = (),
) -> tuple[Route, ...]:
    """The job and allocation routes around `runner`; `node` names this agent's node.

    `host_networks`: the client's host network names, the only ones a port's
    `HostNetwork` may name (else a 400 at that field).
    """

    evals: OrderedDict[str, Json] = OrderedDict()
    eval_allocs: dict[str, tuple[str, ...]] = {}  # eval id -> the allocations it placed or stopped

    def new_eval(
        job_id: str, trigger: str, index: int, job_modify_index: int, allocs: tuple[str, ...]
    ) -> str:
        now = time.time_ns()
        ident = str(uuid.uuid4())
        evals[ident] = {
            "ID": ident,
            "Namespace": NAMESPACE,
            "Priority": PRIORITY,
            "Type": "service",
            "TriggeredBy": trigger,
            "JobID": job_id,
            "JobModifyIndex": job_modify_index,
            "NodeID": "",
            "NodeModifyIndex": 0,
            "DeploymentID": "",
            "Status": "complete",
            "StatusDescription": "",
            "Wait": 0,
            "WaitUntil": "0001-01-01T00:00:00Z",
            "NextEval": "",
            "PreviousEval": "",
            "BlockedEval": "",
            "FailedTGAllocs": None,
            "QueuedAllocations": {},
            "SnapshotIndex": index,
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": now,
            "ModifyTime": now,
        }
        eval_allocs[ident] = allocs
        while len(evals) > MAX_EVALS:
            gone, _ = evals.popitem(last=False)
            eval_allocs.pop(gone, None)
        return ident

    def parse_body(req: ApiRequest, *, plan: bool = False) -> tuple[JobSpec, bool]:
        body = _decode(req.body)
        diff = False
        if plan and isinstance(body, dict):
            body = dict(body)
            diff = bool(body.pop("Diff", False))
            body.pop("PolicyOverride", None)
        try:
            spec = parse_job(body, host_networks=host_networks)
        except ValidationError as err:
            raise ApiError.invalid(err) from None
        wanted = req.params.get("id")
        if wanted is not None and wanted != spec.id:
            raise ApiError(400, f"Job ID {spec.id!r} does not match the URL's {wanted!r}", "Job.ID")
        return spec, diff

    async def register(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
        spec, _ = parse_body(req)
        try:
            result = await runner.run(spec)
        except JobFailed as err:
            raise _failed(err) from None
        except ValidationError as err:
            raise ApiError.invalid(err) from None
        except StateError as err:  # the records were not written: nothing is applied
            raise ApiError(FAILED, f"job {spec.id!r} not run, nothing applied: {err}", "") from None
        index = result.index
        job_index = result.job.job_modify_index
        warnings = [*spec.warnings, *result.warnings]
        if not result.changed:
            warnings.append("job unchanged")
        version = result.job.version
        touched = tuple(
            a.id
            for a in allocs_of(ctx.registry.snapshot.allocations, spec.id)
            if a.job_version == version and not a.terminal
        )
        body = {
            "EvalID": new_eval(spec.id, "job-register", index, job_index, touched),
            "EvalCreateIndex": index,
            "JobModifyIndex": job_index,
            "Warnings": "; ".join(warnings),
            "Index": index,
            "LastContact": 0,
            "KnownLeader": True,
        }
        return ApiResponse(body, index=index)

    def plan_job(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        spec, diff = parse_body(req, plan=True)
        plan, old = runner.plan(spec)
        current = old.spec if old is not None and not old.stop else None
        body = render_plan(
            plan,
            current,
            spec,
            job_modify_index=old.job_modify_index if old is not None else 0,
            diff=diff,
            warnings=list(spec.warnings),
        )
        body["Index"] = snap.index
        return ApiResponse(body)

    async def plan_write(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
        return plan_job(req, ctx.registry.snapshot)

    def list_evals(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        return ApiResponse([evals[k] for k in evals if k.startswith(req.arg("prefix") or "")])

    def job_evals(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        _job(req, snap)
        job_id = req.params["id"]
        return ApiResponse([e for e in reversed(evals.values()) if e["JobID"] == job_id])

    def get_eval(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        found = evals.get(req.params["id"])
        if found is None:
            raise ApiError(404, "eval not found", "id")
        return ApiResponse(found)

    def eval_allocations(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        ident = req.params["id"]
        if ident not in evals:
            raise ApiError(404, "eval not found", "id")
        found = [snap.allocations.get(a) for a in eval_allocs.get(ident, ())]
        return ApiResponse([render_alloc_stub(a, node) for a in found if a is not None])

    def regions(_req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        return ApiResponse([REGION])

    def list_jobs(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        stubs = {k: render_job_stub(job, snap, datacenter) for k, job in snap.jobs.items()}
        stubs.update((k, render_dead_stub(k, why)) for k, why in runner.dead.items())
        return ApiResponse([stubs[k] for k in _prefixed(stubs, req)])

    def _job(req: ApiRequest, snap: Snapshot) -> Job | None:
        """The job of the request's id; None for a dead one; 404 for neither."""
        ident = req.params["id"]
        job = snap.jobs.get(ident)
        if job is None and ident not in runner.dead:
            raise ApiError(404, "job not found", "id")
        return job

    def get_job(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        job = _job(req, snap)
        if job is None:
            ident = req.params["id"]
            return ApiResponse(render_dead_stub(ident, runner.dead[ident]))
        return ApiResponse(render_job_detail(job, snap, datacenter))

    def job_allocs(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        job = _job(req, snap)
        if job is None:
            return ApiResponse([])
        return ApiResponse(
            [render_alloc_stub(a, node) for a in allocs_of(snap.allocations, job.id)]
        )

    def job_summary(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        job = _job(req, snap)
        if job is None:
            raise ApiError(404, "job not found", "id")
        return ApiResponse(render_summary(job, snap))

    async def deregister(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
        purge = parse_bool(req.arg("purge"), "purge")
        try:
            errors = await runner.stop(req.params["id"], purge=purge)
        except NotFoundError:
            raise ApiError(404, "job not found", "id") from None
        except StateError as err:  # the records were not written: nothing is changed
            raise ApiError(FAILED, f"job not stopped, nothing changed: {err}", "") from None
        index = ctx.registry.snapshot.index
        ident = req.params["id"]
        stopped = tuple(a.id for a in allocs_of(ctx.registry.snapshot.allocations, ident))
        body: Json = {
            "EvalID": new_eval(ident, "job-deregister", index, index, stopped),
            "EvalCreateIndex": index,
            "JobModifyIndex": index,
        }
        if errors:
            body["Warnings"] = "; ".join(errors)
        return ApiResponse(body, index=index)

    def list_allocs(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        allocations = snap.allocations
        return ApiResponse(
            [render_alloc_stub(allocations[k], node) for k in _prefixed(allocations, req)]
        )

    def get_alloc(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        alloc = find_alloc(snap, req.params["id"])
        return ApiResponse(render_alloc(alloc, snap.jobs.get(alloc.job_id), snap, node))

    def on_job(req: ApiRequest) -> list[str]:
        return [job_key(req.params["id"])]

    def on_jobs(_req: ApiRequest) -> list[str]:
        return [JOBS_KEY, ALLOCS_KEY]

    def on_allocs(_req: ApiRequest) -> list[str]:
        return [ALLOCS_KEY]

    def on_alloc(req: ApiRequest) -> list[str]:
        return [alloc_key(req.params["id"])]

    return (
        Route("POST", "/v1/jobs", Access.WRITE, write=register),
        Route("PUT", "/v1/jobs", Access.WRITE, write=register),
        Route("POST", "/v1/job/{id}", Access.WRITE, write=register),
        Route("PUT", "/v1/job/{id}", Access.WRITE, write=register),
        Route("GET", "/v1/jobs", Access.READ, read=list_jobs, watch=on_jobs),
        Route("GET", "/v1/job/{id}", Access.READ, read=get_job, watch=on_job),
        Route("GET", "/v1/job/{id}/allocations", Access.READ, read=job_allocs, watch=on_job),
        Route("GET", "/v1/job/{id}/summary", Access.READ, read=job_summary, watch=on_job),
        Route("DELETE", "/v1/job/{id}", Access.WRITE, write=deregister),
        Route("POST", "/v1/job/{id}/plan", Access.WRITE, write=plan_write),
        Route("PUT", "/v1/job/{id}/plan", Access.WRITE, write=plan_write),
        Route("GET", "/v1/job/{id}/evaluations", Access.READ, read=job_evals, watch=on_job),
        Route("GET", "/v1/evaluations", Access.READ, read=list_evals, watch=on_jobs),
        Route("GET", "/v1/evaluation/{id}", Access.READ, read=get_eval, watch=on_jobs),
        Route(
            "GET",
            "/v1/evaluation/{id}/allocations",
            Access.READ,
            read=eval_allocations,
            watch=on_allocs,
        ),
        Route("GET", "/v1/regions", Access.READ, read=regions),
        Route("GET", "/v1/allocations", Access.READ, read=list_allocs, watch=on_allocs),
        Route("GET", "/v1/allocation/{id}", Access.READ, read=get_alloc, watch=on_alloc),
    )


def find_alloc(snap: Snapshot, ident: str) -> Allocation:
    """The allocation `ident` names: its id, or a unique prefix of it (404 otherwise)."""
    alloc = snap.allocations.get(ident)
    if alloc is not None:
        return alloc
    matches = []
    if len(ident) >= MIN_PREFIX:
        matches = [a for k, a in snap.allocations.items() if k.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ApiError(400, f"allocation prefix {ident!r} matches several allocations", "id")
    raise ApiError(404, f"allocation {ident!r} not found", "id")
