"""Persistence across `kill -9`: every acknowledged registration is back after a restart.

Two levels:

- the store alone: a real process (restart_child.py) registers instances one
  by one and prints each one once durable() returned; the test SIGKILLs it in
  the middle of the stream, reads every line it managed to print (each is an
  acknowledgement), then reopens the store and checks that each acknowledged
  instance is back, with its check status and output, and that the stored
  index is at least the last acknowledged one.  A second run on the same data
  dir restores, goes on, and is killed too;
- the real agent (`python -m discovery agent`): concurrent clients register
  over HTTP (PUT /v1/agent/service/register, then a TTL pass with a note);
  the agent is SIGKILLed mid-stream and restarted on the same data dir, and
  GET /v1/agent/services, /v1/agent/checks and the index show every
  acknowledged registration back, passing, with the index not gone backwards.

Only the processes started here are killed, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from discovery.model import Health
from discovery.store import Restored, open_store

PYTHON = sys.executable
CHILD = Path(__file__).with_name("restart_child.py")
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds for a child to print what the test waits for
MANY = 1_000_000  # registrations asked of a child: it never finishes before the kill


@dataclass
class Run:
    restored_index: int
    restored_count: int
    acked: dict[str, int]  # instance id -> index acknowledged
    returncode: int


async def run_and_kill(data_dir: Path, prefix: str, kill_after: int) -> Run:
    """Start a child, SIGKILL it after `kill_after` acks, collect every line it printed."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        str(CHILD),
        str(data_dir),
        prefix,
        str(MANY),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    acked: dict[str, int] = {}
    try:
        async with asyncio.timeout(DEADLINE):
            first = (await proc.stdout.readline()).decode().split()
            assert first[:1] == ["restored"], (first, await proc.stderr.read())
            while len(acked) < kill_after:
                line = (await proc.stdout.readline()).decode()
                assert line, f"child ended early: {(await proc.stderr.read()).decode()}"
                _, ident, index = line.split()
                acked[ident] = int(index)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # our child, by its pid
        async with asyncio.timeout(DEADLINE):
            rest, _ = await proc.communicate()
    for line in rest.decode().splitlines():  # printed before it died: acknowledged too
        if line.strip():
            _, ident, index = line.split()
            acked[ident] = int(index)
    assert proc.returncode == -signal.SIGKILL
    return Run(int(first[1]), int(first[2]), acked, proc.returncode)


async def reopen(data_dir: Path) -> Restored:
    store = open_store(data_dir)
    try:
        return store.load()
    finally:
        await store.close()


def assert_all_back(restored: Restored, acked: dict[str, int]) -> None:
    back = {i.id: i for i in restored.instances}
    missing = sorted(set(acked) - set(back))
    assert missing == [], f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
    for ident in acked:
        inst = back[ident]
        n = int(ident.rsplit("-", 1)[1])
        assert inst.health is Health.PASSING, ident
        assert [(c.id, c.status, c.output) for c in inst.checks] == [
            (f"service:{ident}", Health.PASSING, f"ok {n}")
        ]
    assert restored.index >= max(acked.values())


@pytest.mark.parametrize("kill_after", [1, 150])
async def test_acknowledged_registrations_survive_sigkill(tmp_path: Path, kill_after: int) -> None:
    first = await run_and_kill(tmp_path, "a", kill_after)
    assert first.restored_count == 0
    assert len(first.acked) >= kill_after
    restored = await reopen(tmp_path)
    assert_all_back(restored, first.acked)

    second = await run_and_kill(tmp_path, "b", kill_after)
    assert second.restored_count >= len(first.acked)
    assert second.restored_index > max(first.acked.values())  # the index never goes back
    assert min(second.acked.values()) > max(first.acked.values())
    restored = await reopen(tmp_path)
    assert_all_back(restored, first.acked | second.acked)


# -- the real agent over HTTP -----------------------------------------------------------------

HTTP_LISTENING = re.compile(r"^waypost: http listening on 127\.0\.0\.1:(\d+)$")
RESTORED = re.compile(r"^waypost: restored (\d+) instances from .* \(index (\d+)\)$")
CLIENTS = 4  # concurrent registering clients: group commit under real HTTP
KILL_AFTER = 200  # acknowledged registrations before the SIGKILL
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class AgentProcess:
    """A running agent; its stderr is drained into `lines` until it exits."""

    proc: asyncio.subprocess.Process
    port: int
    restored: int
    lines: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _read_stderr(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        lines.append(raw.decode().rstrip("\n"))


@contextlib.asynccontextmanager
async def agent_process(data_dir: Path) -> AsyncIterator[AgentProcess]:
    """Start the agent on port 0 with `data_dir`; SIGKILL it on the way out if still alive."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "discovery",
        "agent",
        "--dev",
        "--dns-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        port, restored = await _wait_started(proc, lines)
        agent = AgentProcess(proc, port, restored, lines)
        agent.drain = asyncio.create_task(_read_stderr(proc, lines))
        yield agent
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # our agent, by its pid
        async with asyncio.timeout(DEADLINE):
            await proc.wait()
            if proc.stderr is not None:
                await proc.stderr.read()


async def _wait_started(proc: asyncio.subprocess.Process, lines: list[str]) -> tuple[int, int]:
    assert proc.stderr is not None
    restored = -1
    async with asyncio.timeout(DEADLINE):
        while raw := await proc.stderr.readline():
            lines.append(raw.decode().rstrip("\n"))
            if found := RESTORED.match(lines[-1]):
                restored = int(found[1])
            if found := HTTP_LISTENING.match(lines[-1]):
                return int(found[1]), restored
    pytest.fail(f"the agent did not start: {lines}")


async def register_until_killed(
    http: aiohttp.ClientSession, url: str, client: int, acked: dict[str, int], enough: asyncio.Event
) -> None:
    """Register svc<client>-<n> with a TTL check, pass it with a note, read the index.

    An id goes in `acked` once both writes answered 200; the index recorded is
    the service's, read right after: this client is the only writer of
    svc<client>, so it is the index of its own acknowledged change.
    """
    service = f"svc{client}"
    for n in range(MANY):
        ident = f"{service}-{n}"
        body = {"Name": service, "ID": ident, "Port": 1000 + n % 60000, "Check": {"TTL": "5m"}}
        try:
            async with http.put(f"{url}/v1/agent/service/register", json=body) as resp:
                assert resp.status == 200, await resp.text()
            check = f"{url}/v1/agent/check/pass/service:{ident}"
            async with http.put(check, params={"note": f"ok {n}"}) as resp:
                assert resp.status == 200, await resp.text()
            acked[ident] = 0
            if len(acked) >= KILL_AFTER:
                enough.set()
            async with http.get(f"{url}/v1/catalog/service/{service}") as resp:
                acked[ident] = int(resp.headers["X-Consul-Index"])
        except (aiohttp.ClientError, TimeoutError):
            return  # the agent is gone


async def test_agent_keeps_acknowledged_http_registrations_across_sigkill(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    acked: dict[str, int] = {}
    async with (
        agent_process(data_dir) as first,
        aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http,
    ):
        assert first.restored == 0
        enough = asyncio.Event()
        clients = [
            asyncio.create_task(register_until_killed(http, first.url, c, acked, enough))
            for c in range(CLIENTS)
        ]
        async with asyncio.timeout(DEADLINE):
            await enough.wait()
        first.proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*clients)
            assert await first.proc.wait() == -signal.SIGKILL
    assert len(acked) >= KILL_AFTER
    last_index = max(acked.values())

    async with (
        agent_process(data_dir) as second,
        aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http,
    ):
        assert second.restored >= len(acked)
        async with http.get(f"{second.url}/v1/agent/services") as resp:
            services = await resp.json()
        missing = sorted(set(acked) - set(services))
        assert missing == [], f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
        async with http.get(f"{second.url}/v1/agent/checks") as resp:
            checks = await resp.json()
        for ident in acked:
            check = checks[f"service:{ident}"]
            n = ident.rsplit("-", 1)[1]
            assert (check["Status"], check["Output"]) == ("passing", f"ok {n}"), check
        async with http.get(f"{second.url}/v1/catalog/services") as resp:
            assert int(resp.headers["X-Consul-Index"]) > last_index
        second.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            assert await second.proc.wait() == 0, second.lines
