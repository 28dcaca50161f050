"""Integration fixtures: real waypost DNS servers on loopback port 0, and real clients.

`start_waypost(settings, instances)` builds a Registry, a Responder and
:func:`discovery.dns.server.start_dns` on 127.0.0.1 port 0 and returns a
:class:`RunningDns`, whose methods query it with dnspython (async, so the
server keeps running in the same loop), raw sockets, or the `dig` binary.
Everything started is closed at the end of the test.

`_netsetup_sees_no_root` (autouse) makes every test here look unprivileged to
netsetup and the agent (`os.geteuid()` answers NOT_ROOT), even when CI runs as root:
netsetup then refuses bridge mode before it touches anything, and the agent never
reconciles allocations (tests/conftest.py checks the namespace on top of that).
Host mode, which only reserves ports, runs for real.  Kernel work is for
tests/netns, inside namespaces of their own.

`no_task_left` (autouse): a test that ran jobs in an agent on `tmp_path` ends
with no task process of those allocations running (found by their
NOMAD_ALLOC_ID in /proc; killed and the test failed if any is left).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from discovery.dns.responder import Responder
from discovery.dns.server import DnsServer, start_dns
from discovery.dns.settings import DnsSettings
from discovery.model import Instance, Node
from discovery.registry import Registry
from discovery.tasks.process import find_marked

LOCAL_NODE = Node("agent", "127.0.0.1")
ALLOC_DIR = "alloc"  # <data dir>/alloc/<alloc id>: where an agent on tmp_path keeps them
NOT_ROOT = 65534  # nobody
CLIENT_TIMEOUT = 2.0  # seconds; every reply on loopback comes in milliseconds
DIG_DEADLINE = 10.0  # seconds for a whole dig run (it retries over TCP on TC)


@dataclass
class DigResult:
    """What `dig` printed, parsed: status, header flags, sections of records, EDNS line."""

    status: str
    flags: set[str]
    sections: dict[str, list[tuple[str, int, str, str, str]]]  # name, ttl, class, type, rdata
    edns: str | None
    text: str

    def records(
        self, section: str, rtype: str | None = None
    ) -> list[tuple[str, int, str, str, str]]:
        return [r for r in self.sections.get(section, []) if rtype is None or r[3] == rtype]


def parse_dig(text: str) -> DigResult:
    status, flags, edns, section = "", set[str](), None, ""
    sections: dict[str, list[tuple[str, int, str, str, str]]] = {}
    for line in text.splitlines():
        if line.startswith(";; ->>HEADER<<-"):
            status = line.split("status: ", 1)[1].split(",", 1)[0]
        elif line.startswith(";; flags:"):
            flags = set(line[len(";; flags:") :].split(";", 1)[0].split())
        elif line.startswith("; EDNS:"):
            edns = line
        elif line.startswith(";; ") and line.endswith(" SECTION:"):
            section = line[3:].split()[0]
        elif line and not line.startswith(";") and section:
            name, ttl, klass, rtype, *rdata = line.split()
            sections.setdefault(section, []).append((name, int(ttl), klass, rtype, " ".join(rdata)))
    return DigResult(status, flags, sections, edns, text)


@dataclass
class RunningDns:
    """A running waypost DNS server and its registry."""

    registry: Registry
    responder: Responder
    server: DnsServer

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    async def udp(self, query: dns.message.Message) -> dns.message.Message:
        return await dns.asyncquery.udp(query, self.host, port=self.port, timeout=CLIENT_TIMEOUT)

    async def tcp(self, query: dns.message.Message) -> dns.message.Message:
        return await dns.asyncquery.tcp(query, self.host, port=self.port, timeout=CLIENT_TIMEOUT)

    async def udp_raw(self, data: bytes, *, wait: float = CLIENT_TIMEOUT) -> bytes | None:
        """Send one datagram; the first datagram back, or None after `wait` seconds."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        loop = asyncio.get_running_loop()
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((self.host, self.port))
            await loop.sock_sendall(sock, data)
            try:
                async with asyncio.timeout(wait):
                    return await loop.sock_recv(sock, 65535)
            except TimeoutError:
                return None

    async def dig(self, *args: str) -> DigResult:
        """Run the real `dig` against this server; fails the test if dig fails."""
        proc = await asyncio.create_subprocess_exec(
            DIG,
            f"@{self.host}",
            "-p",
            str(self.port),
            "+tries=1",
            "+time=2",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(DIG_DEADLINE):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()  # only the dig we started, by its pid
                await proc.wait()
        text = out.decode()
        assert proc.returncode == 0, f"dig {' '.join(args)} failed: {err.decode()}{text}"
        return parse_dig(text)


@pytest.fixture(autouse=True)
def _netsetup_sees_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """No in-process agent may build bridges, namespaces or nft tables here (see above)."""
    monkeypatch.setattr(os, "geteuid", lambda: NOT_ROOT)


# No skip when dig is missing: `make test` installs dnsutils, and a skip would hide it.
DIG = shutil.which("dig") or "dig"

StartWaypost = Callable[..., Awaitable[RunningDns]]


@pytest.fixture
async def start_waypost() -> AsyncIterator[StartWaypost]:
    """A factory: `await start_waypost(settings, instances, host=..., **start_dns_kwargs)`."""
    started: list[DnsServer] = []

    async def start(
        settings: DnsSettings | None = None,
        instances: Iterable[Instance] = (),
        *,
        nodes: Iterable[Node] = (),
        host: str = "127.0.0.1",
        responder_class: type[Responder] = Responder,
        **kwargs: int,
    ) -> RunningDns:
        registry = Registry(LOCAL_NODE)
        registry.apply(upserts=instances, nodes=nodes)
        responder = responder_class(registry, settings or DnsSettings(node_name=LOCAL_NODE.name))
        server = await start_dns(responder, host, 0, **kwargs)
        started.append(server)
        return RunningDns(registry, responder, server)

    yield start
    for server in started:
        server.close()
    for server in started:
        await server.wait_closed()


@pytest.fixture
async def waypost(start_waypost: StartWaypost) -> RunningDns:
    """A server with no instances, default settings (domain nomad., dc dc1)."""
    return await start_waypost()


def task_processes(data_dir: Path, *, leaders: bool = False) -> dict[str, list[int]]:
    """The processes still running of each allocation that has a directory in `data_dir`.

    `leaders`: only the task processes themselves, not what they started.
    """
    root = data_dir / ALLOC_DIR
    ids = [p.name for p in root.iterdir()] if root.is_dir() else []
    return {ident: pids for ident in ids if (pids := find_marked(ident, leaders_only=leaders))}


@pytest.fixture(autouse=True)
def no_task_left(tmp_path: Path) -> Iterator[None]:
    """Every test ends with no task process of its allocations running (killed if any)."""
    yield
    left = task_processes(tmp_path)
    for pids in left.values():
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"task processes left behind: {left}"
