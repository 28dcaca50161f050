"""Tests of netsetup.env: the NOMAD_* port variables, compared whole.  Pure.

The expected maps are written out by hand from Nomad's client/taskenv/env.go
(`addPorts`, `addNomadAllocNetwork`, the key cleaning in `buildEnv`) and
helper.CleanEnvVar, so a missing, extra or renamed variable fails.
"""

from __future__ import annotations

import pytest

from netsetup.env import clean_env_var, join_host_port, render_env
from netsetup.spec import AllocNetwork, PortMapping, parse_result, render_result


def bridge(*ports: PortMapping, ip: str = "172.26.64.2", ip6: str = "") -> AllocNetwork:
    return AllocNetwork(
        alloc_id="6d2c9a8e-0000-4000-8000-000000000001",
        mode="bridge",
        host_ip="10.0.0.5",
        ports=ports,
        netns="/var/run/netns/6d2c9a8e-0000-4000-8000-000000000001",
        alloc_ip=ip,
        alloc_ip6=ip6,
        interface="eth0",
        host_veth="wp0123456789abc",
        bridge="nomad",
    )


def test_bridge_mode_every_variable() -> None:
    env = render_env(bridge(PortMapping("http", "10.0.0.5", 24561, 8080)))
    assert env == {
        "NOMAD_IP_http": "10.0.0.5",
        "NOMAD_HOST_IP_http": "10.0.0.5",
        "NOMAD_ADDR_http": "10.0.0.5:24561",
        "NOMAD_HOST_ADDR_http": "10.0.0.5:24561",
        "NOMAD_HOST_PORT_http": "24561",
        "NOMAD_PORT_http": "8080",
        "NOMAD_ALLOC_PORT_http": "8080",
        "NOMAD_ALLOC_IP_http": "172.26.64.2",
        "NOMAD_ALLOC_ADDR_http": "172.26.64.2:8080",
        "NOMAD_ALLOC_INTERFACE_http": "eth0",
    }


def test_host_mode_has_no_alloc_network_variables() -> None:
    network = AllocNetwork(
        alloc_id="a1",
        mode="host",
        host_ip="10.0.0.5",
        ports=(
            PortMapping("db", "10.0.0.5", 5432, 5432),
            PortMapping("web", "10.0.0.5", 20001, 20001),
        ),
    )
    assert render_env(network) == {
        "NOMAD_IP_db": "10.0.0.5",
        "NOMAD_HOST_IP_db": "10.0.0.5",
        "NOMAD_ADDR_db": "10.0.0.5:5432",
        "NOMAD_HOST_ADDR_db": "10.0.0.5:5432",
        "NOMAD_HOST_PORT_db": "5432",
        "NOMAD_PORT_db": "5432",
        "NOMAD_ALLOC_PORT_db": "5432",
        "NOMAD_IP_web": "10.0.0.5",
        "NOMAD_HOST_IP_web": "10.0.0.5",
        "NOMAD_ADDR_web": "10.0.0.5:20001",
        "NOMAD_HOST_ADDR_web": "10.0.0.5:20001",
        "NOMAD_HOST_PORT_web": "20001",
        "NOMAD_PORT_web": "20001",
        "NOMAD_ALLOC_PORT_web": "20001",
    }


def test_only_some_prefixes_are_cleaned_as_in_nomad() -> None:
    env = render_env(bridge(PortMapping("my-api.v2", "10.0.0.5", 20001, 9000)))
    assert env == {
        # cleaned: NOMAD_IP_, NOMAD_ADDR_, NOMAD_PORT_, NOMAD_HOST_PORT_ ('.' is kept)
        "NOMAD_IP_my_api.v2": "10.0.0.5",
        "NOMAD_ADDR_my_api.v2": "10.0.0.5:20001",
        "NOMAD_PORT_my_api.v2": "9000",
        "NOMAD_HOST_PORT_my_api.v2": "20001",
        # not cleaned by Nomad: the label as written
        "NOMAD_HOST_IP_my-api.v2": "10.0.0.5",
        "NOMAD_HOST_ADDR_my-api.v2": "10.0.0.5:20001",
        "NOMAD_ALLOC_PORT_my-api.v2": "9000",
        "NOMAD_ALLOC_IP_my-api.v2": "172.26.64.2",
        "NOMAD_ALLOC_ADDR_my-api.v2": "172.26.64.2:9000",
        "NOMAD_ALLOC_INTERFACE_my-api.v2": "eth0",
    }


def test_ipv6_addresses_are_bracketed() -> None:
    network = AllocNetwork(
        alloc_id="a1",
        mode="bridge",
        host_ip="2001:db8::5",
        ports=(PortMapping("http", "2001:db8::5", 20001, 80),),
        alloc_ip6="fd00:1::2",
        interface="eth0",
    )
    env = render_env(network)
    assert env["NOMAD_ADDR_http"] == "[2001:db8::5]:20001"
    assert env["NOMAD_HOST_ADDR_http"] == "[2001:db8::5]:20001"
    assert env["NOMAD_IP_http"] == "2001:db8::5"
    assert env["NOMAD_ALLOC_IP_http"] == "fd00:1::2"  # IPv4 first, else the IPv6 one
    assert env["NOMAD_ALLOC_ADDR_http"] == "[fd00:1::2]:80"


def test_ipv4_is_the_alloc_address_when_dual_stack() -> None:
    env = render_env(bridge(PortMapping("http", "10.0.0.5", 20001, 80), ip6="fd00:1::2"))
    assert env["NOMAD_ALLOC_IP_http"] == "172.26.64.2"


def test_no_ports_no_variables() -> None:
    assert render_env(bridge()) == {}


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("NOMAD_PORT_http", "NOMAD_PORT_http"),
        ("a-b", "a_b"),
        ("a.b", "a.b"),
        ("1abc", "_abc"),  # a leading digit
        ("a1", "a1"),
        ("é", "__"),  # one `_` per UTF-8 byte (Go iterates bytes)
        ("a b=c", "a_b_c"),
        ("", ""),
    ],
)
def test_clean_env_var(name: str, cleaned: str) -> None:
    assert clean_env_var(name) == cleaned


@pytest.mark.parametrize(
    ("host", "port", "joined"),
    [("10.0.0.5", 80, "10.0.0.5:80"), ("::1", 80, "[::1]:80"), ("fd00::2", 1, "[fd00::2]:1")],
)
def test_join_host_port(host: str, port: int, joined: str) -> None:
    assert join_host_port(host, port) == joined


def test_results_round_trip_through_json() -> None:
    network = bridge(PortMapping("http", "10.0.0.5", 24561, 8080), ip6="fd00:1::2")
    assert parse_result(render_result(network)) == network
