"""The real `dig` against a real waypost DNS server on 127.0.0.1 port 0."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from discovery.model import make_instance

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

WEB = (
    make_instance(
        service="web",
        id="web-1",
        node="agent",
        address="10.0.0.1",
        port=8080,
        tags=["primary"],
        meta={"version": "1"},
    ),
    # Same address as its node: the SRV target is the node name.
    make_instance(service="web", id="web-2", node="agent", address="127.0.0.1", port=8081),
)
SRV_DATA = ["1 1 8080 0a000001.addr.dc1.nomad.", "1 1 8081 agent.node.dc1.nomad."]
GLUE = {("0a000001.addr.dc1.nomad.", "A", "10.0.0.1"), ("agent.node.dc1.nomad.", "A", "127.0.0.1")}


@pytest.fixture
async def web(start_waypost: StartWaypost) -> RunningDns:
    return await start_waypost(instances=WEB)


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_srv_has_answers_and_glue(web: RunningDns, transport: str) -> None:
    extra = ["+tcp"] if transport == "TCP" else []
    out = await web.dig("SRV", "web.service.nomad", *extra)
    assert out.status == "NOERROR"
    assert {"qr", "aa", "rd"} <= out.flags
    assert "ra" not in out.flags
    assert f"({transport})" in out.text
    answers = out.records("ANSWER", "SRV")
    assert {r[0] for r in answers} == {"web.service.nomad."}
    assert sorted(r[4] for r in answers) == SRV_DATA
    assert {(r[0], r[3], r[4]) for r in out.records("ADDITIONAL")} == GLUE
    assert out.records("AUTHORITY") == []


async def test_a_records(web: RunningDns) -> None:
    out = await web.dig("A", "web.service.nomad")
    assert out.status == "NOERROR"
    assert sorted(r[4] for r in out.records("ANSWER", "A")) == ["10.0.0.1", "127.0.0.1"]
    assert len(out.records("ANSWER")) == 2


async def test_txt_from_meta(web: RunningDns) -> None:
    out = await web.dig("TXT", "web.service.nomad")
    assert out.status == "NOERROR"
    assert [r[4] for r in out.records("ANSWER")] == ['"version=1"']


async def test_tag_filter(web: RunningDns) -> None:
    out = await web.dig("SRV", "primary.web.service.nomad")
    assert [r[4] for r in out.records("ANSWER")] == [SRV_DATA[0]]


async def test_nxdomain_has_soa_in_authority(web: RunningDns) -> None:
    out = await web.dig("SRV", "nope.service.nomad")
    assert out.status == "NXDOMAIN"
    assert "aa" in out.flags
    assert out.records("ANSWER") == []
    [soa] = out.records("AUTHORITY")
    serial = web.registry.snapshot.index
    assert soa[0] == "nomad."
    assert soa[3] == "SOA"
    assert soa[4] == f"agent.node.dc1.nomad. hostmaster.nomad. {serial} 3600 600 86400 0"


async def test_out_of_zone_is_refused(web: RunningDns) -> None:
    out = await web.dig("A", "example.com")
    assert out.status == "REFUSED"
    assert "ra" not in out.flags
    assert out.records("ANSWER") == []


async def test_norec_still_authoritative(web: RunningDns) -> None:
    out = await web.dig("A", "web.service.nomad", "+norec")
    assert out.status == "NOERROR"
    assert "rd" not in out.flags
    assert "aa" in out.flags
    assert len(out.records("ANSWER")) == 2


@pytest.mark.parametrize("bufsize", [512, 4096])
async def test_edns_is_echoed_with_our_payload(web: RunningDns, bufsize: int) -> None:
    out = await web.dig("SRV", "web.service.nomad", f"+bufsize={bufsize}")
    assert out.edns is not None
    assert "version: 0" in out.edns
    assert "udp: 1232" in out.edns  # DnsSettings.edns_max_payload, whatever the client offers
    assert len(out.records("ANSWER")) == 2


async def test_no_edns_no_opt(web: RunningDns) -> None:
    out = await web.dig("SRV", "web.service.nomad", "+noedns")
    assert out.status == "NOERROR"
    assert out.edns is None
    assert len(out.records("ANSWER")) == 2


async def test_edns_version_1_is_badvers(web: RunningDns) -> None:
    out = await web.dig("SRV", "web.service.nomad", "+edns=1", "+noednsnegotiation")
    assert out.status == "BADVERS"
    assert out.records("ANSWER") == []
    assert out.edns is not None
    assert "version: 0" in out.edns
