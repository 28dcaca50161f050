"""The `client` block: Nomad's client option names onto netsetup's NetConfig."""

from __future__ import annotations

import json

import pytest

from discovery.config import AgentConfig, Overrides, parse_config
from discovery.errors import ConfigError
from discovery.hclfile import parse_hcl, parse_json
from netsetup.spec import HostNetwork, NetConfig


def hcl(text: str, overrides: Overrides | None = None) -> AgentConfig:
    return parse_config([parse_hcl(text, "client.hcl")], overrides or Overrides())


def test_every_nomad_option_maps_onto_netconfig() -> None:
    config = hcl(
        """
client {
  network_interface = "eth1"
  min_dynamic_port = 21000
  max_dynamic_port = 22000
  reserved {
    reserved_ports = "22,80,8500-8600"
  }
  bridge_network_name = "wp0"
  bridge_network_subnet = "10.99.0.0/24"
  bridge_network_subnet_ipv6 = "fd00:99::/64"
  bridge_network_hairpin_mode = false
  host_network {
    name = "public"
    cidr = "203.0.113.7/32"
    reserved_ports = "443"
  }
}
data_dir = "/tmp/wp-data"
"""
    )
    assert config.client == NetConfig(
        network_interface="eth1",
        min_dynamic_port=21000,
        max_dynamic_port=22000,
        reserved_ports="22,80,8500-8600",
        bridge="wp0",
        subnet="10.99.0.0/24",
        subnet6="fd00:99::/64",
        hairpin=False,
        host_networks=(HostNetwork("public", "203.0.113.7", "443"),),
        data_dir="/tmp/wp-data",
    )


def test_defaults_are_netsetups_with_the_agents_data_dir() -> None:
    config = hcl("", Overrides(data_dir="/tmp/d"))
    assert config.client == NetConfig(data_dir="/tmp/d")


def test_the_host_address_is_advertise_addr_else_loopback_in_dev() -> None:
    assert hcl('advertise_addr = "192.0.2.5"').client.advertise == "192.0.2.5"
    assert hcl("", Overrides(dev=True)).client.advertise == "127.0.0.1"
    dev_with_interface = hcl('client {\n network_interface = "eth0"\n}\n', Overrides(dev=True))
    assert dev_with_interface.client.advertise == ""
    assert hcl("").client.advertise == ""


def test_json_host_networks_are_keyed_by_name() -> None:
    raw = {"client": {"host_network": {"lan": {"address": "192.0.2.9", "reserved_ports": "22"}}}}
    config = parse_config([parse_json(json.dumps(raw), "c.json")])
    assert config.client.host_networks == (HostNetwork("lan", "192.0.2.9", "22"),)


def test_host_networks_take_a_label_as_in_nomad() -> None:
    config = hcl(
        """
client {
  host_network "public" {
    cidr = "203.0.113.7/32"
    reserved_ports = "22"
  }
  host_network "lan" { address = "192.0.2.9" }
  host_network {
    name = "old-style"
    address = "192.0.2.10"
  }
}
"""
    )
    assert config.client.host_networks == (
        HostNetwork("lan", "192.0.2.9", ""),
        HostNetwork("old-style", "192.0.2.10", ""),
        HostNetwork("public", "203.0.113.7", "22"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("client {\n  bogus = 1 # <-\n}\n", "client.bogus: unknown key"),
        (
            'client {\n  host_network "x" {\n    cidr = "10.0.0.0/8" # <-\n  }\n}\n',
            "one address",
        ),
        (
            'client {\n  host_network "x" { # <-\n    name = "y"\n  }\n}\n',
            "client.host_network.name: is given by the label 'x'",
        ),
        ('client {\n  host_network "x" "y" { # <-\n  }\n}\n', "takes one label"),
        ('client {\n  reserved "x" { # <-\n  }\n}\n', "a reserved block takes no labels"),
        ("client {\n  min_dynamic_port = 70000 # <-\n}\n", "client.min_dynamic_port"),
        (
            "client {\n  min_dynamic_port = 30000 # <-\n  max_dynamic_port = 20000\n}\n",
            "min_dynamic_port 30000 > max_dynamic_port 20000",
        ),
        ('client {\n  bridge_network_subnet = "10.0.0.0/33" # <-\n}\n', "not a subnet"),
        ('client {\n  bridge_network_name = "a-very-long-bridge" # <-\n}\n', "interface name"),
        (
            'client {\n  reserved {\n    reserved_ports = "80-22" # <-\n  }\n}\n',
            "reversed range",
        ),
        (
            'client {\n  host_network {\n    name = "x"\n    cidr = "10.0.0.0/8" # <-\n  }\n}\n',
            "one address",
        ),
        ('client {\n  host_network { # <-\n    name = "x"\n    mtu = 1\n  }\n}\n', "unknown key"),
    ],
)
def test_bad_client_settings_name_file_line_and_key(text: str, message: str) -> None:
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "# <-" in row)
    with pytest.raises(ConfigError) as caught:
        hcl(text.replace(" # <-", ""))
    assert message in str(caught.value)
    assert caught.value.line == line
    assert caught.value.path == "client.hcl"
