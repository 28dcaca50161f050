"""Nothing is left behind: 200 setup/teardown cycles, crashes at every step.  Root.

"Nothing" is counted in the kernel and the firewall, not in netsetup's own books:
namespaces under /var/run/netns, links and addresses of the host namespace, nft map
elements, and the state's reservations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.netns.conftest import (
    Driver,
    Topology,
    ip_json,
    namespaces,
    nft_elements,
    owned_links,
)

pytestmark = pytest.mark.root

CYCLES = 200
StartDriver = Callable[..., Driver]


def host_inventory(topology: Topology) -> dict[str, Any]:
    """What the host namespace holds, by name: links and their addresses."""
    return {
        link["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"])
        for link in ip_json(topology.host, "addr", "show")
    }


def assert_clean(topology: Topology, driver: Driver, baseline: dict[str, Any]) -> None:
    assert driver.call("settle") == []  # the veths teardown detached are deleted
    assert namespaces(topology.prefix + "-") == []
    assert owned_links(topology.host) == []
    assert host_inventory(topology) == baseline
    assert nft_elements(topology.host) == []
    assert driver.call("list") == []


def test_200_setup_teardown_cycles_leave_nothing(topology: Topology, driver: Driver) -> None:
    warm = driver.setup(topology.alloc_id("w"), ports=[{"label": "p"}])
    driver.call("teardown", alloc=warm["alloc_id"])  # the bridge and the table exist from here
    baseline = host_inventory(topology)
    assert set(baseline) == {"lo", "ext0", "nomad"}
    started = time.monotonic()
    ips, ports = set(), set()
    for _ in range(CYCLES):
        alloc = topology.alloc_id("l")
        result = driver.setup(alloc, ports=[{"label": "p", "to": 80}])
        ips.add(result["alloc_ip"])
        ports.add(result["ports"][0]["host_port"])
        assert driver.call("teardown", alloc=alloc) is True
    elapsed = time.monotonic() - started
    assert len(ips) == CYCLES  # round-robin leases: a released address comes back last
    assert_clean(topology, driver, baseline)
    print(f"{CYCLES} cycles in {elapsed:.1f} s ({1000 * elapsed / CYCLES:.1f} ms per cycle)")


@pytest.mark.parametrize(
    "step", ["create_namespace", "create_veth", "configure_inside", "add_alloc", "complete"]
)
def test_crash_at_any_step_then_restart_leaves_nothing(
    topology: Topology, start_driver: StartDriver, step: str
) -> None:
    first = start_driver(topology)
    warm = first.setup(topology.alloc_id("w"), ports=[{"label": "p"}])
    first.call("teardown", alloc=warm["alloc_id"])
    baseline = host_inventory(topology)
    alloc = topology.alloc_id("x")
    first.call("fault", step=step, action="pause", alloc=alloc)
    first.send("setup", alloc=alloc, spec={"mode": "bridge", "ports": [{"label": "p"}]})
    first.wait_event("paused")
    first.kill()

    second = start_driver(topology)
    report = second.call("reconcile")
    assert report["rolled_back"] == [alloc] and report["failed"] == []
    assert_clean(topology, second, baseline)
