"""Shared helpers for the table-driven DNS answer tests.  Pure: no I/O.

Holds the fixture "world" (a registry of nodes, instances and allocations that
every DNS table row is answered from), the query builders, and the reply
normaliser that turns resource records into comparable text, CoreDNS-style:
``"<owner> <ttl> <class> <type> <rdata>"`` with owner and domain names in lower
case (DNS names are case-insensitive, RFC 4343; case preservation is tested
separately on raw names).  An expected TTL written as ``*`` matches any TTL;
it is used only where docs/dns_rules.md does not fix the TTL.

dnslib is used as a codec only: it packs questions and parses replies.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, DNSRecord

from discovery.dns.responder import ForwardQuery, Responder
from discovery.dns.settings import DnsSettings, SoaSettings
from discovery.model import Health, Instance, Node, make_instance
from discovery.registry import Alloc, Registry

QUERY_ID = 0x5A17
OPT = 41  # RFC 6891 section 6.1.1: the OPT pseudo-RR type
DO_BIT = 0x8000  # RFC 3225: DNSSEC OK, top bit of the OPT flags
BADVERS = 16  # RFC 6891 section 6.1.3

# -- the world every table row is answered from ----------------------------------------

SETTINGS = DnsSettings(
    alt_domains=("consul.",),
    service_ttl={"*": 5, "web": 30, "db*": 20, "dbx*": 25},
    node_ttl=7,
    soa=SoaSettings(min_ttl=11),
)
LOCAL = Node("localhost", "127.0.0.1")
NODES = (
    Node("node1", "10.0.0.1", meta={"arch": "amd64", "rack": "r1"}),
    Node("node2", "10.0.0.2"),
    Node("node6", "fd00::6"),
    Node("noder", "10.2.0.1", datacenter="dc2"),
    Node("node3", "10.3.0.1", datacenter="dc3"),  # dc3 is known through this node only
)
ALLOC_A = "3f2a9c1e-0000-4000-8000-000000000001"
ALLOC_B = "3f2b0000-0000-4000-8000-000000000002"
ALLOCS = (
    Alloc(ALLOC_A, ("172.26.64.5", "fd00::a:5"), name="web.web[0]"),
    Alloc(ALLOC_B, ("172.26.64.6",), name="web.web[1]"),
)


def world_instances() -> list[Instance]:
    """The service instances of the fixture world (see the table in test_dns_answer.py)."""
    mk = make_instance
    return [
        # web: node target (v4 and v6), addr target (v4 and v6), a critical and a warning one
        mk(
            service="web",
            id="web-1",
            node="node1",
            address="10.0.0.1",
            port=8080,
            tags=["v1", "primary"],
            meta={"version": "1", "color": "blue"},
            ports={"http": 18080, "admin": 19090},
        ),
        mk(
            service="web",
            id="web-2",
            node="node2",
            address="10.0.1.2",
            port=8081,
            tags=["v2", "Primary"],
            meta={"version": "2"},
            ports={"http": 18081},
        ),
        mk(service="web", id="web-3", node="node6", address="fd00::6", port=8082, tags=["v1"]),
        mk(
            service="web",
            id="web-4",
            node="node1",
            address="10.0.0.4",
            port=8083,
            tags=["v1", "primary"],
            meta={"version": "4"},
            ports={"http": 18083, "grpc": 18084},
            health=Health.CRITICAL,
        ),
        mk(
            service="web",
            id="web-5",
            node="node2",
            address="fd00::5",
            port=8084,
            tags=["v3"],
            weights={"passing": 5, "warning": 2},
            health=Health.WARNING,
        ),
        mk(
            service="web", id="web-r", node="noder", address="10.2.0.1", port=8080, datacenter="dc2"
        ),
        mk(
            service="api", id="api-r", node="noder", address="10.2.0.9", port=9000, datacenter="dc2"
        ),
        # two instances behind one target, identical meta
        mk(
            service="db-main",
            id="db-1",
            node="node1",
            address="10.0.0.1",
            port=5432,
            meta={"role": "replica"},
        ),
        mk(
            service="db-main",
            id="db-2",
            node="node1",
            address="10.0.0.1",
            port=5433,
            meta={"role": "replica"},
        ),
        mk(service="dbx-a", id="dbx-1", node="node2", address="10.0.0.2", port=1),
        mk(service="cache", id="cache-1", node="node1", address="10.0.0.1", port=6379),
        mk(
            service="pri",
            id="pri-1",
            node="node2",
            address="10.0.0.2",
            port=7000,
            meta={"srv-priority": "10"},
            weights={"passing": 3, "warning": 1},
        ),
        mk(
            service="down", id="down-1", node="node1", address="10.0.0.1", port=1, health="critical"
        ),
        mk(service="warn", id="warn-1", node="node2", address="10.0.0.2", port=2, health="warning"),
        mk(service="orphan", id="orphan-1", node="ghost", address="10.9.9.9", port=3),
    ]


def world_registry() -> Registry:
    """A fresh registry holding the fixture world."""
    registry = Registry(LOCAL)
    registry.apply(upserts=world_instances(), nodes=NODES, allocs=ALLOCS)
    return registry


def soa(zone: str = "nomad.", serial: int | str = "{serial}", min_ttl: int = 11) -> str:
    """The expected SOA record text of `zone` with SETTINGS' timers."""
    return (
        f"{zone} {min_ttl} IN SOA localhost.node.dc1.{zone} hostmaster.{zone} "
        f"{serial} 3600 600 86400 {min_ttl}"
    )


def zone_of(qname: str) -> str:
    """The zone of SETTINGS a name is in ('nomad.' or 'consul.')."""
    name = qname.lower().rstrip(".") + "."
    for zone in (SETTINGS.domain, *SETTINGS.alt_domains):
        if name == zone or name.endswith("." + zone):
            return zone
    raise AssertionError(f"{qname} is not in a test zone")


# -- building queries ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Edns:
    """An OPT record to put in a query."""

    payload: int = 4096
    version: int = 0
    do: bool = False


def query(
    qname: str,
    qtype: str = "A",
    *,
    qclass: str = "IN",
    ident: int = QUERY_ID,
    edns: Edns | None = None,
    rd: bool = True,
) -> bytes:
    """The wire form of a one-question query."""
    record = DNSRecord.question(qname, qtype, qclass)
    record.header.id = ident
    record.header.rd = int(rd)
    if edns is not None:
        record.add_ar(
            EDNS0(udp_len=edns.payload, version=edns.version, flags="do" if edns.do else "")
        )
    return bytes(record.pack())


def header(
    *,
    ident: int = QUERY_ID,
    qr: bool = False,
    opcode: int = 0,
    rd: bool = True,
    qdcount: int = 1,
    ancount: int = 0,
    nscount: int = 0,
    arcount: int = 0,
) -> bytes:
    """A raw 12-octet header (RFC 1035 section 4.1.1)."""
    flags = (int(qr) << 15) | (opcode << 11) | (int(rd) << 8)
    return struct.pack("!6H", ident, flags, qdcount, ancount, nscount, arcount)


def question_wire(qname: str, qtype: int = 1, qclass: int = 1) -> bytes:
    """A raw question entry, labels exactly as given (no compression)."""
    out = b"".join(bytes([len(label)]) + label.encode() for label in qname.rstrip(".").split("."))
    return out + b"\x00" + struct.pack("!HH", qtype, qclass)


def opt_wire(payload: int = 4096, version: int = 0) -> bytes:
    """A raw OPT pseudo-RR with an empty RDATA."""
    return b"\x00" + struct.pack("!HHIH", OPT, payload, version << 16, 0)


# -- decoding replies --------------------------------------------------------------


def ask(
    responder: Responder,
    data: bytes,
    *,
    client: str = "127.0.0.1",
    tcp: bool = False,
) -> DNSRecord:
    """Send `data` to the responder and parse the reply, which must be bytes."""
    reply = responder.respond(data, client=client, tcp=tcp)
    assert isinstance(reply, bytes), f"expected a reply, got {reply!r}"
    return DNSRecord.parse(reply)


def raw_reply(
    responder: Responder, data: bytes, *, client: str = "127.0.0.1", tcp: bool = False
) -> bytes | ForwardQuery | None:
    """The responder's result, unparsed."""
    return responder.respond(data, client=client, tcp=tcp)


def rdata_text(rr: RR) -> str:
    """RDATA as comparable text: domain names lower case, addresses canonical."""
    rtype = QTYPE.get(rr.rtype, str(rr.rtype))
    data = rr.rdata
    if rtype in ("A", "AAAA"):
        return str(ipaddress.ip_address(str(data)))
    if rtype == "SRV":
        return f"{data.priority} {data.weight} {data.port} {str(data.target).lower()}"
    if rtype in ("NS", "CNAME", "PTR"):
        return str(data.label).lower()
    if rtype == "SOA":
        times = " ".join(str(t) for t in data.times)
        return f"{str(data.mname).lower()} {str(data.rname).lower()} {times}"
    if rtype == "TXT":
        return " ".join('"' + bytes(s).decode("utf-8", "replace") + '"' for s in data.data)
    return str(data)


def rr_text(rr: RR) -> str:
    """One record as ``owner ttl class type rdata`` (owner lower case)."""
    rtype = QTYPE.get(rr.rtype, str(rr.rtype))
    rclass = CLASS.get(rr.rclass, str(rr.rclass))
    return f"{str(rr.rname).lower()} {rr.ttl} {rclass} {rtype} {rdata_text(rr)}"


def texts(records: Iterable[RR]) -> list[str]:
    """The records of a section as text, OPT pseudo-records left out."""
    return [rr_text(rr) for rr in records if rr.rtype != OPT]


def _key(text: str) -> tuple[str, str]:
    owner, _ttl, rest = text.split(" ", 2)
    return owner, rest


def same_records(expected: Sequence[str], got: Sequence[str]) -> tuple[list[str], list[str]]:
    """Compare as multisets; an expected TTL of '*' matches any TTL.

    Returns (sorted expected, sorted got) after wildcards were applied, for an
    assert whose failure shows both sides.
    """
    wild = {_key(e) for e in expected if e.split(" ", 2)[1] == "*"}
    normalised = []
    for text in got:
        owner, rest = _key(text)
        normalised.append(f"{owner} * {rest}" if (owner, rest) in wild else text)
    return sorted(expected), sorted(normalised)


@dataclass(frozen=True, slots=True)
class Opt:
    """The decoded OPT pseudo-record of a reply."""

    payload: int
    ext_rcode: int
    version: int
    do: bool


def opts(reply: DNSRecord) -> list[Opt]:
    """Every OPT record in the additional section, decoded."""
    return [
        Opt(rr.rclass, rr.ttl >> 24, (rr.ttl >> 16) & 0xFF, bool(rr.ttl & DO_BIT))
        for rr in reply.ar
        if rr.rtype == OPT
    ]


def rcode_name(reply: DNSRecord) -> str:
    """The full rcode (header rcode plus OPT extended rcode) by name."""
    value = reply.header.rcode
    found = opts(reply)
    if found:
        value |= found[0].ext_rcode << 4
    if value == BADVERS:
        return "BADVERS"
    return str(RCODE.get(value, str(value)))


def flags(reply: DNSRecord) -> set[str]:
    """The header flags among qr, aa, tc, ra that are set."""
    head = reply.header
    names = {"qr": head.qr, "aa": head.aa, "tc": head.tc, "ra": head.ra}
    return {name for name, bit in names.items() if bit}


def srv_targets(reply: DNSRecord) -> list[str]:
    """The SRV targets of the answer section, in order, lower case."""
    return [str(rr.rdata.target).lower() for rr in reply.rr if rr.rtype == QTYPE.SRV]


def glue_owners(reply: DNSRecord) -> list[str]:
    """Owner names of the A/AAAA records in the additional section, lower case."""
    return [str(rr.rname).lower() for rr in reply.ar if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
