"""The resolv.conf a bridge allocation's tasks see.  Pure: no I/O but the two named readers.

Nomad's rules, from its source:

- client/allocrunner/taskrunner (buildTaskConfig): the network's own DNS (Nomad:
  what CNI returned; here: the agent's DNS on the bridge gateway,
  :func:`agent_dns`) is the task's, unless the group's network has a `dns`
  block: then that block is, whole (empty lists included).  Neither: no file
  and no mount (the task sees the host's /etc/resolv.conf, as a host-mode task).
- drivers/shared/resolvconf (GenerateDNSMount): a block with no servers, no
  searches and no options is the host's resolv.conf copied as is; otherwise
  each part the block leaves empty is the host's (its nameservers, its last
  `search` line, its options), and the file is Moby's `Build`: one `nameserver`
  line per server, one `search` line, one `options` line, nothing else.
- lib/resolvconf (Moby's parser): `domain` is an old name of `search`, the last
  `search` line wins, `options` lines add up, an invalid nameserver is
  skipped, `#` and `;` start comments; a search of "." is dropped.  The host's
  file is /etc/resolv.conf, or /run/systemd/resolve/resolv.conf when its only
  nameserver is systemd-resolved's stub 127.0.0.53 (Moby's Path()).

The file is written as `<alloc dir>/alloc/resolv.conf` by the allocation
runner (Nomad's is in the task dir, which belongs to the task's user here) and
bind-mounted over /etc/resolv.conf in each task's own mount namespace
(discovery.tasks.process).

:func:`read_host_resolv_conf` is the only I/O here (a file read).
Error handling: none raised by the pure functions; the reader returns "" when
the host has no resolv.conf (then glibc's defaults apply, as for the host).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from netsetup.spec import DnsConfig

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")
SYSTEMD_STUB = ipaddress.ip_address("127.0.0.53")
FILE_NAME = "resolv.conf"  # in the allocation's shared dir, `alloc/`


@dataclass(frozen=True, slots=True)
class ResolvConf:
    """The parts of a resolv.conf that Nomad's rules use."""

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> ResolvConf:
    """The nameservers, search list and options of `text` (Moby's parser, see above)."""
    servers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0][0] in "#;" or len(fields) < 2:
            continue
        key, words = fields[0], fields[1:]
        if key == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(words[0])))
            except ValueError:
                continue
        elif key in ("search", "domain"):
            searches = words
        elif key == "options":
            options += words
    return ResolvConf(tuple(servers), tuple(searches), tuple(options))


def agent_dns(gateway: str, domain: str) -> DnsConfig:
    """The agent's DNS for bridge allocations: the gateway, `service.<domain>` then `<domain>`."""
    zone = domain.rstrip(".").lower()
    return DnsConfig(servers=(gateway,), searches=(f"service.{zone}", zone))


def task_dns(network_dns: DnsConfig | None, job_dns: DnsConfig | None) -> DnsConfig | None:
    """The task's DNS: the group's `dns` block when there is one, else the network's."""
    return job_dns if job_dns is not None else network_dns


def render_resolv_conf(dns: DnsConfig | None, host_text: str) -> str | None:
    """The task's resolv.conf for `dns` over the host's `host_text`; None: no file at all."""
    if dns is None:
        return None
    if not (dns.servers or dns.searches or dns.options):
        return host_text  # Nomad's copySystemDNS
    host = parse_resolv_conf(host_text)
    servers = dns.servers or host.servers
    searches = tuple(s for s in (dns.searches or host.searches) if s != ".")
    options = dns.options or host.options
    lines = [f"nameserver {s}" for s in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "".join(f"{line}\n" for line in lines)


def host_resolv_path(etc_text: str) -> Path:
    """Which host file holds the real resolvers, given /etc/resolv.conf's text (Moby's Path())."""
    servers = parse_resolv_conf(etc_text).servers
    if len(servers) == 1 and ipaddress.ip_address(servers[0]) == SYSTEMD_STUB:
        return SYSTEMD_RESOLV_CONF
    return HOST_RESOLV_CONF


def read_host_resolv_conf() -> str:
    """The host's resolv.conf text (see :func:`host_resolv_path`); "" when there is none."""
    try:
        text = HOST_RESOLV_CONF.read_text(errors="replace")
        path = host_resolv_path(text)
        return text if path == HOST_RESOLV_CONF else path.read_text(errors="replace")
    except OSError:
        return ""
