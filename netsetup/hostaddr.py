"""The host address: what `NOMAD_IP_*` and host-mode services advertise.

Adapter (through netsetup.links, the only pyroute2 importer) around a pure choice:

1. `advertise` in the config, as given;
2. else the first global IPv4 (then IPv6) address of `network_interface`;
3. else the same on the interface of the best IPv4 default route;
4. else the first global IPv4 (then IPv6) address of any interface.

waypost's own bridge and veths never count (the bridge's gateway address is global
too).  When nothing fits, SpecError names the setting to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from netsetup.errors import SpecError
from netsetup.links import HostAddress, Links, is_owned_link_name
from netsetup.spec import NetConfig


def choose_host_address(
    config: NetConfig, addresses: Sequence[HostAddress], default_route_ifs: Sequence[int]
) -> str:
    """Pure: the host address per the rules above, from what the kernel reported."""
    if config.advertise:
        return config.advertise
    candidates = [
        a
        for a in addresses
        if a.ifname != config.bridge and not is_owned_link_name(config.veth_prefix, a.ifname)
    ]
    if config.network_interface:
        found = _first(a for a in candidates if a.ifname == config.network_interface)
        if found is None:
            raise SpecError(
                "network_interface",
                f"no global address on interface {config.network_interface!r}",
            )
        return found
    for index in default_route_ifs:
        found = _first(a for a in candidates if a.index == index)
        if found is not None:
            return found
    found = _first(candidates)
    if found is None:
        raise SpecError("advertise", "no global address on this host: set advertise")
    return found


def _first(addresses: Iterable[HostAddress]) -> str | None:
    """The first IPv4 address of `addresses`, else the first IPv6 one, else None."""
    listed = list(addresses)
    for version in (4, 6):
        for address in listed:
            if address.address.version == version:
                return str(address.address.ip)
    return None


async def resolve_host_address(config: NetConfig, links: Links) -> str:
    """The host address of the namespace `links` talks to."""
    if config.advertise:
        return config.advertise
    addresses = await links.global_addresses()
    routes = [] if config.network_interface else await links.default_route_interfaces()
    return choose_host_address(config, addresses, routes)
