"""Consul's agent, catalog and health endpoints, in Consul's JSON shapes.  Pure: no I/O.

The subset that Consul clients (py-consul, consul-template, Go's api package)
use against a local agent:

    PUT /v1/agent/service/register            PUT /v1/agent/service/deregister/:id
    PUT /v1/agent/check/{pass,warn,fail}/:id  PUT /v1/agent/check/update/:id
    GET /v1/agent/services   GET /v1/agent/checks   GET /v1/agent/service/:id
    GET /v1/agent/health/service/name/:name   GET /v1/agent/health/service/id/:id
    GET /v1/catalog/services GET /v1/catalog/service/:name   GET /v1/catalog/node/:node
    GET /v1/health/service/:name    GET /v1/health/checks/:name
    GET /v1/health/node/:node       GET /v1/health/state/:state

and, from :mod:`discovery.api_consul_node` (ROUTES includes them), the node-level
ones: agent/self, status/leader and peers, catalog/datacenters and nodes.

Reads are functions of a snapshot (blocking and encoding are the adapter's);
the agent endpoints show the local node's instances, the catalog and health
ones every instance of the datacenter chosen by `?dc=` (the local one by
default).  `/v1/agent/service/:id` blocks on `?hash=` (Consul's hash-based
blocking): its ContentHash is a hash of the service definition it shows.
`?tag=` (repeatable, AND-ed, case-insensitive), `?passing`, `?node-meta=k:v`
and `?filter=` (:mod:`discovery.filter`, applied to each element's JSON)
narrow the results as in Consul.

Registration bodies are decoded as Consul decodes them (keys case-insensitive,
snake_case aliases, durations as Go strings or nanoseconds); Consul fields
waypost does not implement are refused by name rather than silently dropped,
and an unknown field is a 400 naming it (as Consul 1.7+ does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from discovery import api_consul_node
from discovery.acl import Access
from discovery.api import (
    WATCH_ALL,
    ApiContext,
    ApiError,
    ApiRequest,
    ApiResponse,
    Read,
    Route,
    Write,
    decode_json,
)
from discovery.api_consul_node import (
    address_family,
    api_error,
    chosen_datacenter,
    filtered,
    in_datacenter,
    local_datacenter,
    node_of,
    parse_node_meta,
    render_node,
)
from discovery.api_consul_node import node_id as node_id  # noqa: PLC0414 (api_nomad's, api_jobs')
from discovery.durations import format_duration, parse_duration
from discovery.errors import NotFoundError, ValidationError
from discovery.model import (
    MAX_OUTPUT,
    Check,
    CheckKind,
    Health,
    Instance,
    Node,
    make_check,
    make_instance,
)
from discovery.registry import Snapshot

Json = dict[str, Any]
CHECK_STATES = ("passing", "warning", "critical")
# Consul's /v1/agent/health endpoints answer load balancers through the status code.
HEALTH_STATUS = {Health.PASSING: 200, Health.WARNING: 429, Health.CRITICAL: 503}
TEXT = "text/plain; charset=utf-8"
# Hash-based blocking (GET /v1/agent/service/:id?hash=): the hash in this header and in
# the body's ContentHash; the adapter blocks while a `?hash=` request's hash is current.
CONTENT_HASH = "X-Consul-ContentHash"
HASH_DIGITS = 16  # Consul's hashes are 64-bit, printed in hex
# A JSON `null` body (Consul's answer for an unknown node; py-consul reads it as None).
# The adapter writes str bodies of text types as they are, and a body of None as nothing.
JSON_NULL = ApiResponse("null", content_type=TEXT, headers={"Content-Type": "application/json"})


# -- where: datacenter, node, selection ---------------------------------------------


def _is_local_agent(inst: Instance, snap: Snapshot) -> bool:
    """Whether the local agent owns `inst` (what /v1/agent/* shows and changes).

    Instances pulled from Consul are never the agent's own, even from a Consul
    node that happens to have our name.
    """
    return (
        inst.source != "consul"
        and not inst.datacenter
        and inst.node.lower() == snap.local_node.lower()
    )


def _selected(req: ApiRequest, snap: Snapshot, insts: Iterable[Instance]) -> list[Instance]:
    """`insts` in the chosen datacenter, with every `?tag=`, `?node-meta=` (and `?passing`)."""
    dc, local = chosen_datacenter(req, snap), local_datacenter(req)
    tags = [t.lower() for t in req.query.get("tag", ())]
    node_meta = parse_node_meta(req)
    passing = req.flag("passing")
    out = []
    for inst in insts:
        if not in_datacenter(inst, dc, local) or (passing and inst.health is not Health.PASSING):
            continue
        if tags and not set(tags) <= {t.lower() for t in inst.tags}:
            continue
        if node_meta:
            meta = node_of(snap, inst).meta
            if any(meta.get(k) != v for k, v in node_meta):
                continue
        out.append(inst)
    return out


# -- Consul's JSON shapes ---------------------------------------------------------------


def _service_tagged(inst: Instance) -> Json:
    family = address_family(inst.address)
    where = {"Address": inst.address, "Port": inst.port}
    return {f"lan_{family}": where, f"wan_{family}": where}


def _weights(inst: Instance) -> Json:
    return {"Passing": inst.weights.passing, "Warning": inst.weights.warning}


def render_agent_service(inst: Instance, dc: str) -> Json:
    """Consul's AgentService, as /v1/agent/services shows it."""
    return {
        "ID": inst.id,
        "Service": inst.service,
        "Tags": list(inst.tags),
        "Meta": dict(inst.meta),
        "Port": inst.port,
        "Address": inst.address,
        "TaggedAddresses": _service_tagged(inst),
        "Weights": _weights(inst),
        "EnableTagOverride": False,
        "Datacenter": dc,
    }


def render_service(inst: Instance) -> Json:
    """The `Service` of a health ServiceEntry (Consul's AgentService with indexes)."""
    return {
        "ID": inst.id,
        "Service": inst.service,
        "Tags": list(inst.tags),
        "Address": inst.address,
        "TaggedAddresses": _service_tagged(inst),
        "Meta": dict(inst.meta),
        "Port": inst.port,
        "Weights": _weights(inst),
        "EnableTagOverride": False,
        "Proxy": {"MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "CreateIndex": inst.create_index,
        "ModifyIndex": inst.modify_index,
    }


def _duration(seconds: float | None) -> str:
    return format_duration(seconds or 0.0)


def render_check(inst: Instance, check: Check) -> Json:
    """Consul's HealthCheck."""
    timed = check.kind is not CheckKind.TTL
    return {
        "Node": inst.node,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status.value,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": inst.id,
        "ServiceName": inst.service,
        "ServiceTags": list(inst.tags),
        "Type": check.kind.value,
        "Interval": _duration(check.interval) if timed else "",
        "Timeout": _duration(check.timeout) if timed else "",
        "ExposedPort": 0,
        "Definition": {
            "HTTP": check.target if check.kind is CheckKind.HTTP else "",
            "TCP": check.target if check.kind is CheckKind.TCP else "",
            "Interval": _duration(check.interval),
            "Timeout": _duration(check.timeout),
            "DeregisterCriticalServiceAfter": _duration(check.deregister_after),
        },
        "CreateIndex": inst.create_index,
        "ModifyIndex": inst.modify_index,
    }


def render_catalog_service(inst: Instance, node: Node, dc: str) -> Json:
    """Consul's CatalogService (a ServiceNode)."""
    return {
        "ID": node_id(node.name),
        "Node": node.name,
        "Address": node.address,
        "Datacenter": dc,
        "TaggedAddresses": render_node(node, dc)["TaggedAddresses"],
        "NodeMeta": dict(node.meta),
        "ServiceKind": "",
        "ServiceID": inst.id,
        "ServiceName": inst.service,
        "ServiceTags": list(inst.tags),
        "ServiceAddress": inst.address,
        "ServiceTaggedAddresses": _service_tagged(inst),
        "ServiceWeights": _weights(inst),
        "ServiceMeta": dict(inst.meta),
        "ServicePort": inst.port,
        "ServiceSocketPath": "",
        "ServiceEnableTagOverride": False,
        "ServiceProxy": {"MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "CreateIndex": inst.create_index,
        "ModifyIndex": inst.modify_index,
    }


def render_service_entry(snap: Snapshot, inst: Instance, dc: str) -> Json:
    """Consul's ServiceEntry: {Node, Service, Checks}."""
    return {
        "Node": render_node(node_of(snap, inst), dc),
        "Service": render_service(inst),
        "Checks": [render_check(inst, c) for c in inst.checks],
    }


def _dc_of(inst: Instance, req: ApiRequest) -> str:
    return inst.datacenter.lower() or local_datacenter(req)


# -- reads --------------------------------------------------------------------------------


def agent_services(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/agent/services: the local agent's instances by ID."""
    dc = local_datacenter(req)
    local = [i for i in snap.instances.values() if _is_local_agent(i, snap)]
    shown = filtered(req, (render_agent_service(i, dc) for i in sorted(local, key=_by_id)))
    return ApiResponse({s["ID"]: s for s in shown})


def agent_checks(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/agent/checks: the local agent's checks by check ID."""
    checks = [
        render_check(inst, check)
        for inst in sorted(snap.instances.values(), key=_by_id)
        if _is_local_agent(inst, snap)
        for check in inst.checks
    ]
    return ApiResponse({c["CheckID"]: c for c in filtered(req, checks)})


def catalog_services(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/catalog/services: service name -> the union of its tags."""
    insts = _selected(req, snap, snap.instances.values())
    if req.arg("filter"):
        entries = (_catalog_entry(req, snap, i) for i in insts)
        wanted = {entry["ServiceID"] for entry in filtered(req, entries)}
        insts = [i for i in insts if i.id in wanted]
    names: dict[str, list[str]] = {}
    for inst in sorted(insts, key=lambda i: (i.service, i.id)):
        tags = names.setdefault(inst.service, [])
        tags.extend(t for t in inst.tags if t not in tags)
    return ApiResponse({name: sorted(tags) for name, tags in sorted(names.items())})


def _catalog_entry(req: ApiRequest, snap: Snapshot, inst: Instance) -> Json:
    return render_catalog_service(inst, node_of(snap, inst), _dc_of(inst, req))


def catalog_service(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/catalog/service/:name: a CatalogService per instance, any health."""
    insts = _selected(req, snap, snap.service(req.params["name"]))
    return ApiResponse(filtered(req, (_catalog_entry(req, snap, i) for i in insts)))


def health_service(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/health/service/:name: a ServiceEntry per instance (`?passing`: healthy ones)."""
    insts = _selected(req, snap, snap.service(req.params["name"]))
    entries = (render_service_entry(snap, i, _dc_of(i, req)) for i in insts)
    return ApiResponse(filtered(req, entries))


def health_state(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/health/state/:state: every check in that state (`any`: all of them)."""
    state = req.params["state"]
    if state != "any" and state not in CHECK_STATES:
        raise api_error(400, "state", f"{state!r} is not passing, warning, critical or any")
    req_any = dataclasses.replace(req, query=_without(req.query, "passing", "tag"))
    checks = [
        render_check(inst, check)
        for inst in sorted(_selected(req_any, snap, snap.instances.values()), key=_by_id)
        for check in inst.checks
        if state in ("any", check.status.value)
    ]
    return ApiResponse(filtered(req, checks))


def _without(query: Mapping[str, Sequence[str]], *names: str) -> dict[str, Sequence[str]]:
    return {k: v for k, v in query.items() if k not in names}


def _agent_health(req: ApiRequest, snap: Snapshot, insts: list[Instance]) -> ApiResponse:
    """Consul's answer to load balancers: 200 passing, 429 warning, 503 critical."""
    dc = local_datacenter(req)
    worst = max((i.health for i in insts), key=list(HEALTH_STATUS).index)
    if req.arg("format") != "json":
        return ApiResponse(worst.value, HEALTH_STATUS[worst], content_type=TEXT)
    infos = [
        {
            "AggregatedStatus": i.health.value,
            "Service": render_agent_service(i, dc),
            "Checks": [render_check(i, c) for c in i.checks],
        }
        for i in insts
    ]
    body: object = infos if "name" in req.params else infos[0]
    return ApiResponse(body, HEALTH_STATUS[worst])


def agent_health_by_name(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    name = req.params["name"]
    insts = [i for i in snap.service(name) if _is_local_agent(i, snap)]
    if not insts:
        raise api_error(404, "name", f"ServiceName {name} Not Found")
    return _agent_health(req, snap, insts)


def agent_health_by_id(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    ident = req.params["id"]
    inst = snap.instances.get(ident)
    if inst is None or not _is_local_agent(inst, snap):
        raise api_error(404, "id", f"ServiceId {ident} not found")
    return _agent_health(req, snap, [inst])


def _on_node(req: ApiRequest, snap: Snapshot) -> tuple[str, list[Instance]]:
    """The chosen datacenter and the instances of node `:node` in it (case-insensitive)."""
    dc, local = chosen_datacenter(req, snap), local_datacenter(req)
    name = req.params["node"].lower()
    insts = [
        i for i in snap.instances.values() if i.node.lower() == name and in_datacenter(i, dc, local)
    ]
    return dc, sorted(insts, key=_by_id)


def catalog_node(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/catalog/node/:node: {Node, Services by ID}; null for an unknown node (as Consul)."""
    dc, insts = _on_node(req, snap)
    node = snap.nodes.get(req.params["node"].lower())
    if node is not None and (node.datacenter.lower() or local_datacenter(req)) != dc:
        node = None
    if node is None and insts:
        node = node_of(snap, insts[0])
    if node is None:
        return JSON_NULL
    services = filtered(req, (render_service(i) for i in insts))
    return ApiResponse({"Node": render_node(node, dc), "Services": {s["ID"]: s for s in services}})


def health_node(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/health/node/:node: the checks of the node's instances ([] for an unknown node)."""
    _dc, insts = _on_node(req, snap)
    return ApiResponse(filtered(req, (render_check(i, c) for i in insts for c in i.checks)))


def health_checks(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/health/checks/:name: the checks of the service's instances (`?node-meta=`)."""
    req_all = dataclasses.replace(req, query=_without(req.query, "passing", "tag"))
    insts = sorted(_selected(req_all, snap, snap.service(req.params["name"])), key=_by_id)
    return ApiResponse(filtered(req, (render_check(i, c) for i in insts for c in i.checks)))


def content_hash(body: Json) -> str:
    """A stable hash of a JSON body (Consul's ContentHash: 64 bits in hex)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:HASH_DIGITS]


def agent_service(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/agent/service/:id: a local instance's definition with its ContentHash.

    The hash covers the definition only (not health): `?hash=` watchers wake
    when the service is re-registered differently, as in Consul.
    """
    ident = req.params["id"]
    inst = snap.instances.get(ident)
    if inst is None or not _is_local_agent(inst, snap):
        raise api_error(404, "id", f"unknown service ID: {ident}")
    body = render_agent_service(inst, local_datacenter(req))
    digest = content_hash(body)
    return ApiResponse(body | {"ContentHash": digest}, headers={CONTENT_HASH: digest})


def _by_id(inst: Instance) -> str:
    return inst.id


# -- registration bodies ---------------------------------------------------------------

# Consul decodes keys case-insensitively (Go's encoding/json) and translates a
# few snake_case aliases (lib.TranslateKeys); both reduce to: lower case, no "_".
SERVICE_FIELDS = {
    "name": "Name",
    "id": "ID",
    "tags": "Tags",
    "address": "Address",
    "port": "Port",
    "meta": "Meta",
    "weights": "Weights",
    "check": "Check",
    "checks": "Checks",
    "enabletagoverride": "EnableTagOverride",  # accepted: only Consul servers use it
}
# Consul fields waypost does not implement: refused when set, so nothing is silently lost.
SERVICE_UNSUPPORTED = {
    k.lower(): k
    for k in (
        "Kind", "TaggedAddresses", "Connect", "Proxy", "SocketPath", "Locality",
        "Namespace", "Partition",
    )
}  # fmt: skip
CHECK_FIELDS = {
    "checkid": "CheckID",
    "id": "CheckID",  # Consul's config-file spelling
    "name": "Name",
    "ttl": "TTL",
    "http": "HTTP",
    "tcp": "TCP",
    "interval": "Interval",
    "timeout": "Timeout",
    "deregistercriticalserviceafter": "DeregisterCriticalServiceAfter",
    "status": "Status",
    "notes": "Notes",
}
CHECK_UNSUPPORTED = {
    k.lower(): k
    for k in (
        "ScriptArgs", "Args", "DockerContainerID", "Shell", "GRPC", "GRPCUseTLS", "H2PING",
        "H2PingUseTLS", "UDP", "OSService", "AliasNode", "AliasService", "Header", "Method",
        "Body", "TLSServerName", "TLSSkipVerify", "SuccessBeforePassing",
        "FailuresBeforeWarning", "FailuresBeforeCritical", "OutputMaxSize", "ServiceID",
    )
}  # fmt: skip
# Field names of discovery.model's errors -> Consul's.
_MODEL_SERVICE_FIELDS = {
    "service": "Name",
    "id": "ID",
    "address": "Address",
    "port": "Port",
    "tags": "Tags",
    "meta": "Meta",
    "weights": "Weights",
    "checks": "Checks",
}
_MODEL_CHECK_FIELDS = {v.lower(): v for v in CHECK_FIELDS.values()} | {
    "id": "CheckID",
    "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
}
DEFAULT_CHECK_TIMEOUT = 10.0  # seconds; Consul's default for HTTP and TCP checks
_KINDS = {"TTL": CheckKind.TTL, "HTTP": CheckKind.HTTP, "TCP": CheckKind.TCP}


def parse_json_object(body: bytes) -> Mapping[str, object]:
    """A request body that must be one JSON object; ValidationError("body", ...) otherwise."""
    if not body.strip():
        raise ValidationError("body", "is empty; expected a JSON object")
    value = decode_json(body)
    if not isinstance(value, dict):
        raise ValidationError("body", f"must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _is_set(value: object) -> bool:
    """Whether a JSON value is more than Go's zero value (null, "", 0, false, [], {})."""
    if isinstance(value, list | dict):
        return bool(value)
    return value not in (None, "", 0, False)


def _fields(
    obj: object, where: str, known: Mapping[str, str], unsupported: Mapping[str, str]
) -> dict[str, object]:
    """`obj`'s fields under their Consul names; unknown or unsupported ones raise naming them."""
    prefix = f"{where}." if where else ""
    if not isinstance(obj, Mapping):
        raise ValidationError(where or "body", "must be a JSON object")
    out: dict[str, object] = {}
    for key, value in obj.items():
        folded = str(key).replace("_", "").lower()
        name = known.get(folded)
        if name is None:
            if folded not in unsupported:
                raise ValidationError(f"{prefix}{key}", "unknown field")
            if _is_set(value) and not (folded == "method" and value == "GET"):
                raise ValidationError(
                    f"{prefix}{unsupported[folded]}", "is not supported by waypost"
                )
            continue
        if name in out:
            raise ValidationError(f"{prefix}{name}", f"is given twice (as {key!r} too)")
        out[name] = value
    return out


def _consul_field(err: ValidationError, names: Mapping[str, str]) -> ValidationError:
    """`err` with its field renamed from the model's spelling to Consul's (`port` -> `Port`)."""
    head = re.match(r"[a-z_]*", err.field)
    first = head[0] if head else ""
    rest = err.field[len(first) :]
    if first == "weights":
        rest = rest.replace("passing", "Passing").replace("warning", "Warning")
    return ValidationError(names.get(first, first) + rest, err.message)


def _go_duration(value: object, fieldname: str) -> float:
    """Seconds from a Consul duration: a Go string ("10s") or a number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return parse_duration(f"{value}ns" if value >= 0 else value, fieldname)
    return parse_duration(value, fieldname)


def parse_registration(
    body: Mapping[str, object],
    *,
    node: Node,
    previous: Mapping[str, Instance],
    replace_checks: bool = False,
) -> Instance:
    """A Consul service registration (AgentServiceRegistration) as a local "api" instance.

    Error handling: ValidationError naming the Consul field ("Port", "Check.TTL",
    "Checks[1].HTTP", "Meta.version").  Re-registering an ID keeps the status
    and output of checks that keep their ID and kind, and (unless
    `replace_checks`, Consul's `?replace-existing-checks`) the checks the
    request no longer lists.
    """
    fields = _fields(body, "", SERVICE_FIELDS, SERVICE_UNSUPPORTED)
    if not isinstance(fields.get("EnableTagOverride", False), bool):
        raise ValidationError("EnableTagOverride", "must be a boolean")
    port = fields.get("Port")

    def build(checks: Iterable[Check] = ()) -> Instance:
        return make_instance(
            service=fields.get("Name"),
            id=fields.get("ID"),
            node=node.name,
            address=fields.get("Address") or node.address,
            port=0 if port is None else port,
            tags=fields.get("Tags"),
            meta=fields.get("Meta"),
            weights=fields.get("Weights"),
            source="api",
            checks=checks,
        )

    try:
        inst = build()
        parsed = _parse_checks(fields, inst)
        return build(_keep_state(parsed, previous.get(inst.id), replace_checks))
    except ValidationError as err:
        if re.split(r"[.\[ ]", err.field)[0] in _MODEL_SERVICE_FIELDS:
            raise _consul_field(err, _MODEL_SERVICE_FIELDS) from None
        raise


def _parse_checks(fields: Mapping[str, object], inst: Instance) -> list[tuple[Check, bool]]:
    """The checks of `Check` and `Checks`, each with whether its Status was given."""
    raw: list[tuple[str, dict[str, object]]] = []
    if fields.get("Check") is not None:
        raw.append(("Check", _fields(fields["Check"], "Check", CHECK_FIELDS, CHECK_UNSUPPORTED)))
    listed = fields.get("Checks")
    if listed is not None:
        if not isinstance(listed, list):
            raise ValidationError("Checks", "must be a list of checks")
        for n, item in enumerate(listed):
            where = f"Checks[{n}]"
            if item is not None:
                raw.append((where, _fields(item, where, CHECK_FIELDS, CHECK_UNSUPPORTED)))
    # Consul skips empty check definitions ("Check": {}), then numbers the rest.
    defined = [(where, f) for where, f in raw if any(_is_set(v) for v in f.values())]
    several = len(defined) > 1
    return [
        (
            _parse_check(f, where, inst, f"service:{inst.id}" + (f":{n}" if several else "")),
            _is_set(f.get("Status")),
        )
        for n, (where, f) in enumerate(defined, start=1)
    ]


def _parse_check(fields: Mapping[str, object], where: str, inst: Instance, default: str) -> Check:
    kinds = [name for name in _KINDS if _is_set(fields.get(name))]
    if len(kinds) != 1:
        raise ValidationError(where, "needs exactly one of TTL, HTTP or TCP")
    kind = _KINDS[kinds[0]]
    timed = kind is not CheckKind.TTL
    try:
        timeout = _go_duration(fields.get("Timeout"), "Timeout")
        dereg = _go_duration(
            fields.get("DeregisterCriticalServiceAfter"), "DeregisterCriticalServiceAfter"
        )
        return make_check(
            id=fields.get("CheckID") or default,
            name=fields.get("Name") or f"Service '{inst.service}' check",
            kind=kind,
            target=fields.get(kinds[0], ""),
            ttl=_go_duration(fields.get("TTL"), "TTL"),
            interval=_go_duration(fields.get("Interval"), "Interval"),
            timeout=(timeout or DEFAULT_CHECK_TIMEOUT) if timed else timeout,
            deregister_after=dereg or None,
            status=fields.get("Status") or None,
            notes=fields.get("Notes") or "",
        )
    except ValidationError as err:
        raise _consul_field(err, _MODEL_CHECK_FIELDS).within(where) from None


def _keep_state(
    checks: list[tuple[Check, bool]], prev: Instance | None, replace_all: bool
) -> list[Check]:
    """Consul's re-registration: same-ID checks keep their state; unlisted ones stay."""
    before = {c.id: c for c in prev.checks} if prev is not None else {}
    kept = []
    for check, explicit in checks:
        old = before.get(check.id)
        if old is not None and old.kind is check.kind and not explicit:
            check = dataclasses.replace(check, status=old.status, output=old.output)
        kept.append(check)
    if prev is not None and not replace_all:
        listed = {c.id for c in kept}
        kept.extend(c for c in prev.checks if c.id not in listed)
    return kept


def parse_check_update(body: Mapping[str, object]) -> tuple[Health, str]:
    """The body of PUT /v1/agent/check/update/:id: {"Status": ..., "Output": ...}."""
    fields = _fields(body, "", {"status": "Status", "output": "Output"}, {})
    status = fields.get("Status")
    if status not in CHECK_STATES:
        raise ValidationError("Status", "must be passing, warning or critical")
    output = fields.get("Output", "")
    if not isinstance(output, str):
        raise ValidationError("Output", "must be a string")
    return Health(status), output


# -- writes --------------------------------------------------------------------------------


async def register(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
    """PUT /v1/agent/service/register: add or replace a local instance; 200 once durable."""
    snap = ctx.registry.snapshot
    try:
        body = parse_json_object(req.body)
        inst = parse_registration(
            body,
            node=ctx.registry.local_node,
            previous=snap.instances,
            replace_checks=req.flag("replace-existing-checks"),
        )
    except ValidationError as err:
        raise ApiError.invalid(err) from None
    prev = snap.instances.get(inst.id)
    if prev is not None and not _is_local_agent(prev, snap):
        raise api_error(400, "ID", f"{inst.id!r} is the ID of another node's instance")
    owner = _foreign_check(ctx, inst)
    if owner:
        raise api_error(400, "Checks", f"check ID {owner!r} belongs to another service")
    await ctx.register(inst)
    return ApiResponse()


def _foreign_check(ctx: ApiContext, inst: Instance) -> str:
    """The first check ID of `inst` that another instance already has, if any."""
    for check in inst.checks:
        owner = ctx.registry.check_owner(check.id)
        if owner is not None and owner.id != inst.id:
            return check.id
    return ""


async def deregister(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
    """PUT /v1/agent/service/deregister/:id: remove a local instance and its checks."""
    ident = req.params["id"]
    snap = ctx.registry.snapshot
    inst = snap.instances.get(ident)
    if inst is None or not _is_local_agent(inst, snap):
        raise api_error(404, "id", f"Unknown service ID {ident!r}")
    changed = ctx.registry.remove(ident)
    await ctx.store.durable(changed.index)
    return ApiResponse()


def _ttl_check(ctx: ApiContext, check_id: str) -> Check:
    snap = ctx.registry.snapshot
    inst = ctx.registry.check_owner(check_id)
    if inst is None or not _is_local_agent(inst, snap):
        raise api_error(404, "check_id", f"Unknown check ID {check_id!r}")
    check = next(c for c in inst.checks if c.id == check_id)
    if check.kind is not CheckKind.TTL:
        raise api_error(400, "check_id", f"{check_id!r} is a {check.kind} check, not a TTL check")
    return check


async def _set_ttl(ctx: ApiContext, check_id: str, status: Health, note: str) -> ApiResponse:
    _ttl_check(ctx, check_id)
    try:
        ctx.checks.ttl_update(check_id, status, note[:MAX_OUTPUT])
    except NotFoundError:
        raise api_error(404, "check_id", f"Unknown check ID {check_id!r}") from None
    await ctx.store.durable(ctx.registry.snapshot.index)
    return ApiResponse()


def _ttl_write(status: Health) -> Write:
    async def write(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
        """PUT /v1/agent/check/{pass,warn,fail}/:check_id?note=: a TTL check's new status."""
        return await _set_ttl(ctx, req.params["check_id"], status, req.arg("note") or "")

    return write


async def check_update(req: ApiRequest, ctx: ApiContext) -> ApiResponse:
    """PUT /v1/agent/check/update/:check_id with {"Status": ..., "Output": ...}."""
    try:
        status, output = parse_check_update(parse_json_object(req.body))
    except ValidationError as err:
        raise ApiError.invalid(err) from None
    return await _set_ttl(ctx, req.params["check_id"], status, output)


# -- routes --------------------------------------------------------------------------------


def _service_key(req: ApiRequest) -> Sequence[str]:
    return (req.params["name"].lower(),)


def _everything(_req: ApiRequest) -> Sequence[str]:
    return (WATCH_ALL,)


def _get(path: str, read: Read, watch: Callable[[ApiRequest], Sequence[str]] | None) -> Route:
    return Route("GET", path, Access.READ, read=read, watch=watch)


ROUTES: tuple[Route, ...] = (
    Route("PUT", "/v1/agent/service/register", Access.WRITE, write=register),
    Route("PUT", "/v1/agent/service/deregister/{id}", Access.WRITE, write=deregister),
    Route("PUT", "/v1/agent/check/pass/{check_id}", Access.WRITE, write=_ttl_write(Health.PASSING)),
    Route("PUT", "/v1/agent/check/warn/{check_id}", Access.WRITE, write=_ttl_write(Health.WARNING)),
    Route(
        "PUT", "/v1/agent/check/fail/{check_id}", Access.WRITE, write=_ttl_write(Health.CRITICAL)
    ),
    Route("PUT", "/v1/agent/check/update/{check_id}", Access.WRITE, write=check_update),
    _get("/v1/agent/services", agent_services, _everything),
    _get("/v1/agent/checks", agent_checks, _everything),
    _get("/v1/agent/health/service/name/{name}", agent_health_by_name, None),
    _get("/v1/agent/health/service/id/{id}", agent_health_by_id, None),
    # Not "register": a GET of PUT /v1/agent/service/register is a 405, as in Consul.
    _get("/v1/agent/service/{id:(?!register$)[^/]+}", agent_service, _everything),
    _get("/v1/catalog/services", catalog_services, _everything),
    _get("/v1/catalog/service/{name}", catalog_service, _service_key),
    _get("/v1/catalog/node/{node}", catalog_node, _everything),
    _get("/v1/health/service/{name}", health_service, _service_key),
    _get("/v1/health/checks/{name}", health_checks, _service_key),
    _get("/v1/health/node/{node}", health_node, _everything),
    _get("/v1/health/state/{state}", health_state, _everything),
    *api_consul_node.ROUTES,
)
