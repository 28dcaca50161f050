"""DNS settings: the zone, TTLs, limits and forwarding.  Pure: no I/O.

Defaults follow Consul's `dns_config` (TTLs 0, SOA refresh 3600 / retry 600 /
expire 86400 / minimum 0, enable_truncate on) and DESIGN.md (domain `nomad.`,
datacenter `dc1`), with one exception: `udp_answer_limit` is unset (0), so a
UDP reply holds as many answers as fit 512 octets or the EDNS size.  Consul's
default of 3 sets TC=1 on replies that fit, which RFC 2181 section 9 forbids
("the TC bit should be set ... only when ... the entire answer RRSet" does
not fit); an explicit limit gives Consul's behaviour back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# RFC 1035 section 4.2.1: a UDP message without EDNS is at most 512 octets.
CLASSIC_UDP_SIZE = 512
# DNS Flag Day 2020: 1232 octets avoids IP fragmentation on almost every path.
DEFAULT_EDNS_PAYLOAD = 1232
# RFC 1035 section 4.2.2: TCP messages carry a 16-bit length prefix.
MAX_TCP_SIZE = 65535
# The responder's caches: ~45 MiB holds every answer of 10,000 services for one
# kind of client (README); past the budget the least recently used go.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
# An eighth of the server's 512 connections: a busy stub resolver's pool fits,
# and eight clients at their limit still leave the others room.
DEFAULT_TCP_PER_CLIENT = 64


@dataclass(frozen=True, slots=True)
class SoaSettings:
    """SOA timers (seconds); `min_ttl` is also the negative-caching TTL (RFC 2308)."""

    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    min_ttl: int = 0


def _default_ttls() -> Mapping[str, int]:
    return MappingProxyType({"*": 0})


def _loopback() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """Everything the DNS responder needs besides the registry."""

    domain: str = "nomad."  # absolute, lower case, trailing dot
    alt_domains: tuple[str, ...] = ()  # answered exactly like `domain`
    datacenter: str = "dc1"
    node_name: str = "localhost"  # the agent's node: NS and SOA point at it
    node_address: str = "127.0.0.1"
    # Consul's service_ttl: exact name, then "prefix*" wildcards, then "*".
    service_ttl: Mapping[str, int] = field(default_factory=_default_ttls)
    node_ttl: int = 0
    soa: SoaSettings = SoaSettings()
    only_passing: bool = False  # when False, warning instances are served too
    # Answers in a UDP reply to a client without EDNS; 0: as many as fit (RFC 2181
    # section 9).  Set it (Consul's default is 3) for Consul's behaviour.
    udp_answer_limit: int = 0
    enable_truncate: bool = True  # set TC=1 when a UDP answer was trimmed
    edns_max_payload: int = DEFAULT_EDNS_PAYLOAD  # cap on the client's advertised size
    recursors: tuple[str, ...] = ()  # "ip" or "ip:port"; empty: REFUSED outside the zone
    recursor_timeout: float = 2.0
    recursion_allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=_loopback
    )
    tcp_idle_timeout: float = 10.0  # RFC 7766 section 6.2.3 suggests "a few seconds" or more
    # TCP connections one client address may hold (RFC 7766 section 10); the
    # server's total cap is start_dns(max_tcp_connections=...).
    tcp_max_per_client: int = DEFAULT_TCP_PER_CLIENT
    # Memory for memoized answers and whole replies (responder.py), in octets.
    cache_max_bytes: int = DEFAULT_CACHE_BYTES

    def ttl_for(self, service: str) -> int:
        """The TTL of `service`'s records (case-insensitive), Consul's lookup order."""
        key = service.lower()
        exact = self.service_ttl.get(key)
        if exact is not None:
            return exact
        best = -1
        ttl = self.service_ttl.get("*", 0)
        for pattern, value in self.service_ttl.items():
            if pattern.endswith("*") and len(pattern) > 1:
                prefix = pattern[:-1]
                if key.startswith(prefix) and len(prefix) > best:
                    best, ttl = len(prefix), value
        return ttl

    def may_recurse(self, client: str) -> bool:
        """True when forwarding is configured and `client` (an IP) is allowed to use it."""
        if not self.recursors:
            return False
        try:
            ip = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.recursion_allowed)
