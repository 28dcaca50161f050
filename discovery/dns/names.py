"""The zone's name grammar: a query name to what it designates.  Pure: no I/O.

Like CoreDNS's `plugin/kubernetes/parse.go`, this only splits labels; whether
the designated service, node or allocation exists is decided against a
snapshot in :mod:`discovery.dns.records`.  Grammar (README "DNS names"):

    <domain>                                   Apex
    service.<domain>, <dc>.<domain>, ...       Nonterminal (empty non-terminal)
    [<tag>.]*<svc>.service[.<dc>].<domain>     ServiceName, tags AND-ed
    _<svc>._<tag|tcp|udp>.service[.<dc>]...    ServiceName (RFC 2782)
    _<port>._<tcp|udp>.<svc>.service[.<dc>]... ServiceName with a named port
    _<tcp|udp>.<svc>.service[.<dc>]...         ServiceName, empty non-terminal
    <node>.node[.<dc>].<domain>                NodeName
    <hexip>.addr[.<dc>].<domain>               AddrName
    <alloc-id-prefix>.alloc[.<dc>].<domain>    AllocName
    anything else below <domain>               Missing
    not below any zone                         None
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KINDS = frozenset({"service", "node", "addr", "alloc"})
PROTOCOLS = frozenset({"tcp", "udp"})


@dataclass(frozen=True, slots=True)
class Zone:
    """One domain we are authoritative for, as lower-case labels (`("nomad",)`)."""

    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Apex:
    zone: Zone


@dataclass(frozen=True, slots=True)
class Nonterminal:
    """A name that exists only because names below it do (RFC 8020)."""

    zone: Zone
    datacenter: str | None


@dataclass(frozen=True, slots=True)
class ServiceName:
    zone: Zone
    datacenter: str | None
    service: str
    tags: tuple[str, ...] = ()
    port_label: str | None = None  # `_<port>._<proto>` form
    nonterminal: bool = False  # `_tcp.<svc>`: exists iff the service does, never has data


@dataclass(frozen=True, slots=True)
class NodeName:
    zone: Zone
    datacenter: str | None
    node: str


@dataclass(frozen=True, slots=True)
class AddrName:
    zone: Zone
    datacenter: str | None
    hexip: str


@dataclass(frozen=True, slots=True)
class AllocName:
    zone: Zone
    datacenter: str | None
    prefix: str


@dataclass(frozen=True, slots=True)
class Missing:
    """Below a zone but matching no form of the grammar: NXDOMAIN."""

    zone: Zone


Name = Apex | Nonterminal | ServiceName | NodeName | AddrName | AllocName | Missing


def parse_name(labels: Sequence[str], zones: Sequence[Zone]) -> Name | None:
    """What the lower-case `labels` designate in the first matching zone; None if outside."""
    for zone in zones:
        size = len(zone.labels)
        if len(labels) >= size and tuple(labels[len(labels) - size :]) == zone.labels:
            return _parse_relative(list(labels[: len(labels) - size]), zone)
    return None


def _parse_relative(rel: list[str], zone: Zone) -> Name:
    if not rel:
        return Apex(zone)
    datacenter: str | None = None
    if rel[-1] in KINDS:
        kind = rel.pop()
    elif len(rel) >= 2 and rel[-2] in KINDS:
        datacenter = rel.pop()
        kind = rel.pop()
    elif len(rel) == 1:
        return Nonterminal(zone, rel[0])  # `<dc>.<domain>`; exists iff the dc is known
    else:
        return Missing(zone)
    if not rel:
        return Nonterminal(zone, datacenter)
    if kind == "service":
        return _parse_service(rel, zone, datacenter)
    if len(rel) != 1:
        return Missing(zone)
    if kind == "node":
        return NodeName(zone, datacenter, rel[0])
    if kind == "addr":
        return AddrName(zone, datacenter, rel[0])
    return AllocName(zone, datacenter, rel[0])


def _parse_service(rel: list[str], zone: Zone, datacenter: str | None) -> Name:
    first = rel[0]
    if not first.startswith("_"):
        return ServiceName(zone, datacenter, rel[-1], tags=tuple(rel[:-1]))
    if len(rel) == 2 and rel[1].startswith("_"):  # RFC 2782 _service._proto-or-tag
        tag = rel[1][1:]
        tags = () if tag in PROTOCOLS else (tag,)
        return ServiceName(zone, datacenter, first[1:], tags=tags)
    if len(rel) == 2 and first[1:] in PROTOCOLS:  # `_tcp.<svc>`, parent of `_<port>._tcp.<svc>`
        return ServiceName(zone, datacenter, rel[1], nonterminal=True)
    if len(rel) == 3 and rel[1].startswith("_") and not rel[2].startswith("_"):
        if rel[1][1:] not in PROTOCOLS:
            return Missing(zone)
        return ServiceName(zone, datacenter, rel[2], port_label=first[1:])
    return Missing(zone)
