"""Nomad's service registration endpoints, in Nomad's JSON shapes.  Pure: no I/O.

The subset Nomad's clients (the Go `api` package, consul-template's
`nomadService`, `nomad service info`) use:

    GET    /v1/services                  [{"Namespace", "Services": [{"ServiceName", "Tags"}]}]
    GET    /v1/service/:name             [ServiceRegistration...]  ?filter= &choose=n|key
    DELETE /v1/service/:name/:id

Nomad's ServiceRegistration (nomad/structs/service_registration.go) is what
each instance is rendered as, plus two fields Nomad lacks and its clients
ignore: `Health` ("passing", "warning", "critical") and `Meta`.  Nomad has
one namespace here, "default"; `?namespace=` other than it (or "*") is empty.

`?filter=` (:mod:`discovery.filter`) applies to each registration's JSON,
then `?choose=<n>|<key>` keeps the n instances that rank first for `key` by
rendezvous hashing, exactly as Nomad does (nomad/service_registration_endpoint.go
`choose`, structs `HashWith`): one md5 per instance over its identity and the
key, sorted; the same key always gets the same subset, and adding or
removing an instance moves only the keys that ranked it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from discovery.acl import Access
from discovery.api import WATCH_ALL, ApiContext, ApiError, ApiRequest, ApiResponse, Route
from discovery.api_consul import node_id
from discovery.errors import NotFoundError, ValidationError
from discovery.filter import parse_filter_arg
from discovery.model import Instance
from discovery.registry import Snapshot

Json = dict[str, Any]
NAMESPACE = "default"  # Nomad's default namespace; waypost has no other
ALL_NAMESPACES = "*"  # Nomad's wildcard (structs.AllNamespacesSentinel)
# Selectors of `?filter=` on /v1/service/:name: the registration's fields.
FIELDS = (
    "ID",
    "ServiceName",
    "Namespace",
    "NodeID",
    "Datacenter",
    "JobID",
    "AllocID",
    "Tags",
    "Address",
    "Port",
    "CreateIndex",
    "ModifyIndex",
    "Health",
    "Meta.*",
)
# Nomad's structs.ErrMalformedChooseParameter.
MALFORMED_CHOOSE = "choose param must be of form 'int|key'"


def local_datacenter(req: ApiRequest) -> str:
    """The agent's datacenter, as the adapter set it on the request."""
    return req.datacenter


def render_registration(inst: Instance, datacenter: str, index: int) -> Json:
    """Nomad's ServiceRegistration for `inst`, with waypost's Health and Meta."""
    return {
        "ID": inst.id,
        "ServiceName": inst.service,
        "Namespace": NAMESPACE,
        "NodeID": node_id(inst.node),  # the same UUID as Consul's Node.ID
        "Datacenter": inst.datacenter or datacenter,
        "JobID": inst.job_id,
        "AllocID": inst.alloc_id,
        "Tags": list(inst.tags),
        "Address": inst.address,
        "Port": inst.port,
        "CreateIndex": index,
        "ModifyIndex": index,
        "Health": inst.health.value,
        "Meta": dict(inst.meta),
    }


def _namespace_matches(req: ApiRequest) -> bool:
    wanted = req.arg("namespace") or NAMESPACE
    return wanted in (NAMESPACE, ALL_NAMESPACES)


def list_services(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/services: every service name with the union of its instances' tags."""
    if not _namespace_matches(req) or not snap.services:
        return ApiResponse([], index=snap.index)
    stubs = []
    for key in sorted(snap.services):
        members = snap.services[key]
        tags = sorted({tag for inst in members for tag in inst.tags})
        stubs.append({"ServiceName": members[0].service, "Tags": tags})
    return ApiResponse([{"Namespace": NAMESPACE, "Services": stubs}], index=snap.index)


def service_index(snap: Snapshot, name: str) -> int:
    """The index of service `name`'s last change (the snapshot's, if it never existed)."""
    return max(1, snap.service_index.get(name.lower(), snap.index))


def get_service(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/service/:name: its registrations, `?filter=`-ed, then `?choose=`-n."""
    name = req.params["name"]
    index = service_index(snap, name)
    if not _namespace_matches(req):
        return ApiResponse([], index=index)
    datacenter = local_datacenter(req)
    rendered = [render_registration(inst, datacenter, index) for inst in snap.service(name)]
    try:
        expr = parse_filter_arg(req.arg("filter"), FIELDS)
        if expr is not None:
            rendered = [item for item in rendered if expr.matches(item)]
    except ValidationError as err:
        raise ApiError.invalid(err) from None
    choose = req.arg("choose")
    if choose:
        rendered = choose_registrations(rendered, choose)
    return ApiResponse(rendered, index=index)


def parse_choose(value: str) -> tuple[int, str]:
    """`<n>|<key>` (Nomad's `?choose=`): how many, and the hashing key."""
    count, sep, key = value.partition("|")
    digits = count[1:] if count[:1] in "+-" else count
    if not sep or not key or not digits.isascii() or not digits.isdigit():
        raise ValidationError("choose", MALFORMED_CHOOSE)
    n = int(count)
    if n < 0:
        raise ValidationError("choose", f"{n} is negative: {MALFORMED_CHOOSE}")
    return n, key


def hash_with(reg: Json, key: str) -> str:
    """Nomad's ServiceRegistration.HashWith: md5 of the port, identity fields, tags and key."""
    digest = hashlib.md5(usedforsecurity=False)
    digest.update(int(reg["Port"]).to_bytes(8, "big"))
    for name in ("AllocID", "ID", "Namespace", "Address", "ServiceName"):
        digest.update(str(reg[name]).encode())
    for tag in reg["Tags"]:
        digest.update(str(tag).encode())
    digest.update(key.encode())
    return digest.hexdigest()


def choose_registrations(registrations: Sequence[Json], choose: str) -> list[Json]:
    """The first n registrations by rendezvous rank for the key (Nomad's `choose`)."""
    try:
        n, key = parse_choose(choose)
    except ValidationError as err:
        raise ApiError(400, f"failed to choose services: {err.message}", err.field) from None
    ranked = sorted(registrations, key=lambda reg: hash_with(reg, key))  # stable, as Go's
    return ranked[:n]


async def delete_service(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
    """DELETE /v1/service/:name/:id: remove one registration; answers once durable."""
    name, ident = req.params["name"], req.params["id"]
    inst = ctx.registry.snapshot.instances.get(ident)
    if inst is None or inst.key != name.lower():
        raise ApiError(404, f"service registration {ident!r} of {name!r} not found", "id")
    try:
        snap = ctx.registry.remove(ident)
    except NotFoundError as err:  # gone since the lookup (nothing awaits in between)
        raise ApiError(404, str(err), "id") from None
    await ctx.store.durable(snap.index)
    return ApiResponse(None, index=snap.index)


def _watch_service(req: ApiRequest) -> Sequence[str]:
    return [req.params["name"].lower()]


def _watch_all(_req: ApiRequest) -> Sequence[str]:
    return [WATCH_ALL]


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/services", Access.READ, read=list_services, watch=_watch_all),
    Route("GET", "/v1/service/{name}", Access.READ, read=get_service, watch=_watch_service),
    Route("DELETE", "/v1/service/{name}/{id}", Access.WRITE, write=delete_service),
)
