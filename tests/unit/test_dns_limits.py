"""UDP answer limits and truncation, from docs/dns_rules.md.  Pure: no I/O.

UDP without EDNS: at most 512 octets (and settings.udp_answer_limit answers
when set: Consul parity; unset by default, so TC=1 only when 512 is too few);
with EDNS: min(max(client payload, 512), settings.edns_max_payload) octets;
TCP: everything.  Dropped answers go from the end of the ordered list, glue
follows the answers left, and TC=1 is set when settings.enable_truncate.
"""

from __future__ import annotations

import dataclasses

import pytest
from dnslib import QTYPE, DNSRecord

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns.responder import Responder
from discovery.dns.settings import DnsSettings
from discovery.model import Instance, make_instance
from discovery.registry import Registry

SETTINGS = DnsSettings()  # no udp_answer_limit, enable_truncate, edns_max_payload 1232
CONSUL = DnsSettings(udp_answer_limit=3)  # Consul's default, set explicitly


def instances(service: str, count: int, *, v6: bool = False, priority: str = "") -> list[Instance]:
    """`count` instances on distinct addresses of unregistered nodes (addr targets)."""
    meta = {"srv-priority": priority} if priority else None
    return [
        make_instance(
            service=service,
            id=f"{service}-{priority}-{i}",
            node=f"n{i}",
            address=f"fd00::{i + 1:x}" if v6 else f"10.1.{i // 250}.{i % 250 + 1}",
            port=1000 + i,
            meta=meta,
        )
        for i in range(count)
    ]


def with_meta(service: str, count: int, pairs: int, size: int) -> list[Instance]:
    """Instances whose TXT records are large: `pairs` meta values of `size` octets."""
    return [
        make_instance(
            service=service,
            id=f"{service}-{i}",
            node="n1",
            address=f"10.2.0.{i + 1}",
            port=1,
            meta={f"k{j}": chr(ord("a") + i) * size for j in range(pairs)},
        )
        for i in range(count)
    ]


def registry() -> Registry:
    reg = Registry(dc.LOCAL)
    reg.apply(
        upserts=[
            *instances("many", 30),
            *instances("huge", 100),
            *instances("many6", 30, v6=True),
            *instances("three", 3),
            *instances("six", 6),
            *instances("tiered", 2, priority="1"),
            *instances("tiered", 4, priority="2"),
            *with_meta("txt3", 3, 1, 200),  # 3 answers of ~215 octets: over 512
            *with_meta("txtbig", 1, 4, 200),  # 1 answer of ~820 octets
            *with_meta("txthuge", 6, 64, 240),  # 6 answers of ~15.7 KB: over 65535
        ]
    )
    return reg


def make(settings: DnsSettings = SETTINGS) -> Responder:
    return Responder(registry(), settings)


def ask_raw(responder: Responder, qname: str, qtype: str, **kw: object) -> tuple[bytes, DNSRecord]:
    tcp = bool(kw.pop("tcp", False))
    edns = kw.pop("edns", None)
    assert edns is None or isinstance(edns, dc.Edns)
    raw = responder.respond(dc.query(qname, qtype, edns=edns), client="127.0.0.1", tcp=tcp)
    assert isinstance(raw, bytes)
    return raw, DNSRecord.parse(raw)


def assert_glue_matches(reply: DNSRecord) -> None:
    """One glue record per distinct SRV target still answered, and no other."""
    targets = dc.srv_targets(reply)
    owners = dc.glue_owners(reply)
    assert sorted(owners) == sorted(set(targets))


# -- UDP without EDNS -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qname", "qtype"),
    [
        ("many.service.nomad.", "SRV"),
        ("many.service.nomad.", "A"),
        ("many6.service.nomad.", "AAAA"),
        ("six.service.nomad.", "SRV"),
    ],
)
def test_udp_answer_limit(qname: str, qtype: str) -> None:
    raw, reply = ask_raw(make(CONSUL), qname, qtype)
    assert len(reply.rr) == CONSUL.udp_answer_limit
    assert {rr.rtype for rr in reply.rr} == {getattr(QTYPE, qtype)}
    assert reply.header.tc == 1
    assert dc.rcode_name(reply) == "NOERROR"
    assert len(raw) <= 512
    assert_glue_matches(reply)


def test_udp_answers_within_the_limit_not_truncated() -> None:
    _, reply = ask_raw(make(), "three.service.nomad.", "SRV")
    assert len(reply.rr) == 3
    assert reply.header.tc == 0
    assert_glue_matches(reply)
    assert len(reply.ar) == 3


@pytest.mark.parametrize(
    ("qname", "qtype", "count"),
    [
        ("six.service.nomad.", "SRV", 6),
        ("six.service.nomad.", "A", 6),
        ("tiered.service.nomad.", "SRV", 6),
    ],
)
def test_default_sends_every_answer_that_fits_512(qname: str, qtype: str, count: int) -> None:
    # RFC 2181 section 9: TC=1 only when the answer does not fit; no count limit.
    raw, reply = ask_raw(make(), qname, qtype)
    assert len(reply.rr) == count
    assert reply.header.tc == 0
    assert len(raw) <= 512
    assert_glue_matches(reply)


@pytest.mark.parametrize(
    ("qname", "qtype"), [("many.service.nomad.", "SRV"), ("huge.service.nomad.", "A")]
)
def test_default_truncates_only_what_does_not_fit(qname: str, qtype: str) -> None:
    raw, reply = ask_raw(make(), qname, qtype)
    assert reply.header.tc == 1
    assert len(raw) <= 512
    assert (
        CONSUL.udp_answer_limit < len(reply.rr) < len(ask_raw(make(), qname, qtype, tcp=True)[1].rr)
    )
    assert_glue_matches(reply)


def test_default_fills_512_with_a_records() -> None:
    # 12 (header) + 24 (question) + 29 * 16 (A records) = 500 octets; a 30th would make 516.
    raw, reply = ask_raw(make(), "many.service.nomad.", "A")
    assert (len(reply.rr), len(raw), reply.header.tc) == (29, 500, 1)


def test_udp_answer_limit_is_a_setting() -> None:
    responder = make(dataclasses.replace(SETTINGS, udp_answer_limit=5))
    _, reply = ask_raw(responder, "six.service.nomad.", "A")
    assert len(reply.rr) == 5
    assert reply.header.tc == 1
    _, reply = ask_raw(responder, "three.service.nomad.", "A")
    assert len(reply.rr) == 3
    assert reply.header.tc == 0


def test_limit_keeps_the_lowest_priorities() -> None:
    # answers are dropped from the end of the priority-ordered list
    responder = make(CONSUL)
    for _ in range(20):
        _, reply = ask_raw(responder, "tiered.service.nomad.", "SRV")
        assert [rr.rdata.priority for rr in reply.rr] == [1, 1, 2]
        assert reply.header.tc == 1
        assert_glue_matches(reply)


@pytest.mark.parametrize("qtype", ["SRV", "A"])
def test_no_tc_when_truncation_disabled(qtype: str) -> None:
    responder = make(dataclasses.replace(CONSUL, enable_truncate=False))
    raw, reply = ask_raw(responder, "many.service.nomad.", qtype)
    assert len(reply.rr) == CONSUL.udp_answer_limit
    assert reply.header.tc == 0
    assert len(raw) <= 512
    assert_glue_matches(reply)


def test_udp_size_limit_without_edns() -> None:
    # within the answer-count limit, but over 512 octets
    raw, reply = ask_raw(make(), "txt3.service.nomad.", "TXT")
    assert len(raw) <= 512
    assert 0 < len(reply.rr) < 3
    assert reply.header.tc == 1
    _, full = ask_raw(make(), "txt3.service.nomad.", "TXT", tcp=True)
    assert len(full.rr) == 3
    assert full.header.tc == 0


def test_single_answer_too_large_for_udp() -> None:
    raw, reply = ask_raw(make(), "txtbig.service.nomad.", "TXT")
    assert len(raw) <= 512
    assert dc.rcode_name(reply) == "NOERROR"
    assert reply.rr == []
    assert reply.header.tc == 1
    _, full = ask_raw(make(), "txtbig.service.nomad.", "TXT", edns=dc.Edns(payload=1232))
    assert len(full.rr) == 1
    assert full.header.tc == 0


# -- UDP with EDNS ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", [100, 511, 512])
def test_edns_small_payload_means_512(payload: int) -> None:
    raw, reply = ask_raw(make(), "many.service.nomad.", "SRV", edns=dc.Edns(payload=payload))
    assert len(raw) <= 512
    assert 3 < len(reply.rr) < 30  # no answer-count limit with EDNS, only the size
    assert reply.header.tc == 1
    assert_glue_matches(reply)
    assert dc.opts(reply) == [dc.Opt(SETTINGS.edns_max_payload, 0, 0, False)]


def test_edns_answers_that_fit_are_all_sent() -> None:
    _, reply = ask_raw(make(), "six.service.nomad.", "SRV", edns=dc.Edns(payload=1232))
    assert len(reply.rr) == 6
    assert reply.header.tc == 0
    assert_glue_matches(reply)


def test_edns_payload_capped_by_the_setting() -> None:
    responder = make()
    raw512, small = ask_raw(responder, "huge.service.nomad.", "SRV", edns=dc.Edns(payload=512))
    raw, reply = ask_raw(responder, "huge.service.nomad.", "SRV", edns=dc.Edns(payload=65000))
    assert 512 < len(raw) <= SETTINGS.edns_max_payload
    assert len(small.rr) < len(reply.rr) < 100
    assert reply.header.tc == 1
    assert_glue_matches(reply)
    assert len(raw512) <= 512


def test_edns_larger_setting_allows_more() -> None:
    responder = make(dataclasses.replace(SETTINGS, edns_max_payload=4000))
    raw, reply = ask_raw(responder, "huge.service.nomad.", "SRV", edns=dc.Edns(payload=4096))
    assert 1232 < len(raw) <= 4000
    assert reply.header.tc == 1
    assert_glue_matches(reply)
    raw, reply = ask_raw(responder, "huge.service.nomad.", "SRV", edns=dc.Edns(payload=1500))
    assert len(raw) <= 1500
    assert reply.header.tc == 1


def test_edns_trim_without_tc_when_disabled() -> None:
    responder = make(dataclasses.replace(SETTINGS, enable_truncate=False))
    raw, reply = ask_raw(responder, "many.service.nomad.", "SRV", edns=dc.Edns(payload=512))
    assert len(raw) <= 512
    assert 3 < len(reply.rr) < 30
    assert reply.header.tc == 0
    assert_glue_matches(reply)


def test_edns_a_records_trimmed_to_size() -> None:
    raw, reply = ask_raw(make(), "huge.service.nomad.", "A", edns=dc.Edns(payload=512))
    assert len(raw) <= 512
    assert 3 < len(reply.rr) < 100
    assert reply.header.tc == 1


# -- TCP -------------------------------------------------------------------------------


@pytest.mark.parametrize("edns", [None, dc.Edns(payload=512)])
def test_tcp_gets_everything(edns: dc.Edns | None) -> None:
    raw, reply = ask_raw(make(), "huge.service.nomad.", "SRV", tcp=True, edns=edns)
    assert len(reply.rr) == 100
    assert reply.header.tc == 0
    assert_glue_matches(reply)
    assert len(reply.ar) - len(dc.opts(reply)) == 100
    assert len(raw) > 1232


def test_tcp_size_limit() -> None:
    # RFC 1035 section 4.2.2: a TCP message is at most 65535 octets
    raw, reply = ask_raw(make(), "txthuge.service.nomad.", "TXT", tcp=True)
    assert len(raw) <= 65535
    assert 0 < len(reply.rr) < 6
    assert reply.header.tc == 1


def test_tcp_a_records_not_limited() -> None:
    _, reply = ask_raw(make(), "many.service.nomad.", "A", tcp=True)
    assert len(reply.rr) == 30
    assert reply.header.tc == 0
