"""The responder's whole-reply cache (UDP queries of the plain shape).  Pure: no I/O.

A query whose bytes after the ID equal an earlier one's is answered from the
replies kept for it.  These tests ask the same bytes again and again and
check that nothing a reply depends on is lost on the way: the ID, the RD
flag, the question's case, the EDNS shape, the transport, the client (with
recursion), the registry's current state, the shuffle, and the counts.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns import responder as responder_module
from discovery.dns.responder import ForwardQuery, Responder
from discovery.model import Health, make_instance
from discovery.registry import Registry

WEB = "web.service.nomad."  # A: 2 addresses (its SRV answers are weighted: web-5)
DB = "db-main.service.nomad."  # SRV: 2 equal instances


def make(registry: Registry | None = None, **changes: object) -> Responder:
    settings = dataclasses.replace(dc.SETTINGS, **changes)  # type: ignore[arg-type]
    return Responder(registry if registry is not None else dc.world_registry(), settings)


def flat_registry(count: int) -> Registry:
    """`flat` with `count` equal instances (count! answer orders)."""
    registry = Registry(dc.LOCAL)
    registry.upsert(
        *(
            make_instance(
                service="flat", id=f"flat-{n}", node="n", address=f"10.4.0.{n}", port=1000 + n
            )
            for n in range(1, count + 1)
        )
    )
    return registry


def kept(responder: Responder) -> int:
    """How many whole-reply entries the responder holds."""
    return len(responder._replies)


def test_repeated_query_is_kept_and_answered_with_its_own_id() -> None:
    responder = make()
    first = dc.ask(responder, dc.query(DB, "SRV", ident=1))
    assert kept(responder) == 1
    for ident in (2, 0xFFFF, 0):
        reply = dc.ask(responder, dc.query(DB, "SRV", ident=ident))
        assert reply.header.id == ident
        assert sorted(dc.texts(reply.rr)) == sorted(dc.texts(first.rr))
        assert sorted(dc.texts(reply.ar)) == sorted(dc.texts(first.ar))
    assert kept(responder) == 1


@pytest.mark.parametrize("order", [(True, False), (False, True)])
def test_rd_flag_is_never_taken_from_another_query(order: tuple[bool, bool]) -> None:
    responder = make()
    for rd in order * 3:
        reply = dc.ask(responder, dc.query(WEB, "A", rd=rd))
        assert bool(reply.header.rd) is rd
        assert {"qr", "aa"} <= dc.flags(reply)


def test_question_case_is_echoed_after_a_lower_case_twin() -> None:
    responder = make()
    dc.ask(responder, dc.query("web.service.nomad.", "A"))
    dc.ask(responder, dc.query("web.service.nomad.", "A"))
    for spelling in ("WeB.SeRvIcE.NoMaD.", "WEB.service.nomad.", "web.service.nomad."):
        data = dc.query(spelling, "A")
        reply = responder.respond(data, client="127.0.0.1", tcp=False)
        assert isinstance(reply, bytes)
        # the question, as asked, byte for byte
        assert reply[12 : 12 + len(data) - 12] == data[12:]
    # mixed-case questions are answered, but not kept: 0x20 clients would fill the cache
    assert kept(responder) == 1


def test_edns_shapes_are_kept_apart() -> None:
    """Truncation and the OPT depend on the EDNS payload: each shape has its own entry."""
    responder = make(registry=flat_registry(4), udp_answer_limit=0)
    name = "flat.service.nomad."
    shapes: list[dc.Edns | None] = [None, dc.Edns(payload=512), dc.Edns(payload=4096)]
    for _ in range(3):
        for edns in shapes:
            reply = dc.ask(responder, dc.query(name, "SRV", edns=edns))
            has_opt = bool(dc.opts(reply))
            assert has_opt is (edns is not None)
            # 4 SRV answers + 4 glue fit in 512 octets: no shape truncates here
            assert len(reply.rr) == 4
    assert kept(responder) == len(shapes)


def test_edns_with_options_is_answered_but_not_kept() -> None:
    responder = make()
    plain = dc.query(WEB, "A", edns=dc.Edns())
    # an OPT with a COOKIE option (RFC 7873): rdlength 12, client cookie of 8 octets
    cookie = b"\x00\x0a\x00\x08" + bytes(range(8))
    data = plain[:-2] + len(cookie).to_bytes(2, "big") + cookie
    for _ in range(3):
        reply = dc.ask(responder, data)
        assert dc.rcode_name(reply) == "NOERROR"
        assert len(reply.rr) == 2
    assert kept(responder) == 0


def test_trailing_octets_are_answered_but_not_kept() -> None:
    responder = make()
    data = dc.query(WEB, "A") + b"\x00\x00"
    for _ in range(3):
        assert len(dc.ask(responder, data).rr) == 2
    assert kept(responder) == 0


def test_tcp_is_not_answered_from_udp_replies() -> None:
    """UDP keeps at most udp_answer_limit answers; TCP must still get them all."""
    responder = make(registry=flat_registry(5), udp_answer_limit=2)
    data = dc.query("flat.service.nomad.", "SRV")
    for _ in range(3):
        udp = dc.ask(responder, data)
        assert len(udp.rr) == 2
        tcp = dc.ask(responder, data, tcp=True)
        assert len(tcp.rr) == 5


def test_registry_change_drops_the_kept_replies() -> None:
    registry = dc.world_registry()
    responder = make(registry=registry)
    data = dc.query(WEB, "A")
    before = {rr.rdata.data for rr in dc.ask(responder, data).rr}
    dc.ask(responder, data)
    other = dc.query("cache.service.nomad.", "A")
    dc.ask(responder, other)
    assert kept(responder) == 2
    registry.upsert(make_instance(service="web", id="web-9", node="node2", address="10.0.9.9"))
    after = {str(rr.rdata) for rr in dc.ask(responder, data).rr}
    assert "10.0.9.9" in after and len(after) == len(before) + 1
    registry.set_health("web-9", Health.CRITICAL)
    assert "10.0.9.9" not in {str(rr.rdata) for rr in dc.ask(responder, data).rr}
    # the negative answers carry the SOA serial (the registry index): always refreshed
    nx = dc.query("nothere.service.nomad.", "A")
    dc.ask(responder, nx)
    registry.remove("web-9")
    reply = dc.ask(responder, nx)
    assert dc.texts(reply.auth) == [dc.soa(serial=registry.snapshot.index)]


def test_change_to_one_service_keeps_the_others() -> None:
    registry = dc.world_registry()
    responder = make(registry=registry)
    dc.ask(responder, dc.query(WEB, "A"))
    dc.ask(responder, dc.query("cache.service.nomad.", "A"))
    registry.upsert(make_instance(service="web", id="web-9", node="node2", address="10.0.9.9"))
    assert kept(responder) == 1  # cache's entry survived web's change


def test_every_order_is_served_uniformly() -> None:
    """3 equal instances: 6 orders, each about 1/6 of 6,000 draws (bounds: > 8 sigma)."""
    responder = make(registry=flat_registry(3))
    data = dc.query("flat.service.nomad.", "SRV")
    seen: collections.Counter[tuple[str, ...]] = collections.Counter()
    for _ in range(6000):
        reply = dc.ask(responder, data)
        ports = tuple(str(rr.rdata.port) for rr in reply.rr)
        glue = tuple(str(rr.rdata) for rr in reply.ar)
        assert len(set(ports)) == 3 and len(set(glue)) == 3
        seen[ports] += 1
    assert len(seen) == 6
    assert all(800 < n < 1200 for n in seen.values()), seen
    assert kept(responder) == 1


def test_weighted_answers_are_not_kept() -> None:
    """A weighted draw has too many outcomes to keep; each query is drawn afresh."""
    registry = Registry(dc.LOCAL)
    registry.upsert(
        make_instance(service="w", id="w1", node="n", address="10.5.0.1", weights={"passing": 1}),
        make_instance(service="w", id="w2", node="n", address="10.5.0.2", weights={"passing": 9}),
    )
    responder = make(registry=registry)
    data = dc.query("w.service.nomad.", "SRV")
    firsts = collections.Counter(str(dc.ask(responder, data).ar[0].rdata) for _ in range(2000))
    assert kept(responder) == 0
    assert 1600 < firsts["10.5.0.2"] < 1950, firsts


def test_counts_include_kept_replies() -> None:
    responder = make()
    for _ in range(5):
        dc.ask(responder, dc.query(DB, "SRV"))
        dc.ask(responder, dc.query("nothere.service.nomad.", "A"))
    dc.ask(responder, dc.query(DB, "SRV"), tcp=True)
    srv, a = QTYPE.reverse["SRV"], QTYPE.reverse["A"]
    counts = responder.counts
    assert counts[(srv, RCODE.reverse["NOERROR"])] == 6
    assert counts[(a, RCODE.reverse["NXDOMAIN"])] == 5
    counts[(srv, 0)] = 0  # a copy: the caller cannot change the responder's figures
    assert responder.counts[(srv, 0)] == 6


def test_recursion_replies_are_per_client() -> None:
    """With recursors, RA depends on the client: nothing is kept, every client judged."""
    responder = make(recursors=("127.0.0.53",))
    data = dc.query(WEB, "A")
    for _ in range(2):
        assert "ra" in dc.flags(dc.ask(responder, data, client="127.0.0.1"))
        assert "ra" not in dc.flags(dc.ask(responder, data, client="192.0.2.7"))
    outside = dc.query("example.org.", "A")
    assert isinstance(responder.respond(outside, client="127.0.0.1", tcp=False), ForwardQuery)
    assert dc.rcode_name(dc.ask(responder, outside, client="192.0.2.7")) == "REFUSED"
    assert kept(responder) == 0


def test_kept_replies_are_bounded() -> None:
    budget = 8 * 1024  # a few dozen small entries
    responder = make(cache_max_bytes=budget)
    for n in range(200):
        reply = dc.ask(responder, dc.query(f"nx{n}.service.nomad.", "A"))
        assert dc.rcode_name(reply) == "NXDOMAIN"
        assert 0 < responder.cache_bytes <= budget
    assert 0 < kept(responder) < 200
    # least recently used out first: the last question is kept, the first is gone
    last = dc.query("nx199.service.nomad.", "A")
    first = dc.query("nx0.service.nomad.", "A")
    assert responder_module.reply_key(last, 1232) in responder._replies
    assert responder_module.reply_key(first, 1232) not in responder._replies


def test_settings_change_drops_the_kept_replies() -> None:
    responder = make()
    data = dc.query("cache.service.nomad.", "A")
    assert dc.ask(responder, data).rr[0].ttl == 5
    dc.ask(responder, data)
    responder.update_settings(dataclasses.replace(dc.SETTINGS, service_ttl={"cache": 99}))
    assert dc.ask(responder, data).rr[0].ttl == 99


def test_reply_matches_the_uncached_rendering() -> None:
    """The kept reply is byte-identical to what a fresh responder renders (one order)."""
    for qname, qtype in [
        ("cache.service.nomad.", "A"),
        ("cache.service.nomad.", "SRV"),
        ("nothere.service.nomad.", "A"),
        ("service.nomad.", "A"),
        ("nomad.", "SOA"),
        ("node1.node.nomad.", "A"),
    ]:
        data = dc.query(qname, qtype, edns=dc.Edns(payload=1400, do=True))
        fresh = make().respond(data, client="127.0.0.1", tcp=True)
        responder = make()
        responder.respond(data, client="127.0.0.1", tcp=False)
        again = responder.respond(data, client="127.0.0.1", tcp=False)
        assert isinstance(fresh, bytes) and isinstance(again, bytes)
        # TCP and UDP differ only in size limits; these answers fit either way
        assert DNSRecord.parse(again) == DNSRecord.parse(fresh), qname
