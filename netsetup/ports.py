"""Host ports for allocations: policy, the allocator, and the OS probe.

Pure, except :func:`probe_port_free` / :func:`probe_static_port`, which ask the
kernel (bind, then close) and are injected into the allocator as callables.

Semantics follow Nomad (nomad/structs/network.go, `NetworkIndex.AssignPorts`):

- dynamic ports come from `min_dynamic_port`-`max_dynamic_port`, inclusive;
- reserved ports ("22,80,8500-8600") are global and per host address (a host
  network's own `reserved_ports` add to the global ones), never handed out;
- a static port may lie outside or inside the dynamic range; inside, it is
  simply used and never handed out dynamically; a static port that is reserved
  or already taken is an error naming the port;
- each port is reserved on one host IP (its `host_network`'s address), and a
  mapping holds the port for TCP and UDP both (the ledger has no protocol);
- `to` > 0 is the port inside the allocation, 0 / -1 mean the host port;
- dynamic selection makes `RANDOM_PROBES` random picks (Nomad: 20), then scans
  every candidate; "dynamic port selection failed" when none is left.

Unlike Nomad, a dynamic candidate already bound on the host by some other
process is skipped (`is_free`), and a static port bound by another process is
refused when a `static_free` probe is given.  Planning reserves nothing: the
caller (netsetup.state) records the whole plan in one transaction, so an
allocation gets all its ports or none.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from netsetup.errors import PortError, PortsExhausted, SpecError
from netsetup.spec import (
    DEFAULT_HOST_NETWORK,
    NetConfig,
    PortMapping,
    PortSpec,
    parse_port_ranges,
)

__all__ = [
    "RANDOM_PROBES",
    "PortLedger",
    "PortPolicy",
    "PortProbe",
    "alloc_port",
    "parse_port_ranges",
    "plan_policy",
    "plan_ports",
    "probe_port_free",
    "probe_static_port",
]

RANDOM_PROBES = 20  # Nomad's maxRandPortAttempts, before the exhaustive scan

# host_ip -> port -> the allocation holding it (what netsetup.state reads back)
PortLedger = Mapping[str, Mapping[int, str]]
# (host_ip, port) -> True when nothing else on the host holds the port
PortProbe = Callable[[str, int], bool]


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """The dynamic range, reserved ports and host-network addresses, resolved.

    Build it with :func:`plan_policy`; `reserved_by_ip` holds the per-address
    additions (host networks' `reserved_ports`), `addresses` maps host network
    names to their address ("default" is always there).
    """

    low: int
    high: int
    reserved: frozenset[int] = frozenset()
    reserved_by_ip: Mapping[str, frozenset[int]] = field(default_factory=dict)
    addresses: Mapping[str, str] = field(default_factory=dict)

    def reserved_for(self, host_ip: str) -> frozenset[int]:
        """Every port never handed out on `host_ip`."""
        return self.reserved | self.reserved_by_ip.get(host_ip, frozenset())

    def host_ip_for(self, host_network: str) -> str:
        """The address of `host_network` ("" = "default"); SpecError when unknown."""
        name = host_network or DEFAULT_HOST_NETWORK
        try:
            return self.addresses[name]
        except KeyError:
            known = ", ".join(sorted(self.addresses))
            raise SpecError(
                "port.host_network", f"unknown host network {name!r} (known: {known})"
            ) from None


def plan_policy(config: NetConfig, default_ip: str) -> PortPolicy:
    """The :class:`PortPolicy` of `config` with `default_ip` as the host address."""
    reserved = parse_port_ranges(config.reserved_ports)
    addresses = {DEFAULT_HOST_NETWORK: default_ip}
    by_ip: dict[str, frozenset[int]] = {}
    for network in config.host_networks:
        address = network.address
        if not address:
            if network.name != DEFAULT_HOST_NETWORK:
                raise SpecError(f"host_network[{network.name}].address", "must be set")
            address = default_ip
        addresses[network.name] = address
        extra = parse_port_ranges(
            network.reserved_ports, f"host_network[{network.name}].reserved_ports"
        )
        by_ip[address] = by_ip.get(address, frozenset()) | extra
    return PortPolicy(
        low=config.min_dynamic_port,
        high=config.max_dynamic_port,
        reserved=reserved,
        reserved_by_ip=by_ip,
        addresses=addresses,
    )


def alloc_port(spec: PortSpec, host_port: int) -> int:
    """The port inside the allocation: `to` when > 0, else the host port (Nomad)."""
    return spec.to if spec.to > 0 else host_port


def plan_ports(
    specs: Sequence[PortSpec],
    policy: PortPolicy,
    ledger: PortLedger,
    *,
    is_free: PortProbe | None = None,
    static_free: PortProbe | None = None,
    rng: random.Random | None = None,
) -> tuple[PortMapping, ...]:
    """Choose a host port for each of `specs`; the mappings in `specs`' order.

    `ledger` is every port already held, per host IP.  Raises PortError
    (static conflict) or PortsExhausted; in both cases nothing is held, since
    planning changes nothing.  `is_free` is asked about dynamic candidates
    (default: everything is free), `static_free` about static ports (default:
    not asked).
    """
    rng = rng or random.Random()
    taken: dict[str, set[int]] = {}  # ports of this plan, per host IP
    chosen: dict[str, tuple[str, int]] = {}  # label -> (host_ip, port)
    for spec in specs:  # static ports first: dynamic picks must avoid them (Nomad)
        if spec.static is not None:
            host_ip = policy.host_ip_for(spec.host_network)
            _check_static(spec, spec.static, host_ip, policy, ledger, taken, static_free)
            taken.setdefault(host_ip, set()).add(spec.static)
            chosen[spec.label] = (host_ip, spec.static)
    for spec in specs:
        if spec.static is None:
            host_ip = policy.host_ip_for(spec.host_network)
            mine = taken.setdefault(host_ip, set())
            blocked = _Blocked(policy.reserved_for(host_ip), ledger.get(host_ip, {}), mine)
            port = _pick_dynamic(host_ip, policy, blocked, is_free, rng)
            mine.add(port)
            chosen[spec.label] = (host_ip, port)
    return tuple(
        PortMapping(
            label=spec.label,
            host_ip=chosen[spec.label][0],
            host_port=chosen[spec.label][1],
            alloc_port=alloc_port(spec, chosen[spec.label][1]),
        )
        for spec in specs
    )


@dataclass(frozen=True, slots=True)
class _Blocked:
    """Ports a dynamic pick must avoid on one host IP."""

    reserved: frozenset[int]
    held: Mapping[int, str]
    mine: set[int]

    def __contains__(self, port: object) -> bool:
        return port in self.reserved or port in self.held or port in self.mine


def _check_static(
    spec: PortSpec,
    port: int,
    host_ip: str,
    policy: PortPolicy,
    ledger: PortLedger,
    taken: Mapping[str, set[int]],
    static_free: PortProbe | None,
) -> None:
    what = f"static port {port} ({spec.label}) on {host_ip}"
    if port in policy.reserved_for(host_ip):
        raise PortError(f"{what} is a reserved port", host_ip=host_ip, port=port)
    owner = ledger.get(host_ip, {}).get(port)
    if owner is not None:
        raise PortError(f"{what} is already held by allocation {owner}", host_ip=host_ip, port=port)
    if port in taken.get(host_ip, ()):
        raise PortError(f"{what} is asked for twice", host_ip=host_ip, port=port)
    if static_free is not None and not static_free(host_ip, port):
        raise PortError(
            f"{what} is in use by another process on the host", host_ip=host_ip, port=port
        )


def _pick_dynamic(
    host_ip: str,
    policy: PortPolicy,
    blocked: _Blocked,
    is_free: PortProbe | None,
    rng: random.Random,
) -> int:
    """Random probes, then every candidate from a random start; PortsExhausted if none."""
    low, high = policy.low, policy.high
    for _ in range(RANDOM_PROBES):
        # Inclusive at both ends (Nomad's random pick, rand.Intn(max-min), never hits max).
        port = rng.randint(low, high)
        if port not in blocked and (is_free is None or is_free(host_ip, port)):
            return port
    start = rng.randint(low, high)
    for port in _cyclic(low, high, start):
        if port not in blocked and (is_free is None or is_free(host_ip, port)):
            return port
    raise PortsExhausted(host_ip, low, high)


def _cyclic(low: int, high: int, start: int) -> Iterable[int]:
    yield from range(start, high + 1)
    yield from range(low, start)


# --- the OS probe ----------------------------------------------------------------


def probe_port_free(host_ip: str, port: int) -> bool:
    """True when `port` can be bound on `host_ip` for TCP and for UDP right now.

    Binds (never connects or sends) with SO_REUSEADDR off, so listeners,
    bound sockets, wildcard binds and TIME_WAIT leftovers all count as "in
    use": conservative, which is right for a port we may pick or skip.
    """
    return _probe(host_ip, port, reuse_addr=False)


def probe_static_port(host_ip: str, port: int) -> bool:
    """Like :func:`probe_port_free`, with SO_REUSEADDR on: ignores TIME_WAIT.

    For static ports, which cannot be skipped: the allocation's own previous
    connections lingering in TIME_WAIT must not block its restart (Linux lets
    the bind through when those sockets had SO_REUSEADDR too, as servers set
    it: Go's net.Listen, nginx, asyncio), but another process listening or
    bound there must.
    """
    return _probe(host_ip, port, reuse_addr=True)


def _probe(host_ip: str, port: int, *, reuse_addr: bool) -> bool:
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_addr))
            try:
                sock.bind((host_ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                if exc.errno == errno.EACCES:
                    return True  # privileged port and not root: cannot tell, assume free
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise PortError(
                        f"host address {host_ip} is not configured on this host",
                        host_ip=host_ip,
                        port=port,
                    ) from None
                raise
    return True
