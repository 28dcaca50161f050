"""The access scopes of Nomad's bridge mode, with real TCP and UDP, in throwaway namespaces.

A host namespace with the `nomad` bridge, two allocations ("a" serves, "b" is a
neighbour) and an external peer that routes the bridge subnet through the host.
Allocation "a" serves on three kinds of address:

    127.0.0.1:9090   loopback        -> only inside the allocation
    0.0.0.0:7070     no forwarding   -> from the host (and the allocations on its
                                        bridge) via the alloc IP; never from outside
    0.0.0.0:8080     forwarded from HOST_IP:20000 -> from outside, from the host via
                                        HOST_IP and 127.0.0.1, from another allocation
                                        and from itself (hairpin) via HOST_IP:20000

plus egress from the allocation to the external peer.  Every case runs for TCP and
UDP, with br_netfilter on and off, and with the host's FORWARD policy ACCEPT and DROP.
Each answer names the server and the source address it saw, which checks the
masquerading too (hairpin and 127.0.0.1 come from the gateway, outside clients keep
their address, egress leaves as the host).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from netsetup.firewall import Firewall
from netsetup.spec import AllocNetwork, NetConfig, PortMapping
from tests.netns.access_topo import (
    EXTERNAL_IP,
    EXTERNAL_IP6,
    GATEWAY,
    GATEWAY6,
    HOST_IP,
    HOST_IP6,
    SKIP_REASON,
    SUBNET6,
    Namespaces,
    Server,
    Topology,
    build_topology,
    has_br_netfilter,
    is_root,
    nft_in,
    probe,
    set_forward_drop,
    sh,
    start_server,
    sweep,
    sysctl,
)
from tests.netns.conftest import Driver
from tests.netns.conftest import Topology as HostTopology

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason=SKIP_REASON)]

_TAGS = itertools.count()
HOST_PORT = 20000
FORWARDED, UNFORWARDED, LOOPBACK, EXTERNAL_PORT = 8080, 7070, 9090, 5353
A_IP, B_IP = "172.26.64.2", "172.26.64.3"
BOTH = ("tcp", "udp")

Case = tuple[str, str, int, str]  # (from, host, port, expected answer or "" for none)


def scopes(host_ip: str, external_ip: str, a_ip: str, b_ip: str, host_port: int) -> list[Case]:
    """Every access case of allocation "a" (each runs for TCP and UDP)."""
    return [
        # loopback: only inside the allocation
        ("a", "127.0.0.1", LOOPBACK, "A 127.0.0.1"),
        ("host", a_ip, LOOPBACK, ""),
        ("b", a_ip, LOOPBACK, ""),
        ("external", a_ip, LOOPBACK, ""),
        # 0.0.0.0 without forwarding: the host and its bridge, not outside
        ("host", a_ip, UNFORWARDED, f"A {GATEWAY}"),
        ("b", a_ip, UNFORWARDED, f"A {b_ip}"),
        ("external", a_ip, UNFORWARDED, ""),
        ("external", host_ip, UNFORWARDED, ""),
        ("external", host_ip, FORWARDED, ""),  # the alloc port is not a host port
        # forwarded: from everywhere through the host port
        ("external", host_ip, host_port, f"A {external_ip}"),
        ("host", host_ip, host_port, f"A {host_ip}"),
        ("host", "127.0.0.1", host_port, f"A {GATEWAY}"),
        ("b", host_ip, host_port, f"A {GATEWAY}"),
        ("a", host_ip, host_port, f"A {GATEWAY}"),  # hairpin
        # egress
        ("a", external_ip, EXTERNAL_PORT, f"E {host_ip}"),
        ("b", external_ip, EXTERNAL_PORT, f"E {host_ip}"),
    ]


SCOPES = scopes(HOST_IP, EXTERNAL_IP, A_IP, B_IP, HOST_PORT)


@pytest.fixture(scope="module", autouse=True)
def _no_namespace_left() -> Iterator[None]:
    yield
    assert sweep() == [], "namespaces of this run were left behind"


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    made = Namespaces(f"s{next(_TAGS)}")
    try:
        yield made
    finally:
        made.close()


def alloc_a() -> AllocNetwork:
    return AllocNetwork(
        alloc_id="alloc-a",
        mode="bridge",
        host_ip=HOST_IP,
        ports=(PortMapping("http", HOST_IP, HOST_PORT, FORWARDED),),
        alloc_ip=A_IP,
    )


def listeners(spec: list[tuple[str, int]]) -> list[str]:
    return [f"{host}:{port}/{proto}" for host, port in spec for proto in BOTH]


async def start_servers(topo: Topology) -> list[Server]:
    servers = []
    try:
        servers.append(
            await start_server(
                topo.allocs["a"],
                "A",
                listeners(
                    [("127.0.0.1", LOOPBACK), ("0.0.0.0", UNFORWARDED), ("0.0.0.0", FORWARDED)]
                ),
            )
        )
        servers.append(
            await start_server(topo.external, "E", listeners([("0.0.0.0", EXTERNAL_PORT)]))
        )
    except BaseException:
        await asyncio.gather(*(s.close() for s in servers))
        raise
    return servers


async def observe(topo: Topology, cases: list[Case]) -> dict[str, str]:
    """Run every case for TCP and UDP, grouped per client namespace, concurrently."""
    where = {"host": topo.host, "external": topo.external, **topo.allocs}
    groups: dict[str, list[tuple[str, str, int]]] = {}
    for origin, host, port, _ in cases:
        for proto in BOTH:
            groups.setdefault(origin, []).append((proto, host, port))
    answers = await asyncio.gather(*(probe(where[o], probes) for o, probes in groups.items()))
    seen = {}
    for (origin, probes), replies in zip(groups.items(), answers, strict=True):
        for (proto, host, port), reply in zip(probes, replies, strict=True):
            seen[f"{proto} {origin} -> {host}:{port}"] = reply
    return seen


def expected(cases: list[Case]) -> dict[str, str]:
    return {
        f"{proto} {origin} -> {host}:{port}": answer
        for origin, host, port, answer in cases
        for proto in BOTH
    }


@pytest.mark.parametrize(
    ("forward_policy", "br_netfilter"),
    [("accept", False), ("accept", True), ("drop", True), ("drop", False)],
)
async def test_access_scopes(spaces: Namespaces, forward_policy: str, br_netfilter: bool) -> None:
    topo = build_topology(spaces, ["a", "b"], br_netfilter=br_netfilter)
    if br_netfilter and not has_br_netfilter(topo.host):
        pytest.skip("br_netfilter is not available in this kernel (no /proc/sys/net/bridge)")
    if forward_policy == "drop":
        set_forward_drop(topo.host)  # Docker was there first
    fw = Firewall(NetConfig(), nft_command=nft_in(topo.host))
    await fw.ensure_base()
    await fw.add_alloc(alloc_a())
    servers = await start_servers(topo)
    try:
        assert await observe(topo, SCOPES) == expected(SCOPES)
    finally:
        await asyncio.gather(*(s.close() for s in servers))


async def test_forward_drop_set_after_start_needs_ensure_again(spaces: Namespaces) -> None:
    """Docker started after waypost: forwarding breaks until ensure_forward_accept (or
    ensure_base) runs again, then works: the accept rules are inserted on top."""
    topo = build_topology(spaces, ["a", "b"], br_netfilter=True)
    fw = Firewall(NetConfig(), nft_command=nft_in(topo.host))
    await fw.ensure_base()
    await fw.add_alloc(alloc_a())
    cases = [
        ("external", HOST_IP, HOST_PORT, f"A {EXTERNAL_IP}"),
        ("a", EXTERNAL_IP, EXTERNAL_PORT, f"E {HOST_IP}"),
    ]
    servers = await start_servers(topo)
    try:
        assert await observe(topo, cases) == expected(cases)
        set_forward_drop(topo.host)
        blocked = [(o, h, p, "") for o, h, p, _ in cases]
        assert await observe(topo, blocked) == expected(blocked)
        await fw.ensure_forward_accept()
        assert await observe(topo, cases) == expected(cases)
    finally:
        await asyncio.gather(*(s.close() for s in servers))


async def test_removed_forward_is_gone_everywhere(spaces: Namespaces) -> None:
    topo = build_topology(spaces, ["a", "b"], br_netfilter=True)
    fw = Firewall(NetConfig(), nft_command=nft_in(topo.host))
    await fw.ensure_base()
    await fw.add_alloc(alloc_a())
    forwarded = [case for case in SCOPES if case[2] == HOST_PORT]
    servers = await start_servers(topo)
    try:
        assert await observe(topo, forwarded) == expected(forwarded)
        await fw.remove_alloc(alloc_a())
        gone = [(o, h, p, "") for o, h, p, _ in forwarded]
        assert await observe(topo, gone) == expected(gone)
        # the scopes that never needed forwarding are unchanged
        direct = [case for case in SCOPES if case[2] in (UNFORWARDED, LOOPBACK, EXTERNAL_PORT)]
        assert await observe(topo, direct) == expected(direct)
    finally:
        await asyncio.gather(*(s.close() for s in servers))


# --- the same scopes through NetworkManager (tests/netns/driver.py) ---------------------


@pytest.mark.parametrize(
    ("forward_policy", "br_netfilter"),
    [("accept", False), ("accept", True), ("drop", True), ("drop", False)],
)
async def test_access_scopes_through_network_manager(
    topology: HostTopology,
    start_driver: Callable[..., Driver],
    forward_policy: str,
    br_netfilter: bool,
) -> None:
    """What `NetworkManager.setup` builds (links, sysctls, firewall) gives every scope."""
    host = topology.host
    if not has_br_netfilter(host):
        if br_netfilter:
            pytest.skip("br_netfilter is not available in this kernel (no /proc/sys/net/bridge)")
    else:
        sysctl(host, "net.bridge.bridge-nf-call-iptables", "1" if br_netfilter else "0")
    if forward_policy == "drop":
        set_forward_drop(host)  # Docker was there before waypost
    # the external peer can route to the bridge subnet: "not from outside" is the firewall
    sh("ip", "-n", topology.external, "route", "add", "172.26.64.0/20", "via", topology.host_ip)
    driver = start_driver(topology, {"bridge_nf_call_iptables": br_netfilter})
    port = {"label": "http", "to": FORWARDED}
    results: dict[str, Any] = {
        role: driver.setup(topology.alloc_id(role), ports=[port] if role == "a" else [])
        for role in ("a", "b")
    }
    topo = Topology(
        host,
        topology.external,
        {role: r["alloc_id"] for role, r in results.items()},
        {role: r["alloc_ip"] for role, r in results.items()},
    )
    [mapping] = results["a"]["ports"]
    assert mapping["host_ip"] == topology.host_ip
    cases = scopes(
        topology.host_ip,
        topology.external_ip,
        topo.alloc_ips["a"],
        topo.alloc_ips["b"],
        mapping["host_port"],
    )
    servers = await start_servers(topo)
    try:
        assert await observe(topo, cases) == expected(cases)
        driver.call("teardown", alloc=topo.allocs["a"])
        still = [("b", topology.external_ip, EXTERNAL_PORT, f"E {topology.host_ip}")]
        gone = [
            ("external", topology.host_ip, mapping["host_port"], ""),
            ("host", "127.0.0.1", mapping["host_port"], ""),
        ]
        assert await observe(topo, still + gone) == expected(still + gone)
    finally:
        await asyncio.gather(*(s.close() for s in servers))


# --- IPv6 (a bridge with a v6 subnet, a port on a v6 host address) ----------------------


async def test_ipv6_scopes_with_forward_drop(spaces: Namespaces) -> None:
    topo = build_topology(spaces, ["a", "b"], br_netfilter=True, ipv6=True)
    set_forward_drop(topo.host, "ip")
    set_forward_drop(topo.host, "ip6")
    fw = Firewall(NetConfig(subnet6=SUBNET6), nft_command=nft_in(topo.host))
    await fw.ensure_base()
    a6, b6 = "fd00:26::2", "fd00:26::3"
    await fw.add_alloc(
        AllocNetwork(
            alloc_id="alloc-a",
            mode="bridge",
            host_ip=HOST_IP,
            ports=(
                PortMapping("http", HOST_IP, HOST_PORT, FORWARDED),
                PortMapping("http6", HOST_IP6, HOST_PORT, FORWARDED),
            ),
            alloc_ip=A_IP,
            alloc_ip6=a6,
        )
    )
    cases: list[Case] = [
        ("external", HOST_IP6, HOST_PORT, f"A {EXTERNAL_IP6}"),
        ("host", HOST_IP6, HOST_PORT, f"A {HOST_IP6}"),
        ("b", HOST_IP6, HOST_PORT, f"A {GATEWAY6}"),
        ("a", HOST_IP6, HOST_PORT, f"A {GATEWAY6}"),  # hairpin
        ("host", a6, UNFORWARDED, f"A {GATEWAY6}"),
        ("b", a6, UNFORWARDED, f"A {b6}"),
        ("external", a6, UNFORWARDED, ""),
        ("external", a6, LOOPBACK, ""),
        ("a", EXTERNAL_IP6, EXTERNAL_PORT, f"E {HOST_IP6}"),
        ("external", HOST_IP, HOST_PORT, f"A {EXTERNAL_IP}"),  # v4 still forwarded
    ]
    servers: list[Server] = []
    try:
        servers.append(
            await start_server(
                topo.allocs["a"],
                "A",
                listeners(
                    [
                        ("127.0.0.1", LOOPBACK),
                        ("[::]", UNFORWARDED),
                        ("[::]", FORWARDED),
                        ("0.0.0.0", FORWARDED),
                    ]
                ),
            )
        )
        servers.append(await start_server(topo.external, "E", listeners([("[::]", EXTERNAL_PORT)])))
        assert await observe(topo, cases) == expected(cases)
    finally:
        await asyncio.gather(*(s.close() for s in servers))
