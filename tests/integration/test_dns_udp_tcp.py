"""dnspython against a real waypost DNS server: exact sections over UDP and TCP."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from discovery.dns.settings import DnsSettings
from discovery.model import Health, Instance, make_instance

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

SETTINGS = DnsSettings(node_name="agent")


def web(n: int, **kwargs: object) -> Instance:
    """Instance web-<n> at 10.0.1.<n>:<8000+n> on the local node (target: hex addr)."""
    return make_instance(
        service="web",
        id=f"web-{n}",
        node="agent",
        address=f"10.0.1.{n}",
        port=8000 + n,
        **kwargs,  # type: ignore[arg-type]
    )


def target(n: int) -> str:
    return f"0a0001{n:02x}.addr.dc1.nomad."


def srv_set(reply: dns.message.Message) -> set[tuple[str, int, int, int, str]]:
    """(owner, priority, weight, port, target) of every SRV answer."""
    return {
        (rrset.name.to_text(), rd.priority, rd.weight, rd.port, rd.target.to_text())
        for rrset in reply.answer
        for rd in rrset
        if rrset.rdtype == dns.rdatatype.SRV
    }


def glue_set(reply: dns.message.Message) -> set[tuple[str, str]]:
    """(owner, address) of every A/AAAA record in Additional."""
    return {
        (rrset.name.to_text(), rd.address)
        for rrset in reply.additional
        for rd in rrset
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
    }


def query(name: str, rdtype: str, **kwargs: object) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def three(start_waypost: StartWaypost) -> RunningDns:
    return await start_waypost(SETTINGS, [web(1), web(2), web(3, meta={"version": "2"})])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_srv_sections_exact(three: RunningDns, transport: str) -> None:
    ask = three.udp if transport == "udp" else three.tcp
    reply = await ask(query("web.service.nomad.", "SRV"))
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.AA
    assert reply.flags & dns.flags.RD  # copied from the query
    assert not reply.flags & (dns.flags.RA | dns.flags.TC)
    assert srv_set(reply) == {("web.service.nomad.", 1, 1, 8000 + n, target(n)) for n in (1, 2, 3)}
    assert reply.authority == []
    assert glue_set(reply) == {(target(n), f"10.0.1.{n}") for n in (1, 2, 3)}
    assert len(reply.additional) == 3
    assert all(rrset.ttl == 0 for rrset in [*reply.answer, *reply.additional])


async def test_a_and_txt_and_nodata(three: RunningDns) -> None:
    a = await three.udp(query("web.service.nomad.", "A"))
    assert {rd.address for rrset in a.answer for rd in rrset} == {
        "10.0.1.1",
        "10.0.1.2",
        "10.0.1.3",
    }
    assert a.additional == []
    txt = await three.udp(query("web.service.nomad.", "TXT"))
    assert [rd.strings for rrset in txt.answer for rd in rrset] == [(b"version=2",)]
    aaaa = await three.udp(query("web.service.nomad.", "AAAA"))
    assert aaaa.rcode() == dns.rcode.NOERROR
    assert aaaa.answer == []
    [soa] = aaaa.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name.to_text() == "nomad."


async def test_nxdomain_and_apex(three: RunningDns) -> None:
    missing = await three.tcp(query("nope.service.nomad.", "SRV"))
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.flags & dns.flags.AA
    assert [r.rdtype for r in missing.authority] == [dns.rdatatype.SOA]
    serial = three.registry.snapshot.index
    assert missing.authority[0][0].serial == serial
    ns = await three.udp(query("nomad.", "NS"))
    assert [rd.target.to_text() for rrset in ns.answer for rd in rrset] == ["agent.node.dc1.nomad."]
    assert glue_set(ns) == {("agent.node.dc1.nomad.", "127.0.0.1")}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_mixed_case_question_echoed(three: RunningDns, transport: str) -> None:
    ask = three.udp if transport == "udp" else three.tcp
    reply = await ask(query("WeB.SeRvIcE.NoMaD.", "A"))
    assert reply.question[0].name.to_text() == "WeB.SeRvIcE.NoMaD."
    assert {rrset.name.to_text() for rrset in reply.answer} == {"WeB.SeRvIcE.NoMaD."}


async def test_edns_echoed_with_do_bit(three: RunningDns) -> None:
    reply = await three.udp(query("web.service.nomad.", "SRV", use_edns=0, payload=4096))
    assert reply.edns == 0
    assert reply.payload == SETTINGS.edns_max_payload
    assert not reply.ednsflags & dns.flags.DO
    signed = await three.udp(
        query("web.service.nomad.", "SRV", use_edns=0, payload=4096, want_dnssec=True)
    )
    assert signed.ednsflags & dns.flags.DO
    plain = await three.udp(query("web.service.nomad.", "SRV", use_edns=False))
    assert plain.edns == -1


async def test_badvers(three: RunningDns) -> None:
    reply = await three.udp(query("web.service.nomad.", "SRV", use_edns=1))
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0
    assert reply.answer == []


async def test_other_class_and_zone_transfer_refused(three: RunningDns) -> None:
    chaos = dns.message.make_query("version.bind.", "TXT", rdclass=dns.rdataclass.CH)
    assert (await three.udp(chaos)).rcode() == dns.rcode.REFUSED
    axfr = await three.tcp(query("nomad.", "AXFR"))
    assert axfr.rcode() == dns.rcode.REFUSED


# -- truncation --------------------------------------------------------------------

MANY = 30  # SRV answers + glue of 30 instances are well over 512 octets


@pytest.fixture
async def many(start_waypost: StartWaypost) -> RunningDns:
    return await start_waypost(SETTINGS, [web(n) for n in range(1, MANY + 1)])


def assert_glue_consistent(reply: dns.message.Message) -> None:
    targets = {t for _, _, _, _, t in srv_set(reply)}
    assert {owner for owner, _ in glue_set(reply)} == targets
    for owner, address in glue_set(reply):
        assert target(int(address.rsplit(".", 1)[1])) == owner


CONSUL_LIMIT = 3  # Consul's udp_answer_limit default, set explicitly


@pytest.fixture
async def many_limited(start_waypost: StartWaypost) -> RunningDns:
    settings = dataclasses.replace(SETTINGS, udp_answer_limit=CONSUL_LIMIT)
    return await start_waypost(settings, [web(n) for n in range(1, MANY + 1)])


async def test_udp_without_edns_truncates_to_answer_limit(many_limited: RunningDns) -> None:
    reply = await many_limited.udp(query("web.service.nomad.", "SRV", use_edns=False))
    assert reply.flags & dns.flags.TC
    assert len(srv_set(reply)) == CONSUL_LIMIT
    assert_glue_consistent(reply)


async def test_udp_without_edns_fills_512_by_default(many: RunningDns) -> None:
    # RFC 2181 section 9: as many answers as fit; TC=1 because the 30 do not.
    wire = await many.udp_raw(query("web.service.nomad.", "SRV", use_edns=False).to_wire())
    assert wire is not None
    assert len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert CONSUL_LIMIT < len(srv_set(reply)) < MANY
    assert_glue_consistent(reply)


async def test_udp_without_edns_small_answer_not_truncated(three: RunningDns) -> None:
    three.registry.upsert(web(4))
    reply = await three.udp(query("web.service.nomad.", "SRV", use_edns=False))
    assert not reply.flags & dns.flags.TC
    assert len(srv_set(reply)) == 4
    assert_glue_consistent(reply)


async def test_udp_small_bufsize_truncates_to_size(many: RunningDns) -> None:
    wire = await many.udp_raw(query("web.service.nomad.", "SRV", use_edns=0, payload=512).to_wire())
    assert wire is not None
    assert len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert 0 < len(srv_set(reply)) < MANY
    assert_glue_consistent(reply)


async def test_a_records_truncated_over_udp(many_limited: RunningDns) -> None:
    reply = await many_limited.udp(query("web.service.nomad.", "A", use_edns=False))
    assert reply.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in reply.answer) == CONSUL_LIMIT


async def test_tcp_gives_everything(many: RunningDns) -> None:
    reply = await many.tcp(query("web.service.nomad.", "SRV", use_edns=False))
    assert not reply.flags & dns.flags.TC
    assert srv_set(reply) == {
        ("web.service.nomad.", 1, 1, 8000 + n, target(n)) for n in range(1, MANY + 1)
    }
    assert_glue_consistent(reply)


async def test_large_edns_payload_gives_everything_over_udp(many: RunningDns) -> None:
    # 20 SRV + glue fit 1232 octets (DnsSettings.edns_max_payload); 30 would not.
    many.registry.remove(*(f"web-{n}" for n in range(21, MANY + 1)))
    wire = await many.udp_raw(
        query("web.service.nomad.", "SRV", use_edns=0, payload=4096).to_wire()
    )
    assert wire is not None
    assert 512 < len(wire) <= SETTINGS.edns_max_payload
    reply = dns.message.from_wire(wire)
    assert not reply.flags & dns.flags.TC
    assert len(srv_set(reply)) == 20
    assert_glue_consistent(reply)


async def test_edns_payload_capped_by_settings(many: RunningDns) -> None:
    wire = await many.udp_raw(
        query("web.service.nomad.", "SRV", use_edns=0, payload=4096).to_wire()
    )
    assert wire is not None
    assert len(wire) <= SETTINGS.edns_max_payload
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert 0 < len(srv_set(reply)) < MANY
    assert_glue_consistent(reply)


# -- registry changes --------------------------------------------------------------


async def test_registry_changes_visible_in_next_answer(three: RunningDns) -> None:
    name = "web.service.nomad."
    first = await three.udp(query(name, "SRV"))
    assert len(srv_set(first)) == 3
    three.registry.upsert(web(4))
    # EDNS: so the four fit whatever the limit settings.
    after = await three.udp(query(name, "SRV", use_edns=0))
    assert (name, 1, 1, 8004, target(4)) in srv_set(after)
    three.registry.set_health("web-1", Health.CRITICAL)
    ports = {port for _, _, _, port, _ in srv_set(await three.tcp(query(name, "SRV")))}
    assert ports == {8002, 8003, 8004}
    three.registry.remove("web-1", "web-2", "web-3", "web-4")
    gone = await three.udp(query(name, "SRV"))
    assert gone.rcode() == dns.rcode.NXDOMAIN
    three.registry.upsert(web(5, weights={"passing": 7}, meta={"srv-priority": "3"}))
    back = await three.udp(query(name, "SRV"))
    assert srv_set(back) == {(name, 3, 7, 8005, target(5))}


async def test_ipv6_listener(start_waypost: StartWaypost) -> None:
    try:
        dnsv6 = await start_waypost(SETTINGS, [web(1)], host="::1")
    except OSError as exc:  # a host without IPv6 on loopback
        pytest.skip(f"no IPv6 loopback: {exc}")
    assert dnsv6.host == "::1"
    for ask in (dnsv6.udp, dnsv6.tcp):
        reply = await ask(query("web.service.nomad.", "SRV"))
        assert srv_set(reply) == {("web.service.nomad.", 1, 1, 8001, target(1))}
