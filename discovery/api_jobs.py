"""Jobs and allocations over HTTP, in Nomad's JSON shapes.  Pure: no I/O.

    POST|PUT /v1/jobs               register a job ({"Job": {...}}, Nomad's body); runs it
    GET    /v1/jobs                 [JobListStub]
    GET    /v1/job/:id              the job (Nomad's fields waypost implements) + Status
    GET    /v1/job/:id/allocations  [AllocListStub] of that job
    DELETE /v1/job/:id              deregister: services out, allocations torn down
    GET    /v1/allocations          [AllocListStub]
    GET    /v1/allocation/:id       the allocation: Nomad's AllocatedResources (ports with
                                    Label, Value, To, HostIP) and NetworkStatus, plus
                                    waypost's `Network` (mode, IPs, namespace path, veth)
                                    and `Env` (the NOMAD_* variables to run its tasks with)

Writes need a write token when ACLs are on.  Bad input is a 400 naming the JSON
path (`Job.TaskGroups[0].Count`), an unknown id a 404, a port or address that
cannot be had a 409, a host that cannot do it (bridge mode without root) a 500
saying so; in every case nothing of the request is left applied.

Tasks are not run: `ClientStatus` "running" means the allocation's network is up
and its services are registered.  A job whose persisted document could not be read
at start is listed with Status "dead" and the reason in StatusDescription (no
allocations); DELETE forgets it.  A store failure after a run or stop committed
(see discovery.allocations) is a 200 whose Warnings say so.  These reads are not
blocking queries.
"""

from __future__ import annotations

import json
from typing import Any

from discovery.acl import Access
from discovery.allocations import JobFailed, JobRunner, RunningAlloc, RunningJob
from discovery.api import ApiContext, ApiError, ApiRequest, ApiResponse, Route
from discovery.api_consul import node_id
from discovery.errors import StateError, ValidationError
from discovery.jobs import NAMESPACE, alloc_env, parse_job, render_job
from discovery.registry import Snapshot
from netsetup.env import render_env
from netsetup.errors import AllocExists, PortError, SubnetExhausted

Json = dict[str, Any]
CONFLICT = 409  # a port or an address is taken
FAILED = 500


def _job_stub(job: RunningJob) -> Json:
    return {
        "ID": job.spec.id,
        "Name": job.spec.name,
        "Namespace": NAMESPACE,
        "Type": "service",
        "Status": "running",
        "CreateIndex": job.modify_index,
        "ModifyIndex": job.modify_index,
        "JobModifyIndex": job.modify_index,
    }


def render_dead_stub(job_id: str, reason: str) -> Json:
    """A job whose document could not be read at start: not running, nothing served."""
    return {
        "ID": job_id,
        "Name": job_id,
        "Namespace": NAMESPACE,
        "Type": "service",
        "Status": "dead",
        "StatusDescription": reason,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "JobModifyIndex": 0,
    }


def render_job_detail(job: RunningJob) -> Json:
    return {**render_job(job.spec), **_job_stub(job)}


def render_alloc_stub(job: RunningJob, alloc: RunningAlloc, node: str) -> Json:
    plan = alloc.plan
    return {
        "ID": plan.id,
        "Name": plan.name,
        "Namespace": NAMESPACE,
        "NodeID": node_id(node),
        "NodeName": node,
        "JobID": job.spec.id,
        "TaskGroup": plan.group,
        "DesiredStatus": "run",
        "ClientStatus": "running",
        "CreateIndex": job.modify_index,
        "ModifyIndex": job.modify_index,
    }


def render_alloc(job: RunningJob, alloc: RunningAlloc, node: str) -> Json:
    """Nomad's Allocation (the fields waypost has) plus `Network` and `Env`."""
    net = alloc.network
    ports = [
        {"Label": p.label, "Value": p.host_port, "To": p.alloc_port, "HostIP": p.host_ip}
        for p in net.ports
    ]
    statics = {p.label for p in alloc.plan.network.ports if p.static is not None}
    network = {
        "Mode": net.mode,
        "IP": net.host_ip,
        "ReservedPorts": [
            {"Label": p["Label"], "Value": p["Value"], "To": p["To"]}
            for p in ports
            if p["Label"] in statics
        ],
        "DynamicPorts": [
            {"Label": p["Label"], "Value": p["Value"], "To": p["To"]}
            for p in ports
            if p["Label"] not in statics
        ],
    }
    return {
        **render_alloc_stub(job, alloc, node),
        "AllocatedResources": {"Shared": {"Networks": [network], "Ports": ports}},
        "NetworkStatus": {
            "InterfaceName": net.interface,
            "Address": net.alloc_ip,
            "AddressIPv6": net.alloc_ip6,
        },
        "Network": {
            "Mode": net.mode,
            "HostIP": net.host_ip,
            "AllocIP": net.alloc_ip,
            "AllocIPv6": net.alloc_ip6,
            "Namespace": net.netns,
            "Interface": net.interface,
            "HostVeth": net.host_veth,
            "Bridge": net.bridge,
        },
        "Services": [i.id for i in alloc.instances],
        "Env": alloc_env(alloc.plan, job.spec, render_env(net)),
    }


def _decode(body: bytes) -> object:
    if not body:
        raise ApiError(400, 'body: a job is required ({"Job": {...}})', "body")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: not JSON: {exc}", "body") from None


def _failed(err: JobFailed) -> ApiError:
    conflict = isinstance(err.cause, PortError | SubnetExhausted | AllocExists)
    return ApiError(CONFLICT if conflict else FAILED, str(err), "")


def routes(runner: JobRunner, node: str) -> tuple[Route, ...]:
    """The job and allocation routes around `runner`; `node` names this agent's node."""

    async def register(req: ApiRequest, _ctx: ApiContext) -> ApiResponse:
        try:
            spec = parse_job(_decode(req.body))
        except ValidationError as err:
            raise ApiError.invalid(err) from None
        try:
            job, changed = await runner.run(spec)
        except JobFailed as err:
            raise _failed(err) from None
        except ValidationError as err:
            raise ApiError.invalid(err, "Job") from None
        except StateError as err:  # the document was not written: nothing is applied
            raise ApiError(FAILED, f"job {spec.id!r} not run, nothing applied: {err}", "") from None
        index = job.modify_index
        body = {
            "EvalID": "",
            "EvalCreateIndex": index,
            "JobModifyIndex": index,
            "Warnings": "; ".join(job.warnings) if changed else "job unchanged",
            "Index": index,
        }
        return ApiResponse(body, index=index)

    def list_jobs(_req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        stubs = {k: _job_stub(job) for k, job in runner.jobs.items()}
        stubs.update((k, render_dead_stub(k, why)) for k, why in runner.dead.items())
        return ApiResponse([stubs[k] for k in sorted(stubs)])

    def _job(req: ApiRequest) -> RunningJob | None:
        """The running job of the request's id; None for a dead one; 404 for neither."""
        ident = req.params["id"]
        job = runner.jobs.get(ident)
        if job is None and ident not in runner.dead:
            raise ApiError(404, f"job {ident!r} not found", "id")
        return job

    def get_job(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        job = _job(req)
        if job is None:
            ident = req.params["id"]
            return ApiResponse(render_dead_stub(ident, runner.dead[ident]))
        return ApiResponse(render_job_detail(job))

    def job_allocs(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        job = _job(req)
        if job is None:
            return ApiResponse([])
        return ApiResponse([render_alloc_stub(job, a, node) for a in job.allocs])

    async def deregister(req: ApiRequest, _ctx: ApiContext) -> ApiResponse:
        _job(req)
        try:
            errors = await runner.stop(req.params["id"])
        except StateError as err:  # the document was not deleted: nothing is changed
            raise ApiError(FAILED, f"job not stopped, nothing changed: {err}", "") from None
        index = runner.last_index
        body = {"EvalID": "", "EvalCreateIndex": index, "JobModifyIndex": index}
        if errors:
            body["Warnings"] = "; ".join(errors)
        return ApiResponse(body, index=index)

    def list_allocs(_req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        jobs = [runner.jobs[k] for k in sorted(runner.jobs)]
        return ApiResponse([render_alloc_stub(j, a, node) for j in jobs for a in j.allocs])

    def get_alloc(req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        found = runner.alloc(req.params["id"])
        if found is None:
            raise ApiError(404, f"allocation {req.params['id']!r} not found", "id")
        return ApiResponse(render_alloc(*found, node))

    return (
        Route("POST", "/v1/jobs", Access.WRITE, write=register),
        Route("PUT", "/v1/jobs", Access.WRITE, write=register),
        Route("GET", "/v1/jobs", Access.READ, read=list_jobs),
        Route("GET", "/v1/job/{id}", Access.READ, read=get_job),
        Route("GET", "/v1/job/{id}/allocations", Access.READ, read=job_allocs),
        Route("DELETE", "/v1/job/{id}", Access.WRITE, write=deregister),
        Route("GET", "/v1/allocations", Access.READ, read=list_allocs),
        Route("GET", "/v1/allocation/{id}", Access.READ, read=get_alloc),
    )
