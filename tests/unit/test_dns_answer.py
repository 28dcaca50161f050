"""Table-driven tests of the DNS answers, written from docs/dns_rules.md.  Pure: no I/O.

Each row is (qname, qtype, rcode, answer, extra[, ns]) in the style of CoreDNS'
`test.Case`, answered by `Responder.respond` from the fixture world of
:mod:`tests.unit.dnscase`, over TCP, over UDP with EDNS, and (when the answer
fits the UDP answer limit) over plain UDP.  Records are compared as multisets
of text, since answer order is random; order is tested in test_dns_order.py.

The fixture world (SETTINGS: zone nomad., alt zone consul., dc1; TTLs web 30,
db* 20, dbx* 25, * 5; node TTL 7; SOA minimum 11):

    node1 10.0.0.1 (meta arch, rack)   node2 10.0.0.2   node6 fd00::6   noder 10.2.0.1 (dc2)
    node3 10.3.0.1 (dc3, no instances)
    web   web-1 node1 10.0.0.1:8080 v1,primary meta version=1,color=blue
                ports http 18080, admin 19090
          web-2 node2 10.0.1.2:8081 v2,Primary meta version=2 ports http 18081
          web-3 node6 fd00::6:8082 v1
          web-4 node1 10.0.0.4:8083 CRITICAL (never served)
          web-5 node2 fd00::5:8084 v3 WARNING weights passing 5 / warning 2
          web-r noder 10.2.0.1:8080 dc2
    api   api-r noder 10.2.0.9:9000 dc2 only
    db-main db-1, db-2: node1 10.0.0.1:5432/5433 meta role=replica
    dbx-a node2 10.0.0.2:1   cache node1 10.0.0.1:6379
    pri   node2 10.0.0.2:7000 srv-priority 10, weight 3
    down (critical only)     warn (warning only)   orphan on unknown node ghost 10.9.9.9
    allocs 3f2a9c1e-... (172.26.64.5, fd00::a:5), 3f2b0000-... (172.26.64.6)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from dnslib import QTYPE

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns.responder import Responder

W = "web.service.nomad."
HEX5 = "fd000000000000000000000000000005"
GLUE_WEB = (
    "node1.node.dc1.nomad. 30 IN A 10.0.0.1",
    "0a000102.addr.dc1.nomad. 30 IN A 10.0.1.2",
    "node6.node.dc1.nomad. 30 IN AAAA fd00::6",
    f"{HEX5}.addr.dc1.nomad. 30 IN AAAA fd00::5",
)


def web_srv(owner: str) -> tuple[str, ...]:
    return (
        f"{owner} 30 IN SRV 1 1 8080 node1.node.dc1.nomad.",
        f"{owner} 30 IN SRV 1 1 8081 0a000102.addr.dc1.nomad.",
        f"{owner} 30 IN SRV 1 1 8082 node6.node.dc1.nomad.",
        f"{owner} 30 IN SRV 1 2 8084 {HEX5}.addr.dc1.nomad.",
    )


def primary_srv(owner: str) -> tuple[str, ...]:
    return (
        f"{owner} 30 IN SRV 1 1 8080 node1.node.dc1.nomad.",
        f"{owner} 30 IN SRV 1 1 8081 0a000102.addr.dc1.nomad.",
    )


GLUE_PRIMARY = GLUE_WEB[:2]


@dataclass(frozen=True, slots=True)
class Case:
    """One question and the exact reply expected (CoreDNS `test.Case`).

    `ns` None means: the zone SOA when the answer is empty (RFC 2308), not
    checked otherwise.  `extra` None means not checked (the rules are silent).
    """

    qname: str
    qtype: str
    rcode: str = "NOERROR"
    answer: tuple[str, ...] = ()
    extra: tuple[str, ...] | None = ()
    ns: tuple[str, ...] | None = None
    flags: frozenset[str] = frozenset({"qr", "aa"})


def nx(qname: str, qtype: str = "A") -> Case:
    return Case(qname, qtype, "NXDOMAIN")


def nodata(qname: str, qtype: str = "A") -> Case:
    return Case(qname, qtype)


SERVICE_CASES = [
    # SRV with glue: node targets and addr targets, IPv4 and IPv6; critical left out,
    # warning served with its warning weight; remote dc left out.
    Case(W, "SRV", answer=web_srv(W), extra=GLUE_WEB),
    Case("web.service.dc1.nomad.", "SRV", answer=web_srv("web.service.dc1.nomad."), extra=GLUE_WEB),
    Case("WEB.Service.NOMAD.", "SRV", answer=web_srv(W), extra=GLUE_WEB),
    Case(W, "A", answer=(f"{W} 30 IN A 10.0.0.1", f"{W} 30 IN A 10.0.1.2")),
    Case(W, "AAAA", answer=(f"{W} 30 IN AAAA fd00::6", f"{W} 30 IN AAAA fd00::5")),
    Case(
        W, "TXT", answer=(f'{W} 30 IN TXT "color=blue" "version=1"', f'{W} 30 IN TXT "version=2"')
    ),
    # RFC 8482: ANY gets the A and AAAA records
    Case(
        W,
        "ANY",
        answer=(
            f"{W} 30 IN A 10.0.0.1",
            f"{W} 30 IN A 10.0.1.2",
            f"{W} 30 IN AAAA fd00::6",
            f"{W} 30 IN AAAA fd00::5",
        ),
        extra=None,
    ),
    nodata(W, "MX"),
    # tag filters: case-insensitive, several labels AND-ed
    Case(
        "primary.web.service.nomad.",
        "SRV",
        answer=primary_srv("primary.web.service.nomad."),
        extra=GLUE_PRIMARY,
    ),
    Case(
        "PRIMARY.web.service.nomad.",
        "A",
        answer=(
            "primary.web.service.nomad. 30 IN A 10.0.0.1",
            "primary.web.service.nomad. 30 IN A 10.0.1.2",
        ),
    ),
    Case(
        "v1.primary.web.service.nomad.",
        "SRV",
        answer=("v1.primary.web.service.nomad. 30 IN SRV 1 1 8080 node1.node.dc1.nomad.",),
        extra=GLUE_WEB[:1],
    ),
    Case(
        "primary.v1.web.service.nomad.",
        "A",
        answer=("primary.v1.web.service.nomad. 30 IN A 10.0.0.1",),
    ),
    Case("v1.web.service.nomad.", "AAAA", answer=("v1.web.service.nomad. 30 IN AAAA fd00::6",)),
    Case("v1.web.service.nomad.", "A", answer=("v1.web.service.nomad. 30 IN A 10.0.0.1",)),
    Case(
        "v3.web.service.nomad.",
        "SRV",
        answer=(f"v3.web.service.nomad. 30 IN SRV 1 2 8084 {HEX5}.addr.dc1.nomad.",),
        extra=GLUE_WEB[3:],
    ),
    Case("v3.web.service.nomad.", "A"),  # v3 is IPv6 only: NODATA
    nx("nope.web.service.nomad.", "SRV"),
    nx("v2.v1.web.service.nomad."),
    nx("x.nope.web.service.nomad."),
    # RFC 2782 _svc._tag, _tcp/_udp meaning no filter
    Case(
        "_web._primary.service.nomad.",
        "SRV",
        answer=primary_srv("_web._primary.service.nomad."),
        extra=GLUE_PRIMARY,
    ),
    Case(
        "_web._tcp.service.nomad.",
        "SRV",
        answer=web_srv("_web._tcp.service.nomad."),
        extra=GLUE_WEB,
    ),
    Case(
        "_web._udp.service.dc1.nomad.",
        "SRV",
        answer=web_srv("_web._udp.service.dc1.nomad."),
        extra=GLUE_WEB,
    ),
    nx("_web._nope.service.nomad.", "SRV"),
    nx("_nope._tcp.service.nomad.", "SRV"),
    # named ports; instances without the label left out, critical ones never
    Case(
        "_http._tcp.web.service.nomad.",
        "SRV",
        answer=(
            "_http._tcp.web.service.nomad. 30 IN SRV 1 1 18080 node1.node.dc1.nomad.",
            "_http._tcp.web.service.nomad. 30 IN SRV 1 1 18081 0a000102.addr.dc1.nomad.",
        ),
        extra=GLUE_PRIMARY,
    ),
    Case(
        "_admin._udp.web.service.nomad.",
        "SRV",
        answer=("_admin._udp.web.service.nomad. 30 IN SRV 1 1 19090 node1.node.dc1.nomad.",),
        extra=GLUE_WEB[:1],
    ),
    nx("_grpc._tcp.web.service.nomad.", "SRV"),
    # two instances behind one target: one glue record, one A, identical TXT once
    Case(
        "db-main.service.nomad.",
        "SRV",
        answer=(
            "db-main.service.nomad. 20 IN SRV 1 1 5432 node1.node.dc1.nomad.",
            "db-main.service.nomad. 20 IN SRV 1 1 5433 node1.node.dc1.nomad.",
        ),
        extra=("node1.node.dc1.nomad. 20 IN A 10.0.0.1",),
    ),
    Case("db-main.service.nomad.", "A", answer=("db-main.service.nomad. 20 IN A 10.0.0.1",)),
    Case(
        "db-main.service.nomad.", "TXT", answer=('db-main.service.nomad. 20 IN TXT "role=replica"',)
    ),
    # per-service TTLs: exact, longest prefix*, *
    Case("dbx-a.service.nomad.", "A", answer=("dbx-a.service.nomad. 25 IN A 10.0.0.2",)),
    Case("cache.service.nomad.", "A", answer=("cache.service.nomad. 5 IN A 10.0.0.1",)),
    Case("Cache.Service.Nomad.", "A", answer=("cache.service.nomad. 5 IN A 10.0.0.1",)),
    nodata("cache.service.nomad.", "AAAA"),
    nodata("cache.service.nomad.", "TXT"),
    # SRV priority from meta srv-priority, weight from Weights.passing
    Case(
        "pri.service.nomad.",
        "SRV",
        answer=("pri.service.nomad. 5 IN SRV 10 3 7000 node2.node.dc1.nomad.",),
        extra=("node2.node.dc1.nomad. 5 IN A 10.0.0.2",),
    ),
    Case(
        "pri.service.nomad.",
        "TXT",
        answer=('pri.service.nomad. 5 IN TXT "srv-priority=10"',),
    ),
    # health: critical never, warning when only_passing is off
    nx("down.service.nomad.", "SRV"),
    nx("down.service.nomad."),
    nx("down.service.nomad.", "TXT"),
    Case("warn.service.nomad.", "A", answer=("warn.service.nomad. 5 IN A 10.0.0.2",)),
    # node unknown to the registry: addr target
    Case(
        "orphan.service.nomad.",
        "SRV",
        answer=("orphan.service.nomad. 5 IN SRV 1 1 3 0a090909.addr.dc1.nomad.",),
        extra=("0a090909.addr.dc1.nomad. 5 IN A 10.9.9.9",),
    ),
    nx("missing.service.nomad.", "SRV"),
    nx("missing.service.nomad."),
    nx("x.missing.service.nomad."),
]

DC_CASES = [
    # remote-dc instances only under their dc label
    nx("api.service.nomad.", "SRV"),
    nx("api.service.dc1.nomad.", "SRV"),
    Case(
        "api.service.dc2.nomad.",
        "SRV",
        answer=("api.service.dc2.nomad. 5 IN SRV 1 1 9000 0a020009.addr.dc2.nomad.",),
        extra=("0a020009.addr.dc2.nomad. 5 IN A 10.2.0.9",),
    ),
    Case(
        "web.service.dc2.nomad.",
        "SRV",
        answer=("web.service.dc2.nomad. 30 IN SRV 1 1 8080 noder.node.dc2.nomad.",),
        extra=("noder.node.dc2.nomad. 30 IN A 10.2.0.1",),
    ),
    Case("web.service.dc2.nomad.", "A", answer=("web.service.dc2.nomad. 30 IN A 10.2.0.1",)),
    Case("WEB.SERVICE.DC2.NOMAD.", "A", answer=("web.service.dc2.nomad. 30 IN A 10.2.0.1",)),
    nx("web.service.dc9.nomad.", "SRV"),
    nx("web.service.dc9.nomad."),
    nx("node1.node.dc9.nomad."),
    nx("0a000001.addr.dc9.nomad."),
    Case("noder.node.dc2.nomad.", "A", answer=("noder.node.dc2.nomad. 7 IN A 10.2.0.1",)),
    nx("noder.node.nomad."),
    Case("0a000001.addr.dc2.nomad.", "A", answer=("0a000001.addr.dc2.nomad. 7 IN A 10.0.0.1",)),
    nx("node1.node.dc2.nomad."),  # a local node is not in dc2
    # a dc known through a node only
    nodata("dc3.nomad."),
    nodata("service.dc3.nomad.", "SRV"),
    nx("web.service.dc3.nomad.", "SRV"),
    Case("node3.node.dc3.nomad.", "A", answer=("node3.node.dc3.nomad. 7 IN A 10.3.0.1",)),
    nx("node3.node.nomad."),
]

ALT_CASES = [
    # the alt zone answers like the main one, with targets in the alt zone
    Case(
        "web.service.consul.",
        "SRV",
        answer=(
            "web.service.consul. 30 IN SRV 1 1 8080 node1.node.dc1.consul.",
            "web.service.consul. 30 IN SRV 1 1 8081 0a000102.addr.dc1.consul.",
            "web.service.consul. 30 IN SRV 1 1 8082 node6.node.dc1.consul.",
            f"web.service.consul. 30 IN SRV 1 2 8084 {HEX5}.addr.dc1.consul.",
        ),
        extra=tuple(g.replace(".nomad.", ".consul.") for g in GLUE_WEB),
    ),
    Case(
        "web.service.dc2.CONSUL.",
        "SRV",
        answer=("web.service.dc2.consul. 30 IN SRV 1 1 8080 noder.node.dc2.consul.",),
        extra=("noder.node.dc2.consul. 30 IN A 10.2.0.1",),
    ),
    Case(
        "web.service.consul.",
        "A",
        answer=("web.service.consul. 30 IN A 10.0.0.1", "web.service.consul. 30 IN A 10.0.1.2"),
    ),
    Case("node1.node.consul.", "A", answer=("node1.node.consul. 7 IN A 10.0.0.1",)),
    Case("consul.", "SOA", answer=(dc.soa("consul."),), extra=None),
    Case(
        "consul.",
        "NS",
        answer=("consul. * IN NS localhost.node.dc1.consul.",),
        extra=("localhost.node.dc1.consul. * IN A 127.0.0.1",),
    ),
    nx("missing.service.consul."),
    nodata("service.consul."),
    nodata("consul.", "A"),
]

NODE_CASES = [
    Case("node1.node.nomad.", "A", answer=("node1.node.nomad. 7 IN A 10.0.0.1",)),
    Case("NODE1.node.dc1.nomad.", "A", answer=("node1.node.dc1.nomad. 7 IN A 10.0.0.1",)),
    Case("localhost.node.nomad.", "A", answer=("localhost.node.nomad. 7 IN A 127.0.0.1",)),
    nodata("node1.node.nomad.", "AAAA"),
    Case("node6.node.nomad.", "AAAA", answer=("node6.node.nomad. 7 IN AAAA fd00::6",)),
    nodata("node6.node.nomad.", "A"),
    Case("node1.node.nomad.", "TXT", answer=('node1.node.nomad. 7 IN TXT "arch=amd64" "rack=r1"',)),
    nodata("node2.node.nomad.", "TXT"),
    nx("ghost.node.nomad."),
    nx("x.node1.node.nomad."),
]

ADDR_CASES = [
    Case("0a000001.addr.nomad.", "A", answer=("0a000001.addr.nomad. 7 IN A 10.0.0.1",)),
    Case("0A000001.addr.dc1.nomad.", "A", answer=("0a000001.addr.dc1.nomad. 7 IN A 10.0.0.1",)),
    Case("c0a80101.addr.nomad.", "A", answer=("c0a80101.addr.nomad. 7 IN A 192.168.1.1",)),
    nodata("0a000001.addr.nomad.", "AAAA"),
    Case(
        "fd000000000000000000000000000006.addr.nomad.",
        "AAAA",
        answer=("fd000000000000000000000000000006.addr.nomad. 7 IN AAAA fd00::6",),
    ),
    nodata("fd000000000000000000000000000006.addr.nomad.", "A"),
    nx("0a00001.addr.nomad."),
    nx("0a0000011.addr.nomad."),
    nx("zz000001.addr.nomad."),
    nx("fd00000000000000000000000000006.addr.nomad.", "AAAA"),
    nx("x.0a000001.addr.nomad."),
]

ALLOC_CASES = [
    Case("3f2a.alloc.nomad.", "A", answer=("3f2a.alloc.nomad. 7 IN A 172.26.64.5",)),
    Case("3f2a.alloc.nomad.", "AAAA", answer=("3f2a.alloc.nomad. 7 IN AAAA fd00::a:5",)),
    Case(
        "3F2A9C1E.alloc.dc1.nomad.", "A", answer=("3f2a9c1e.alloc.dc1.nomad. 7 IN A 172.26.64.5",)
    ),
    Case(
        f"{dc.ALLOC_B}.alloc.nomad.", "A", answer=(f"{dc.ALLOC_B}.alloc.nomad. 7 IN A 172.26.64.6",)
    ),
    nodata("3f2b.alloc.nomad.", "AAAA"),
    nx("3f2.alloc.nomad."),  # ambiguous prefix
    nx("ffff.alloc.nomad."),
]

APEX_CASES = [
    Case("nomad.", "SOA", answer=(dc.soa(),), extra=None),
    Case("NoMaD.", "SOA", answer=(dc.soa(),), extra=None),
    Case(
        "nomad.",
        "NS",
        answer=("nomad. * IN NS localhost.node.dc1.nomad.",),
        extra=("localhost.node.dc1.nomad. * IN A 127.0.0.1",),
    ),
    Case(
        "nomad.", "ANY", answer=(dc.soa(), "nomad. * IN NS localhost.node.dc1.nomad."), extra=None
    ),
    nodata("nomad.", "A"),
    nodata("nomad.", "TXT"),
    nodata("nomad.", "SRV"),
]

ENT_CASES = [
    # empty non-terminals: NODATA (RFC 8020 forbids NXDOMAIN above existing names)
    *(
        nodata(name, qtype)
        for name in (
            "service.nomad.",
            "node.nomad.",
            "addr.nomad.",
            "alloc.nomad.",
            "dc1.nomad.",
            "dc2.nomad.",
            "service.dc1.nomad.",
            "service.dc2.nomad.",
            "node.dc2.nomad.",
            "addr.dc1.nomad.",
        )
        for qtype in ("A", "SRV")
    ),
    # names that do not exist, and names below them
    nx("foo.nomad."),
    nx("a.b.foo.nomad."),
    nx("dc9.nomad."),
    nx("service.dc9.nomad."),
    nx("web.foo.nomad."),
]

ALL_CASES = [
    *SERVICE_CASES,
    *DC_CASES,
    *ALT_CASES,
    *NODE_CASES,
    *ADDR_CASES,
    *ALLOC_CASES,
    *APEX_CASES,
    *ENT_CASES,
]

TRANSPORTS = ("tcp", "udp-edns", "udp")


def _params() -> list[object]:
    # Every case fits 512 octets, so without EDNS (no udp_answer_limit by default,
    # RFC 2181 section 9) UDP gets the whole answer too; trimming: test_dns_limits.py.
    return [
        pytest.param(case, transport, id=f"{case.qname}{case.qtype}-{transport}")
        for case in ALL_CASES
        for transport in TRANSPORTS
    ]


@pytest.fixture(scope="module")
def responder() -> Responder:
    return Responder(dc.world_registry(), dc.SETTINGS)


def check_case(responder: Responder, case: Case, transport: str) -> None:
    """Ask `case` over `transport` and compare the reply exactly."""
    edns = dc.Edns(payload=4096) if transport == "udp-edns" else None
    data = dc.query(case.qname, case.qtype, edns=edns)
    reply = dc.ask(responder, data, tcp=transport == "tcp")
    serial = responder.registry.snapshot.index % 2**32
    head = reply.header
    assert head.id == dc.QUERY_ID
    assert head.opcode == 0
    assert dc.rcode_name(reply) == case.rcode
    assert dc.flags(reply) == set(case.flags)
    # the question is echoed as asked (case included)
    assert [(str(q.qname), q.qtype, q.qclass) for q in reply.questions] == [
        (case.qname, getattr(QTYPE, case.qtype), 1)
    ]
    answer = [a.format(serial=serial) for a in case.answer]
    want, got = dc.same_records(answer, dc.texts(reply.rr))
    assert got == want, "answer section"
    ns = case.ns
    if ns is None and not case.answer:
        ns = (dc.soa(dc.zone_of(case.qname)),)
    if ns is not None:
        want = [n.format(serial=serial) for n in ns]
        want, got = dc.same_records(want, dc.texts(reply.auth))
        assert got == want, "authority section"
    if case.extra is not None:
        want, got = dc.same_records(list(case.extra), dc.texts(reply.ar))
        assert got == want, "additional section"
    found = dc.opts(reply)
    if edns is None:
        assert found == []
    else:
        assert found == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, do=False)]


@pytest.mark.parametrize(("case", "transport"), _params())
def test_answer(responder: Responder, case: Case, transport: str) -> None:
    check_case(responder, case, transport)
