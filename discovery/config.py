"""Agent configuration: validate raw config trees into an :class:`AgentConfig`.  Pure: no I/O.

Reading files is :mod:`discovery.hclfile`'s job; it hands over one
:class:`RawFile` per file (plain dicts, lists and scalars, plus the line of
each path).  Here each file is validated on its own into flat settings
(``"dns.soa.refresh" -> 10``) and service definitions, then the files are
layered in order: a later file's setting overrides an earlier one key by key
(so nested blocks like ``dns`` merge), ``service`` blocks accumulate.  CLI
:class:`Overrides` come last.

Keys follow Consul's and Nomad's HCL (snake_case, case-sensitive); unknown
keys are an error, as in Consul.  Every error is a
:class:`~discovery.errors.ConfigError` naming the file, the line when known
and the key (``services.hcl:12: service[1].port: 70000 is out of range 0-65535``);
block indexes count from 0 within one file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from discovery.acl import AclSettings, parse_default_policy, parse_tokens
from discovery.dns.forward import DNS_PORT, parse_recursor
from discovery.dns.settings import DnsSettings, SoaSettings
from discovery.durations import duration_ns, positive_seconds
from discovery.errors import ConfigError, ValidationError
from discovery.model import (
    EMPTY_META,
    EMPTY_PORTS,
    MAX_LABEL,
    Check,
    CheckKind,
    Health,
    Instance,
    Node,
    Weights,
    check_address,
    check_int,
    check_label,
    check_port,
    is_label,
    make_check,
    make_instance,
    worst_health,
)
from netsetup.errors import SpecError
from netsetup.spec import HostNetwork, NetConfig, parse_port_ranges

DEFAULT_DOMAIN = "nomad."
DEFAULT_BIND = "127.0.0.1"
DEFAULT_DNS_PORT = 8600  # Consul's DNS port
DEFAULT_HTTP_PORT = 4646  # Nomad's HTTP port
DEV_DATA_DIR = "./data"
DATA_DIR = "/var/lib/waypost"
SOURCE = "config"  # Instance.source of services defined in config files
DEFAULT_CHECK_TIMEOUT = 10.0  # Consul's default for HTTP and TCP checks
MAX_TTL = 2**31 - 1  # RFC 2181 section 8: TTLs are 31-bit
MAX_NAME = 253  # RFC 1035 section 2.3.4, in presentation form without the root dot

_TTL_PATTERN = re.compile(r"(?:\*|[a-z0-9][a-z0-9-]*\*?)")


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawFile:
    """One config file as read: plain data and the line of each path (``service[1].port``)."""

    path: str
    data: Mapping[str, object]
    lines: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def line_of(self, where: str) -> int | None:
        """The line of `where`, else of its closest enclosing path that has one."""
        while where:
            line = self.lines.get(where)
            if line is not None:
                return line
            cut = max(where.rfind("."), where.rfind("["))
            where = where[:cut] if cut > 0 else ""
        return None

    def error(self, key: str, message: str, where: str | None = None) -> ConfigError:
        """A ConfigError for `key` in this file; `where` is its path in the data if different."""
        return ConfigError(self.path, message, line=self.line_of(where or key), key=key)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags; they win over every config file.

    Except the environment's CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN (read by the
    CLI), which are defaults of the `consul` block: its own keys win.
    """

    dev: bool = False
    dns_addr: Endpoint | None = None
    http_addr: Endpoint | None = None
    data_dir: str | None = None
    consul_http_addr: str = ""
    consul_http_token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """A validated `service` block; :func:`service_instances` places it on a node."""

    name: str
    id: str
    address: str = ""  # "" means the node's address (Consul)
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_META, hash=False)
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY_PORTS, hash=False)
    weights: Weights = field(default_factory=Weights)
    checks: tuple[Check, ...] = ()
    origin: str = ""  # "file:line", for messages

    @property
    def initial_health(self) -> Health:
        """The worst initial status of its checks; passing without checks."""
        return worst_health(self.checks)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs to start, after defaults and overrides."""

    node_name: str
    node_address: str  # advertise_addr, else a specific bind_addr, else 127.0.0.1
    bind_addr: str
    advertise_addr: str  # "" when not configured
    dns_addr: Endpoint
    http_addr: Endpoint
    data_dir: str
    dns: DnsSettings
    services: tuple[ServiceDefinition, ...] = ()
    files: tuple[str, ...] = ()
    acl: AclSettings = field(default_factory=AclSettings)
    consul: MirrorSettings | None = None  # the Consul mirror; None: no `consul` block
    client: NetConfig = field(default_factory=NetConfig)  # allocation networking (jobs)
    dev: bool = False  # --dev: tasks are stopped with the agent

    @property
    def datacenter(self) -> str:
        return self.dns.datacenter

    @property
    def domain(self) -> str:
        return self.dns.domain

    @property
    def node(self) -> Node:
        """The local node (datacenter "" means the local one, as for instances)."""
        return Node(name=self.node_name, address=self.node_address)


def service_instances(services: Iterable[ServiceDefinition], node: Node) -> tuple[Instance, ...]:
    """The registry instances of configured services on `node` (source "config")."""
    return tuple(
        make_instance(
            service=s.name,
            id=s.id,
            node=node.name,
            address=s.address or node.address,
            port=s.port,
            tags=s.tags,
            meta=s.meta,
            ports=s.ports,
            weights=s.weights,
            source=SOURCE,
            checks=s.checks,
        )
        for s in services
    )


def node_name_from_hostname(hostname: str) -> str:
    """The host name's first label as an RFC 1123 label ("localhost" if nothing is left)."""
    first = hostname.split(".", 1)[0].lower()
    cleaned = re.sub(r"[^a-z0-9-]+", "-", first)[:MAX_LABEL].strip("-")
    return cleaned if is_label(cleaned) else "localhost"


def parse_endpoint(text: str, fieldname: str = "address") -> Endpoint:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` with an IP literal host."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValidationError(fieldname, f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValidationError(fieldname, f"{text!r}: write an IPv6 host as [addr]:port")
    return Endpoint(check_address(host, fieldname), check_port(int(port), fieldname))


# -- values ----------------------------------------------------------------------


def _seconds(value: object, fieldname: str) -> int:
    """A whole number of seconds (TTLs are integers on the wire), 0 to 2^31-1."""
    ns = duration_ns(value, fieldname)
    if ns % 10**9:
        raise ValidationError(fieldname, f"{value!r} is not a whole number of seconds")
    if ns // 10**9 > MAX_TTL:
        raise ValidationError(fieldname, f"{value!r} is longer than {MAX_TTL} seconds")
    return ns // 10**9


def _bool(value: object, fieldname: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(fieldname, "must be true or false")
    return value


def _string(value: object, fieldname: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be a non-empty string")
    return value


def _list(value: object, fieldname: str) -> list[object]:
    if not isinstance(value, list):
        raise ValidationError(fieldname, "must be a list")
    return value


def _domain(value: object, fieldname: str) -> str:
    """A zone name, returned absolute and lower case ("nomad" -> "nomad.")."""
    name = _string(value, fieldname).lower().removesuffix(".")
    if not name or len(name) > MAX_NAME or not all(is_label(lab) for lab in name.split(".")):
        raise ValidationError(fieldname, f"{value!r} is not a valid domain name")
    return name + "."


def _domains(value: object, fieldname: str) -> tuple[str, ...]:
    items = _list(value, fieldname)
    out = tuple(_domain(v, f"{fieldname}[{i}]") for i, v in enumerate(items))
    if len(set(out)) != len(out):
        raise ValidationError(fieldname, "lists a domain twice")
    return out


def _address(value: object, fieldname: str) -> str:
    return check_address(value, fieldname)


def _service_ttl(value: object, fieldname: str) -> Mapping[str, int]:
    """One duration for every service, or Consul's map of name / "prefix*" / "*" to durations."""
    if not isinstance(value, Mapping):
        return MappingProxyType({"*": _seconds(value, fieldname)})
    out: dict[str, int] = {}
    for pattern, ttl in value.items():
        key = str(pattern).lower()
        if not _TTL_PATTERN.fullmatch(key) or len(key) > MAX_LABEL + 1:
            raise ValidationError(
                f"{fieldname}.{pattern}", 'must be a service name, "prefix*" or "*"'
            )
        out[key] = _seconds(ttl, f"{fieldname}.{pattern}")
    return MappingProxyType(out)


def _recursor(value: object, fieldname: str) -> str:
    """ "ip" or "ip:port" / "[v6]:port", canonical."""
    text = _string(value, fieldname)
    try:
        host, port = parse_recursor(text)
    except ValueError as exc:
        raise ValidationError(fieldname, str(exc)) from None
    return host if port == DNS_PORT else str(Endpoint(host, port))


def _recursors(value: object, fieldname: str) -> tuple[str, ...]:
    return tuple(_recursor(v, f"{fieldname}[{i}]") for i, v in enumerate(_list(value, fieldname)))


def _networks(
    value: object, fieldname: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for i, item in enumerate(_list(value, fieldname)):
        try:
            out.append(ipaddress.ip_network(_string(item, f"{fieldname}[{i}]"), strict=False))
        except ValueError:
            raise ValidationError(f"{fieldname}[{i}]", f"{item!r} is not a CIDR network") from None
    return tuple(out)


def _ranged(low: int, high: int) -> Callable[[object, str], int]:
    return lambda value, fieldname: check_int(value, fieldname, low, high)


# -- the consul block: the Consul mirror (discovery.mirror) -------------------------

CONSUL_PORT = 8500  # Consul's HTTP port
CONSUL_SCHEMES = ("http", "https")
MAX_CONSUL_TOKEN = 256  # Consul's are UUIDs (36 characters)


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    """`consul { address, token, datacenter, push, pull, services }`.

    Push registers this agent's instances with the Consul agent at `address`
    (in that agent's datacenter); pull reads `datacenter`'s catalog (the Consul
    agent's own when ""), every service or only `services`.  A block with
    just an address (or none: CONSUL_HTTP_ADDR, else 127.0.0.1:8500) does both.
    """

    host: str = "127.0.0.1"  # an IP literal or a DNS name
    port: int = CONSUL_PORT
    scheme: str = "http"
    token: str = field(default="", repr=False)  # a secret: never in reprs or logs
    datacenter: str = ""
    push: bool = True
    pull: bool = True
    services: tuple[str, ...] = ()  # pulled services; empty: all of them

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_consul_address(text: str, fieldname: str = "consul.address") -> tuple[str, str, int]:
    """(scheme, host, port) of "host:port", "[v6]:port", "host", optionally after "http(s)://"."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme.lower() not in CONSUL_SCHEMES:
        raise ValidationError(fieldname, f"{text!r}: the scheme must be http or https")
    rest = rest.removesuffix("/")
    if not rest or any(c in rest for c in "/?#@ "):
        raise ValidationError(fieldname, f"{text!r} is not [http(s)://]HOST[:PORT]")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        host = check_address(host, fieldname)
        port = tail.removeprefix(":") if tail.startswith(":") else tail or str(CONSUL_PORT)
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, str(CONSUL_PORT)
        if ":" in host:
            raise ValidationError(fieldname, f"{text!r}: write an IPv6 host as [addr]:port")
        if not _is_hostname(host):
            raise ValidationError(fieldname, f"{text!r}: {host!r} is not an address or host name")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValidationError(fieldname, f"{text!r}: the port must be 1-65535")
    return scheme.lower(), host, int(port)


def _is_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        name = host.removesuffix(".")
        return bool(name) and len(name) <= MAX_NAME and all(map(is_label, name.split(".")))


def _consul_address(value: object, fieldname: str) -> tuple[str, str, int]:
    return parse_consul_address(_string(value, fieldname), fieldname)


def _consul_token(value: object, fieldname: str) -> str:
    """A secret: the message never repeats it."""
    if not isinstance(value, str) or not value:
        raise ValidationError(fieldname, "must be a non-empty string")
    if len(value) > MAX_CONSUL_TOKEN or any(ord(c) < 33 for c in value):
        raise ValidationError(
            fieldname, f"must be at most {MAX_CONSUL_TOKEN} printable characters, no spaces"
        )
    return value


def _consul_services(value: object, fieldname: str) -> tuple[str, ...]:
    names = [check_label(v, f"{fieldname}[{i}]") for i, v in enumerate(_list(value, fieldname))]
    if len({n.lower() for n in names}) != len(names):
        raise ValidationError(fieldname, "lists a service twice")
    return tuple(names)


# -- the client block: allocation networking for jobs (netsetup's NetConfig) --------
#
# Nomad's client option names (https://developer.hashicorp.com/nomad/docs/configuration/client)
# mapped onto netsetup.spec.NetConfig fields.
CLIENT_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "client.network_interface": "network_interface",
        "client.min_dynamic_port": "min_dynamic_port",
        "client.max_dynamic_port": "max_dynamic_port",
        "client.reserved.reserved_ports": "reserved_ports",
        "client.bridge_network_name": "bridge",
        "client.bridge_network_subnet": "subnet",
        "client.bridge_network_subnet_ipv6": "subnet6",
        "client.bridge_network_hairpin_mode": "hairpin",
    }
)
_HOST_NETWORK = "client.host_network"
_HOST_NETWORK_KEYS = frozenset({"name", "cidr", "address", "reserved_ports"})


def _port_ranges(value: object, fieldname: str) -> str:
    """Nomad's "22,80,8500-8600" port list, as given (validated)."""
    if not isinstance(value, str):
        raise ValidationError(fieldname, 'must be a string like "22,80,8500-8600"')
    try:
        parse_port_ranges(value, fieldname)
    except SpecError as err:
        raise ValidationError(fieldname, err.message) from None
    return value


def _host_address(obj: Mapping[str, object], fieldname: str) -> str:
    """A host network's address: `address`, or a `cidr` of one host (/32, /128)."""
    if "address" in obj:
        return check_address(obj["address"], f"{fieldname}.address")
    cidr = obj.get("cidr")
    if cidr is None:
        return ""
    try:
        net = ipaddress.ip_network(_string(cidr, f"{fieldname}.cidr"), strict=True)
    except ValueError:
        raise ValidationError(f"{fieldname}.cidr", f"{cidr!r} is not a CIDR network") from None
    if net.num_addresses != 1:
        raise ValidationError(
            f"{fieldname}.cidr",
            f"{cidr!r}: waypost takes one address (a /32 or /128, or `address`), not a range",
        )
    return str(net.network_address)


def _host_networks(raw: RawFile, value: object, where: str, key: str) -> list[HostNetwork]:
    """Host networks keyed by name: `host_network "public" { ... }` (Nomad's form;
    hclfile gives it as JSON's `{"public": {...}}`) or `host_network { name = "public" }`."""
    out = []
    for bw, block in _objects(raw, value, where, key):
        named = [(bw, block)] if "name" in block else []
        if not named:
            for label, body in block.items():
                if not isinstance(body, Mapping):
                    raise raw.error(f"{key}.{label}", "must be a block (an object)", bw)
                if "name" in body:
                    raise raw.error(f"{key}.name", f"is given by the label {label!r}", bw)
                named.append((f"{bw}.{label}", {"name": label, **body}))
        for nw, obj in named:
            for name in obj:
                if name not in _HOST_NETWORK_KEYS:
                    raise raw.error(f"{key}.{name}", "unknown key", nw)
            try:
                label = _string(obj["name"], f"{key}.name")
                out.append(
                    HostNetwork(
                        name=label,
                        address=_host_address(obj, key),
                        reserved_ports=_port_ranges(
                            obj.get("reserved_ports", ""), f"{key}.reserved_ports"
                        ),
                    )
                )
            except ValidationError as err:
                attribute = f"{nw}.{err.field.rpartition('.')[2]}"  # its line, else the block's
                raise raw.error(err.field, err.message, attribute) from None
            except SpecError as err:
                raise raw.error(key, err.message, nw) from None
    return out


def _client_config(settings: Mapping[str, _Setting], data_dir: str, advertise: str) -> NetConfig:
    """netsetup's NetConfig from the `client` settings; ConfigError naming the key."""
    fields: dict[str, Any] = {
        name: settings[key].value for key, name in CLIENT_FIELDS.items() if key in settings
    }
    networks = [
        s.value
        for key, s in sorted(settings.items())
        if key.startswith(_HOST_NETWORK + ".") and isinstance(s.value, HostNetwork)
    ]
    try:
        return NetConfig(
            **fields, host_networks=tuple(networks), advertise=advertise, data_dir=data_dir
        )
    except SpecError as err:
        by_field = {name: key for key, name in CLIENT_FIELDS.items()}
        key = by_field.get(err.field.partition(".")[0], "client")
        found = settings.get(key) or settings.get("client")
        if found is None:
            raise ConfigError("config", err.message, key=key) from None
        raise found.raw.error(key, err.message, found.where) from None


# -- the schema ------------------------------------------------------------------

# Blocks whose keys merge one by one across files (HCL blocks or JSON objects).
_SECTIONS = frozenset(
    {"ports", "addresses", "dns", "dns.soa", "acl", "consul", "client", "client.reserved"}
)
# Sections whose presence alone means something (`consul {}` turns the mirror on).
_PRESENT = frozenset({"consul"})
# Every other setting: dotted key -> validator returning the value to keep.
_SETTINGS: Mapping[str, Callable[[Any, str], object]] = {
    "datacenter": lambda value, fieldname: check_label(value, fieldname).lower(),
    "domain": _domain,
    "alt_domains": _domains,
    "node_name": check_label,
    "bind_addr": _address,
    "advertise_addr": _address,
    "data_dir": _string,
    "ports.dns": check_port,
    "ports.http": check_port,
    "addresses.dns": _address,
    "addresses.http": _address,
    "dns.service_ttl": _service_ttl,
    "dns.node_ttl": _seconds,
    "dns.soa.refresh": _seconds,
    "dns.soa.retry": _seconds,
    "dns.soa.expire": _seconds,
    "dns.soa.min_ttl": _seconds,
    "dns.only_passing": _bool,
    "dns.udp_answer_limit": _ranged(1, 65535),
    "dns.enable_truncate": _bool,
    "dns.recursors": _recursors,
    "dns.recursor_timeout": positive_seconds,
    "dns.allow_recursion_from": _networks,
    "dns.edns_max_payload": _ranged(512, 65535),  # RFC 6891 section 6.2.5: below 512 means 512
    "dns.tcp_idle_timeout": positive_seconds,
    "dns.cache_max_bytes": _ranged(0, 1 << 40),  # octets; 0 keeps nothing
    "dns.tcp_max_per_client": _ranged(1, 65535),
    "acl.enabled": _bool,
    "acl.default_policy": parse_default_policy,
    "acl.tokens": parse_tokens,
    "consul.address": _consul_address,
    "consul.token": _consul_token,
    "consul.datacenter": lambda value, fieldname: check_label(value, fieldname).lower(),
    "consul.push": _bool,
    "consul.pull": _bool,
    "consul.services": _consul_services,
    "client.network_interface": _string,
    "client.min_dynamic_port": check_port,
    "client.max_dynamic_port": check_port,
    "client.reserved.reserved_ports": _port_ranges,
    "client.bridge_network_name": _string,
    "client.bridge_network_subnet": _string,
    "client.bridge_network_subnet_ipv6": _string,
    "client.bridge_network_hairpin_mode": _bool,
}
# Config keys whose DnsSettings field has another name.
_DNS_FIELD = {"allow_recursion_from": "recursion_allowed"}
_SERVICE_BLOCKS = ("service", "services")  # Consul accepts both spellings
_SERVICE_OBJECTS = ("meta", "ports", "weights")  # blocks that merge inside a service
# Blocks named by their key alone in messages (several of them merge into one).
_MERGED = _SECTIONS | {f"{s}.{o}" for s in _SERVICE_BLOCKS for o in _SERVICE_OBJECTS}
_SERVICE_KEYS = frozenset(
    {"name", "id", "tags", "address", "port", "meta", "weights", "ports", "check", "checks"}
)
_CHECK_KEYS = frozenset(
    {"id", "name", "ttl", "http", "tcp", "interval", "timeout", "status"}
    | {"deregister_critical_service_after"}
)


def key_of(where: str) -> str:
    """The key that names path `where` in messages: merged blocks lose their index.

    ``dns[0].soa[1].retry`` is ``dns.soa.retry``; ``service[2].weights[0].passing``
    is ``service[2].weights.passing`` (services stay apart, so they keep theirs).
    """
    parts: list[str] = []
    names: list[str] = []
    for part in where.split("."):
        name = part.partition("[")[0]
        names.append(name)
        parts.append(name if ".".join(names) in _MERGED else part)
    return ".".join(parts)


# -- one file ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setting:
    """A validated value and where it was set, for errors found after merging."""

    value: object
    raw: RawFile
    where: str


@dataclass(frozen=True, slots=True)
class _Service:
    definition: ServiceDefinition
    raw: RawFile
    where: str
    check_paths: tuple[str, ...]


@dataclass(slots=True)
class _Layer:
    """What one file sets: flat dotted settings and its services, in order."""

    settings: dict[str, _Setting] = field(default_factory=dict)
    services: list[_Service] = field(default_factory=list)


def _origin(raw: RawFile, where: str) -> str:
    line = raw.line_of(where)
    return f"{raw.path}:{line}" if line else raw.path


def _objects(
    raw: RawFile, value: object, where: str, key: str
) -> list[tuple[str, Mapping[str, object]]]:
    """A block: an object, or a list of objects (repeated HCL blocks) with their paths."""
    if isinstance(value, Mapping):
        return [(where, value)]
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        return [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    raise raw.error(key, "must be a block (an object)", where)


def _merged(raw: RawFile, value: object, where: str) -> dict[str, object] | None:
    """An object given as one or several blocks, merged; None when absent."""
    if value is None:
        return None
    out: dict[str, object] = {}
    for _, obj in _objects(raw, value, where, where):
        out.update(obj)
    return out


def _walk(raw: RawFile, obj: Mapping[str, object], where: str, key: str, layer: _Layer) -> None:
    for name, value in obj.items():
        w = f"{where}.{name}" if where else str(name)
        k = f"{key}.{name}" if key else str(name)
        if not key and name in _SERVICE_BLOCKS:
            # Services do not merge, so their keys are their paths in this file.
            for sw, svc in _objects(raw, value, w, k):
                layer.services.append(_parse_service(raw, svc, sw))
        elif k == _HOST_NETWORK:
            for network in _host_networks(raw, value, w, k):
                layer.settings[f"{k}.{network.name}"] = _Setting(network, raw, w)
        elif k in _SECTIONS:
            if k in _PRESENT:
                layer.settings[k] = _Setting(True, raw, w)
            for sw, section in _objects(raw, value, w, k):
                _walk(raw, section, sw, k, layer)
        elif k in _SETTINGS:
            try:
                checked = _SETTINGS[k](value, k)
            except ValidationError as err:
                raise raw.error(err.field, err.message, w) from None
            layer.settings[k] = _Setting(checked, raw, w)
        else:
            raise raw.error(k, "unknown key", w)


def _parse_file(raw: RawFile) -> _Layer:
    """Validate one file on its own."""
    layer = _Layer()
    _walk(raw, raw.data, "", "", layer)
    return layer


def _parse_service(raw: RawFile, obj: Mapping[str, object], where: str) -> _Service:
    for name in obj:
        if name not in _SERVICE_KEYS:
            raise raw.error(f"{where}.{name}", "unknown key")
    address = obj.get("address") or ""
    try:
        inst = make_instance(
            service=obj.get("name"),
            id=obj.get("id"),
            node="localhost",  # placeholder: the node is known once every file is read
            address=address or DEFAULT_BIND,
            port=obj.get("port", 0),
            tags=obj.get("tags"),
            meta=_merged(raw, obj.get("meta"), f"{where}.meta"),
            ports=_merged(raw, obj.get("ports"), f"{where}.ports"),
            weights=_merged(raw, obj.get("weights"), f"{where}.weights"),
        )
    except ValidationError as err:
        key = f"{where}.{'name' if err.field == 'service' else err.field}"
        raise raw.error(key, err.message) from None
    blocks = [
        item
        for name in ("check", "checks")
        if name in obj
        for item in _objects(raw, obj[name], f"{where}.{name}", f"{where}.{name}")
    ]
    checks = tuple(
        _parse_check(raw, check, cwhere, inst, n if len(blocks) > 1 else 0)
        for n, (cwhere, check) in enumerate(blocks, 1)
    )
    definition = ServiceDefinition(
        name=inst.service,
        id=inst.id,
        address=inst.address if address else "",
        port=inst.port,
        tags=inst.tags,
        meta=inst.meta,
        ports=inst.ports,
        weights=inst.weights,
        checks=checks,
        origin=_origin(raw, where),
    )
    return _Service(definition, raw, where, tuple(cwhere for cwhere, _ in blocks))


def _parse_check(
    raw: RawFile, obj: Mapping[str, object], where: str, service: Instance, number: int
) -> Check:
    """A Consul check block; `number` (1-based, 0 if it is the only one) makes the default id."""
    for name in obj:
        if name not in _CHECK_KEYS:
            raise raw.error(f"{where}.{name}", "unknown key")
    kinds = [kind for kind in CheckKind if kind.value in obj]
    if len(kinds) != 1:
        raise raw.error(where, "a check needs exactly one of ttl, http or tcp")
    kind = kinds[0]
    timed = kind is not CheckKind.TTL
    suffix = f":{number}" if number else ""
    try:
        for name in ("interval", "timeout"):
            if name in obj and not timed:
                raise ValidationError(name, "is for http and tcp checks only")
        if timed and "interval" not in obj:
            raise ValidationError("interval", f"is required for {kind} checks")
        dereg = obj.get("deregister_critical_service_after")
        return make_check(
            id=obj.get("id", f"service:{service.id}{suffix}"),
            name=obj.get("name", f"Service '{service.service}' check"),
            kind=kind,
            target=obj.get(kind.value, ""),
            ttl=positive_seconds(obj["ttl"], "ttl") if not timed else 0.0,
            interval=positive_seconds(obj["interval"], "interval") if timed else 0.0,
            timeout=(
                positive_seconds(obj.get("timeout", DEFAULT_CHECK_TIMEOUT), "timeout")
                if timed
                else 0.0
            ),
            deregister_after=(
                None
                if dereg is None
                else positive_seconds(dereg, "deregister_critical_service_after")
            ),
            status=obj.get("status"),
        )
    except ValidationError as err:
        raise raw.error(err.within(where).field, err.message) from None


def _name(value: object, fieldname: str) -> str:
    text = _string(value, fieldname)
    if any(ord(c) < 32 for c in text) or len(text) > 255:
        raise ValidationError(fieldname, "must be at most 255 printable characters")
    return text


# -- all files ---------------------------------------------------------------------


def parse_config(
    files: Sequence[RawFile], overrides: Overrides = Overrides(), *, hostname: str = "localhost"
) -> AgentConfig:
    """Layer `files` in order, then `overrides`, over the defaults.

    `hostname` gives the default node name.  Error handling: the first problem
    raises ConfigError; nothing is partially applied.
    """
    settings: dict[str, _Setting] = {}
    services: list[_Service] = []
    for raw in files:
        layer = _parse_file(raw)
        settings.update(layer.settings)
        services.extend(layer.services)
    _check_unique(services)
    values = {key: s.value for key, s in settings.items()}
    domain = str(values.get("domain", DEFAULT_DOMAIN))
    if domain in values.get("alt_domains", ()):  # type: ignore[operator]
        alt = settings["alt_domains"]
        raise alt.raw.error("alt_domains", f"{domain!r} is the domain already", alt.where)
    bind = str(values.get("bind_addr", DEFAULT_BIND))
    advertise = str(values.get("advertise_addr", ""))
    if advertise and ipaddress.ip_address(advertise).is_unspecified:
        where = settings["advertise_addr"]
        raise where.raw.error(
            "advertise_addr", f"{advertise!r} cannot be advertised; give this host's address"
        )
    node_address = advertise or (
        bind if not ipaddress.ip_address(bind).is_unspecified else DEFAULT_BIND
    )
    node_name = str(values.get("node_name") or node_name_from_hostname(hostname))
    data_dir = overrides.data_dir or str(
        values.get("data_dir") or (DEV_DATA_DIR if overrides.dev else DATA_DIR)
    )
    dns = _dns_settings(values, domain=domain, node_name=node_name, node_address=node_address)
    return AgentConfig(
        node_name=node_name,
        node_address=node_address,
        bind_addr=bind,
        advertise_addr=advertise,
        dns_addr=overrides.dns_addr or _endpoint(values, "dns", bind, DEFAULT_DNS_PORT),
        http_addr=overrides.http_addr or _endpoint(values, "http", bind, DEFAULT_HTTP_PORT),
        data_dir=data_dir,
        dns=dns,
        services=tuple(s.definition for s in services),
        files=tuple(raw.path for raw in files),
        acl=_acl_settings(values),
        consul=_mirror_settings(values, overrides),
        client=_client_config(
            settings,
            data_dir,
            # Nomad -dev puts allocations on the loopback interface; so does --dev here.
            advertise
            or (node_address if overrides.dev and "client.network_interface" not in values else ""),
        ),
        dev=overrides.dev,
    )


def _acl_settings(values: Mapping[str, object]) -> AclSettings:
    acl: dict[str, Any] = {k[4:]: v for k, v in values.items() if k.startswith("acl.")}
    return AclSettings(**acl)


def _endpoint(values: Mapping[str, object], name: str, bind: str, port: int) -> Endpoint:
    host = values.get(f"addresses.{name}", bind)
    number = values.get(f"ports.{name}", port)
    assert isinstance(host, str) and isinstance(number, int)
    return Endpoint(host, number)


def _dns_settings(values: Mapping[str, object], **top: Any) -> DnsSettings:
    soa: dict[str, Any] = {
        k.removeprefix("dns.soa."): v for k, v in values.items() if k.startswith("dns.soa.")
    }
    dns: dict[str, Any] = {
        _DNS_FIELD.get(name, name): v
        for k, v in values.items()
        if k.startswith("dns.") and "." not in (name := k.removeprefix("dns."))
    }
    if "datacenter" in values:
        top["datacenter"] = values["datacenter"]
    if "alt_domains" in values:
        top["alt_domains"] = values["alt_domains"]
    return DnsSettings(soa=SoaSettings(**soa), **dns, **top)


def _check_unique(services: Sequence[_Service]) -> None:
    """Service ids and check ids are unique across all files (Consul keys both by id)."""
    seen: dict[str, str] = {}
    checks: dict[str, str] = {}
    for svc in services:
        ident = svc.definition.id
        if ident in seen:
            raise svc.raw.error(
                f"{svc.where}.id",
                f"service id {ident!r} is already defined at {seen[ident]}"
                " (give each instance its own id)",
            )
        seen[ident] = svc.definition.origin
        for check, where in zip(svc.definition.checks, svc.check_paths, strict=True):
            if check.id in checks:
                raise svc.raw.error(
                    f"{where}.id", f"check id {check.id!r} is already defined at {checks[check.id]}"
                )
            checks[check.id] = _origin(svc.raw, where)


def _mirror_settings(values: Mapping[str, object], overrides: Overrides) -> MirrorSettings | None:
    """The mirror's settings when there is a `consul` block (None also when push and pull are off).

    The block's address and token win over CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN.
    """
    if "consul" not in values:
        return None
    push, pull = values.get("consul.push", True), values.get("consul.pull", True)
    if not push and not pull:
        return None
    address = values.get("consul.address")
    if not isinstance(address, tuple):
        try:
            address = parse_consul_address(
                overrides.consul_http_addr or f"127.0.0.1:{CONSUL_PORT}", "CONSUL_HTTP_ADDR"
            )
        except ValidationError as err:
            raise ConfigError("environment", err.message, key=err.field) from None
    scheme, host, port = address
    services = values.get("consul.services", ())
    assert isinstance(services, tuple)
    return MirrorSettings(
        host=str(host),
        port=int(port),
        scheme=str(scheme),
        token=str(values.get("consul.token") or overrides.consul_http_token),
        datacenter=str(values.get("consul.datacenter", "")),
        push=bool(push),
        pull=bool(pull),
        services=services,
    )
