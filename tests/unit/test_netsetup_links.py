"""The pure parts of netsetup's kernel side: names, host address choice, plans, CLI parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsetup.cli import parse_config, parse_port
from netsetup.errors import InvalidName, SpecError
from netsetup.hostaddr import choose_host_address
from netsetup.links import (
    HostAddress,
    bridge_mac,
    check_namespace_name,
    host_sysctls,
    is_owned_link_name,
    veth_name,
)
from netsetup.network import _run_undo, plan_result
from netsetup.spec import NetConfig, NetworkSpec, PortMapping, PortSpec
from netsetup.state import Reservation


@pytest.mark.parametrize(
    "name", ["a", "0", "5f1e7f2c-3c0a-4b8e-9f4e-1d2c3b4a5e6f", "web.1_x-y", "x" * 64]
)
def test_namespace_names_accepted(name: str) -> None:
    assert check_namespace_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a/b", "/etc", ".", "..", ".hidden", "-x", "_x", "a b", "x" * 65, "é", "a\0"]
)
def test_namespace_names_refused(name: str) -> None:
    with pytest.raises(InvalidName) as refused:
        check_namespace_name(name)
    assert refused.value.kind == "namespace" and refused.value.name == name


@given(st.text(min_size=1, max_size=300))
def test_veth_names_fit_ifnamsiz_and_are_recognised_as_ours(alloc_id: str) -> None:
    for prefix in ("wp", "w", "abcdef"):
        name = veth_name(prefix, alloc_id)
        assert len(name) == 15 and name.startswith(prefix)
        assert is_owned_link_name(prefix, name)
        assert name == veth_name(prefix, alloc_id)


@pytest.mark.parametrize(
    "name",
    ["eth0", "wp", "wp0123456789ab", "wp0123456789abcd", "wp0123456789ABC", "wq0123456789abc"],
)
def test_other_link_names_are_not_ours(name: str) -> None:
    assert not is_owned_link_name("wp", name)


def test_distinct_allocations_get_distinct_veths() -> None:
    names = {veth_name("wp", f"alloc-{i}") for i in range(5000)}
    assert len(names) == 5000


def test_bridge_mac_is_fixed_local_and_unicast() -> None:
    mac = bridge_mac("nomad")
    first = int(mac.split(":")[0], 16)
    assert mac == bridge_mac("nomad") != bridge_mac("other")
    assert first & 0x02 and not first & 0x01
    assert len(mac.split(":")) == 6


@pytest.mark.parametrize(
    ("ipv6", "bridge_nf", "extra"),
    [
        (False, False, []),
        (True, False, ["net.ipv6.conf.all.forwarding"]),
        (False, True, ["net.bridge.bridge-nf-call-iptables"]),
        (
            True,
            True,
            [
                "net.ipv6.conf.all.forwarding",
                "net.bridge.bridge-nf-call-iptables",
                "net.bridge.bridge-nf-call-ip6tables",
            ],
        ),
    ],
)
def test_host_sysctls(ipv6: bool, bridge_nf: bool, extra: list[str]) -> None:
    wanted = host_sysctls("br.0", ipv6=ipv6, bridge_nf=bridge_nf)
    assert all(value == "1" for _, value in wanted)
    keys = [key for key, _ in wanted]
    assert keys[:2] == [
        ("net", "ipv4", "ip_forward"),
        ("net", "ipv4", "conf", "br.0", "route_localnet"),
    ]
    assert [".".join(k) for k in keys[2:]] == extra


def _addr(index: int, ifname: str, text: str) -> HostAddress:
    return HostAddress(index, ifname, ipaddress.ip_interface(text))


ADDRESSES = [
    _addr(2, "nomad", "172.26.64.1/20"),  # our bridge: never the host address
    _addr(3, "wp0123456789abc", "10.9.9.9/24"),  # our veth: never either
    _addr(4, "eth0", "2001:db8::5/64"),
    _addr(4, "eth0", "192.0.2.5/24"),
    _addr(5, "eth1", "198.51.100.7/24"),
]


@pytest.mark.parametrize(
    ("config", "routes", "expected"),
    [
        (NetConfig(advertise="203.0.113.9"), [5], "203.0.113.9"),
        (NetConfig(network_interface="eth1"), [4], "198.51.100.7"),
        (NetConfig(), [5, 4], "198.51.100.7"),  # the best default route's interface
        (NetConfig(), [4], "192.0.2.5"),  # IPv4 before IPv6 on one interface
        (NetConfig(), [9], "192.0.2.5"),  # a route via an interface without address
        (NetConfig(), [], "192.0.2.5"),  # no default route: the first global address
        (NetConfig(), [2], "192.0.2.5"),  # a default route via our bridge does not count
    ],
)
def test_choose_host_address(config: NetConfig, routes: list[int], expected: str) -> None:
    assert choose_host_address(config, ADDRESSES, routes) == expected


def test_host_address_errors_name_the_setting() -> None:
    with pytest.raises(SpecError) as missing:
        choose_host_address(NetConfig(network_interface="eth7"), ADDRESSES, [])
    assert missing.value.field == "network_interface"
    with pytest.raises(SpecError) as none:
        choose_host_address(NetConfig(), ADDRESSES[:2], [2])
    assert none.value.field == "advertise"
    only_v6 = [_addr(4, "eth0", "2001:db8::5/64")]
    assert choose_host_address(NetConfig(), only_v6, []) == "2001:db8::5"


def test_plan_result_bridge_and_host() -> None:
    config = NetConfig(subnet6="fd00:1::/64")
    ports = (PortMapping("http", "192.0.2.5", 23000, 80),)
    reservation = Reservation(ports, ("172.26.64.9", "fd00:1::9"))
    bridge = plan_result(
        config, "a1", NetworkSpec("bridge"), reservation, "192.0.2.5", "wp0123456789abc"
    )
    assert (bridge.netns, bridge.alloc_ip, bridge.alloc_ip6) == (
        "/var/run/netns/a1",
        "172.26.64.9",
        "fd00:1::9",
    )
    assert (bridge.interface, bridge.host_veth, bridge.bridge) == (
        "eth0",
        "wp0123456789abc",
        "nomad",
    )
    host = plan_result(config, "a2", NetworkSpec("host"), Reservation(ports), "192.0.2.5", "")
    assert (host.mode, host.netns, host.alloc_ip, host.ports) == ("host", "", "", ports)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http", PortSpec("http")),
        ("http:8080", PortSpec("http", static=8080)),
        ("http::80", PortSpec("http", to=80)),
        ("http:8080:80", PortSpec("http", static=8080, to=80)),
        ("http::-1", PortSpec("http", to=-1)),
        ("http:", PortSpec("http")),
    ],
)
def test_parse_port(text: str, expected: PortSpec) -> None:
    assert parse_port(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "a:b", "a:1:2:3", "a:70000", "a b", "a::x"])
def test_parse_port_refuses(text: str) -> None:
    with pytest.raises(SpecError):
        parse_port(text)


def test_parse_config() -> None:
    config = parse_config(
        {
            "bridge": "br1",
            "min_dynamic_port": 30000,
            "host_networks": [{"name": "public", "address": "192.0.2.1"}],
        },
        "net.json",
    )
    assert config.bridge == "br1" and config.min_dynamic_port == 30000
    assert config.host_network("public") is not None
    for bad, field in [
        ([], "net.json"),
        ({"brige": "x"}, "brige"),
        ({"host_networks": "x"}, "host_networks"),
        ({"host_networks": [{"nam": "x"}]}, "net.json"),
        ({"subnet": "nonsense"}, "subnet"),
    ]:
        with pytest.raises(SpecError) as refused:
            parse_config(bad, "net.json")
        assert refused.value.field == field


async def test_undo_runs_backwards_past_failures_and_keeps_the_error() -> None:
    ran: list[str] = []

    async def step(name: str) -> None:
        ran.append(name)
        if name == "b":
            raise SpecError("b", "undo of b failed")

    error = RuntimeError("setup failed")
    await _run_undo("a1", [lambda: step("a"), lambda: step("b"), lambda: step("c")], error)
    assert ran == ["c", "b", "a"]
    assert error.__notes__ == ["undo failed, possibly left behind: b: undo of b failed"]
