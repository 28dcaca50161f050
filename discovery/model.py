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

from discovery.errors import ValidationError

# RFC 1123 section 2.1: letters, digits and hyphens, not starting or ending
# with a hyphen, at most 63 octets.  Matching is case-insensitive (RFC 4343).
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
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
    source: str = "api"  # who owns it: config, api, job, consul

    @property
    def key(self) -> str:
        """The service name as matched (lower case)."""
        return self.service.lower()

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
    return bool(_LABEL.match(name))


def check_label(value: object, fieldname: str) -> str:
    """Return `value` if it is an RFC 1123 label, else raise naming `fieldname`."""
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be a non-empty string")
    if len(value) > MAX_LABEL:
        raise ValidationError(fieldname, f"{value!r} is longer than {MAX_LABEL} characters")
    if not _LABEL.match(value):
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
    source: str = "api",
) -> Instance:
    """Validate raw values and build an :class:`Instance`.

    Error handling: the first invalid field raises ValidationError naming it
    (`service`, `port`, `meta.version`...).  The ID defaults to the service name,
    as in Consul.  The SRV priority comes from meta `srv-priority` (0-65535).
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
        source=source,
    )
