"""Hardening of the DNS responder against malformed and adversarial queries.  Pure: no I/O.

Malformed EDNS options (RFC 6891 section 6.1.2) get FORMERR, and the reply
caches stay within their byte budget whatever header flags, EDNS sizes and
OPT TTL bits a client varies.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from dnslib import QTYPE

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.config import parse_config
from discovery.dns import render, wire
from discovery.dns.responder import Responder
from discovery.dns.settings import DnsSettings
from discovery.errors import ConfigError
from discovery.hclfile import parse_hcl
from discovery.model import make_instance
from discovery.registry import Registry


def make(settings: DnsSettings = dc.SETTINGS) -> Responder:
    return Responder(dc.world_registry(), settings)


def opt_with(rdata: bytes, *, rdlength: int | None = None) -> bytes:
    """A raw OPT pseudo-RR with `rdata` (and an RDLENGTH that may lie about it)."""
    size = len(rdata) if rdlength is None else rdlength
    return b"\x00" + struct.pack("!HHIH", wire.TYPE_OPT, 1232, 0, size) + rdata


def option(code: int, length: int, data: bytes) -> bytes:
    return struct.pack("!HH", code, length) + data


# -- EDNS options ------------------------------------------------------------------------

OVERRUNS = [
    pytest.param(option(10, 100, b"12345678"), id="length-past-rdata"),
    pytest.param(option(10, 9, b"12345678"), id="one-octet-past"),
    pytest.param(option(10, 8, b"12345678") + b"\x00\x08", id="half-an-option-header"),
    pytest.param(b"\x00", id="one-octet-rdata"),
    pytest.param(option(10, 0, b"") + option(8, 4, b"\x00\x01"), id="second-overruns"),
]


@pytest.mark.parametrize("rdata", OVERRUNS)
@pytest.mark.parametrize("tcp", [False, True])
def test_opt_option_overrunning_the_record_formerr(rdata: bytes, tcp: bool) -> None:
    data = dc.header(ident=0x0C0D, arcount=1) + dc.question_wire("web.service.nomad.")
    reply = dc.ask(make(), data + opt_with(rdata), tcp=tcp)
    assert reply.header.id == 0x0C0D
    assert dc.rcode_name(reply) == "FORMERR"
    assert [(str(q.qname), q.qtype) for q in reply.questions] == [("web.service.nomad.", QTYPE.A)]
    assert reply.rr == []


@pytest.mark.parametrize("rdata", OVERRUNS)
def test_opt_option_overrun_formerr_on_the_full_decoder_path(rdata: bytes) -> None:
    # Trailing bytes after the OPT send the query to codec.py (dnslib), which on
    # its own drops an overrunning option and would answer NOERROR.
    data = dc.header(ident=0x0C0E, arcount=1) + dc.question_wire("web.service.nomad.")
    reply = dc.ask(make(), data + opt_with(rdata) + b"\x00\x00")
    assert dc.rcode_name(reply) == "FORMERR"


@pytest.mark.parametrize(
    "rdata",
    [
        b"",
        option(10, 8, b"12345678"),
        option(10, 0, b""),
        option(10, 8, b"12345678") + option(8, 4, b"\x00\x01\x18\x00"),
    ],
)
def test_well_formed_options_answered(rdata: bytes) -> None:
    data = dc.header(arcount=1) + dc.question_wire("web.service.nomad.") + opt_with(rdata)
    reply = dc.ask(make(), data)
    assert dc.rcode_name(reply) == "NOERROR"
    assert len(reply.rr) == 2


def test_options_fit_table() -> None:
    cases = {
        b"": True,
        option(1, 0, b""): True,
        option(1, 2, b"ab"): True,
        option(1, 3, b"ab"): False,
        b"\x00\x01\x00": False,
    }
    for rdata, fits in cases.items():
        assert wire.options_fit(b"xx" + rdata, 2, 2 + len(rdata)) is fits, rdata


# -- cache memory --------------------------------------------------------------------------


def shaped_query(
    qname: str,
    *,
    qtype: int = wire.TYPE_A,
    flags: int = 0x0100,
    payload: int | None = None,
    opt_flags: int = 0,
) -> bytes:
    """A one-question query with raw header `flags` and, when `payload`, an OPT whose
    TTL carries `opt_flags` (DO and the Z bits; RFC 6891 section 6.1.3)."""
    arcount = 0 if payload is None else 1
    data = struct.pack("!HHHHHH", dc.QUERY_ID, flags, 1, 0, 0, arcount) + dc.question_wire(
        qname, qtype
    )
    if payload is not None:
        data += b"\x00" + struct.pack("!HHIH", wire.TYPE_OPT, payload, opt_flags & 0xFFFF, 0)
    return data


def test_header_and_opt_bits_that_change_nothing_share_one_reply() -> None:
    responder = make()
    want = sorted(dc.texts(dc.ask(responder, shaped_query("web.service.nomad.")).rr))
    # AD, CD, Z, RA and a stray rcode in the query; AA/TC bits a query should not set
    for flags in (0x0100, 0x0120, 0x0110, 0x0140, 0x0180, 0x0105, 0x0500, 0x0300):
        reply = dc.ask(responder, shaped_query("web.service.nomad.", flags=flags))
        assert sorted(dc.texts(reply.rr)) == want
        assert reply.header.rd == 1 and reply.header.aa == 1
    assert len(responder._replies) == 1
    # EDNS sizes under 512 all mean 512; sizes over the cap all mean the cap
    for payload in (0, 100, 511, 512):
        dc.ask(responder, shaped_query("web.service.nomad.", payload=payload))
    for payload in (1232, 1500, 4096, 65535):
        dc.ask(responder, shaped_query("web.service.nomad.", payload=payload))
    assert len(responder._replies) == 3
    # OPT Z bits change nothing; DO is echoed, so it is its own reply
    for z in (0x0001, 0x4000, 0x7FFF):
        dc.ask(responder, shaped_query("web.service.nomad.", payload=1232, opt_flags=z))
    assert len(responder._replies) == 3
    reply = dc.ask(responder, shaped_query("web.service.nomad.", payload=1232, opt_flags=0x8000))
    assert dc.opts(reply) == [dc.Opt(dc.SETTINGS.edns_max_payload, 0, 0, True)]
    assert len(responder._replies) == 4
    # RD is copied into the reply: RD=0 is its own entry, and says so
    reply = dc.ask(responder, shaped_query("web.service.nomad.", flags=0))
    assert reply.header.rd == 0
    assert len(responder._replies) == 5


BUDGET = 256 * 1024


def test_cache_stays_within_its_budget_under_any_query_mix() -> None:
    # One client varying what it can: header bits, EDNS size, OPT TTL bits and the
    # letter case of the name (the render path), over services with 4 equal
    # instances (24 answer orders each).  The accounting stays under the budget
    # and every answer stays right.
    settings = dataclasses.replace(dc.SETTINGS, cache_max_bytes=BUDGET)
    responder = Responder(many_services(40, 4), settings)
    expect = {n: {f"10.5.{n}.{i}" for i in range(1, 5)} for n in range(40)}
    peak = 0
    for step in range(4000):
        n = step % 40
        name = f"s{n}.service.nomad."
        if step % 7 == 0:
            name = name.upper() if step % 2 else name.title()
        data = shaped_query(
            name,
            flags=0x0100 | ((step * 0x10) & 0x00F0),
            payload=None if step % 5 == 0 else 512 + (step * 37) % 3000,
            opt_flags=(step * 0x1111) & 0xFFFF,
        )
        reply = dc.ask(responder, data, tcp=step % 11 == 0)
        assert dc.rcode_name(reply) == "NOERROR"
        assert {str(rr.rdata) for rr in reply.rr} == expect[n]
        assert not reply.header.tc
        assert responder.cache_bytes <= BUDGET
        peak = max(peak, responder.cache_bytes)
    assert peak > BUDGET // 2  # the budget was reached, so eviction was exercised
    counted = sum(entry[1] for entry in responder._replies.values()) + sum(
        held[1] for held in responder._cache.values()
    )
    assert counted == responder.cache_bytes


def test_memo_per_answer_is_bounded_by_shapes() -> None:
    # Mixed-case questions are rendered per query from the Prepared's memo; EDNS
    # sizes that trim differently must not each get their own memo entry.
    responder = Responder(many_services(1, 30), dc.SETTINGS)
    for payload in range(512, 1232, 8):
        data = shaped_query("S0.service.nomad.", qtype=wire.TYPE_SRV, payload=payload)
        assert dc.ask(responder, data).header.tc == 1
    (held,) = responder._cache.values()
    assert len(held[0].memo.bodies) <= render.MAX_MEMO_SHAPES
    assert held[1] == responder.cache_bytes  # what the memo holds is counted


def many_services(services: int, instances: int) -> Registry:
    registry = Registry(dc.LOCAL)
    registry.upsert(
        *(
            make_instance(
                service=f"s{n}",
                id=f"s{n}-{i}",
                node="n",
                address=f"10.5.{n}.{i}",
                port=1000 + i,
            )
            for n in range(services)
            for i in range(1, instances + 1)
        )
    )
    return registry


# -- configuration ----------------------------------------------------------------------------


def test_dns_block_keys_and_defaults() -> None:
    text = "dns {\n  tcp_max_per_client = 8\n  cache_max_bytes = 1048576\n}"
    config = parse_config([parse_hcl(text, "test.hcl")])
    assert (config.dns.tcp_max_per_client, config.dns.cache_max_bytes) == (8, 1 << 20)
    defaults = parse_config([])
    assert (defaults.dns.tcp_max_per_client, defaults.dns.cache_max_bytes) == (64, 64 << 20)
    assert defaults.dns.udp_answer_limit == 0  # as many answers as fit (RFC 2181 section 9)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dns {\n  tcp_max_per_client = 0\n}", "dns.tcp_max_per_client"),
        ("dns {\n  cache_max_bytes = -1\n}", "dns.cache_max_bytes"),
        ('dns {\n  cache_max_bytes = "64MiB"\n}', "dns.cache_max_bytes"),
    ],
)
def test_dns_block_rejects(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config([parse_hcl(text, "test.hcl")])
