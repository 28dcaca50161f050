"""What keeps a setup and a teardown cheap, and their cost flat in the number of allocations.  Root.

- Forwards go in and out through the in-process nftables context: a teardown has
  removed them when it returns (nothing for the background, no port held after).
- Without an IPv6 subnet, neither side of an allocation's veth has IPv6: no DAD, MLD
  or router solicitation flooded by the bridge to every other allocation, no routes
  per veth in the host's IPv6 table (which the kernel walks whole when a link goes
  down).  With one, eth0 has its addresses as before.
- A link deletion (the kernel's RCU waits, tens of ms) runs in a thread: the event
  loop goes on meanwhile.
- Reconcile does not take a veth still being deleted for an orphan.

The timings of all this are in tests/bench/net_setup.py (see tests/bench/README.md).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
from pyroute2 import AsyncIPRoute

from netsetup.links import Links, veth_name
from netsetup.spec import NetConfig
from tests.netns.conftest import (
    Driver,
    Topology,
    ip_json,
    nft_elements,
    ns_socket,
    owned_links,
    run,
)

pytestmark = pytest.mark.root

StartDriver = Callable[..., Driver]


def test_teardown_has_removed_the_forwards_when_it_returns(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc, ports=[{"label": "s", "static": 8053, "to": 53}])
    assert len(nft_elements(topology.host)) == 4
    assert driver.call("teardown", alloc=alloc) is True
    assert nft_elements(topology.host) == []  # no settle: not left to the background
    again = driver.setup(topology.alloc_id(), ports=[{"label": "s", "static": 8053, "to": 53}])
    assert again["ports"][0]["host_port"] == 8053
    assert len(nft_elements(topology.host)) == 4


def inet6(ns: str, dev: str) -> list[dict[str, str]]:
    """The IPv6 addresses of `dev` in `ns`."""
    [link] = ip_json(ns, "addr", "show", "dev", dev)
    return [a for a in link["addr_info"] if a["family"] == "inet6"]


def disable_ipv6(ns: str, dev: str) -> str:
    return run("ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")


def test_no_ipv6_on_either_side_of_the_veth_without_a_v6_subnet(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc, ports=[{"label": "p"}])
    assert inet6(alloc, "eth0") == []  # not even a link-local address
    assert [a["local"] for a in inet6(alloc, "lo")] == ["::1"]
    veth = veth_name("wp", alloc)
    assert disable_ipv6(topology.host, veth).strip() == "1"
    assert ip_json(topology.host, "-6", "route", "show", "table", "all", "dev", veth) == []
    assert ip_json(alloc, "route", "show", "default")[0]["gateway"] == "172.26.64.1"


def test_eth0_keeps_its_ipv6_with_a_v6_subnet(
    topology: Topology, start_driver: StartDriver
) -> None:
    driver = start_driver(topology, config={"subnet6": "fd00:26::/64"})
    alloc = topology.alloc_id()
    result = driver.setup(alloc, ports=[{"label": "p"}])
    scopes = {a["scope"]: a["local"] for a in inet6(alloc, "eth0")}
    assert scopes["global"] == result["alloc_ip6"] and scopes["link"].startswith("fe80:")
    assert disable_ipv6(topology.host, veth_name("wp", alloc)).strip() == "1"  # a port


async def test_a_link_deletion_leaves_the_event_loop_free(topology: Topology) -> None:
    ns = topology.host
    # Links on netlink sockets made inside the throwaway namespace: everything acts there.
    own = ns_socket(ns, socket.SOCK_DGRAM, socket.AF_NETLINK)  # protocol 0: NETLINK_ROUTE
    deleters = [ns_socket(ns, socket.SOCK_RAW, socket.AF_NETLINK) for _ in range(2)]
    links = Links(AsyncIPRoute(use_socket=own, groups=0), NetConfig(), delete_sockets=deleters)
    try:
        run("ip", "-n", ns, "link", "add", "wpdel0", "type", "veth", "peer", "name", "wpdel1")
        [link] = ip_json(ns, "link", "show", "wpdel0")
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:  # how long the loop goes without running us
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        start = time.perf_counter()
        await links.delete_link_index(int(link["ifindex"]), "wpdel0")
        took = time.perf_counter() - start
        done.set()
        await ticker
        assert await links.link("wpdel0") is None and await links.link("wpdel1") is None
        assert max(gaps) < took / 2, f"the loop stood still {max(gaps):.4f} s of {took:.4f} s"
        await links.delete_link_index(int(link["ifindex"]), "wpdel0")  # gone: fine
    finally:
        links.close()
        own.close()


def test_reconcile_right_after_a_teardown_finds_no_orphan(
    topology: Topology, driver: Driver
) -> None:
    allocs = [topology.alloc_id() for _ in range(10)]
    for alloc in allocs:
        driver.setup(alloc, ports=[{"label": "p"}])
    pending = [driver.send("teardown", alloc=a) for a in allocs]
    assert [driver.wait(i) for i in pending] == [True] * 10
    report = driver.call("reconcile")  # the last veths are still being deleted
    assert report["removed_links"] == [] and report["failed"] == []
    assert driver.call("settle") == [] and owned_links(topology.host) == []
