"""What the Consul mirror writes to Consul and makes of what it reads.  Pure: no I/O.

Push: :func:`plan_wanted` turns an instance into the Consul entry it should be
(:class:`Wanted`), :func:`parse_seen` reads our entries out of the Consul
agent's answers (:class:`Seen`), :func:`plan_push` lists the writes between the
two.  Pull: :func:`parse_pulled` turns a /v1/health/service answer into registry
instances and nodes.  :mod:`discovery.mirror` does the I/O and says why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from discovery.errors import ValidationError
from discovery.model import (
    MAX_LABEL,
    Health,
    Instance,
    Node,
    check_address,
    is_label,
    make_instance,
)

PUSHED_SOURCES = frozenset({"config", "api", "job"})  # never "consul": no echo
SOURCE = "consul"  # Instance.source of pulled instances
ID_PREFIX = "_waypost-"
CHECK_SUFFIX = ":health"
OWNER_META = "waypost-node"
EXTERNAL_SOURCE_META = "external-source"  # Consul's UI shows where an entry comes from
EXTERNAL_SOURCE = "waypost"
CHECK_NAME = "waypost health"
_STATUS = {status.value: status for status in Health}


# -- push: pure planning --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushEntry:
    """An instance as a Consul service (what GET /v1/agent/services shows of it)."""

    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()  # sorted pairs
    weights: tuple[int, int] = (1, 1)  # passing, warning


@dataclass(frozen=True, slots=True)
class Wanted:
    """One entry as it should be in Consul: the service and its TTL check's status."""

    entry: PushEntry
    status: Health
    output: str = ""  # sent with status updates (not compared: Consul keeps it loosely)


@dataclass(frozen=True, slots=True)
class Seen:
    """One of our entries as Consul has it; status None when its check is missing."""

    entry: PushEntry
    status: Health | None


@dataclass(frozen=True, slots=True)
class PushPlan:
    """The writes that make Consul hold what we want."""

    register: tuple[Wanted, ...] = ()
    update: tuple[Wanted, ...] = ()  # TTL check status only
    deregister: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.register) + len(self.update) + len(self.deregister)


def service_id(node: str, instance_id: str) -> str:
    return f"{ID_PREFIX}{node}-{instance_id}"


def check_id(consul_service_id: str) -> str:
    return consul_service_id + CHECK_SUFFIX


def plan_wanted(inst: Instance, node: str) -> Wanted:
    """What Consul should hold for `inst`, pushed by agent `node`."""
    meta = dict(inst.meta) | {EXTERNAL_SOURCE_META: EXTERNAL_SOURCE, OWNER_META: node}
    entry = PushEntry(
        id=service_id(node, inst.id),
        service=inst.service,
        address=inst.address,
        port=inst.port,
        tags=inst.tags,
        meta=tuple(sorted(meta.items())),
        weights=(inst.weights.passing, inst.weights.warning),
    )
    failing = [c for c in inst.checks if c.status is inst.health and c.output]
    output = "; ".join(f"{c.name}: {c.output}" for c in failing)[:4096]
    return Wanted(entry, inst.health, output)


def plan_push(
    wanted: Mapping[str, Wanted], seen: Mapping[str, Seen], skip: Mapping[str, Wanted] = {}
) -> PushPlan:
    """Register what is missing or differs, update statuses, deregister what is not wanted.

    `seen` holds only entries this agent owns; `skip` are registrations Consul
    refused, left alone while they stay the same.
    """
    register: list[Wanted] = []
    update: list[Wanted] = []
    for ident, want in wanted.items():
        have = seen.get(ident)
        if have is None or have.entry != want.entry or have.status is None:
            if skip.get(ident) != want:
                register.append(want)
        elif have.status is not want.status:
            update.append(want)
    gone = tuple(ident for ident in seen if ident not in wanted)
    return PushPlan(tuple(register), tuple(update), gone)


def parse_seen(
    services: Mapping[str, Any], checks: Mapping[str, Any], node: str
) -> dict[str, Seen]:
    """Our entries in GET /v1/agent/services and /v1/agent/checks answers (others ignored)."""
    prefix = f"{ID_PREFIX}{node}-"
    out: dict[str, Seen] = {}
    for ident, svc in services.items():
        if not isinstance(svc, Mapping) or not str(ident).startswith(prefix):
            continue
        meta = svc.get("Meta") or {}
        if meta.get(OWNER_META) != node:
            continue
        check = checks.get(check_id(ident))
        status = None
        if isinstance(check, Mapping) and check.get("ServiceID") == ident:
            status = _STATUS.get(str(check.get("Status")), Health.CRITICAL)
        out[ident] = Seen(parse_entry(svc), status)
    return out


def parse_entry(svc: Mapping[str, Any]) -> PushEntry:
    """A service of GET /v1/agent/services as a PushEntry (null lists and maps are empty)."""
    weights = svc.get("Weights") or {}
    return PushEntry(
        id=str(svc.get("ID", "")),
        service=str(svc.get("Service", "")),
        address=str(svc.get("Address", "")),
        port=int(svc.get("Port") or 0),
        tags=tuple(svc.get("Tags") or ()),
        meta=tuple(sorted((svc.get("Meta") or {}).items())),
        weights=(int(weights.get("Passing", 1)), int(weights.get("Warning", 1))),
    )


def render_check(want: Wanted, node: str, ttl: float) -> dict[str, str]:
    """The TTL check definition registered with the service."""
    return {
        "CheckID": check_id(want.entry.id),
        "Name": CHECK_NAME,
        "TTL": f"{round(ttl)}s",
        "Status": want.status.value,
        "Notes": f"health of the instance, mirrored by waypost on {node}",
    }


# -- pull: pure parsing -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pulled:
    """One health/service answer turned into registry objects, and what was skipped."""

    instances: tuple[Instance, ...]
    nodes: tuple[Node, ...]
    skipped: tuple[str, ...] = ()  # "<id>: <reason>" of entries our model cannot hold


def node_label(name: str) -> str:
    """A Consul node name as a DNS label (dots and underscores become '-'); "" if none left."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", name)[:MAX_LABEL].strip("-")
    return cleaned if is_label(cleaned) else ""


def worst_status(checks: Iterable[Mapping[str, Any]]) -> Health:
    """Consul's aggregate: the worst check (unknown statuses count as critical)."""
    order = (Health.PASSING, Health.WARNING, Health.CRITICAL)
    statuses = [_STATUS.get(str(c.get("Status")), Health.CRITICAL) for c in checks]
    return max(statuses, key=order.index, default=Health.PASSING)


def parse_pulled(
    entries: Iterable[Mapping[str, Any]], *, node: str, datacenter: str, default_dc: str
) -> Pulled:
    """Registry instances and nodes from a GET /v1/health/service/<name> answer.

    `node` is this agent's (its own pushed entries are skipped), `datacenter`
    ours (instances there are unlabeled), `default_dc` the one assumed when an
    entry does not name its node's.
    """
    instances: list[Instance] = []
    nodes: dict[str, Node] = {}
    skipped: list[str] = []
    for entry in entries:
        svc = entry.get("Service") or {}
        host = entry.get("Node") or {}
        meta = svc.get("Meta") or {}
        if meta.get(OWNER_META) == node:
            continue
        raw_node = str(host.get("Node", ""))
        ident = f"{SOURCE}/{raw_node}/{svc.get('ID', '')}"
        dc = str(host.get("Datacenter") or default_dc).lower()
        label = "" if dc == datacenter.lower() else dc
        name = node_label(raw_node)
        try:
            if not name:
                raise ValidationError("node", f"{raw_node!r} cannot be a DNS label")
            inst = make_instance(
                service=svc.get("Service"),
                id=ident,
                node=name,
                address=svc.get("Address") or host.get("Address"),
                port=svc.get("Port") or 0,
                tags=svc.get("Tags"),
                meta=meta,
                weights=svc.get("Weights"),
                health=worst_status(entry.get("Checks") or ()),
                datacenter=label,
                source=SOURCE,
            )
        except ValidationError as err:
            skipped.append(f"{ident}: {err.field}: {err.message}")
            continue
        try:
            address = check_address(host.get("Address"), "Node.Address")
        except ValidationError:  # a host name: the instance's address stands in for it
            address = inst.address
        instances.append(inst)
        nodes[name.lower()] = Node(name, address, label)
    return Pulled(tuple(instances), tuple(nodes.values()), tuple(skipped))
