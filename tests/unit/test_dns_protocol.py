"""Protocol rules of the DNS responder, from docs/dns_rules.md and the RFCs it cites.  Pure.

Header flags, recursion and forwarding, REFUSED/NOTIMP/FORMERR, EDNS0 and
BADVERS, 0x20 case echo, SERVFAIL, and answers following registry and
settings changes.  The fixture world is described in test_dns_answer.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord, EDNSOption

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns.responder import ForwardQuery, Responder
from discovery.dns.settings import DnsSettings, SoaSettings
from discovery.model import Health, Node, make_instance
from discovery.registry import Alloc, Registry, Snapshot

RECURSING = dataclasses.replace(dc.SETTINGS, recursors=("127.0.0.53",))


def make(settings: DnsSettings = dc.SETTINGS, registry: Registry | None = None) -> Responder:
    return Responder(registry if registry is not None else dc.world_registry(), settings)


def question_of(reply: DNSRecord) -> list[tuple[str, int, int]]:
    return [(str(q.qname), q.qtype, q.qclass) for q in reply.questions]


# -- header flags and recursion ---------------------------------------------------------


@pytest.mark.parametrize("rd", [True, False])
def test_rd_is_copied(rd: bool) -> None:
    # RFC 1035 section 4.1.1: RD "is copied into the response"
    reply = dc.ask(make(), dc.query("web.service.nomad.", "A", rd=rd))
    assert reply.header.rd == int(rd)


@pytest.mark.parametrize(
    ("qname", "qtype", "rcode"),
    [
        ("web.service.nomad.", "A", "NOERROR"),
        ("missing.service.nomad.", "A", "NXDOMAIN"),
        ("service.nomad.", "A", "NOERROR"),
        ("nomad.", "SOA", "NOERROR"),
    ],
)
@pytest.mark.parametrize(
    ("settings", "client", "ra"),
    [
        (dc.SETTINGS, "127.0.0.1", False),
        (RECURSING, "127.0.0.1", True),
        (RECURSING, "::1", True),
        (RECURSING, "192.0.2.10", False),
    ],
    ids=["no-recursors", "allowed-v4", "allowed-v6", "not-allowed"],
)
def test_aa_and_ra(
    qname: str, qtype: str, rcode: str, settings: DnsSettings, client: str, ra: bool
) -> None:
    reply = dc.ask(make(settings), dc.query(qname, qtype), client=client)
    assert dc.rcode_name(reply) == rcode
    assert dc.flags(reply) == ({"qr", "aa", "ra"} if ra else {"qr", "aa"})


OUT_OF_ZONE = ["example.com.", "xnomad.", "nomad.com.", "nomad.example.", "."]


@pytest.mark.parametrize("qname", OUT_OF_ZONE)
@pytest.mark.parametrize(
    ("settings", "client"),
    [(dc.SETTINGS, "127.0.0.1"), (RECURSING, "192.0.2.10")],
    ids=["no-recursors", "not-allowed"],
)
def test_out_of_zone_refused(qname: str, settings: DnsSettings, client: str) -> None:
    data = dc.query(qname, "A")
    reply = dc.ask(make(settings), data, client=client)
    assert reply.header.id == dc.QUERY_ID
    assert reply.header.qr == 1
    assert dc.rcode_name(reply) == "REFUSED"
    assert question_of(reply) == [(qname, QTYPE.A, 1)]
    assert reply.rr == []
    assert "aa" not in dc.flags(reply)  # not authoritative for other zones


@pytest.mark.parametrize(
    ("qname", "qtype", "qclass"),
    [("example.com.", "A", "IN"), ("version.bind.", "TXT", "CH"), ("nomad.", "AXFR", "IN")],
)
def test_refused_keeps_edns(qname: str, qtype: str, qclass: str) -> None:
    # dns_rules.md: a query with an OPT gets a reply with one, whatever the rcode
    data = dc.query(qname, qtype, qclass=qclass, edns=dc.Edns(payload=4096, do=True))
    reply = dc.ask(make(), data)
    assert dc.rcode_name(reply) == "REFUSED"
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, True)]


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_out_of_zone_transfer_refused_not_forwarded(qtype: str) -> None:
    reply = dc.ask(make(RECURSING), dc.query("example.com.", qtype), tcp=True)
    assert dc.rcode_name(reply) == "REFUSED"


@pytest.mark.parametrize("qname", OUT_OF_ZONE)
@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("client", ["127.0.0.1", "127.1.2.3", "::1"])
def test_out_of_zone_forwarded_for_allowed_clients(qname: str, tcp: bool, client: str) -> None:
    data = dc.query(qname, "AAAA", edns=dc.Edns(payload=1400, do=True))
    got = dc.raw_reply(make(RECURSING), data, client=client, tcp=tcp)
    assert got == ForwardQuery(data)


def test_forwarding_honours_the_allow_list() -> None:
    settings = dataclasses.replace(
        RECURSING, recursion_allowed=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    data = dc.query("example.com.", "A")
    assert dc.raw_reply(make(settings), data, client="10.1.2.3") == ForwardQuery(data)
    refused = dc.ask(make(settings), data, client="127.0.0.1")
    assert dc.rcode_name(refused) == "REFUSED"


def test_in_zone_never_forwarded() -> None:
    data = dc.query("missing.service.nomad.", "A")
    reply = dc.ask(make(RECURSING), data)
    assert dc.rcode_name(reply) == "NXDOMAIN"


@pytest.mark.parametrize(
    ("qname", "qtype"),
    [("version.bind.", "TXT"), ("web.service.nomad.", "A"), ("nomad.", "SOA")],
)
@pytest.mark.parametrize("settings", [dc.SETTINGS, RECURSING], ids=["plain", "recursing"])
def test_class_chaos_refused(qname: str, qtype: str, settings: DnsSettings) -> None:
    data = dc.query(qname, qtype, qclass="CH")
    reply = dc.ask(make(settings), data)
    assert dc.rcode_name(reply) == "REFUSED"
    assert reply.header.id == dc.QUERY_ID
    assert reply.rr == []


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
@pytest.mark.parametrize("qname", ["nomad.", "consul.", "web.service.nomad."])
@pytest.mark.parametrize("tcp", [False, True])
def test_zone_transfer_refused(qtype: str, qname: str, tcp: bool) -> None:
    reply = dc.ask(make(), dc.query(qname, qtype), tcp=tcp)
    assert dc.rcode_name(reply) == "REFUSED"
    assert reply.header.id == dc.QUERY_ID
    assert reply.rr == []


# -- malformed and unsupported messages ------------------------------------------------


@pytest.mark.parametrize("length", range(12))
def test_shorter_than_a_header_is_dropped(length: int) -> None:
    data = dc.query("web.service.nomad.", "A")[:length]
    assert dc.raw_reply(make(), data) is None
    assert dc.raw_reply(make(), data, tcp=True) is None


def test_responses_are_dropped() -> None:
    # QR=1: a reply sent to us; answering it could loop between two servers
    data = dc.header(qr=True) + dc.question_wire("web.service.nomad.")
    assert dc.raw_reply(make(), data) is None
    assert dc.raw_reply(make(RECURSING), dc.header(qr=True) + dc.question_wire("a.com.")) is None


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 15])
def test_other_opcodes_notimp(opcode: int) -> None:
    data = dc.header(ident=0xBEEF, opcode=opcode) + dc.question_wire("nomad.", QTYPE.SOA)
    reply = dc.ask(make(), data)
    assert reply.header.id == 0xBEEF
    assert reply.header.qr == 1
    assert reply.header.opcode == opcode  # RFC 1035 section 4.1.1: copied
    assert dc.rcode_name(reply) == "NOTIMP"
    assert reply.rr == []


def test_qdcount_zero_formerr() -> None:
    reply = dc.ask(make(), dc.header(ident=0x0102, qdcount=0))
    assert reply.header.id == 0x0102
    assert dc.rcode_name(reply) == "FORMERR"
    assert reply.header.q == 0
    assert reply.questions == []


def test_qdcount_two_formerr() -> None:
    body = dc.question_wire("web.service.nomad.") + dc.question_wire("nomad.", QTYPE.SOA)
    reply = dc.ask(make(), dc.header(ident=0x0203, qdcount=2) + body)
    assert reply.header.id == 0x0203
    assert dc.rcode_name(reply) == "FORMERR"
    assert reply.rr == []


GARBAGE = [
    b"\xff\xff\xff",
    b"\x03web\x07ser",  # question cut short
    b"\x03web\x07service\x05nomad\x00\x00",  # no class
    b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer to itself
    b"\x40abc\x00\x00\x01\x00\x01",  # reserved label type 01
]


@pytest.mark.parametrize("body", GARBAGE)
@pytest.mark.parametrize("tcp", [False, True])
def test_unparsable_body_formerr(body: bytes, tcp: bool) -> None:
    reply = dc.ask(make(), dc.header(ident=0x7777) + body, tcp=tcp)
    assert reply.header.id == 0x7777
    assert reply.header.qr == 1
    assert dc.rcode_name(reply) == "FORMERR"
    assert reply.rr == []


def test_record_counts_beyond_the_data_formerr() -> None:
    data = dc.header(ident=0x4242, arcount=3) + dc.question_wire("web.service.nomad.")
    reply = dc.ask(make(), data)
    assert reply.header.id == 0x4242
    assert dc.rcode_name(reply) == "FORMERR"
    assert question_of(reply) == [("web.service.nomad.", QTYPE.A, 1)]  # one parsable question


def test_two_opt_records_formerr() -> None:
    # RFC 6891 section 6.1.1: more than one OPT -> FORMERR
    data = (
        dc.header(ident=0x0A0B, arcount=2)
        + dc.question_wire("web.service.nomad.")
        + dc.opt_wire()
        + dc.opt_wire()
    )
    reply = dc.ask(make(), data)
    assert reply.header.id == 0x0A0B
    assert dc.rcode_name(reply) == "FORMERR"
    assert question_of(reply) == [("web.service.nomad.", QTYPE.A, 1)]
    assert reply.rr == []


# -- EDNS0 -----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [100, 512, 1232, 4096, 65535])
@pytest.mark.parametrize("do", [False, True])
@pytest.mark.parametrize(
    ("qname", "rcode"),
    [("web.service.nomad.", "NOERROR"), ("missing.service.nomad.", "NXDOMAIN")],
)
def test_opt_echoed(payload: int, do: bool, qname: str, rcode: str) -> None:
    data = dc.query(qname, "A", edns=dc.Edns(payload=payload, do=do))
    reply = dc.ask(make(), data)
    assert dc.rcode_name(reply) == rcode
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, do)]


def test_edns_options_do_not_change_the_answer() -> None:
    # RFC 6891 section 6.1.2: unknown options are ignored; here a cookie and a client subnet
    record = DNSRecord.question("web.service.nomad.", "A")
    record.header.id = dc.QUERY_ID
    record.add_ar(
        EDNS0(
            udp_len=1232,
            opts=[EDNSOption(10, b"12345678"), EDNSOption(8, b"\x00\x01\x18\x00\x0a\x00\x00")],
        )
    )
    reply = dc.ask(make(), bytes(record.pack()))
    assert dc.rcode_name(reply) == "NOERROR"
    assert sorted(dc.texts(reply.rr)) == [
        "web.service.nomad. 30 IN A 10.0.0.1",
        "web.service.nomad. 30 IN A 10.0.1.2",
    ]
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, False)]


def test_opt_payload_is_the_setting() -> None:
    settings = dataclasses.replace(dc.SETTINGS, edns_max_payload=4000)
    reply = dc.ask(make(settings), dc.query("nomad.", "SOA", edns=dc.Edns(payload=1400)))
    assert dc.opts(reply) == [dc.Opt(4000, 0, 0, False)]


def test_no_opt_without_edns() -> None:
    reply = dc.ask(make(), dc.query("nomad.", "SOA"))
    assert dc.opts(reply) == []


@pytest.mark.parametrize("version", [1, 2, 255])
@pytest.mark.parametrize("qname", ["web.service.nomad.", "missing.service.nomad.", "nomad."])
def test_badvers(version: int, qname: str) -> None:
    # RFC 6891 section 6.1.3: BADVERS (16) = header rcode 0 + OPT extended rcode 1
    data = dc.query(qname, "A", edns=dc.Edns(version=version))
    reply = dc.ask(make(), data)
    assert reply.header.id == dc.QUERY_ID
    assert reply.header.rcode == 0
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 1, 0, False)]
    assert dc.rcode_name(reply) == "BADVERS"
    assert reply.rr == []


def test_badvers_copies_do() -> None:
    # dns_rules.md: every reply to a query with an OPT copies its DO bit (RFC 3225 section 3)
    data = dc.query("web.service.nomad.", "A", edns=dc.Edns(version=1, do=True))
    reply = dc.ask(make(), data)
    assert dc.rcode_name(reply) == "BADVERS"
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 1, 0, True)]


# -- 0x20: the question and the owner names as asked -------------------------------------


@pytest.mark.parametrize(
    ("qname", "qtype"),
    [
        ("WeB.SeRvIcE.NoMaD.", "A"),
        ("wEb.sErViCe.Dc1.nOmAd.", "SRV"),
        ("WeB.SeRvIcE.NoMaD.", "TXT"),
        ("PrImArY.wEb.SeRvIcE.nOmAd.", "A"),
        ("NoDe1.NoDe.NoMaD.", "A"),
        ("0A000001.AdDr.NoMaD.", "A"),
        ("3F2a.AlLoC.nOmAd.", "A"),
        ("NoMaD.", "SOA"),
        ("MiSsInG.sErViCe.NoMaD.", "A"),
        ("SeRvIcE.nOmAd.", "A"),
    ],
)
def test_case_echoed_byte_exact(qname: str, qtype: str) -> None:
    data = dc.query(qname, qtype)
    raw = dc.raw_reply(make(), data)
    assert isinstance(raw, bytes)
    asked = dc.question_wire(qname, getattr(QTYPE, qtype))
    assert raw[12 : 12 + len(asked)] == asked
    reply = DNSRecord.parse(raw)
    assert [str(rr.rname) for rr in reply.rr] == [qname] * len(reply.rr)


def test_case_echoed_with_many_answers() -> None:
    qname = "wEB.SERVICE.nomad."
    reply = dc.ask(make(), dc.query(qname, "SRV"), tcp=True)
    assert len(reply.rr) == 4
    assert {str(rr.rname) for rr in reply.rr} == {qname}


# -- SERVFAIL -----------------------------------------------------------------------------


def test_servfail_echoes_id_and_question() -> None:
    data = dc.query("wEb.service.nomad.", "SRV", ident=0x3344)
    raw = make().servfail(data)
    assert isinstance(raw, bytes)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == 0x3344
    assert reply.header.qr == 1
    assert reply.header.rcode == RCODE.SERVFAIL
    assert question_of(reply) == [("wEb.service.nomad.", QTYPE.SRV, 1)]
    assert reply.rr == []


@pytest.mark.parametrize("do", [False, True])
def test_servfail_to_an_edns_query_carries_an_opt(do: bool) -> None:
    # RFC 6891 section 7: a reply to a query with an OPT has one (forward failures use this)
    raw = make().servfail(dc.query("x.example.", "A", edns=dc.Edns(payload=4096, do=do)))
    assert isinstance(raw, bytes)
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.SERVFAIL
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, do)]


def test_servfail_without_edns_has_no_opt() -> None:
    raw = make().servfail(dc.query("x.example.", "A"))
    assert isinstance(raw, bytes)
    assert dc.opts(DNSRecord.parse(raw)) == []


def test_servfail_of_unparsable_body_keeps_the_id() -> None:
    raw = make().servfail(dc.header(ident=0x5566) + b"\xff\xff")
    assert isinstance(raw, bytes)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == 0x5566
    assert reply.header.rcode == RCODE.SERVFAIL


@pytest.mark.parametrize("length", [0, 1, 11])
def test_servfail_without_header_is_none(length: int) -> None:
    assert make().servfail(dc.query("nomad.", "SOA")[:length]) is None


class BrokenRegistry(Registry):
    """Fault injection, not a fake: the snapshot read fails like a bug would."""

    broken = False

    @property
    def snapshot(self) -> Snapshot:
        if self.broken:
            raise RuntimeError("injected failure")
        return super().snapshot


@pytest.mark.parametrize(
    ("qname", "qtype"),
    [("web.service.nomad.", "SRV"), ("nomad.", "SOA"), ("missing.nomad.", "A")],
)
def test_internal_error_is_servfail(qname: str, qtype: str) -> None:
    registry = BrokenRegistry(dc.LOCAL)
    registry.apply(upserts=dc.world_instances(), nodes=dc.NODES)
    responder = make(registry=registry)
    registry.broken = True
    reply = dc.ask(responder, dc.query(qname, qtype, ident=0x6001))
    assert reply.header.id == 0x6001
    assert reply.header.rcode == RCODE.SERVFAIL
    assert question_of(reply) == [(qname, getattr(QTYPE, qtype), 1)]


# -- answers follow the registry and the settings -------------------------------------------


def a_records(responder: Responder, qname: str) -> set[str]:
    return set(dc.texts(dc.ask(responder, dc.query(qname, "A"), tcp=True).rr))


def soa_serial(responder: Responder) -> int:
    reply = dc.ask(responder, dc.query("nomad.", "SOA"))
    return int(reply.rr[0].rdata.times[0])


def test_registry_changes_show_in_the_next_answer() -> None:
    registry = dc.world_registry()
    responder = make(registry=registry)
    name = "web.service.nomad."
    assert a_records(responder, name) == {f"{name} 30 IN A 10.0.0.1", f"{name} 30 IN A 10.0.1.2"}
    serial = soa_serial(responder)
    assert serial == registry.snapshot.index
    new = make_instance(service="web", id="web-9", node="node2", address="10.0.9.9", port=1)
    registry.upsert(new)
    assert f"{name} 30 IN A 10.0.9.9" in a_records(responder, name)
    assert soa_serial(responder) == registry.snapshot.index > serial
    registry.set_health("web-9", Health.CRITICAL)
    assert f"{name} 30 IN A 10.0.9.9" not in a_records(responder, name)
    registry.remove("cache-1")
    reply = dc.ask(responder, dc.query("cache.service.nomad.", "A"))
    assert dc.rcode_name(reply) == "NXDOMAIN"
    assert dc.texts(reply.auth) == [dc.soa(serial=registry.snapshot.index)]


def test_node_and_alloc_changes_show_in_the_next_answer() -> None:
    registry = dc.world_registry()
    responder = make(registry=registry)
    assert a_records(responder, "node2.node.nomad.") == {"node2.node.nomad. 7 IN A 10.0.0.2"}
    registry.apply(nodes=[Node("node2", "10.0.0.22")])
    assert a_records(responder, "node2.node.nomad.") == {"node2.node.nomad. 7 IN A 10.0.0.22"}
    registry.put_alloc(Alloc("c0ffee00-0000-4000-8000-000000000003", ("172.26.64.9",)))
    assert a_records(responder, "c0ffee.alloc.nomad.") == {"c0ffee.alloc.nomad. 7 IN A 172.26.64.9"}
    registry.drop_alloc(dc.ALLOC_B)
    # 3f2 is no longer ambiguous
    assert a_records(responder, "3f2.alloc.nomad.") == {"3f2.alloc.nomad. 7 IN A 172.26.64.5"}


def test_update_settings_applies_to_the_next_query() -> None:
    responder = make()
    assert a_records(responder, "cache.service.nomad.") == {"cache.service.nomad. 5 IN A 10.0.0.1"}
    responder.update_settings(dataclasses.replace(dc.SETTINGS, service_ttl={"cache": 99}))
    assert a_records(responder, "cache.service.nomad.") == {"cache.service.nomad. 99 IN A 10.0.0.1"}


def test_soa_serial_wraps_at_32_bits() -> None:
    registry = Registry(dc.LOCAL, index=2**32 + 5)
    responder = make(registry=registry)
    assert soa_serial(responder) == 5
    registry.apply(nodes=dc.NODES)
    assert soa_serial(responder) == 6


def test_default_ttls_are_zero() -> None:
    responder = make(DnsSettings())
    registry = responder.registry
    for qname, want in [
        (
            "web.service.nomad.",
            {"web.service.nomad. 0 IN A 10.0.0.1", "web.service.nomad. 0 IN A 10.0.1.2"},
        ),
        ("node1.node.nomad.", {"node1.node.nomad. 0 IN A 10.0.0.1"}),
        ("0a000001.addr.nomad.", {"0a000001.addr.nomad. 0 IN A 10.0.0.1"}),
    ]:
        assert a_records(responder, qname) == want
    reply = dc.ask(responder, dc.query("missing.service.nomad.", "A"))
    assert dc.texts(reply.auth) == [dc.soa(serial=registry.snapshot.index, min_ttl=0)]


def test_soa_timers_from_settings() -> None:
    settings = dataclasses.replace(
        dc.SETTINGS,
        soa=SoaSettings(refresh=11, retry=22, expire=33, min_ttl=44),
        node_name="agent7",
        datacenter="east",
    )
    responder = make(settings)
    serial = responder.registry.snapshot.index
    reply = dc.ask(responder, dc.query("nomad.", "SOA"))
    assert dc.texts(reply.rr) == [
        f"nomad. 44 IN SOA agent7.node.east.nomad. hostmaster.nomad. {serial} 11 22 33 44"
    ]
    reply = dc.ask(responder, dc.query("service.nomad.", "A"))
    assert dc.rcode_name(reply) == "NOERROR"
    assert dc.texts(reply.auth) == [
        f"nomad. 44 IN SOA agent7.node.east.nomad. hostmaster.nomad. {serial} 11 22 33 44"
    ]


def test_ns_glue_is_the_node_address() -> None:
    settings = dataclasses.replace(dc.SETTINGS, node_address="fd00::53")
    reply = dc.ask(make(settings), dc.query("nomad.", "NS"))
    assert [t.split(" ", 2)[2] for t in dc.texts(reply.ar)] == ["IN AAAA fd00::53"]
    assert dc.glue_owners(reply) == ["localhost.node.dc1.nomad."]


def test_only_passing_drops_warning_instances() -> None:
    responder = make(dataclasses.replace(dc.SETTINGS, only_passing=True))
    reply = dc.ask(responder, dc.query("warn.service.nomad.", "A"))
    assert dc.rcode_name(reply) == "NXDOMAIN"
    reply = dc.ask(responder, dc.query("web.service.nomad.", "SRV"), tcp=True)
    assert sorted(rr.rdata.port for rr in reply.rr) == [8080, 8081, 8082]
    reply = dc.ask(responder, dc.query("web.service.nomad.", "AAAA"))
    assert dc.texts(reply.rr) == ["web.service.nomad. 30 IN AAAA fd00::6"]


def test_local_dc_named_explicitly() -> None:
    settings = dataclasses.replace(dc.SETTINGS, datacenter="east")
    responder = make(settings)
    reply = dc.ask(responder, dc.query("web.service.east.nomad.", "SRV"), tcp=True)
    assert len(reply.rr) == 4
    assert all(".node.east.nomad." in t or ".addr.east.nomad." in t for t in dc.srv_targets(reply))
    reply = dc.ask(responder, dc.query("web.service.dc1.nomad.", "SRV"))
    assert dc.rcode_name(reply) == "NXDOMAIN"
