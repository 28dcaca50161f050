"""Throwaway namespaces for the firewall and access-scope tests.  Adapter (`ip`, `nft`).

Every namespace is named with the run prefix (``wpt<6 hex>-``) and deleted by the
fixture that made it, and again by :func:`sweep` at the end of the module, even
when a test fails.  Interfaces are created directly inside those namespaces, so
nothing in the machine's own namespace changes.  Servers run as
``ip netns exec NS python access_agent.py serve ...`` children; each one is
stopped by closing its stdin and, if that does not end it, killed by its pid.

The addresses are the documentation range 198.51.100.0/24 between the host and
the external namespace, and the bridge subnet inside the host namespace: every
packet stays inside these namespaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_PREFIX = f"wpt{secrets.token_hex(3)}-"
AGENT = str(Path(__file__).with_name("access_agent.py"))
HOST_IP = "198.51.100.1"  # the host's address on its link to the external namespace
EXTERNAL_IP = "198.51.100.2"
LINK_PREFIX = 24
COMMAND_TIMEOUT = 20.0
SKIP_REASON = "needs root (network namespaces, nftables)"


def is_root() -> bool:
    return os.geteuid() == 0


def sh(
    *argv: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded in time); CalledProcessError with its stderr when it fails."""
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done


def nft_in(ns: str) -> tuple[str, ...]:
    """The command that runs nft inside `ns` (Firewall's nft_command)."""
    return ("ip", "netns", "exec", ns, "nft")


def nft_json(ns: str, *words: str) -> dict[str, Any]:
    doc = json.loads(sh(*nft_in(ns), "-j", *words).stdout)
    assert isinstance(doc, dict)
    return doc


def sweep() -> list[str]:
    """Delete every namespace of this run that is still there; their names."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line]
    left = [n for n in names if n.startswith(RUN_PREFIX)]
    for name in left:
        sh("ip", "netns", "del", name, check=False)
    return left


@dataclass
class Namespaces:
    """Namespaces made by one test, deleted by :meth:`close` (always called)."""

    tag: str
    made: list[str] = field(default_factory=list)

    def add(self, role: str) -> str:
        name = f"{RUN_PREFIX}{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()


def sysctl(ns: str, key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    sh("ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}")


def has_br_netfilter(ns: str) -> bool:
    """Whether br_netfilter's knobs exist in `ns` (never modprobe: that would change
    the machine's own namespace, where bridge-nf-call-iptables defaults to 1)."""
    done = sh("ip", "netns", "exec", ns, "test", "-e", "/proc/sys/net/bridge", check=False)
    return done.returncode == 0


def iptables_nft() -> str | None:
    """The iptables-nft binary, when installed (it writes `table ip filter`)."""
    found = shutil.which("iptables-nft") or shutil.which("iptables-nft", path="/usr/sbin:/sbin")
    return found


def set_forward_drop(ns: str, family: str = "ip") -> str:
    """FORWARD policy DROP in `ns` the way Docker does it: with iptables-nft (or
    ip6tables-nft) when installed, else the same chain written with nft.  Which one."""
    tool = iptables_nft()
    if tool is not None:
        if family == "ip6":
            tool = tool.replace("iptables-nft", "ip6tables-nft")
        sh("ip", "netns", "exec", ns, tool, "-P", "FORWARD", "DROP")
        return Path(tool).name
    script = (
        f"add table {family} filter\n"
        f"add chain {family} filter FORWARD"
        " { type filter hook forward priority filter ; policy drop ; }\n"
    )
    sh(*nft_in(ns), "-f", "-", stdin=script)
    return "nft"


@dataclass
class Server:
    """An access_agent server in a namespace."""

    ns: str
    proc: asyncio.subprocess.Process

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(5.0):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()  # our own child, by its pid
                await self.proc.wait()


async def start_server(ns: str, name: str, listeners: Sequence[str]) -> Server:
    """Serve `listeners` ("ADDR:PORT/tcp|udp") in `ns`; returns once they are bound."""
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        AGENT,
        "serve",
        name,
        *listeners,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    server = Server(ns, proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            line = await proc.stdout.readline()
        if line.strip() != b"READY":
            err = await proc.stderr.read()
            raise AssertionError(f"server {name} in {ns} did not start: {line!r} {err!r}")
    except BaseException:
        await server.close()
        raise
    return server


async def probe(ns: str, probes: Sequence[tuple[str, str, int]], wait: float = 1.0) -> list[str]:
    """Run `probes` ((proto, host, port)) concurrently from `ns`: each answer's text
    ("NAME PEER-IP") or "" when nothing answered."""
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        AGENT,
        "probe",
        str(wait),
        json.dumps([list(p) for p in probes]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    results = json.loads(out)
    return [r["reply"] if r["ok"] else "" for r in results]


# --- a hand-built host: bridge, allocations, external peer ------------------------------

BRIDGE = "nomad"
GATEWAY = "172.26.64.1"
BRIDGE_PREFIX = 20
# IPv6: documentation range on the host's link, a ULA subnet on the bridge
HOST_IP6 = "2001:db8:100::1"
EXTERNAL_IP6 = "2001:db8:100::2"
SUBNET6 = "fd00:26::/64"
GATEWAY6 = "fd00:26::1"


@dataclass(frozen=True)
class Topology:
    """A host namespace with a bridge, allocation namespaces on it, an external peer."""

    host: str
    external: str
    allocs: dict[str, str]  # role -> namespace
    alloc_ips: dict[str, str]  # role -> address on the bridge


def build_topology(
    spaces: Namespaces, roles: Sequence[str], *, br_netfilter: bool, ipv6: bool = False
) -> Topology:
    """What links.py makes, by hand with `ip`: the external peer routes the bridge
    subnet via the host, so "not reachable from outside" is the firewall's doing."""
    host, external = spaces.add("h"), spaces.add("e")
    sh(
        "ip",
        "-n",
        host,
        "link",
        "add",
        "x0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        external,
    )
    sh("ip", "-n", host, "addr", "add", f"{HOST_IP}/{LINK_PREFIX}", "dev", "x0")
    sh("ip", "-n", host, "link", "set", "x0", "up")
    sh("ip", "-n", external, "addr", "add", f"{EXTERNAL_IP}/{LINK_PREFIX}", "dev", "eth0")
    sh("ip", "-n", external, "link", "set", "eth0", "up")
    sh("ip", "-n", external, "route", "add", "default", "via", HOST_IP)
    sh("ip", "-n", host, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", host, "addr", "add", f"{GATEWAY}/{BRIDGE_PREFIX}", "dev", BRIDGE)
    sh("ip", "-n", host, "link", "set", BRIDGE, "up")
    sysctl(host, "net.ipv4.ip_forward", "1")
    sysctl(host, f"net.ipv4.conf.{BRIDGE}.route_localnet", "1")
    if has_br_netfilter(host):
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            sysctl(host, f"net.bridge.{key}", "1" if br_netfilter else "0")
    if ipv6:
        sysctl(host, "net.ipv6.conf.all.forwarding", "1")
        _addr6(host, "x0", f"{HOST_IP6}/64")
        _addr6(external, "eth0", f"{EXTERNAL_IP6}/64")
        sh("ip", "-n", external, "-6", "route", "add", "default", "via", HOST_IP6)
        _addr6(host, BRIDGE, f"{GATEWAY6}/64")
    allocs, ips = {}, {}
    for i, role in enumerate(roles):
        ns, ip, port = spaces.add(role), f"172.26.64.{i + 2}", f"v{i}"
        sh(
            "ip",
            "-n",
            host,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        sh("ip", "-n", host, "link", "set", port, "master", BRIDGE)
        sh("ip", "-n", host, "link", "set", port, "type", "bridge_slave", "hairpin", "on")
        sh("ip", "-n", host, "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{BRIDGE_PREFIX}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY)
        if ipv6:
            _addr6(ns, "eth0", f"fd00:26::{i + 2}/64")
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", GATEWAY6)
        allocs[role], ips[role] = ns, ip
    return Topology(host, external, allocs, ips)


def _addr6(ns: str, dev: str, address: str) -> None:
    """An IPv6 address usable at once (no duplicate address detection)."""
    sh("ip", "-n", ns, "-6", "addr", "add", address, "dev", dev, "nodad")
