"""Bridge and host mode against the real kernel, inside throwaway namespaces.  Root.

What one setup builds (bridge, veth, namespace, addresses, routes, hairpin, sysctls)
and that traffic really flows: TCP and UDP from the allocation to the gateway, egress
to the external namespace (masqueraded), forwarding from the external namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from netsetup.links import veth_name
from tests.netns.conftest import (
    Driver,
    DriverError,
    EchoServer,
    Topology,
    ip_json,
    namespaces,
    nft_elements,
    owned_links,
    run,
    tcp_ask,
    udp_ask,
)

pytestmark = pytest.mark.root

GATEWAY = "172.26.64.1"


def sysfs(ns: str, path: str) -> str:
    """A /sys file as seen from `ns` (ip netns exec mounts that namespace's sysfs)."""
    return run("ip", "netns", "exec", ns, "cat", f"/sys/{path}").strip()


def sysctl(ns: str, key: str) -> str:
    return run("ip", "netns", "exec", ns, "cat", f"/proc/sys/{key.replace('.', '/')}").strip()


def test_bridge_setup_builds_every_object(topology: Topology, driver: Driver) -> None:
    alloc = topology.alloc_id("web")
    result = driver.setup(alloc, ports=[{"label": "http", "to": 8080}])
    veth = veth_name("wp", alloc)
    assert result["mode"] == "bridge"
    assert result["netns"] == f"/var/run/netns/{alloc}"
    assert result["host_veth"] == veth and len(veth) == 15
    assert result["interface"] == "eth0" and result["bridge"] == "nomad"
    assert result["host_ip"] == topology.host_ip
    [mapping] = result["ports"]
    assert 20000 <= mapping["host_port"] <= 32000 and mapping["alloc_port"] == 8080

    [bridge] = ip_json(topology.host, "-d", "link", "show", "nomad")
    assert bridge["linkinfo"]["info_kind"] == "bridge" and "UP" in bridge["flags"]
    gw = [a for a in ip_json(topology.host, "addr", "show", "nomad")[0]["addr_info"]]
    assert {(a["local"], a["prefixlen"]) for a in gw if a["family"] == "inet"} == {(GATEWAY, 20)}
    [port] = ip_json(topology.host, "-d", "link", "show", veth)
    assert port["master"] == "nomad" and "UP" in port["flags"]
    assert sysfs(topology.host, f"class/net/{veth}/brport/hairpin_mode") == "1"

    inside = {i["ifname"]: i for i in ip_json(alloc, "addr", "show")}
    assert set(inside) == {"lo", "eth0"}
    assert "UP" in inside["lo"]["flags"] and "UP" in inside["eth0"]["flags"]
    v4 = [
        (a["local"], a["prefixlen"]) for a in inside["eth0"]["addr_info"] if a["family"] == "inet"
    ]
    assert v4 == [(result["alloc_ip"], 20)]
    [default] = ip_json(alloc, "route", "show", "default")
    assert default["gateway"] == GATEWAY and default["dev"] == "eth0"

    assert sysctl(topology.host, "net.ipv4.ip_forward") == "1"
    assert sysctl(topology.host, "net.ipv4.conf.nomad.route_localnet") == "1"
    assert len(nft_elements(topology.host)) == 4  # host ip and 127.0.0.1, tcp and udp


def test_tcp_and_udp_from_the_allocation_to_the_gateway(topology: Topology, driver: Driver) -> None:
    alloc = topology.alloc_id()
    result = driver.setup(alloc)
    with EchoServer(topology.host, GATEWAY, name="host") as server:
        assert tcp_ask(alloc, GATEWAY, server.port) == f"host {result['alloc_ip']}"
        assert udp_ask(alloc, GATEWAY, server.port) == f"host {result['alloc_ip']}"


def test_egress_to_the_external_namespace_is_masqueraded(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    driver.setup(alloc)
    with EchoServer(topology.external, topology.external_ip, name="ext") as server:
        # the external side has no route to the bridge subnet: only masquerade answers
        assert tcp_ask(alloc, topology.external_ip, server.port) == f"ext {topology.host_ip}"
        assert udp_ask(alloc, topology.external_ip, server.port) == f"ext {topology.host_ip}"


def test_forwarded_port_from_the_external_namespace(topology: Topology, driver: Driver) -> None:
    alloc = topology.alloc_id()
    result = driver.setup(alloc, ports=[{"label": "db", "to": 5432}])
    host_port = result["ports"][0]["host_port"]
    with EchoServer(alloc, "0.0.0.0", 5432, name="db"):
        assert (
            tcp_ask(topology.external, topology.host_ip, host_port) == f"db {topology.external_ip}"
        )
        assert (
            udp_ask(topology.external, topology.host_ip, host_port) == f"db {topology.external_ip}"
        )


def test_bridge_mac_stays_when_allocations_come_and_go(topology: Topology, driver: Driver) -> None:
    first = topology.alloc_id()
    driver.setup(first)
    mac = ip_json(topology.host, "link", "show", "nomad")[0]["address"]
    others = [topology.alloc_id() for _ in range(3)]
    for alloc in others:
        driver.setup(alloc)
    driver.call("teardown", alloc=first)
    assert ip_json(topology.host, "link", "show", "nomad")[0]["address"] == mac


def test_hairpin_off_when_configured(
    topology: Topology, start_driver: Callable[..., Driver]
) -> None:
    driver = start_driver(topology, config={"hairpin": False})
    alloc = topology.alloc_id()
    driver.setup(alloc)
    assert sysfs(topology.host, f"class/net/{veth_name('wp', alloc)}/brport/hairpin_mode") == "0"


def test_host_mode_reserves_ports_and_touches_no_kernel_object(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id("h")
    result = driver.setup(
        alloc, mode="host", ports=[{"label": "http"}, {"label": "s", "static": 9000}]
    )
    assert result["mode"] == "host" and result["netns"] == "" and result["alloc_ip"] == ""
    assert [p["host_ip"] for p in result["ports"]] == [topology.host_ip] * 2
    assert result["ports"][1]["host_port"] == 9000
    assert namespaces(alloc) == []
    assert owned_links(topology.host) == []
    assert ip_json(topology.host, "link", "show") and not any(
        link["ifname"] == "nomad" for link in ip_json(topology.host, "link", "show")
    )
    with pytest.raises(DriverError, match="9000"):
        driver.setup(topology.alloc_id("h"), mode="host", ports=[{"label": "s", "static": 9000}])
    assert driver.call("teardown", alloc=alloc) is True
    again = driver.setup(
        topology.alloc_id("h"), mode="host", ports=[{"label": "s", "static": 9000}]
    )
    assert again["ports"][0]["host_port"] == 9000


def test_setup_twice_returns_the_same_and_other_spec_is_refused(
    topology: Topology, driver: Driver
) -> None:
    alloc = topology.alloc_id()
    first = driver.setup(alloc, ports=[{"label": "a"}])
    assert driver.setup(alloc, ports=[{"label": "a"}]) == first
    with pytest.raises(DriverError) as refused:
        driver.setup(alloc, ports=[{"label": "b"}])
    assert refused.value.type == "AllocExists"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "-x", "x" * 65, "a b"])
def test_invalid_allocation_names_are_refused_with_nothing_created(
    topology: Topology, driver: Driver, bad: str
) -> None:
    with pytest.raises(DriverError) as refused:
        driver.setup(bad)
    assert refused.value.type == "InvalidName"
    assert driver.call("list") == []
    assert owned_links(topology.host) == []


def test_host_address_follows_the_default_route(topology: Topology, driver: Driver) -> None:
    assert driver.host_ip == topology.host_ip
    assert driver.call("host_ip") == topology.host_ip


def test_data_dir_holds_the_state(topology: Topology, driver: Driver, tmp_path: Path) -> None:
    driver.setup(topology.alloc_id())
    assert (tmp_path / "data" / "netsetup.db").is_file()


def test_ipv6_subnet_gives_the_allocation_a_v6_address_and_route(
    topology: Topology, start_driver: Callable[..., Driver]
) -> None:
    driver = start_driver(topology, config={"subnet6": "fd00:77::/64"})
    alloc = topology.alloc_id()
    result = driver.setup(alloc)
    assert result["alloc_ip6"].startswith("fd00:77::")
    [eth0] = ip_json(alloc, "addr", "show", "eth0")
    v6 = [a for a in eth0["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"]
    assert [(a["local"], a["prefixlen"]) for a in v6] == [(result["alloc_ip6"], 64)]
    assert not any(a.get("tentative") for a in v6)  # no DAD wait before first use
    [default] = ip_json(alloc, "-6", "route", "show", "default")
    assert default["gateway"] == "fd00:77::1"
    assert sysctl(topology.host, "net.ipv6.conf.all.forwarding") == "1"
    with EchoServer(topology.host, "fd00:77::1", name="gw6") as server:
        assert tcp_ask(alloc, "fd00:77::1", server.port) == (f"gw6 {result['alloc_ip6']}")


@pytest.mark.parametrize(
    ("config", "expected"),
    [({"network_interface": "ext0"}, "ext0"), ({"advertise": "192.0.2.44"}, "192.0.2.44")],
)
def test_host_address_from_the_config(
    topology: Topology, start_driver: Callable[..., Driver], config: dict[str, str], expected: str
) -> None:
    driver = start_driver(topology, config=config)
    assert driver.host_ip == (topology.host_ip if expected == "ext0" else expected)
