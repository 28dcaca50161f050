"""A Consul HTTP API stand-in for tests.  State (in memory) and adapter (aiohttp); test-only.

This is a STAND-IN, not Consul: there is no Consul binary on these machines, so the
Consul mirror is tested against this server, which follows Consul's documented
semantics and, where the documentation is silent, its source (Consul 1.17-era CE):

- API docs (developer.hashicorp.com/consul/api-docs): agent/service, agent/check,
  catalog, health, status, agent (``/v1/agent/self``), and the blocking-queries page
  (features/blocking): ``?index=&wait=``, ``X-Consul-Index``.
- Source: ``agent/agent_endpoint.go`` (AgentRegisterService, AgentDeregisterService,
  AgentCheckPass/Warn/Fail/Update), ``agent/agent.go`` (addServiceInternal: check IDs
  ``service:<ID>`` / ``service:<ID>:<n>``, check state kept on re-registration, default
  weights, ``lan_ipv4``/``wan_ipv4`` tagged addresses), ``lib/json.go`` (DecodeJSON:
  unknown fields refused), ``agent/structs`` (ServiceDefinition, CheckType with its
  snake_case aliases, HealthCheck, NodeService, ServiceNode), ``agent/checks`` (TTL
  expiry: critical, "TTL expired"), ``agent/consul/rpc.go`` (blockingQuery).

What it does, as Consul does:

- Registration bodies are decoded like Go's encoding/json with DisallowUnknownFields:
  keys match fields case-insensitively, an unknown key is a 400
  ``Request decode failed: json: unknown field "X"`` (Consul 1.7+).  ID defaults to
  Name; Weights default to {Passing: 1, Warning: 1}.  Re-registering an ID replaces it;
  checks that already exist keep their status and output; the raft index moves only if
  something changed.  ``?replace-existing-checks`` drops the service's other checks.
- ``Check``/``Checks`` with a TTL create checks (CheckID given wins), critical unless
  ``Status`` is given; a TTL not refreshed in time turns critical ("TTL expired").
- Deregistration removes the service and its checks; an unknown ID is a 404.
  ``/v1/agent/check/register`` and ``/deregister/:id`` add and remove TTL checks on
  their own (a check without ServiceID is the node's: it counts for all its services).
- The catalog shows the agent's services on the agent's node at once (a real agent's
  anti-entropy syncs them within seconds).  Every node has the ``serfHealth`` check
  ("Serf Health Status", passing), which health results include, and the server
  node has the ``consul`` service (port 8300), as in a real catalog.
- Catalog and health reads carry ``X-Consul-Index`` (never below 1) and block with
  ``?index=N&wait=D`` (default 5m, max 10m, plus up to wait/16 jitter) until the
  index of the data they read goes above N, or the wait ends.  :meth:`reset_index`
  is a restore from an older snapshot: every index drops to 1 and blocked queries
  return at once with the lower index (a later query still carrying the old, higher
  index blocks until its wait ends, as in Consul: the client must reset to 0).
- ACLs (``acl_tokens``): a request without a token (``X-Consul-Token``, ``?token=``
  or ``Authorization: Bearer``) gets 403 "Permission denied", an unknown token 403
  "ACL not found"; ``/v1/status/*`` needs none.  Errors are text/plain, as Consul's.
- ``?dc=`` naming another datacenter: 500 "No path to datacenter".

- Agent endpoints carry no index and ``/v1/agent/services`` does not block; the
  agent's own view has no ``consul`` service and no serfHealth check.

Where it differs (on purpose; a test that relies on these is testing the stand-in):
only TTL checks (other check types are refused with a 400 naming the stand-in);
no DeregisterCriticalServiceAfter reaping; output-only TTL updates do not move the
index (Consul defers them by check_update_interval); ``?filter=`` knows only
``Sel == "v"``, ``Sel != "v"``, ``"v" in Sel`` joined by ``and``; ACLs are all or
nothing (no policies, reads are refused rather than filtered); only the endpoints in
:meth:`ConsulStandin._routes` (no ``/v1/catalog/register``, KV, sessions, Connect,
namespaces or partitions: aiohttp answers 404/405).

Fault switches for tests: ``fail_status`` (every request answers that status),
``delay`` (seconds before every answer), :meth:`stop_listening` / :meth:`resume`
(the listening socket and every connection really close: clients get connection
refused; resume listens on the same port), ``requests`` (the (method, path) log).
For assertions, without HTTP: :meth:`agent_services`, :meth:`checks`, ``index``,
``blocked`` (blocking queries parked now); other nodes: :meth:`register_foreign`,
:meth:`deregister_foreign`, :meth:`set_check_status` (e.g. a node's serfHealth)::

    async with ConsulStandin() as consul:      # or: await start(); ...; await close()
        ...  # point the client at consul.url
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
SERF_CHECK_ID = "serfHealth"
SERF_CHECK_NAME = "Serf Health Status"
CONSUL_VERSION = "1.17.0"
DEFAULT_WAIT = 300.0  # seconds; Consul's default blocking wait (5m)
MAX_WAIT = 600.0  # seconds; Consul's maximum blocking wait (10m)
JITTER_FRACTION = 16  # Consul adds up to wait/16 of random stagger to a blocking wait
OUTPUT_MAX_SIZE = 4096  # bytes; Consul's default check output limit
SHUTDOWN_TIMEOUT = 1.0  # seconds for the runner to finish handlers on close()
META_MAX_PAIRS, META_MAX_KEY, META_MAX_VALUE = 64, 128, 512  # structs.ValidateServiceMetadata
META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
JSON = "application/json"


class ConsulHttpError(Exception):
    """An answer in Consul's error shape: a status and a text/plain reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# -- decoding, as Go's encoding/json with DisallowUnknownFields -----------------------------


@dataclass(frozen=True, slots=True)
class Struct:
    """A Go struct: its name (for error texts), fields, and json-tag aliases."""

    name: str
    fields: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Any


@dataclass(frozen=True, slots=True)
class MapOf:
    value: Any


STR, INT, BOOL, DURATION, OBJECT = "string", "int", "bool", "duration", "object"


def _fields(names: str, kind: str) -> dict[str, Any]:
    return dict.fromkeys(names.split(), kind)


SERVICE_ADDRESS = Struct("ServiceAddress", {"Address": STR, "Port": INT})
WEIGHTS = Struct("Weights", {"Passing": INT, "Warning": INT})
CHECK_TYPE = Struct(
    "CheckType",
    {
        **_fields(
            "CheckID Name Status Notes HTTP H2PING Method Body TCP UDP AliasNode AliasService "
            "DockerContainerID Shell GRPC OSService TLSServerName ProxyHTTP ProxyGRPC",
            STR,
        ),
        **_fields("H2PingUseTLS DisableRedirects TCPUseTLS GRPCUseTLS TLSSkipVerify", BOOL),
        **_fields(
            "SuccessBeforePassing FailuresBeforeWarning FailuresBeforeCritical OutputMaxSize", INT
        ),
        **_fields("Interval Timeout TTL DeregisterCriticalServiceAfter", DURATION),
        "ScriptArgs": ListOf(STR),
        "Header": MapOf(ListOf(STR)),
        "ServiceID": STR,  # accepted and ignored, as Consul does
    },
    {
        "args": "ScriptArgs",
        "script_args": "ScriptArgs",
        "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
        "docker_container_id": "DockerContainerID",
        "tls_server_name": "TLSServerName",
        "tls_skip_verify": "TLSSkipVerify",
        "grpc_use_tls": "GRPCUseTLS",
        "h2ping_use_tls": "H2PingUseTLS",
        "service_id": "ServiceID",
    },
)
SERVICE_DEFINITION = Struct(
    "ServiceDefinition",
    {
        **_fields("Kind ID Name Address SocketPath Token", STR),
        "Tags": ListOf(STR),
        "TaggedAddresses": MapOf(SERVICE_ADDRESS),
        "Meta": MapOf(STR),
        "Port": INT,
        "Check": CHECK_TYPE,
        "Checks": ListOf(CHECK_TYPE),
        "Weights": WEIGHTS,
        "EnableTagOverride": BOOL,
        "Locality": OBJECT,
        "Proxy": OBJECT,
        "Connect": OBJECT,
    },
    {"enable_tag_override": "EnableTagOverride", "tagged_addresses": "TaggedAddresses"},
)
CHECK_UPDATE = Struct("checkUpdate", {"Status": STR, "Output": STR})
CHECK_DEFINITION = Struct(  # structs.CheckDefinition: a CheckType with ID and ServiceID
    "CheckDefinition",
    {**CHECK_TYPE.fields, "ID": STR, "Token": STR},
    CHECK_TYPE.aliases,
)

_GO_KINDS = {str: "string", bool: "bool", int: "number", float: "number", list: "array"}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION_UNITS |= {"m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("1m30s", "250ms", "0"); ValueError as Go's text."""
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if rest == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def _type_error(value: Any, where: str, go_type: str) -> ValueError:
    kind = _GO_KINDS.get(type(value), "object")
    if isinstance(value, int | float) and not isinstance(value, bool):
        kind = f"number {value}"
    return ValueError(
        f"json: cannot unmarshal {kind} into Go struct field {where} of type {go_type}"
    )


def decode(value: Any, spec: Any, where: str) -> Any:
    """`value` (parsed JSON) decoded into `spec` as Go would, keys renamed to field names."""
    if value is None:
        return None
    if isinstance(spec, Struct):
        return _decode_struct(value, spec, where)
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _type_error(value, where, "[]" + str(spec.item))
        return [decode(item, spec.item, where) for item in value]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise _type_error(value, where, "map[string]...")
        return {key: decode(item, spec.value, where) for key, item in value.items()}
    return _decode_scalar(value, spec, where)


def _decode_scalar(value: Any, spec: str, where: str) -> Any:
    if spec == DURATION:  # CheckType.UnmarshalJSON: a Go duration string or nanoseconds
        if isinstance(value, str):
            return parse_go_duration(value)
        return (
            value / 1e9 if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
        )
    expected: dict[str, tuple[type, ...]] = {
        STR: (str,),
        BOOL: (bool,),
        INT: (int,),
        OBJECT: (dict,),
    }
    if not isinstance(value, expected[spec]) or (spec == INT and isinstance(value, bool)):
        raise _type_error(value, where, spec)
    return value


_FOLDED: dict[int, dict[str, str]] = {}  # id(Struct) -> casefolded key -> field (the specs live on)


def _decode_struct(value: Any, spec: Struct, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(value, where, spec.name)
    folded = _FOLDED.get(id(spec))
    if folded is None:
        folded = _FOLDED[id(spec)] = {n.casefold(): n for n in (*spec.fields, *spec.aliases)}
    out: dict[str, Any] = {}
    aliased: dict[str, Any] = {}
    for key, item in value.items():
        name = key if key in spec.fields or key in spec.aliases else folded.get(key.casefold())
        if name is None:
            raise ValueError(f'json: unknown field "{key}"')
        if name in spec.aliases:
            target = spec.aliases[name]
            aliased[target] = decode(item, spec.fields[target], f"{spec.name}.{target}")
        else:
            out[name] = decode(item, spec.fields[name], f"{spec.name}.{name}")
    for name, item in aliased.items():  # a snake_case alias fills a field left empty
        if not out.get(name):
            out[name] = item
    return {name: item for name, item in out.items() if item is not None}


def parse_body(raw: bytes, spec: Struct) -> dict[str, Any]:
    """A request body decoded as Consul's decodeBody; 400 with Consul's reason on error."""
    try:
        value = json.loads(raw) if raw.strip() else None
    except ValueError as error:
        raise ConsulHttpError(400, f"Request decode failed: {error}") from error
    if value is None:
        raise ConsulHttpError(400, "Request decode failed: EOF")
    try:
        return decode(value, spec, spec.name) or {}
    except ValueError as error:
        raise ConsulHttpError(400, f"Request decode failed: {error}") from error


# -- the catalog: nodes, services, checks, indexes ------------------------------------------


@dataclass
class NodeEntry:
    name: str
    address: str
    node_id: str
    meta: dict[str, str]
    create_index: int = 0
    modify_index: int = 0


@dataclass
class ServiceEntry:
    node: str
    service: dict[str, Any]  # NodeService fields, without the raft indexes
    create_index: int = 0
    modify_index: int = 0


@dataclass
class CheckEntry:
    node: str
    check: dict[str, Any]  # HealthCheck fields, without the raft indexes
    ttl: float | None = None
    create_index: int = 0
    modify_index: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class Change:
    """What one write touched: catalog tables and service names (for per-query indexes)."""

    tables: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tables or self.services)


def new_service(defn: dict[str, Any]) -> dict[str, Any]:
    """A NodeService from a decoded ServiceDefinition, defaults filled as the agent does."""
    name = defn.get("Name", "")
    address = defn.get("Address", "")
    port = defn.get("Port", 0)
    tagged = {key: dict(value) for key, value in (defn.get("TaggedAddresses") or {}).items()}
    for key in _default_tagged_keys(address):
        tagged.setdefault(key, {"Address": address, "Port": port})
    weights = defn.get("Weights") or {"Passing": 1, "Warning": 1}
    return {
        "Kind": defn.get("Kind", ""),
        "ID": defn.get("ID") or name,
        "Service": name,
        "Tags": list(defn.get("Tags") or []),
        "Address": address,
        "TaggedAddresses": tagged,
        "Meta": dict(defn.get("Meta") or {}),
        "Port": port,
        "SocketPath": defn.get("SocketPath", ""),
        "Weights": {"Passing": weights.get("Passing", 0), "Warning": weights.get("Warning", 0)},
        "EnableTagOverride": defn.get("EnableTagOverride", False),
        "Locality": defn.get("Locality"),
    }


def _default_tagged_keys(address: str) -> tuple[str, ...]:
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", address):
        return ("lan_ipv4", "wan_ipv4")
    return ("lan_ipv6", "wan_ipv6") if ":" in address else ()


def validate_definition(defn: dict[str, Any]) -> list[dict[str, Any]]:
    """Consul's checks on a ServiceDefinition; its check types (TTL only here), or 400."""
    if not defn.get("Name"):
        raise ConsulHttpError(400, "Missing service name")
    if defn.get("Address") in ("0.0.0.0", "::", "[::]"):
        raise ConsulHttpError(400, "Invalid service address")
    if defn.get("Kind") or defn.get("Proxy") or defn.get("Connect"):
        raise ConsulHttpError(400, "consul stand-in: Connect and proxy services are not modelled")
    _validate_meta(defn.get("Meta") or {})
    weights = defn.get("Weights")
    if weights is not None and weights.get("Passing", 0) < 1:
        raise ConsulHttpError(400, "Invalid Weights: Passing must be greater than 0")
    if weights is not None and weights.get("Warning", 0) < 0:
        raise ConsulHttpError(400, "Invalid Weights: Warning must be greater or equal than 0")
    check_types = [defn["Check"]] if defn.get("Check") else []
    check_types += defn.get("Checks") or []
    for check_type in check_types:
        _validate_check_type(check_type)
    return check_types


def _validate_meta(meta: dict[str, str]) -> None:
    if len(meta) > META_MAX_PAIRS:
        raise ConsulHttpError(
            400, f"Invalid Service Meta: Node metadata cannot contain more than {META_MAX_PAIRS}"
        )
    for key, value in meta.items():
        problem = ""
        if not META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_MAX_KEY:
            problem = f"Key is too long (limit: {META_MAX_KEY} characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > META_MAX_VALUE:
            problem = f"Value is too long (limit: {META_MAX_VALUE} characters)"
        if problem:
            raise ConsulHttpError(
                400,
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): "
                f"{problem}",
            )


def _validate_check_type(check_type: dict[str, Any]) -> None:
    status = check_type.get("Status", "")
    if status and status not in STATUSES:
        raise ConsulHttpError(400, "Status for checks must 'passing', 'warning', 'critical'")
    runs = ("ScriptArgs", "HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService")
    interval_check = any(check_type.get(name) for name in runs)
    ttl, interval = check_type.get("TTL", 0.0), check_type.get("Interval", 0.0)
    if interval > 0 and ttl > 0:
        raise ConsulHttpError(400, "Invalid check: Interval and TTL cannot both be specified")
    if interval_check and interval <= 0:
        raise ConsulHttpError(
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or "
            "OSService checks",
        )
    alias = check_type.get("AliasNode") or check_type.get("AliasService")
    if not interval_check and not alias and ttl <= 0:
        raise ConsulHttpError(400, "Invalid check: TTL must be > 0 for TTL checks")
    if interval_check or alias:
        raise ConsulHttpError(400, "consul stand-in: only TTL checks are modelled")


def plan_checks(
    service: dict[str, Any], check_types: list[dict[str, Any]], node: str
) -> list[tuple[dict[str, Any], float]]:
    """The HealthChecks (and TTLs) a registration creates, named as addServiceInternal does."""
    planned = []
    for number, check_type in enumerate(check_types, start=1):
        check_id = check_type.get("CheckID") or f"service:{service['ID']}"
        if not check_type.get("CheckID") and len(check_types) > 1:
            check_id += f":{number}"
        check = {
            "Node": node,
            "CheckID": check_id,
            "Name": check_type.get("Name") or f"Service '{service['Service']}' check",
            "Status": check_type.get("Status") or CRITICAL,
            "Notes": check_type.get("Notes", ""),
            "Output": "",
            "ServiceID": service["ID"],
            "ServiceName": service["Service"],
            "ServiceTags": list(service["Tags"]),
            "Type": "ttl",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
        }
        planned.append((check, check_type["TTL"]))
    return planned


def truncate_output(output: str) -> str:
    """Check output capped as Consul's TTL update caps it."""
    data = output.encode()
    if len(data) <= OUTPUT_MAX_SIZE:
        return output
    head = data[:OUTPUT_MAX_SIZE].decode(errors="ignore")
    return f"{head} ... (captured {OUTPUT_MAX_SIZE} of {len(data)} bytes)"


Key = tuple[str, str]  # (node, service ID) or (node, check ID)
WatchKey = tuple[str, str]  # ("table", name) or ("service", name): what a read depends on


class Catalog:
    """Nodes, services and checks of one datacenter, with raft-style indexes.  State.

    Every write that changes something takes the next index and stamps it on what it
    touched, on the tables it touched and on the service names it touched; a read's
    index is the highest of those it depends on (Consul's per-table and per-service
    index entries).  A blocked read parks on the watch keys it depends on and is woken
    by the writes that touch them.  Secondary maps (by name, by node, by owner) keep
    every read and write proportional to what it touches, not to the catalog's size.
    """

    def __init__(self, datacenter: str) -> None:
        self.datacenter = datacenter
        self.index = 0
        self.nodes: dict[str, NodeEntry] = {}
        self.services: dict[Key, ServiceEntry] = {}
        self.checks: dict[Key, CheckEntry] = {}
        self.tables = {"nodes": 0, "services": 0, "checks": 0}
        self.service_index: dict[str, int] = {}
        self.generation = 0  # bumped by reset(): blocked queries return at once
        self.parked = 0  # blocking queries waiting right now
        self._by_name: dict[str, dict[Key, ServiceEntry]] = {}
        self._by_node: dict[str, dict[str, ServiceEntry]] = {}
        self._by_owner: dict[Key, dict[str, CheckEntry]] = {}  # (node, service ID or "")
        self._waiters: dict[WatchKey, set[asyncio.Future[None]]] = {}

    def commit(self, change: Change) -> int:
        self.index += 1
        for table in change.tables:
            self.tables[table] = self.index
        for name in change.services:
            self.service_index[name] = self.index
        keys = {("table", t) for t in change.tables} | {("service", s) for s in change.services}
        for key in keys:
            for future in self._waiters.pop(key, ()):
                if not future.done():
                    future.set_result(None)
        return self.index

    # -- the maps --------------------------------------------------------------------------

    def _put_service(self, entry: ServiceEntry) -> None:
        key = (entry.node, entry.service["ID"])
        self._pop_service(key)
        self.services[key] = entry
        self._by_name.setdefault(entry.service["Service"], {})[key] = entry
        self._by_node.setdefault(entry.node, {})[key[1]] = entry

    def _pop_service(self, key: Key) -> ServiceEntry | None:
        entry = self.services.pop(key, None)
        if entry is not None:
            name = entry.service["Service"]
            self._by_name[name].pop(key, None)
            if not self._by_name[name]:
                del self._by_name[name]
            self._by_node[entry.node].pop(key[1], None)
        return entry

    def _put_check(self, entry: CheckEntry) -> None:
        key = (entry.node, entry.check["CheckID"])
        old = self.checks.get(key)
        if old is not None and old is not entry:
            self._drop_check(old)
        self.checks[key] = entry
        owner = (entry.node, entry.check["ServiceID"])
        self._by_owner.setdefault(owner, {})[entry.check["CheckID"]] = entry

    def _unlink_check(self, entry: CheckEntry) -> None:
        """Out of its owner's map (by its current ServiceID)."""
        owner = (entry.node, entry.check["ServiceID"])
        checks = self._by_owner.get(owner, {})
        if checks.get(entry.check["CheckID"]) is entry:
            del checks[entry.check["CheckID"]]
            if not checks:
                del self._by_owner[owner]

    def _drop_check(self, entry: CheckEntry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        key = (entry.node, entry.check["CheckID"])
        if self.checks.get(key) is entry:
            del self.checks[key]
        self._unlink_check(entry)

    # -- writes ----------------------------------------------------------------------------

    def ensure_node(self, name: str, address: str, meta: dict[str, str] | None = None) -> None:
        """A node and its serfHealth check, created once."""
        if name in self.nodes:
            return
        node_meta = {"consul-network-segment": "", "consul-version": CONSUL_VERSION}
        node = NodeEntry(name, address, str(uuid.uuid4()), node_meta | (meta or {}))
        serf = {
            "Node": name,
            "CheckID": SERF_CHECK_ID,
            "Name": SERF_CHECK_NAME,
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
        }
        index = self.commit(Change({"nodes", "checks"}))
        node.create_index = node.modify_index = index
        self.nodes[name] = node
        self._put_check(CheckEntry(name, serf, None, index, index))

    def register(
        self,
        node: str,
        service: dict[str, Any],
        planned: list[tuple[dict[str, Any], float | None]],
        replace_checks: bool = False,
    ) -> bool:
        """Add or replace a service and its checks; True if anything changed."""
        old = self.services.get((node, service["ID"]))
        change = Change()
        if old is None or old.service != service:
            change.tables.add("services")
            change.services |= {service["Service"], *([old.service["Service"]] if old else [])}
        checks = []
        for check, ttl in planned:
            prev = self.checks.get((node, check["CheckID"]))
            if prev is not None:  # addServiceInternal restores status and output
                check = check | {"Status": prev.check["Status"], "Output": prev.check["Output"]}
            if prev is None or prev.check != check or prev.ttl != ttl:
                change.tables.add("checks")
                change.services.add(service["Service"])
            checks.append((check, ttl))
        wanted = {check["CheckID"] for check, _ in checks}
        owned = self._by_owner.get((node, service["ID"]), {})
        dropped = [e for cid, e in owned.items() if replace_checks and cid not in wanted]
        if dropped:
            change.tables.add("checks")
            change.services.add(service["Service"])
        index = self.commit(change) if change else self.index
        if old is None or old.service != service:
            created = old.create_index if old else index
            self._put_service(ServiceEntry(node, service, created, index))
        for check, ttl in checks:
            self._apply_check(node, check, ttl, index)
        for entry in dropped:
            self._drop_check(entry)
        return bool(change)

    def _apply_check(self, node: str, check: dict[str, Any], ttl: float | None, index: int) -> None:
        prev = self.checks.get((node, check["CheckID"]))
        if prev is None:
            prev = CheckEntry(node, check, ttl, index, index)
            self._put_check(prev)
        elif prev.check != check or prev.ttl != ttl:
            self._unlink_check(prev)
            prev.check, prev.ttl, prev.modify_index = check, ttl, index
            self._put_check(prev)
        self._arm_ttl(prev)

    def add_check(self, node: str, check: dict[str, Any], ttl: float | None) -> None:
        """A check registered on its own (AgentRegisterCheck): its status starts afresh."""
        prev = self.checks.get((node, check["CheckID"]))
        if prev is None or prev.check != check or prev.ttl != ttl:
            names = {check["ServiceName"]} if check["ServiceName"] else set()
            names |= self._names_for_check(prev) if prev else set()
            if not check["ServiceName"]:
                names |= {s.service["Service"] for s in self.services_on(node)}
            index = self.commit(Change({"checks"}, names))
            if prev is not None:
                self._drop_check(prev)
            self._put_check(CheckEntry(node, check, ttl, index, index))
        self._arm_ttl(self.checks[(node, check["CheckID"])])

    def remove_check(self, node: str, check_id: str) -> bool:
        entry = self.checks.get((node, check_id))
        if entry is None:
            return False
        self.commit(Change({"checks"}, self._names_for_check(entry)))
        self._drop_check(entry)
        return True

    def deregister(self, node: str, service_id: str) -> bool:
        """Remove a service and its checks; False if there was no such service."""
        entry = self.services.get((node, service_id))
        if entry is None:
            return False
        self.commit(Change({"services", "checks"}, {entry.service["Service"]}))
        self._pop_service((node, service_id))
        for check in list(self._by_owner.get((node, service_id), {}).values()):
            self._drop_check(check)
        return True

    def update_check(self, node: str, check_id: str, status: str, output: str) -> CheckEntry:
        """A check's new status and output (KeyError if unknown); a new status moves the index."""
        entry = self.checks[(node, check_id)]
        output = truncate_output(output)
        if entry.check["Status"] != status:
            index = self.commit(Change({"checks"}, self._names_for_check(entry)))
            entry.check = entry.check | {"Status": status, "Output": output}
            entry.modify_index = index
        else:  # output only: Consul syncs it after check_update_interval; no index change
            entry.check = entry.check | {"Output": output}
        return entry

    def _names_for_check(self, entry: CheckEntry) -> set[str]:
        if entry.check["ServiceName"]:
            return {entry.check["ServiceName"]}
        return {s.service["Service"] for s in self._by_node.get(entry.node, {}).values()}

    def _arm_ttl(self, entry: CheckEntry) -> None:
        """(Re)start a TTL check's timer: not refreshed in time, it turns critical."""
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.ttl:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(entry.ttl, self._ttl_expired, entry)

    def _ttl_expired(self, entry: CheckEntry) -> None:
        entry.timer = None
        if self.checks.get((entry.node, entry.check["CheckID"])) is not entry:
            return
        last = entry.check["Output"]
        output = f"TTL expired (last output before timeout follows): {last}" if last else ""
        self.update_check(entry.node, entry.check["CheckID"], CRITICAL, output or "TTL expired")

    def refresh_ttl(self, entry: CheckEntry) -> None:
        self._arm_ttl(entry)

    def reset(self) -> None:
        """A restore from an older snapshot: every index drops to 1; blocked reads return."""
        self.index = 1
        for table in self.tables:
            self.tables[table] = 1
        self.service_index = dict.fromkeys(self.service_index, 1)
        entries: list[NodeEntry | ServiceEntry | CheckEntry] = [
            *self.nodes.values(),
            *self.services.values(),
            *self.checks.values(),
        ]
        for entry in entries:
            entry.create_index = entry.modify_index = 1
        self.generation += 1
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        for entry in self.checks.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None

    # -- reads, their indexes and watch keys -----------------------------------------------

    def instances(self, name: str) -> list[ServiceEntry]:
        found = self._by_name.get(name, {})
        return [found[key] for key in sorted(found)]

    def services_on(self, node: str) -> list[ServiceEntry]:
        return list(self._by_node.get(node, {}).values())

    def checks_on(self, node: str) -> list[CheckEntry]:
        """A node's checks: its own, then its services', in ID order."""
        owners = [(node, "")] + [(node, sid) for sid in sorted(self._by_node.get(node, {}))]
        found = [self._by_owner.get(owner, {}) for owner in owners]
        return [checks[cid] for checks in found for cid in sorted(checks)]

    def service_read(self, name: str, with_checks: bool) -> tuple[int, set[WatchKey]]:
        """Consul's maxIndexForService: the service's own entry, else the tables'."""
        if name in self._by_name:
            return self.service_index.get(name, self.index), {("service", name)}
        tables = ("nodes", "services", "checks") if with_checks else ("nodes", "services")
        return max(self.tables[t] for t in tables), {("table", t) for t in tables}

    def table_read(self, table: str) -> tuple[int, set[WatchKey]]:
        return self.tables[table], {("table", table)}

    def node_checks(self, node: str, service_id: str) -> list[CheckEntry]:
        """The node's own checks, then the service's, as health results list them."""
        own = self._by_owner.get((node, ""), {})
        service = self._by_owner.get((node, service_id), {})
        return [own[c] for c in sorted(own)] + [service[c] for c in sorted(service)]

    async def wait_beyond(
        self, read: Callable[[], tuple[int, set[WatchKey]]], min_index: int, wait: float
    ) -> int:
        """Consul's blockingQuery: the read's index once above `min_index`, or at `wait`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        generation = self.generation
        while True:
            index, keys = read()
            index = max(1, index)
            remaining = deadline - loop.time()
            if min_index == 0 or index > min_index or self.generation != generation:
                return index
            if remaining <= 0:
                return index
            await self._park(keys, remaining)

    async def _park(self, keys: set[WatchKey], seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiters.setdefault(key, set()).add(future)
        self.parked += 1
        try:
            async with asyncio.timeout(seconds):
                await future
        except TimeoutError:
            pass
        finally:
            self.parked -= 1
            for key in keys:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[key]


# -- renderers: Consul's JSON shapes --------------------------------------------------------


def render_node(node: NodeEntry, datacenter: str) -> dict[str, Any]:
    """structs.Node (catalog/nodes, and "Node" in health results)."""
    address = node.address
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": address,
        "Datacenter": datacenter,
        "TaggedAddresses": dict.fromkeys(("lan", "lan_ipv4", "wan", "wan_ipv4"), address),
        "Meta": dict(node.meta),
        "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def _service_fields(service: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"Kind": service["Kind"]} if service["Kind"] else {}
    out |= {
        "ID": service["ID"],
        "Service": service["Service"],
        "Tags": list(service["Tags"]),
        "Address": service["Address"],
    }
    if service["TaggedAddresses"]:
        out["TaggedAddresses"] = {k: dict(v) for k, v in service["TaggedAddresses"].items()}
    out |= {"Meta": dict(service["Meta"]), "Port": service["Port"]}
    if service["SocketPath"]:
        out["SocketPath"] = service["SocketPath"]
    out |= {"Weights": dict(service["Weights"]), "EnableTagOverride": service["EnableTagOverride"]}
    return out


def render_agent_service(entry: ServiceEntry, datacenter: str) -> dict[str, Any]:
    """api.AgentService (/v1/agent/services values)."""
    out = _service_fields(entry.service)
    if entry.service["Locality"]:
        out["Locality"] = dict(entry.service["Locality"])
    return out | {"Datacenter": datacenter}


def render_node_service(entry: ServiceEntry) -> dict[str, Any]:
    """structs.NodeService ("Service" in health results)."""
    out = _service_fields(entry.service)
    out |= {"Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {}, "PeerName": ""}
    if entry.service["Locality"]:
        out["Locality"] = dict(entry.service["Locality"])
    return out | {"CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index}


def render_service_node(node: NodeEntry, entry: ServiceEntry, datacenter: str) -> dict[str, Any]:
    """structs.ServiceNode (/v1/catalog/service/:name elements)."""
    rendered = render_node(node, datacenter)
    service = entry.service
    out = {key: rendered[key] for key in ("ID", "Node", "Address", "Datacenter")}
    out |= {"TaggedAddresses": rendered["TaggedAddresses"], "NodeMeta": rendered["Meta"]}
    out |= {
        "ServiceKind": service["Kind"],
        "ServiceID": service["ID"],
        "ServiceName": service["Service"],
        "ServiceTags": list(service["Tags"]),
        "ServiceAddress": service["Address"],
    }
    if service["TaggedAddresses"]:
        tagged = {k: dict(v) for k, v in service["TaggedAddresses"].items()}
        out["ServiceTaggedAddresses"] = tagged
    out |= {
        "ServiceWeights": dict(service["Weights"]),
        "ServiceMeta": dict(service["Meta"]),
        "ServicePort": service["Port"],
        "ServiceSocketPath": service["SocketPath"],
        "ServiceEnableTagOverride": service["EnableTagOverride"],
        "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
    }
    if service["Locality"]:
        out["ServiceLocality"] = dict(service["Locality"])
    return out | {"CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index}


def render_check(entry: CheckEntry, *, local: bool = False) -> dict[str, Any]:
    """structs.HealthCheck; the agent's own view (`local`) has no raft indexes."""
    out = dict(entry.check)
    out["ServiceTags"] = list(out["ServiceTags"])
    out["Definition"] = {}
    if local:
        return out | {"CreateIndex": 0, "ModifyIndex": 0}
    return out | {"CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index}


# -- ?filter= (a small subset of go-bexpr) --------------------------------------------------

_SELECTOR = r"[A-Za-z_][\w\-]*(?:\.[\w\-]+|\[\"[^\"]*\"\])*"
_VALUE = r"\"[^\"]*\"|`[^`]*`|[\w.\-]+"
_COMPARE = re.compile(rf"^\s*(?P<sel>{_SELECTOR})\s*(?P<op>==|!=)\s*(?P<val>{_VALUE})\s*$")
_MEMBER = re.compile(rf"^\s*(?P<val>{_VALUE})\s+(?P<op>in|not in)\s+(?P<sel>{_SELECTOR})\s*$")


def parse_filter(text: str) -> Callable[[Any], bool]:
    """A predicate for `?filter=`: clauses `Sel == v`, `Sel != v`, `v in Sel`, `and`-ed."""
    clauses = []
    for clause in re.split(r"\s+and\s+", text.strip()):
        match = _COMPARE.match(clause) or _MEMBER.match(clause)
        if match is None:
            raise ConsulHttpError(
                400,
                f"Failed to create boolean expression evaluator: {clause!r} is outside the "
                "consul stand-in's filter subset",
            )
        path = re.findall(r"\[\"([^\"]*)\"\]|([\w\-]+)", match["sel"])
        clauses.append(([a or b for a, b in path], match["op"], match["val"].strip('"`')))
    return lambda obj: all(_holds(obj, *clause) for clause in clauses)


def _holds(obj: Any, path: list[str], op: str, value: str) -> bool:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    if op in ("in", "not in"):
        found = value in obj if isinstance(obj, list | dict) else value in str(obj or "")
        return found == (op == "in")
    text = json.dumps(obj) if isinstance(obj, bool) else ("" if obj is None else str(obj))
    return (text == value) == (op == "==")


def _filtered(request: web.Request, items: Iterable[Any]) -> list[Any]:
    text = request.query.get("filter", "")
    if not text:
        return list(items)
    keep = parse_filter(text)
    return [item for item in items if keep(item)]


def _owner(entry: ServiceEntry) -> tuple[str, str]:
    return entry.node, entry.service["ID"]


def _has_tags(service: dict[str, Any], tags: list[str]) -> bool:
    own = {tag.lower() for tag in service["Tags"]}
    return all(tag.lower() in own for tag in tags)


def _parse_blocking(query: Any) -> tuple[int, float]:
    """?index= and ?wait= as Consul's parseWait reads them (with its jitter)."""
    min_index = 0
    if query.get("index", ""):
        try:
            min_index = int(query["index"])
        except ValueError:
            raise ConsulHttpError(400, "Invalid index") from None
        if min_index < 0:
            raise ConsulHttpError(400, "Invalid index")
    wait = DEFAULT_WAIT
    if query.get("wait", ""):
        try:
            wait = parse_go_duration(query["wait"])
        except ValueError:
            raise ConsulHttpError(400, "Invalid wait time") from None
    wait = min(max(wait, 0.0), MAX_WAIT)
    return min_index, wait + random.uniform(0, wait / JITTER_FRACTION)


def _passing_only(query: Any) -> bool:
    if "passing" not in query:
        return False
    value = query["passing"].lower()
    if value in ("", "1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise ConsulHttpError(400, "Invalid value for ?passing")


# -- the server -----------------------------------------------------------------------------


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason, content_type="text/plain")


def _json(body: Any, index: int | None = None) -> web.Response:
    headers = {}
    if index is not None:  # catalog and health reads; agent endpoints carry no index
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
    return web.Response(text=json.dumps(body), content_type=JSON, headers=headers)


class ConsulStandin:
    """Consul HTTP API stand-in (there is no Consul binary here); follows Consul's documented
    semantics.  One agent (`node`, a server) on 127.0.0.1 with its datacenter's catalog."""

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node: str = "consul-1",
        acl_tokens: set[str] | None = None,
        host: str = "127.0.0.1",
        consul_service: bool = True,
    ) -> None:
        self.datacenter = datacenter
        self.node = node
        self.host = host
        self.acl_tokens = set(acl_tokens) if acl_tokens is not None else None
        self.fail_status: int | None = None
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self.catalog = Catalog(datacenter)
        self._consul_service = consul_service
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def blocked(self) -> int:
        """How many blocking queries are parked right now (for tests to wait on)."""
        return self.catalog.parked

    @property
    def index(self) -> int:
        """The current raft index (the highest any read can report)."""
        return max(1, self.catalog.index)

    # -- lifecycle and faults --------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        self.catalog.ensure_node(self.node, self.host)
        if self._consul_service:
            self._register_consul_service()
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._routes())
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        await self._listen(port)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None, "start() first"
        site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
        await site.start()
        self._site = site
        self.port = site.port

    async def stop_listening(self) -> None:
        """An outage: the listening socket and every open connection close (refused)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._drop_connections()

    async def resume(self) -> None:
        """Listen again on the same port, with the same state."""
        if self._site is None:
            await self._listen(self.port)

    def _drop_connections(self) -> None:
        if self._runner is None or self._runner.server is None:
            return
        for connection in self._runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()

    async def close(self) -> None:
        self.catalog.close()
        if self._runner is not None:
            self._drop_connections()
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> ConsulStandin:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def reset_index(self) -> None:
        """A Consul restore from an older snapshot: the raft index goes backwards (to 1)."""
        self.catalog.reset()

    # -- state for assertions and for other nodes (no HTTP) --------------------------------

    def agent_services(self) -> dict[str, dict[str, Any]]:
        """As GET /v1/agent/services would return."""
        return {
            entry.service["ID"]: render_agent_service(entry, self.datacenter)
            for entry in self._local_services()
        }

    def checks(self) -> dict[str, dict[str, Any]]:
        """As GET /v1/agent/checks would return."""
        return {
            entry.check["CheckID"]: render_check(entry, local=True)
            for entry in self.catalog.checks_on(self.node)
            if entry.check["CheckID"] != SERF_CHECK_ID
        }

    def register_foreign(
        self, service: dict[str, Any], node: str = "node-2", *, address: str = "127.0.0.2"
    ) -> None:
        """A service of another node's agent, in the agent registration shape; its checks
        take `Status` (default critical) and are never expired here."""
        if node == self.node:
            raise ValueError(f"{node!r} is the stand-in's own node: register through its agent")
        try:
            defn = decode(service, SERVICE_DEFINITION, SERVICE_DEFINITION.name) or {}
            for check_type in [defn.get("Check") or {}, *(defn.get("Checks") or [])]:
                check_type.setdefault("TTL", 60.0)
            node_service = new_service(defn)
            check_types = validate_definition(defn)
        except (ValueError, ConsulHttpError) as error:
            raise ValueError(f"register_foreign({service!r}): {error}") from error
        self.catalog.ensure_node(node, address)
        planned: list[tuple[dict[str, Any], float | None]] = [
            (check, None) for check, _ in plan_checks(node_service, check_types, node)
        ]
        self.catalog.register(node, node_service, planned)

    def deregister_foreign(self, service_id: str, node: str = "node-2") -> None:
        if not self.catalog.deregister(node, service_id):
            raise KeyError(f"no service {service_id!r} on node {node!r}")

    def set_check_status(
        self, check_id: str, status: str, *, node: str | None = None, output: str = ""
    ) -> None:
        """Any node's check to `status` (e.g. "serfHealth" critical: the node has failed)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        self.catalog.update_check(node or self.node, check_id, status, output)

    def _local_services(self) -> list[ServiceEntry]:
        return [
            entry
            for entry in sorted(self.catalog.services_on(self.node), key=lambda e: e.service["ID"])
            if not (self._consul_service and entry.service["ID"] == "consul")
        ]

    def _register_consul_service(self) -> None:
        meta = {"raft_version": "3", "serf_protocol_current": "2", "version": CONSUL_VERSION}
        defn = {"Name": "consul", "Port": 8300, "Meta": meta}
        self.catalog.register(self.node, new_service(defn), [])

    # -- HTTP: middleware and routes -------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            return _text(self.fail_status, f"consul stand-in: injected HTTP {self.fail_status}")
        try:
            self._check_acl(request)
            self._check_datacenter(request)
            response: web.StreamResponse = await handler(request)
        except ConsulHttpError as error:
            return _text(error.status, error.reason)
        return response

    def _check_acl(self, request: web.Request) -> None:
        if self.acl_tokens is None or request.path.startswith("/v1/status/"):
            return
        token = request.headers.get("X-Consul-Token") or request.query.get("token", "")
        bearer = request.headers.get("Authorization", "")
        if not token and bearer.lower().startswith("bearer "):
            token = bearer[len("bearer ") :].strip()
        if not token:
            raise ConsulHttpError(403, "Permission denied")
        if token not in self.acl_tokens:
            raise ConsulHttpError(403, "ACL not found")

    def _check_datacenter(self, request: web.Request) -> None:
        dc = request.query.get("dc", "")
        if dc and dc != self.datacenter and request.path.startswith(("/v1/catalog", "/v1/health")):
            raise ConsulHttpError(500, "No path to datacenter")

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.put("/v1/agent/service/register", self._register),
            web.put("/v1/agent/service/deregister/{id:.+}", self._deregister),
            web.put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", self._check_verb),
            web.put("/v1/agent/check/update/{id:.+}", self._check_update),
            web.put("/v1/agent/check/register", self._check_register),
            web.put("/v1/agent/check/deregister/{id:.+}", self._check_deregister),
            web.get("/v1/agent/services", self._agent_services),
            web.get("/v1/agent/checks", self._agent_checks),
            web.get("/v1/agent/self", self._agent_self),
            web.get("/v1/catalog/services", self._catalog_services),
            web.get("/v1/catalog/service/{name}", self._catalog_service),
            web.get("/v1/catalog/nodes", self._catalog_nodes),
            web.get("/v1/health/service/{name}", self._health_service),
            web.get("/v1/health/state/{state}", self._health_state),
            web.get("/v1/status/leader", self._status_leader),
            web.get("/v1/status/peers", self._status_peers),
        ]

    # -- agent writes ----------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        defn = parse_body(await request.read(), SERVICE_DEFINITION)
        check_types = validate_definition(defn)
        service = new_service(defn)
        planned = plan_checks(service, check_types, self.node)
        replace = request.query.get("replace-existing-checks", "") not in ("", "false", "0")
        self.catalog.register(self.node, service, list(planned), replace)
        return web.Response()

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        protected = self._consul_service and service_id == "consul"
        if protected or not self.catalog.deregister(self.node, service_id):
            raise ConsulHttpError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        return web.Response()

    async def _check_verb(self, request: web.Request) -> web.Response:
        status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}[request.match_info["verb"]]
        self._update_ttl(request.match_info["id"], status, request.query.get("note", ""))
        return web.Response()

    async def _check_update(self, request: web.Request) -> web.Response:
        update = parse_body(await request.read(), CHECK_UPDATE)
        status = update.get("Status", "")
        if status not in STATUSES:
            raise ConsulHttpError(400, f"Invalid check status: '{status}'")
        self._update_ttl(request.match_info["id"], status, update.get("Output", ""))
        return web.Response()

    async def _check_register(self, request: web.Request) -> web.Response:
        """AgentRegisterCheck: a TTL check on the node, or on one of the agent's services."""
        defn = parse_body(await request.read(), CHECK_DEFINITION)
        if not defn.get("Name"):
            raise ConsulHttpError(400, "Missing check name")
        if defn.get("Status", "") not in ("", *STATUSES):
            raise ConsulHttpError(400, "Bad check status")
        _validate_check_type(defn)
        service_id = defn.get("ServiceID", "")
        owner = self.catalog.services.get((self.node, service_id))
        if service_id and owner is None:
            raise ConsulHttpError(500, f'ServiceID "{service_id}" does not exist')
        service = owner.service if owner else {"ID": "", "Service": "", "Tags": []}
        check = plan_checks(
            service, [defn | {"CheckID": defn.get("ID") or defn["Name"]}], self.node
        )
        self.catalog.add_check(self.node, *check[0])
        return web.Response()

    async def _check_deregister(self, request: web.Request) -> web.Response:
        check_id = request.match_info["id"]
        if check_id == SERF_CHECK_ID or not self.catalog.remove_check(self.node, check_id):
            raise ConsulHttpError(
                404,
                f'Unknown check ID "{check_id}". '
                "Ensure that the check ID is passed, not the check name.",
            )
        return web.Response()

    def _update_ttl(self, check_id: str, status: str, output: str) -> None:
        entry = self.catalog.checks.get((self.node, check_id))
        if entry is None or check_id == SERF_CHECK_ID:
            raise ConsulHttpError(
                404,
                f'Unknown check ID "{check_id}". '
                "Ensure that the check ID is passed, not the check name.",
            )
        if not entry.ttl:
            raise ConsulHttpError(500, f'CheckID "{check_id}" does not have associated TTL')
        self.catalog.update_check(self.node, check_id, status, output)
        self.catalog.refresh_ttl(entry)

    # -- agent reads (not blocking, no index) ----------------------------------------------

    async def _agent_services(self, request: web.Request) -> web.Response:
        services = self.agent_services()
        keep = {id(value) for value in _filtered(request, services.values())}
        return _json({key: value for key, value in services.items() if id(value) in keep})

    async def _agent_checks(self, request: web.Request) -> web.Response:
        checks = self.checks()
        keep = {id(value) for value in _filtered(request, checks.values())}
        return _json({key: value for key, value in checks.items() if id(value) in keep})

    async def _agent_self(self, _request: web.Request) -> web.Response:
        node = self.catalog.nodes[self.node]
        config = {
            "Datacenter": self.datacenter,
            "PrimaryDatacenter": self.datacenter,
            "NodeName": self.node,
            "NodeID": node.node_id,
            "Revision": "standin",
            "Server": True,
            "Version": CONSUL_VERSION,
        }
        member = {"Name": self.node, "Addr": self.host, "Port": 8301, "Status": 1, "Tags": {}}
        return _json({"Config": config, "Member": member, "Meta": dict(node.meta)})

    # -- catalog and health reads (blocking) -----------------------------------------------

    async def _blocking(
        self, request: web.Request, read: Callable[[], tuple[int, set[WatchKey]]]
    ) -> int:
        min_index, wait = _parse_blocking(request.query)
        return await self.catalog.wait_beyond(read, min_index, wait)

    async def _catalog_services(self, request: web.Request) -> web.Response:
        index = await self._blocking(request, lambda: self.catalog.table_read("services"))
        tags: dict[str, set[str]] = {}
        for entry in self.catalog.services.values():
            tags.setdefault(entry.service["Service"], set()).update(entry.service["Tags"])
        return _json({name: sorted(tags[name]) for name in sorted(tags)}, index)

    async def _catalog_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        index = await self._blocking(request, lambda: self.catalog.service_read(name, False))
        wanted = request.query.getall("tag", [])
        nodes = self.catalog.nodes
        found = [
            render_service_node(nodes[e.node], e, self.datacenter)
            for e in self.catalog.instances(name)
            if _has_tags(e.service, wanted)
        ]
        return _json(_filtered(request, found), index)

    async def _catalog_nodes(self, request: web.Request) -> web.Response:
        index = await self._blocking(request, lambda: self.catalog.table_read("nodes"))
        nodes = [render_node(n, self.datacenter) for _, n in sorted(self.catalog.nodes.items())]
        return _json(_filtered(request, nodes), index)

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        passing_only = _passing_only(request.query)
        index = await self._blocking(request, lambda: self.catalog.service_read(name, True))
        wanted = request.query.getall("tag", [])
        found = []
        nodes: dict[str, dict[str, Any]] = {}  # each node rendered once per answer
        for entry in self.catalog.instances(name):
            if not _has_tags(entry.service, wanted):
                continue
            checks = [render_check(c) for c in self.catalog.node_checks(*_owner(entry))]
            if passing_only and any(c["Status"] != PASSING for c in checks):
                continue
            if entry.node not in nodes:
                nodes[entry.node] = render_node(self.catalog.nodes[entry.node], self.datacenter)
            node = nodes[entry.node]
            found.append({"Node": node, "Service": render_node_service(entry), "Checks": checks})
        return _json(_filtered(request, found), index)

    async def _health_state(self, request: web.Request) -> web.Response:
        state = request.match_info["state"]
        if state not in (*STATUSES, "any"):
            raise ConsulHttpError(400, "Bad check state")
        index = await self._blocking(request, lambda: self.catalog.table_read("checks"))
        checks = [
            render_check(entry)
            for _, entry in sorted(self.catalog.checks.items())
            if state in ("any", entry.check["Status"])
        ]
        return _json(_filtered(request, checks), index)

    async def _status_leader(self, _request: web.Request) -> web.Response:
        return _json(f"{self.host}:8300")

    async def _status_peers(self, _request: web.Request) -> web.Response:
        return _json([f"{self.host}:8300"])
