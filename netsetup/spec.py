"""What an allocation asks for, what it gets, and the host's network config.  Pure: no I/O.

- :class:`PortSpec` / :class:`NetworkSpec` — a group's `network` block (Nomad's
  jobspec: `mode`, `port "label" { static, to, host_network }`, and
  :class:`DnsConfig`, `dns { servers, searches, options }`, which netsetup only
  carries: the agent writes it into the tasks' resolv.conf);
- :class:`PortMapping` / :class:`AllocNetwork` — the result of a setup, what the
  state keeps and what the environment (`netsetup.env`) is built from;
- :class:`NetConfig` / :class:`HostNetwork` — the host side: bridge, subnet,
  dynamic port range, reserved ports, data dir, names of the kernel objects.

Every value is validated on construction and raises :class:`SpecError` naming
the field, so a spec or a config that exists is usable.  The `render_*`/`parse_*`
pairs turn specs and results into JSON-able dicts (the state keeps them) and back.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from netsetup.errors import SpecError

NetworkMode = Literal["host", "bridge"]
MODES: tuple[NetworkMode, ...] = ("host", "bridge")

MIN_PORT = 1
MAX_PORT = 65535  # ports are 16-bit; 0 means "any" to the kernel and is never handed out
# Nomad's `to`: -1 means "the same as the host port" (Nomad sets To = Value for
# dynamic ports); 0 / omitted means the same thing for forwarding (Nomad's CNI
# port mapping uses the host port when To < 1).
TO_SAME_AS_HOST = -1
DEFAULT_MIN_DYNAMIC_PORT = 20000  # Nomad's DefaultMinDynamicPort
DEFAULT_MAX_DYNAMIC_PORT = 32000  # Nomad's DefaultMaxDynamicPort
DEFAULT_HOST_NETWORK = "default"  # Nomad's name for the host address's network
# Letters, digits, `_`, `.` and `-`: what a port label may hold.  Nomad cleans
# the other characters out of env names anyway (see netsetup.env); we keep
# labels printable and free of `=`, spaces and shell metacharacters.
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Linux interface names: at most IFNAMSIZ - 1 = 15 bytes, no `/`, no whitespace.
IFNAMSIZ = 16
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _check_port(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {value!r}")
    if not MIN_PORT <= value <= MAX_PORT:
        raise SpecError(field, f"must be between {MIN_PORT} and {MAX_PORT}, got {value}")
    return value


def _check_ip(field: str, value: str, *, version: int | None = None) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise SpecError(field, f"not an IP address: {value!r}") from None
    if version is not None and ip.version != version:
        raise SpecError(field, f"must be an IPv{version} address, got {value!r}")
    return str(ip)


def parse_port_ranges(spec: str, field: str = "reserved_ports") -> frozenset[int]:
    """The ports of a "22,80,8500-8600" spec (Nomad's ParsePortRanges syntax).

    Comma-separated ports or inclusive `low-high` ranges, spaces around items
    allowed; "" is no port.  Ports are 1-65535; an empty item, a reversed range
    or anything else raises SpecError naming `field` and the offending item.
    """
    if not spec.strip():
        return frozenset()
    ports: set[int] = set()
    for item in spec.split(","):
        bounds = [b.strip() for b in item.split("-")]
        if len(bounds) > 2 or not all(b.isdigit() and b.isascii() for b in bounds):
            raise SpecError(field, f"invalid port or range {item.strip()!r} in {spec!r}")
        low, high = int(bounds[0]), int(bounds[-1])
        if not MIN_PORT <= low <= MAX_PORT or not MIN_PORT <= high <= MAX_PORT:
            raise SpecError(field, f"port out of {MIN_PORT}-{MAX_PORT} in {item.strip()!r}")
        if high < low:
            raise SpecError(field, f"reversed range {item.strip()!r} in {spec!r}")
        ports.update(range(low, high + 1))
    return frozenset(ports)


def check_ifname(field: str, name: str) -> str:
    """`name` if it is a valid Linux interface name (1-15 chars), else SpecError."""
    if not _IFNAME.fullmatch(name):
        raise SpecError(field, f"invalid interface name {name!r} (1-15 of [A-Za-z0-9_.-])")
    return name


@dataclass(frozen=True, slots=True)
class PortSpec:
    """`port "label" { static = ..., to = ..., host_network = ... }`.

    `static` None means a dynamic port from the range.  `to` is the port inside
    the allocation: 0 (omitted) or -1 mean "the same as the host port".
    """

    label: str
    static: int | None = None
    to: int = 0
    host_network: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not _LABEL.fullmatch(self.label):
            raise SpecError("port.label", f"invalid port label {self.label!r}")
        where = f"port[{self.label}]"
        if self.static is not None:
            _check_port(f"{where}.static", self.static)
        if isinstance(self.to, bool) or not isinstance(self.to, int):
            raise SpecError(f"{where}.to", f"must be an integer, got {self.to!r}")
        if not TO_SAME_AS_HOST <= self.to <= MAX_PORT:
            raise SpecError(f"{where}.to", f"must be between -1 and {MAX_PORT}, got {self.to}")
        if not isinstance(self.host_network, str):
            raise SpecError(f"{where}.host_network", "must be a string")


# resolv(5): a resolv.conf line is a keyword and words; one without spaces each.
_DNS_WORD = re.compile(r"[^\s#;]{1,253}")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """Nomad's `network { dns { servers, searches, options } }` (structs.DNSConfig).

    Servers are IP addresses; searches and options are single resolv.conf words
    (`ndots:2`, `edns0`).  Empty tuples are Nomad's "not given" (the host's
    resolv.conf fills that part in: discovery.tasks.resolvconf).
    """

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        servers = tuple(
            _check_ip(f"network.dns.servers[{i}]", s) if isinstance(s, str) else s
            for i, s in enumerate(self.servers)
        )
        object.__setattr__(self, "servers", servers)
        for key in ("servers", "searches", "options"):
            for i, word in enumerate(getattr(self, key)):
                if not isinstance(word, str) or not _DNS_WORD.fullmatch(word):
                    raise SpecError(f"network.dns.{key}[{i}]", f"not a resolv.conf word: {word!r}")


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """A group's `network` block: the mode, the ports (labels unique), the DNS block."""

    mode: NetworkMode = "host"  # Nomad's default mode
    ports: tuple[PortSpec, ...] = ()
    dns: DnsConfig | None = None  # None: no `dns` block (the agent's DNS in bridge mode)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError("network.mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        seen: set[str] = set()
        for port in self.ports:
            if port.label in seen:
                raise SpecError(f"network.port[{port.label}]", "duplicate port label")
            seen.add(port.label)


@dataclass(frozen=True, slots=True)
class PortMapping:
    """One reserved port: host_ip:host_port (TCP and UDP) → alloc_port inside.

    `alloc_port` is resolved: `to` when it is > 0, else the host port.
    """

    label: str
    host_ip: str
    host_port: int
    alloc_port: int


@dataclass(frozen=True, slots=True)
class AllocNetwork:
    """What an allocation got.  Empty strings where the mode has nothing (host mode)."""

    alloc_id: str
    mode: NetworkMode
    host_ip: str  # the host address (what NOMAD_IP_* and host-mode services advertise)
    ports: tuple[PortMapping, ...] = ()
    netns: str = ""  # /var/run/netns/<alloc-id>
    alloc_ip: str = ""  # IPv4 address on the bridge
    alloc_ip6: str = ""  # IPv6 address on the bridge, when a v6 subnet is configured
    interface: str = ""  # the interface inside the namespace ("eth0")
    host_veth: str = ""  # the host side of the veth pair
    bridge: str = ""

    def port(self, label: str) -> PortMapping:
        """The mapping of `label`; KeyError if the allocation has no such port."""
        for mapping in self.ports:
            if mapping.label == label:
                return mapping
        raise KeyError(label)


@dataclass(frozen=True, slots=True)
class HostNetwork:
    """Nomad's client `host_network "name" { ... }`: a named host address.

    Ports with `host_network = name` are reserved on `address`; `reserved_ports`
    apply to that address on top of the global ones (Nomad merges them down).
    The network named "default" with an empty address is the host address.
    """

    name: str
    address: str = ""
    reserved_ports: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("host_network.name", "must not be empty")
        if self.address:
            object.__setattr__(
                self, "address", _check_ip(f"host_network[{self.name}].address", self.address)
            )
        parse_port_ranges(self.reserved_ports, f"host_network[{self.name}].reserved_ports")


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The host side of netsetup.  Defaults mirror Nomad's (DESIGN.md)."""

    bridge: str = "nomad"
    subnet: str = "172.26.64.0/20"
    gateway: str = ""  # "" → the first host address of `subnet` (.1)
    subnet6: str = ""  # optional IPv6 subnet for the bridge
    gateway6: str = ""  # "" → the first host address of `subnet6`
    alloc_interface: str = "eth0"  # the interface name inside the namespace
    veth_prefix: str = "wp"  # host-side veth names: prefix + hash of the alloc id
    netns_dir: str = "/var/run/netns"
    nft_table: str = "waypost"
    hairpin: bool = True
    bridge_nf_call_iptables: bool = False
    min_dynamic_port: int = DEFAULT_MIN_DYNAMIC_PORT
    max_dynamic_port: int = DEFAULT_MAX_DYNAMIC_PORT
    reserved_ports: str = ""  # global, "22,80,8500-8600" syntax (Nomad's default: none)
    host_networks: tuple[HostNetwork, ...] = ()
    network_interface: str = ""  # take the host address from this interface
    advertise: str = ""  # or use this address
    data_dir: str = "/var/lib/waypost"

    def __post_init__(self) -> None:
        check_ifname("bridge", self.bridge)
        check_ifname("alloc_interface", self.alloc_interface)
        if self.network_interface:
            check_ifname("network_interface", self.network_interface)
        if not re.match(r"^[A-Za-z0-9]{1,6}$", self.veth_prefix):
            raise SpecError("veth_prefix", "1-6 letters or digits (names must fit 15 chars)")
        net = _check_subnet("subnet", self.subnet, 4)
        object.__setattr__(self, "subnet", str(net))
        object.__setattr__(self, "gateway", _gateway("gateway", net, self.gateway))
        if self.subnet6:
            net6 = _check_subnet("subnet6", self.subnet6, 6)
            object.__setattr__(self, "subnet6", str(net6))
            object.__setattr__(self, "gateway6", _gateway("gateway6", net6, self.gateway6))
        elif self.gateway6:
            raise SpecError("gateway6", "set without subnet6")
        low = _check_port("min_dynamic_port", self.min_dynamic_port)
        high = _check_port("max_dynamic_port", self.max_dynamic_port)
        if low > high:
            raise SpecError("min_dynamic_port", f"min_dynamic_port {low} > max_dynamic_port {high}")
        parse_port_ranges(self.reserved_ports)
        if self.advertise:
            object.__setattr__(self, "advertise", _check_ip("advertise", self.advertise))
        names = [n.name for n in self.host_networks]
        if len(set(names)) != len(names):
            raise SpecError("host_networks", "duplicate host network name")
        if not self.data_dir:
            raise SpecError("data_dir", "must not be empty")

    def host_network(self, name: str) -> HostNetwork | None:
        """The host network called `name` ("" means "default"), if configured."""
        wanted = name or DEFAULT_HOST_NETWORK
        for network in self.host_networks:
            if network.name == wanted:
                return network
        return None


def _check_subnet(
    field: str, value: str, version: int
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise SpecError(field, f"not a subnet: {value!r} ({exc})") from None
    if net.version != version:
        raise SpecError(field, f"must be an IPv{version} subnet, got {value!r}")
    # Room for the gateway and at least one allocation.
    usable = net.num_addresses - (2 if version == 4 else 1)
    if usable < 2:
        raise SpecError(field, f"{value} is too small (gateway plus at least one allocation)")
    return net


def _gateway(field: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network, value: str) -> str:
    if not value:
        return str(net.network_address + 1)
    gw = ipaddress.ip_address(_check_ip(field, value, version=net.version))
    if gw not in net or gw == net.network_address:
        raise SpecError(field, f"{value} is not a host address of {net}")
    if net.version == 4 and gw == net.broadcast_address:
        raise SpecError(field, f"{value} is the broadcast address of {net}")
    return str(gw)


# --- JSON (the state keeps specs and results as JSON) -----------------------------


def render_spec(spec: NetworkSpec) -> dict[str, Any]:
    """`spec` as a JSON-able dict (inverse of :func:`parse_spec`)."""
    out: dict[str, Any] = {
        "mode": spec.mode,
        "ports": [
            {"label": p.label, "static": p.static, "to": p.to, "host_network": p.host_network}
            for p in spec.ports
        ],
    }
    if spec.dns is not None:  # absent otherwise: states written before it read back equal
        dns = spec.dns
        out["dns"] = {
            "servers": list(dns.servers),
            "searches": list(dns.searches),
            "options": list(dns.options),
        }
    return out


def parse_spec(raw: Mapping[str, Any]) -> NetworkSpec:
    """A :class:`NetworkSpec` from a dict shaped like :func:`render_spec`'s output.

    Missing keys take the defaults; unknown keys are rejected (SpecError).
    """
    _only_keys("network", raw, {"mode", "ports", "dns"})
    ports = raw.get("ports", [])
    if not isinstance(ports, list):
        raise SpecError("network.ports", "must be a list")
    parsed: list[PortSpec] = []
    for i, port in enumerate(ports):
        if not isinstance(port, Mapping):
            raise SpecError(f"network.ports[{i}]", "must be an object")
        _only_keys(f"network.ports[{i}]", port, {"label", "static", "to", "host_network"})
        parsed.append(
            PortSpec(
                label=port.get("label", ""),
                static=port.get("static"),
                to=port.get("to", 0),
                host_network=port.get("host_network", ""),
            )
        )
    mode = raw.get("mode", "host")
    if not _is_mode(mode):
        raise SpecError("network.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    return NetworkSpec(mode=mode, ports=tuple(parsed), dns=_parse_dns(raw.get("dns")))


def _parse_dns(raw: object) -> DnsConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SpecError("network.dns", "must be an object")
    _only_keys("network.dns", raw, {"servers", "searches", "options"})
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("servers", "searches", "options"):
        value = raw.get(key, [])
        if not isinstance(value, list):
            raise SpecError(f"network.dns.{key}", "must be a list")
        lists[key] = tuple(value)
    return DnsConfig(**lists)


def render_result(result: AllocNetwork) -> dict[str, Any]:
    """`result` as a JSON-able dict (inverse of :func:`parse_result`)."""
    return {
        "alloc_id": result.alloc_id,
        "mode": result.mode,
        "host_ip": result.host_ip,
        "ports": [
            {
                "label": p.label,
                "host_ip": p.host_ip,
                "host_port": p.host_port,
                "alloc_port": p.alloc_port,
            }
            for p in result.ports
        ],
        "netns": result.netns,
        "alloc_ip": result.alloc_ip,
        "alloc_ip6": result.alloc_ip6,
        "interface": result.interface,
        "host_veth": result.host_veth,
        "bridge": result.bridge,
    }


def parse_result(raw: Mapping[str, Any]) -> AllocNetwork:
    """An :class:`AllocNetwork` from :func:`render_result`'s output; SpecError if malformed."""
    try:
        mode = raw["mode"]
        if not _is_mode(mode):
            raise SpecError("result.mode", f"unknown mode {mode!r}")
        ports = tuple(
            PortMapping(
                label=str(p["label"]),
                host_ip=str(p["host_ip"]),
                host_port=int(p["host_port"]),
                alloc_port=int(p["alloc_port"]),
            )
            for p in raw["ports"]
        )
        return AllocNetwork(
            alloc_id=str(raw["alloc_id"]),
            mode=mode,
            host_ip=str(raw["host_ip"]),
            ports=ports,
            netns=str(raw.get("netns", "")),
            alloc_ip=str(raw.get("alloc_ip", "")),
            alloc_ip6=str(raw.get("alloc_ip6", "")),
            interface=str(raw.get("interface", "")),
            host_veth=str(raw.get("host_veth", "")),
            bridge=str(raw.get("bridge", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError("result", f"malformed allocation result: {exc!r}") from None


def _is_mode(value: object) -> TypeGuard[NetworkMode]:
    return value in MODES


def _only_keys(field: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"{field}.{unknown[0]}", "unknown field")
