"""Addresses for allocations on the bridge subnet.  Pure: no I/O.

A :class:`Pool` is the bridge subnet (IPv4, optionally an IPv6 one) less the
network address, the gateway and, for IPv4, the broadcast address.  Leases
are handed out ROUND-ROBIN from the last address leased, wrapping at the end,
like the CNI `host-local` plugin Nomad uses (it keeps `last_reserved_ip`): an
address just released is the last to come back, so stale ARP/neighbour
entries, conntrack flows and DNS answers pointing at a dead allocation do not
reach a new one.  The caller (netsetup.state) keeps the leases and the last
address, and records a lease in the same transaction as the allocation's ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from netsetup.errors import SpecError, SubnetExhausted
from netsetup.spec import NetConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Pool:
    """The leasable addresses of one subnet: `first`..`last` less the gateway."""

    subnet: IPNetwork
    gateway: IPAddress

    @property
    def first(self) -> int:
        return int(self.subnet.network_address) + 1

    @property
    def last(self) -> int:
        # IPv4: the broadcast address is not a host.  IPv6 has no broadcast.
        end = int(self.subnet.broadcast_address)
        return end - 1 if self.subnet.version == 4 else end

    @property
    def size(self) -> int:
        """How many addresses can be leased at most."""
        return self.last - self.first + 1 - (1 if self.contains(self.gateway) else 0)

    def contains(self, ip: IPAddress) -> bool:
        """True when `ip` lies in `first`..`last` (the gateway included)."""
        return ip.version == self.subnet.version and self.first <= int(ip) <= self.last

    def leasable(self, ip: IPAddress) -> bool:
        """True when `ip` may be leased: in range and not the gateway."""
        return self.contains(ip) and ip != self.gateway

    def address(self, value: int) -> str:
        """The address `value` (an int in this pool's family) as text."""
        if self.subnet.version == 4:
            return str(ipaddress.IPv4Address(value))
        return str(ipaddress.IPv6Address(value))


def plan_pool(subnet: str, gateway: str) -> Pool:
    """The :class:`Pool` of `subnet` with `gateway` kept out; SpecError if invalid."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
        gw = ipaddress.ip_address(gateway)
    except ValueError as exc:
        raise SpecError("subnet", str(exc)) from None
    if gw.version != net.version or gw not in net:
        raise SpecError("gateway", f"{gateway} is not in {subnet}")
    pool = Pool(net, gw)
    if pool.size < 1:
        raise SpecError("subnet", f"{subnet} has no address left for allocations")
    return pool


def plan_pools(config: NetConfig) -> tuple[Pool, Pool | None]:
    """The IPv4 pool of `config` and its IPv6 pool (None without `subnet6`)."""
    v4 = plan_pool(config.subnet, config.gateway)
    v6 = plan_pool(config.subnet6, config.gateway6) if config.subnet6 else None
    return v4, v6


def plan_lease(pool: Pool, leased: Collection[str], last: str = "") -> str:
    """The next free address after `last` (round-robin), as a string.

    `leased` holds every address in use, as canonical text (what this module
    returns; other families and subnets are simply never met).  `last` is the
    previous lease ("" or out of the pool: start at the beginning).  Raises
    SubnetExhausted when every address is leased.  Cost: O(len(leased)) set
    lookups at worst, nothing parsed per lease, so it stays flat as leases grow.
    """
    taken = leased if isinstance(leased, (set, frozenset)) else set(leased)
    previous = _parse(last)
    if previous is not None and pool.contains(previous) and int(previous) < pool.last:
        candidate = int(previous) + 1
    else:
        candidate = pool.first
    gateway = int(pool.gateway)
    # Among any len(taken) + 1 distinct candidates one is free, unless the pool
    # holds no more than that: then all of it has been looked at.
    remaining = min(pool.size, len(taken) + 1)
    while remaining:
        if candidate != gateway:
            text = pool.address(candidate)
            if text not in taken:
                return text
            remaining -= 1
        candidate = pool.first if candidate >= pool.last else candidate + 1
    raise SubnetExhausted(str(pool.subnet))


def _parse(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def plan_addresses(
    v4: Pool, v6: Pool | None, leased: Collection[str], last_ip4: str = "", last_ip6: str = ""
) -> tuple[str, ...]:
    """One IPv4 lease, plus one IPv6 lease when `v6` is set (the order netsetup.state keeps)."""
    addresses = [plan_lease(v4, leased, last_ip4)]
    if v6 is not None:
        addresses.append(plan_lease(v6, leased, last_ip6))
    return tuple(addresses)
