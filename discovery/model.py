"""Service instances and their validation.  Pure: no I/O.

An :class:`Instance` is one endpoint of one service (IP:port plus tags, meta,
named ports, weights and health).  Everything that crosses a seam (config
files, the HTTP API, the Consul mirror, allocations) is turned into
instances here, through :func:`make_instance`, which rejects bad input with a
:class:`~discovery.errors.ValidationError` naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from urllib.parse import urlsplit

from discovery.errors import ValidationError

# RFC 1123 section 2.1: letters, digits and hyphens, not starting or ending
# with a hyphen, at most 63 octets.  Matching is case-insensitive (RFC 4343).
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_LABEL = 63
# A tag becomes a DNS label when used as a filter (`<tag>.<svc>.service`), but
# Consul allows any string as a tag; we accept any printable string and only
# the label-shaped ones are reachable through DNS.
MAX_TAG = 255
MAX_META_KEY = 128  # Consul's limit on meta keys
MAX_META_VALUE = 512  # Consul's limit on meta values
MAX_META_PAIRS = 64  # Consul's limit on meta pairs per service
MAX_ID = 255
MAX_WEIGHT = 65535  # SRV weight is a 16-bit field (RFC 2782)
META_PRIORITY = "srv-priority"  # meta key that sets the SRV priority


class Health(StrEnum):
    """Aggregate health of an instance, as Consul names the states."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Weights:
    """SRV weight used when the instance is passing / warning (Consul's `Weights`)."""

    passing: int = 1
    warning: int = 1


class CheckKind(StrEnum):
    """How a check learns its status: pushed by the service (TTL) or probed by us."""

    TTL = "ttl"
    HTTP = "http"
    TCP = "tcp"
    TASK = "task"  # set by the agent from its task's state (discovery.jobs), never probed


# Checks the check runner runs; the others are set by whoever owns them.
PROBED_KINDS = frozenset({CheckKind.TTL, CheckKind.HTTP, CheckKind.TCP})


# Consul's ordering of statuses when several checks apply: the worst one wins.
_SEVERITY = {Health.PASSING: 0, Health.WARNING: 1, Health.CRITICAL: 2}
MAX_OUTPUT = 4096  # Consul's default check_output_max_size


@dataclass(frozen=True, slots=True)
class Check:
    """A health check of one instance: its definition and its current state."""

    id: str
    name: str
    kind: CheckKind
    target: str = ""  # the URL (http), "host:port" (tcp), "" (ttl)
    ttl: float = 0.0  # seconds; ttl checks only
    interval: float = 0.0  # seconds; http and tcp checks only
    timeout: float = 0.0  # seconds; http and tcp checks only
    deregister_after: float | None = None  # DeregisterCriticalServiceAfter, seconds
    status: Health = Health.CRITICAL  # Consul: a new check is critical until it passes
    output: str = ""
    notes: str = ""


def worst_health(checks: Iterable[Check]) -> Health:
    """The aggregate health of an instance: its worst check; passing without checks."""
    return max((c.status for c in checks), key=_SEVERITY.__getitem__, default=Health.PASSING)


EMPTY_META: Mapping[str, str] = MappingProxyType({})
EMPTY_PORTS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Instance:
    """One endpoint of one service.  Immutable; build it with :func:`make_instance`."""

    service: str  # as registered; matched case-insensitively through `key`
    id: str
    node: str
    address: str  # canonical textual IPv4 or IPv6 address
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_META, hash=False)
    ports: Mapping[str, int] = field(
        default_factory=lambda: EMPTY_PORTS, hash=False
    )  # label -> port
    weights: Weights = Weights()
    priority: int = 1
    health: Health = Health.PASSING
    datacenter: str = ""  # "" means the local datacenter
    alloc_id: str = ""
    job_id: str = ""  # the job of a job's instance (Nomad's JobID); "" otherwise
    source: str = "api"  # who owns it: config, api, job, consul
    checks: tuple[Check, ...] = ()  # health is worst_health(checks) when there are any
    # Registry indexes of its first registration and last change (Consul's CreateIndex and
    # ModifyIndex); set by the registry, not part of equality.
    create_index: int = field(default=0, compare=False)
    modify_index: int = field(default=0, compare=False)

    # The service name as matched (lower case); derived, set once in __post_init__.
    key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.service.lower())

    @property
    def weight(self) -> int:
        """SRV weight for the current health (Consul: Weights.Passing / Weights.Warning)."""
        return self.weights.warning if self.health is Health.WARNING else self.weights.passing


@dataclass(frozen=True, slots=True)
class Node:
    """A host that instances run on; `<node>.node.<domain>` resolves to its address."""

    name: str
    address: str
    datacenter: str = ""
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_META, hash=False)


def is_label(name: str) -> bool:
    """True when `name` is an RFC 1123 label usable in a DNS name."""
    return bool(_LABEL.fullmatch(name))


def check_label(value: object, fieldname: str) -> str:
    """Return `value` if it is an RFC 1123 label, else raise naming `fieldname`."""
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be a non-empty string")
    if len(value) > MAX_LABEL:
        raise ValidationError(fieldname, f"{value!r} is longer than {MAX_LABEL} characters")
    if not _LABEL.fullmatch(value):
        raise ValidationError(
            fieldname,
            f"{value!r} is not a valid DNS label (letters, digits and '-', "
            "not starting or ending with '-')",
        )
    return value


def check_address(value: object, fieldname: str) -> str:
    """Return the canonical text of an IPv4/IPv6 address, else raise naming `fieldname`."""
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be an IPv4 or IPv6 address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValidationError(fieldname, f"{value!r} is not an IPv4 or IPv6 address") from None


def check_port(value: object, fieldname: str) -> int:
    """Return `value` if it is a TCP/UDP port number (0-65535), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(fieldname, "must be an integer")
    if not 0 <= value <= 65535:
        raise ValidationError(fieldname, f"{value} is out of range 0-65535")
    return value


def check_int(value: object, fieldname: str, low: int, high: int) -> int:
    """Return `value` if it is an integer in [low, high], else raise naming `fieldname`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(fieldname, "must be an integer")
    if not low <= value <= high:
        raise ValidationError(fieldname, f"{value} is out of range {low}-{high}")
    return value


def _check_str(value: object, fieldname: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(fieldname, "must be a string")
    if not value and not empty:
        raise ValidationError(fieldname, "must not be empty")
    if len(value) > limit:
        raise ValidationError(fieldname, f"is longer than {limit} characters")
    if any(ord(c) < 32 for c in value):
        raise ValidationError(fieldname, "contains control characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # lone surrogates: no JSON or DNS text can carry them
        raise ValidationError(fieldname, "is not valid Unicode text") from None
    return value


def _check_tags(tags: object, fieldname: str) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise ValidationError(fieldname, "must be a list of strings")
    out: list[str] = []
    for i, tag in enumerate(tags):
        tag = _check_str(tag, f"{fieldname}[{i}]", MAX_TAG)
        if tag not in out:  # Consul de-duplicates tags but keeps their order
            out.append(tag)
    return tuple(out)


def _check_meta(meta: object, fieldname: str) -> Mapping[str, str]:
    if meta is None:
        return EMPTY_META
    if not isinstance(meta, Mapping):
        raise ValidationError(fieldname, "must be an object of string values")
    if len(meta) > MAX_META_PAIRS:
        raise ValidationError(fieldname, f"has more than {MAX_META_PAIRS} pairs")
    out: dict[str, str] = {}
    for key, value in meta.items():
        key = _check_str(key, f"{fieldname} key", MAX_META_KEY)
        if not re.match(r"^[A-Za-z0-9_-]+$", key):
            raise ValidationError(
                f"{fieldname}.{key}", "key may hold only letters, digits, _ and -"
            )
        out[key] = _check_str(value, f"{fieldname}.{key}", MAX_META_VALUE, empty=True)
    return MappingProxyType(out)


def _check_ports(ports: object, fieldname: str) -> Mapping[str, int]:
    if ports is None:
        return EMPTY_PORTS
    if not isinstance(ports, Mapping):
        raise ValidationError(fieldname, "must be an object of label = port")
    out: dict[str, int] = {}
    for label, port in ports.items():
        check_label(label, f"{fieldname} label")
        out[label] = check_port(port, f"{fieldname}.{label}")
    return MappingProxyType(out)


def _check_weights(weights: object, fieldname: str) -> Weights:
    if weights is None:
        return Weights()
    if isinstance(weights, Weights):
        return weights
    if not isinstance(weights, Mapping):
        raise ValidationError(fieldname, "must be an object with passing and warning")
    lowered = {str(k).lower(): v for k, v in weights.items()}
    unknown = set(lowered) - {"passing", "warning"}
    if unknown:
        raise ValidationError(f"{fieldname}.{sorted(unknown)[0]}", "unknown field")
    return Weights(
        passing=check_int(lowered.get("passing", 1), f"{fieldname}.passing", 1, MAX_WEIGHT),
        warning=check_int(lowered.get("warning", 1), f"{fieldname}.warning", 0, MAX_WEIGHT),
    )


def make_check(
    *,
    id: object,
    name: object,
    kind: CheckKind,
    target: object = "",
    ttl: float = 0.0,
    interval: float = 0.0,
    timeout: float = 0.0,
    deregister_after: float | None = None,
    status: object = None,
    notes: object = "",
) -> Check:
    """Validate a check definition (durations already in seconds) and build it.

    Error handling: raises ValidationError naming the field (`id`, `http`,
    `tcp`, `interval`...).  The initial status is critical unless given.
    """
    ident = _check_str(id, "id", MAX_ID)
    label = _check_str(name, "name", MAX_ID)
    if kind is CheckKind.TASK:
        checked_target = ""
    elif kind is CheckKind.TTL:
        if ttl <= 0:
            raise ValidationError("ttl", "must be longer than 0s")
        if interval or timeout:
            raise ValidationError(
                "interval" if interval else "timeout", "is for http and tcp checks"
            )
        checked_target = ""
    else:
        checked_target = _check_target(kind, target)
        if interval <= 0:
            raise ValidationError("interval", f"is required for {kind} checks")
        if timeout <= 0:
            raise ValidationError("timeout", "must be longer than 0s")
    if deregister_after is not None and deregister_after <= 0:
        raise ValidationError("deregister_critical_service_after", "must be longer than 0s")
    try:
        state = Health.CRITICAL if status is None else Health(str(status))
    except ValueError:
        raise ValidationError("status", f"{status!r} is not passing, warning or critical") from None
    return Check(
        id=ident,
        name=label,
        kind=kind,
        target=checked_target,
        ttl=ttl,
        interval=interval,
        timeout=timeout,
        deregister_after=deregister_after,
        status=state,
        notes=_check_str(notes, "notes", MAX_OUTPUT, empty=True),
    )


def _check_target(kind: CheckKind, value: object) -> str:
    fieldname = kind.value
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be a non-empty string")
    if kind is CheckKind.HTTP:
        try:
            url = urlsplit(value)
            ok = url.scheme in ("http", "https") and bool(url.hostname)
            url.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ValidationError(fieldname, f"{value!r} is not an http:// or https:// URL")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValidationError(fieldname, f"{value!r} is not HOST:PORT")
    return value


def make_instance(
    *,
    service: object,
    id: object = None,
    node: str,
    address: object,
    port: object = 0,
    tags: object = None,
    meta: object = None,
    ports: object = None,
    weights: object = None,
    health: object = Health.PASSING,
    datacenter: str = "",
    alloc_id: str = "",
    job_id: str = "",
    source: str = "api",
    checks: Iterable[Check] = (),
) -> Instance:
    """Validate raw values and build an :class:`Instance`.

    Error handling: the first invalid field raises ValidationError naming it
    (`service`, `port`, `meta.version`...).  The ID defaults to the service name,
    as in Consul.  The SRV priority comes from meta `srv-priority` (0-65535).
    With checks, the health is theirs (worst_health) and `health` is ignored.
    """
    name = check_label(service, "service")
    ident = name if id is None or id == "" else _check_str(id, "id", MAX_ID)
    checked_meta = _check_meta(meta, "meta")
    priority = 1
    if META_PRIORITY in checked_meta:
        raw = checked_meta[META_PRIORITY]
        if not raw.isdigit() or int(raw) > 65535:
            raise ValidationError(f"meta.{META_PRIORITY}", f"{raw!r} is not an integer 0-65535")
        priority = int(raw)
    try:
        state = Health(str(health))
    except ValueError:
        raise ValidationError("health", f"{health!r} is not passing, warning or critical") from None
    check_list = tuple(checks)
    if len({c.id for c in check_list}) != len(check_list):
        raise ValidationError("checks", "check ids must be unique")
    if check_list:
        state = worst_health(check_list)
    return Instance(
        service=name,
        id=ident,
        node=check_label(node, "node"),
        address=check_address(address, "address"),
        port=check_port(port, "port"),
        tags=_check_tags(tags, "tags"),
        meta=checked_meta,
        ports=_check_ports(ports, "ports"),
        weights=_check_weights(weights, "weights"),
        priority=priority,
        health=state,
        datacenter=datacenter,
        alloc_id=alloc_id,
        job_id=job_id,
        source=source,
        checks=check_list,
    )
