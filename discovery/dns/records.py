"""Answers for one question against one snapshot, encoded once.  Pure: no I/O.

:func:`prepare` turns (question name, type, class, snapshot, settings) into a
:class:`Prepared` answer: records already in wire form, with every owner name
a compression pointer into the question (offset 12), plus what the
per-query renderer needs to shuffle, trim and glue them.  Because pointers
only depend on the question's length, one Prepared serves every query with
the same lower-cased question, whatever its letter case (0x20).

Sentinel outcomes map to rcodes as in Consul's `agent/dns`: a name that
does not exist is NXDOMAIN, an existing name without the asked type is
NOERROR with no answer (NODATA); both carry the zone's SOA in Authority
with the SOA minimum as TTL (RFC 2308 section 3).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from discovery.dns import wire
from discovery.dns.names import (
    AddrName,
    Apex,
    Missing,
    Name,
    NodeName,
    Nonterminal,
    ServiceName,
    Zone,
    parse_name,
)
from discovery.dns.settings import DnsSettings
from discovery.model import Health, Instance
from discovery.registry import Snapshot

# An answer record: (encoded RR, SRV target wire name or None, glue RR tail or b"").
Answer = tuple[bytes, bytes | None, bytes]
# One SRV priority level: its answers and their weights (None when all equal).
Group = tuple[tuple[Answer, ...], tuple[int, ...] | None]

DEP_ALWAYS = ""  # cache dependency cleared by every registry change (SOA serial, dc set)
DEP_NODES = None  # cleared only when nodes or allocations change


@dataclass(frozen=True, slots=True)
class Body:
    """A rendered reply after the question, without the OPT record (see render.py)."""

    data: bytes
    answers: int
    additional: int
    truncated: bool


class Memo:
    """Bodies render.py memoized for one Prepared, with the octets they hold.

    `bodies` is keyed by (size budget, answer limit); `size` grows as slots
    are filled, so the responder can count it against its cache budget.
    `full` is the Prepared's full_size once render.py needed it (else -1).
    """

    __slots__ = ("bodies", "full", "size")

    def __init__(self) -> None:
        self.bodies: dict[tuple[int, int], list[Body | None]] = {}
        self.size = 0
        self.full = -1


@dataclass(frozen=True, slots=True)
class Prepared:
    """An answer ready to be rendered for any query with this question."""

    rcode: int
    answers: tuple[Answer, ...] = ()
    groups: tuple[Group, ...] | None = None  # None: keep `answers` in order
    authority: bytes = b""
    authority_count: int = 0
    extra: bytes = b""  # additional records that do not depend on answer order
    extra_count: int = 0
    authoritative: bool = True
    outside: bool = False  # not in any zone: REFUSED or forwarded
    dep: str | None = DEP_ALWAYS  # cache dependency: a service key, DEP_ALWAYS or DEP_NODES
    # Renderings memoized by discovery.dns.render, keyed by (size budget, answer limit).
    memo: Memo = field(default_factory=Memo, compare=False, repr=False)

    @property
    def size(self) -> int:
        """Octets of encoded records this answer holds (memoized bodies: `memo.size`)."""
        return (
            sum(
                len(record) + len(target or b"") + len(tail)
                for record, target, tail in self.answers
            )
            + len(self.authority)
            + len(self.extra)
        )

    @property
    def full_size(self) -> int:
        """An upper bound on a body's size: every answer with its glue, authority, extra.

        A glue owner is a pointer (2 octets) or the target spelled out.
        """
        answers = sum(
            len(record) + (max(len(target), 2) + len(tail) if target is not None else 0)
            for record, target, tail in self.answers
        )
        return answers + len(self.authority) + len(self.extra)


@dataclass(frozen=True, slots=True)
class ZoneInfo:
    """Settings-derived constants, computed once per settings change."""

    settings: DnsSettings
    zones: tuple[Zone, ...]

    @classmethod
    def from_settings(cls, settings: DnsSettings) -> ZoneInfo:
        domains = (settings.domain, *settings.alt_domains)
        zones = tuple(Zone(tuple(d.lower().strip(".").split("."))) for d in domains)
        return cls(settings, zones)


REFUSED_OUTSIDE = Prepared(wire.REFUSED, authoritative=False, outside=True, dep=DEP_NODES)
REFUSED = Prepared(wire.REFUSED, authoritative=False, dep=DEP_NODES)


def prepare(
    labels: Sequence[str], qtype: int, qclass: int, snap: Snapshot, info: ZoneInfo
) -> Prepared:
    """The answer to (`labels`, `qtype`, `qclass`); `labels` are the lower-cased question labels."""
    if qclass not in (wire.CLASS_IN, wire.TYPE_ANY) or qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR):
        return REFUSED  # CHAOS (version.bind...) and zone transfers: neither served nor forwarded
    name = parse_name(labels, info.zones)
    if name is None:
        return REFUSED_OUTSIDE
    builder = _Builder(labels, name.zone, snap, info)
    return builder.answer(name, qtype)


class _Builder:
    """Builds one Prepared; holds the question-relative offsets for compression."""

    def __init__(self, labels: Sequence[str], zone: Zone, snap: Snapshot, info: ZoneInfo) -> None:
        self.snap = snap
        self.info = info
        self.settings = info.settings
        self.zone = zone
        self.zone_wire = wire.encode_name([z.encode() for z in zone.labels])
        qname_len = sum(len(label) + 1 for label in labels) + 1
        # The zone's labels end the question name, so they can be pointed to.
        self.zone_ptr = wire.pointer(wire.HEADER_SIZE + qname_len - len(self.zone_wire))
        self.local_dc = self.settings.datacenter.lower()

    # -- dispatch ----------------------------------------------------------------

    def answer(self, name: Name, qtype: int) -> Prepared:
        if isinstance(name, Apex):
            return self.apex(qtype)
        if isinstance(name, Missing):
            return self.negative(wire.NXDOMAIN)
        dc = self.local_dc if name.datacenter is None else name.datacenter
        if dc != self.local_dc and not self.dc_known(dc):
            return self.negative(wire.NXDOMAIN)
        if isinstance(name, Nonterminal):
            return self.negative(wire.NOERROR)
        if isinstance(name, ServiceName):
            return self.service(name, dc, qtype)
        if isinstance(name, NodeName):
            return self.node(name.node, dc, qtype)
        if isinstance(name, AddrName):
            return self.addr(name.hexip, qtype)
        return self.alloc(name.prefix, qtype)

    def dc_known(self, dc: str) -> bool:
        snap = self.snap
        return any(n.datacenter.lower() == dc for n in snap.nodes.values()) or any(
            i.datacenter.lower() == dc for i in snap.instances.values()
        )

    # -- the apex and negative answers -------------------------------------------

    def soa_record(self, owner: bytes) -> bytes:
        s = self.settings
        mname = self.node_target(s.node_name.lower(), self.local_dc, compress=True)
        rname = wire.encode_name([b"hostmaster"], self.zone_ptr)
        rdata = wire.soa_rdata(
            mname, rname, self.snap.index, s.soa.refresh, s.soa.retry, s.soa.expire, s.soa.min_ttl
        )
        return wire.encode_rr(owner, wire.TYPE_SOA, s.soa.min_ttl, rdata)

    def negative(self, rcode: int) -> Prepared:
        """NXDOMAIN or NODATA, with the SOA in Authority (RFC 2308 sections 2.1 and 2.2)."""
        return Prepared(rcode, authority=self.soa_record(self.zone_ptr), authority_count=1)

    def apex(self, qtype: int) -> Prepared:
        s = self.settings
        records: list[bytes] = []
        if qtype in (wire.TYPE_SOA, wire.TYPE_ANY):
            records.append(self.soa_record(wire.QUESTION_POINTER))
        extra = b""
        if qtype in (wire.TYPE_NS, wire.TYPE_ANY):
            target = self.node_target(s.node_name.lower(), self.local_dc, compress=True)
            records.append(wire.encode_rr(wire.QUESTION_POINTER, wire.TYPE_NS, s.node_ttl, target))
            rtype, packed = wire.address_rdata(s.node_address)
            extra = wire.encode_rr(target, rtype, s.node_ttl, packed)
        if not records:
            return self.negative(wire.NOERROR)
        answers = tuple((r, None, b"") for r in records)
        return Prepared(wire.NOERROR, answers, extra=extra, extra_count=1 if extra else 0)

    # -- services ----------------------------------------------------------------

    def servable(self, name: ServiceName, dc: str) -> list[Instance]:
        only_passing = self.settings.only_passing
        wanted_tags = name.tags
        label = name.port_label
        out = []
        for inst in self.snap.services.get(name.service, ()):
            if (inst.datacenter.lower() or self.local_dc) != dc:
                continue
            if inst.health is Health.CRITICAL or (only_passing and inst.health is Health.WARNING):
                continue
            if wanted_tags:
                have = {t.lower() for t in inst.tags}
                if not all(t in have for t in wanted_tags):
                    continue
            if label is not None and _named_port(inst, label) is None:
                continue
            out.append(inst)
        return out

    def service(self, name: ServiceName, dc: str, qtype: int) -> Prepared:
        members = self.servable(name, dc)
        if not members:
            return self.negative(wire.NXDOMAIN)
        if name.nonterminal:
            return self.negative(wire.NOERROR)
        ttl = self.settings.ttl_for(name.service)
        dep = name.service if dc == self.local_dc else DEP_ALWAYS
        if qtype == wire.TYPE_SRV:
            return self.srv(members, name.port_label, dc, ttl, dep)
        if qtype in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY):
            want = None if qtype == wire.TYPE_ANY else qtype
            return self.addresses((m.address for m in members), want, ttl, dep)
        if qtype == wire.TYPE_TXT:
            return self.txt(members, ttl, dep)
        return self.negative(wire.NOERROR)

    def srv(
        self, members: list[Instance], label: str | None, dc: str, ttl: int, dep: str
    ) -> Prepared:
        by_priority: dict[int, list[tuple[Answer, int]]] = {}
        for inst in members:
            port = inst.port if label is None else _named_port(inst, label)
            assert port is not None  # servable() kept only instances with the label
            target = self.instance_target(inst, dc)
            rdata = wire.srv_rdata(inst.priority, inst.weight, port, target)
            record = wire.encode_rr(wire.QUESTION_POINTER, wire.TYPE_SRV, ttl, rdata)
            rtype, packed = wire.address_rdata(inst.address)
            glue = wire.rr_tail(rtype, ttl, packed)
            by_priority.setdefault(inst.priority, []).append(((record, target, glue), inst.weight))
        groups: list[Group] = []
        for priority in sorted(by_priority):
            level = by_priority[priority]
            weights = tuple(w for _, w in level)
            uniform = all(w == weights[0] for w in weights)
            groups.append((tuple(a for a, _ in level), None if uniform else weights))
        answers = tuple(a for group, _ in groups for a in group)
        return Prepared(wire.NOERROR, answers, tuple(groups), dep=dep)

    def addresses(
        self, addresses: Iterable[str], want: int | None, ttl: int, dep: str | None
    ) -> Prepared:
        """A/AAAA answers (want None: both) for distinct addresses, shuffled per query."""
        seen: set[str] = set()
        answers: list[Answer] = []
        for address in addresses:
            if address in seen:
                continue
            seen.add(address)
            rtype, packed = wire.address_rdata(address)
            if want is None or rtype == want:
                record = wire.encode_rr(wire.QUESTION_POINTER, rtype, ttl, packed)
                answers.append((record, None, b""))
        if not answers:
            return self.negative(wire.NOERROR)
        group = tuple(answers)
        return Prepared(wire.NOERROR, group, ((group, None),), dep=dep)

    def txt(self, members: list[Instance], ttl: int, dep: str) -> Prepared:
        rdatas: list[bytes] = []
        for inst in members:
            if inst.meta:
                strings = [f"{k}={inst.meta[k]}".encode() for k in sorted(inst.meta)]
                rdata = wire.txt_rdata(strings)
                if rdata not in rdatas:  # an RRset holds no duplicate records
                    rdatas.append(rdata)
        if not rdatas:
            return self.negative(wire.NOERROR)
        answers = tuple(
            (wire.encode_rr(wire.QUESTION_POINTER, wire.TYPE_TXT, ttl, r), None, b"")
            for r in rdatas
        )
        return Prepared(wire.NOERROR, answers, dep=dep)

    # -- nodes, addresses, allocations -------------------------------------------

    def node(self, name: str, dc: str, qtype: int) -> Prepared:
        node = self.snap.nodes.get(name)
        if node is None or (node.datacenter.lower() or self.local_dc) != dc:
            return self.negative(wire.NXDOMAIN)
        ttl = self.settings.node_ttl
        if qtype == wire.TYPE_TXT:
            if not node.meta:
                return self.negative(wire.NOERROR)
            strings = [f"{k}={node.meta[k]}".encode() for k in sorted(node.meta)]
            rr = wire.encode_rr(wire.QUESTION_POINTER, wire.TYPE_TXT, ttl, wire.txt_rdata(strings))
            return Prepared(wire.NOERROR, ((rr, None, b""),), dep=DEP_NODES)
        return self.typed_addresses([node.address], qtype, ttl)

    def addr(self, hexip: str, qtype: int) -> Prepared:
        if len(hexip) not in (8, 32):
            return self.negative(wire.NXDOMAIN)
        try:
            address = str(ipaddress.ip_address(bytes.fromhex(hexip)))
        except ValueError:
            return self.negative(wire.NXDOMAIN)
        return self.typed_addresses([address], qtype, self.settings.node_ttl)

    def alloc(self, prefix: str, qtype: int) -> Prepared:
        allocs = self.snap.allocs
        found = allocs.get(prefix)
        if found is None:
            matches = [a for key, a in allocs.items() if key.lower().startswith(prefix)]
            if len(matches) != 1:  # unknown, or ambiguous like a short Nomad id prefix
                return self.negative(wire.NXDOMAIN)
            found = matches[0]
        return self.typed_addresses(found.addresses, qtype, self.settings.node_ttl)

    def typed_addresses(self, addresses: Sequence[str], qtype: int, ttl: int) -> Prepared:
        if qtype not in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_ANY):
            return self.negative(wire.NOERROR)
        want = None if qtype == wire.TYPE_ANY else qtype
        return self.addresses(addresses, want, ttl, DEP_NODES)

    # -- target names --------------------------------------------------------------

    def node_target(self, node: str, dc: str, *, compress: bool = False) -> bytes:
        tail = self.zone_ptr if compress else self.zone_wire
        return wire.encode_name([node.encode(), b"node", dc.encode()], tail)

    def instance_target(self, inst: Instance, dc: str) -> bytes:
        """`<node>.node.<dc>.<zone>` when the instance uses its node's address, else `.addr.`."""
        node = self.snap.nodes.get(inst.node.lower())
        if node is not None and node.address == inst.address:
            return self.node_target(inst.node.lower(), dc)
        hexip = ipaddress.ip_address(inst.address).packed.hex()
        return wire.encode_name([hexip.encode(), b"addr", dc.encode()], self.zone_wire)


def _named_port(inst: Instance, label: str) -> int | None:
    port = inst.ports.get(label)
    if port is None:
        for key, value in inst.ports.items():
            if key.lower() == label:
                return value
    return port
