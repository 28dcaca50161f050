"""Consul mirror benchmark: convergence between agents, and syncs of 10,000 instances.

    .venv/bin/python -m tests.bench.mirror_sync [--changes 50] [--instances 10000]
                                                [--services 100] [--json FILE]

Every part talks to the Consul stand-in (tests/consul_standin.py) running as a
process of its own on 127.0.0.1 (`python -m tests.bench.mirror_sync standin`),
so its CPU is not ours; its request log gives the request counts.

1. Convergence: three agents as processes (`python -m discovery agent`), each
   with DNS and HTTP on 127.0.0.1 and `consul { address = <stand-in> }`.  Each
   change is a registration through agent A's HTTP API; the time runs from just
   before the PUT until agent C's DNS (UDP, asked every 2 ms) answers SRV with the
   new port.  "instance": a new instance of a service C already watches;
   "service": a service C has never seen (the catalog watch, then a new service
   watch); "deregister": from the PUT deregister until the port is gone on C.
2. Push: a registry of N instances (S services x N/S) and a push-only mirror in
   this process: the time until Consul holds them all, the requests; then a full
   anti-entropy sync with nothing changed (its requests: O(1), not O(N)), and
   one change (its requests).
3. Pull: N instances on N/100 other nodes in the stand-in's catalog (S services),
   a pull-only mirror in this process: the time until the registry holds them,
   the requests; then requests while idle, and one remote change (time until it
   is in the registry, requests).

Prints one line per figure and, with --json, writes them all.  Loops are
bounded; every process started is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import uvloop

from discovery.config import MirrorSettings
from discovery.mirror import MirrorTiming, start_mirror
from discovery.model import Node, make_instance
from discovery.registry import Registry
from tests.consul_standin import ConsulStandin

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0  # seconds for a process to serve
CHANGE_TIMEOUT = 10.0  # seconds for one change to show on C
SYNC_TIMEOUT = 600.0  # seconds for a 10,000-instance sync
POLL = 0.002  # seconds between DNS asks on C
GAP = 0.25  # seconds of quiet before each timed change (more than the push debounce)
BURST = 20  # registrations at once on A, timed until C answers with all of them
IDLE_FULL_SYNC = 2.0  # seconds: the push's anti-entropy period in part 2
IDLE_WINDOW = 10.0  # seconds of nothing changing, counted
TARGET_MEDIAN = 0.200  # seconds, A -> C with the stand-in
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the stand-in process -----------------------------------------------------------------------


def _route(path: str) -> str:
    """A request path without its ID: /v1/agent/check/pass/:id, /v1/health/service/:name."""
    return re.sub(
        r"^(/v1/(?:agent/service/deregister|agent/check/\w+|health/service|catalog/service))/.+",
        r"\1/:id",
        path,
    )


async def _serve_standin() -> None:
    """The `standin` mode: serve, print "ready <port>", obey commands on stdin."""
    consul = ConsulStandin()
    await consul.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(f"ready {consul.port}", flush=True)
    try:
        while line := await reader.readline():
            print(json.dumps(_command(consul, line.decode().split())), flush=True)
    finally:
        await consul.close()


def _command(consul: ConsulStandin, words: list[str]) -> Any:
    """`requests` (counts since the last call), `foreign S N K`, `move SERVICE ID NODE PORT`."""
    if words[:1] == ["requests"]:
        counts = Counter(f"{m} {_route(p)}" for m, p in consul.requests)
        consul.requests.clear()
        return dict(counts)
    if words[:1] == ["foreign"]:
        services, total, nodes = map(int, words[1:4])
        for n in range(total):
            on = n % nodes
            body: dict[str, Any] = {"ID": f"r{n}", "Name": f"remote{n % services}"}
            body["Port"] = 10000 + n % 50000
            body["Check"] = {"CheckID": f"service:r{n}", "TTL": "60s", "Status": "passing"}
            address = f"127.1.{on // 250}.{on % 250 + 1}"
            consul.register_foreign(body, node=f"node-{on}", address=address)
        return "done"
    if words[:1] == ["move"]:
        service, ident, host, port = words[1:5]
        body = {"ID": ident, "Name": service, "Port": int(port)}
        consul.register_foreign(body, node=host, address="127.1.0.1")
        return "done"
    return f"unknown command {words}"


class Standin:
    """The stand-in process, driven over its stdin."""

    def __init__(self) -> None:
        argv = [sys.executable, "-m", "tests.bench.mirror_sync", "standin"]
        self.proc = _spawn(argv, stdin=True)
        self.port = int(_read_line(self.proc, READY_TIMEOUT).split()[1])

    def ask(self, *words: object) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(_read_line(self.proc, SYNC_TIMEOUT))

    def cpu(self) -> float:
        return _cpu_seconds(self.proc.pid)


# -- processes ----------------------------------------------------------------------------------


def _spawn(
    argv: list[str], *, stdin: bool = False, log: Path | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if log is None else log.open("wb"),
        stderr=subprocess.DEVNULL if log is None else subprocess.STDOUT,
    )


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One stdout line within `timeout` (a thread-free wait: poll the pipe)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buffer = b""
    while b"\n" not in buffer:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r}: no answer (exit {proc.poll()})")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    assert not rest, "one answer per command"
    return line.decode()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL; ours, by pid."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (DNS needs both)."""
    for _ in range(100):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port pair")


# -- 1. convergence between agents ----------------------------------------------------------------


class AgentProcess:
    def __init__(self, name: str, consul_port: int, workdir: Path) -> None:
        self.name = name
        self.dns_port, self.http_port = _free_port(), _free_port()
        config = workdir / f"{name}.hcl"
        config.write_text(
            f'node_name = "{name}"\ndata_dir = "{workdir / name}"\n'
            f"ports {{\n  dns = {self.dns_port}\n  http = {self.http_port}\n}}\n"
            f'consul {{\n  address = "127.0.0.1:{consul_port}"\n}}\n'
        )
        argv = [sys.executable, "-m", "discovery", "agent", "--config", str(config)]
        self.log = workdir / f"{name}.log"
        self.proc = _spawn(argv, log=self.log)
        self.url = f"http://127.0.0.1:{self.http_port}"

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
                writer.close()
                await writer.wait_closed()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)

    async def srv_ports(self, name: str) -> set[int]:
        # EDNS: without it, a UDP answer holds 3 records (Consul's udp_answer_limit).
        query = dns.message.make_query(name, "SRV", use_edns=0, payload=4096)
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=self.dns_port, timeout=1.0)
        return {
            rr.port for rrset in reply.answer if rrset.rdtype == dns.rdatatype.SRV for rr in rrset
        }


async def _until(check: Callable[[], Any], limit: float = CHANGE_TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError("a change did not converge in time")
        await asyncio.sleep(POLL)


async def convergence(changes: int) -> dict[str, Any]:
    standin = Standin()
    with tempfile.TemporaryDirectory(prefix="wp-mirror-bench-") as tmp:
        agents = [AgentProcess(f"host-{h}", standin.port, Path(tmp)) for h in "abc"]
        try:
            for agent in agents:
                await agent.wait_ready()
            return await _measure_convergence(agents[0], agents[2], changes)
        finally:
            for agent in agents:
                _stop(agent.proc)
            _stop(standin.proc)


async def _measure_convergence(a: AgentProcess, c: AgentProcess, changes: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {kind: [] for kind in ("instance", "service", "deregister")}
    register = f"{a.url}/v1/agent/service/register"
    async with aiohttp.ClientSession() as http:

        async def put(url: str, body: Any = None) -> None:
            async with http.put(url, json=body) as resp:
                assert resp.status == 200, await resp.text()

        async def timed(kind: str, url: str, body: Any, check: Callable[[], Any]) -> None:
            await asyncio.sleep(GAP)  # an isolated change: no debounce from the one before
            started = time.perf_counter()
            await put(url, body)
            await _until(check)
            out[kind].append(time.perf_counter() - started)

        await put(register, {"Name": "web", "ID": "web-0", "Port": 20000})
        await _until(partial(_has, c, "web.service.nomad", 20000), READY_TIMEOUT)
        for n in range(1, changes + 1):
            port, name = 20000 + n, f"new{n}"
            body = {"Name": "web", "ID": f"web-{n}", "Port": port}
            await timed("instance", register, body, partial(_has, c, "web.service.nomad", port))
            body = {"Name": name, "ID": f"{name}-1", "Port": port}
            await timed("service", register, body, partial(_has, c, f"{name}.service.nomad", port))
            url = f"{a.url}/v1/agent/service/deregister/web-{n}"
            await timed("deregister", url, None, partial(_gone, c, "web.service.nomad", port))
        ports = {30000 + n for n in range(BURST)}
        burst = [{"Name": "burst", "ID": f"burst-{p}", "Port": p} for p in ports]
        await asyncio.sleep(GAP)
        started = time.perf_counter()
        await asyncio.gather(*(put(register, body) for body in burst))
        accepted_s = time.perf_counter() - started
        await _until(partial(_all, c, "burst.service.nomad", ports))
        burst_s = time.perf_counter() - started
    burst_ms = {"burst_ms": burst_s * 1000, "burst_accepted_ms": accepted_s * 1000}
    return {kind: _summary(times) for kind, times in out.items()} | burst_ms


async def _all(agent: AgentProcess, name: str, ports: set[int]) -> bool:
    return ports <= await agent.srv_ports(name)


async def _has(agent: AgentProcess, name: str, port: int) -> bool:
    return port in await agent.srv_ports(name)


async def _gone(agent: AgentProcess, name: str, port: int) -> bool:
    return port not in await agent.srv_ports(name)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(len(ordered) * 0.9) - 1] * 1000 if len(ordered) >= 10 else 0.0,
        "max_ms": ordered[-1] * 1000,
    }


# -- 2. push and 3. pull of N instances ----------------------------------------------------------


@contextlib.asynccontextmanager
async def _standin() -> AsyncIterator[Standin]:
    standin = Standin()
    try:
        yield standin
    finally:
        _stop(standin.proc)


async def _wait(check: Callable[[], bool], limit: float = SYNC_TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("not converged in time")
        await asyncio.sleep(0.01)


def _total(counts: dict[str, int]) -> int:
    return sum(counts.values())


async def push(instances: int, services: int) -> dict[str, Any]:
    registry = Registry(Node("bench", "127.0.0.1"))
    registry.upsert(
        *(
            make_instance(
                service=f"svc{n % services}",
                id=f"i{n}",
                node="bench",
                address=f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
                port=1000 + n % 60000,
                tags=["bench"],
            )
            for n in range(instances)
        )
    )
    timing = MirrorTiming(anti_entropy=IDLE_FULL_SYNC)
    async with _standin() as standin:
        settings = MirrorSettings(host="127.0.0.1", port=standin.port, pull=False)
        cpu, ours = standin.cpu(), time.process_time()
        started = time.perf_counter()
        mirror = await start_mirror(
            registry, settings, node="bench", datacenter="dc1", timing=timing
        )
        try:
            await _wait(lambda: mirror.stats.pushed == instances and mirror.stats.pending == 0)
            took = time.perf_counter() - started
            first = standin.ask("requests")
            result: dict[str, Any] = {
                "instances": instances,
                "seconds": took,
                "requests": first,
                "standin_cpu_s": standin.cpu() - cpu,
                "mirror_cpu_s": time.process_time() - ours,
            }
            await asyncio.sleep(IDLE_FULL_SYNC)  # a full sync in flight ends here
            standin.ask("requests")
            await asyncio.sleep(IDLE_WINDOW)  # full syncs with nothing changed
            idle = standin.ask("requests")
            syncs = idle.get("GET /v1/agent/services", 0)
            result["idle_full_syncs"] = syncs
            result["idle_requests"] = idle
            result["requests_per_idle_full_sync"] = _total(idle) / max(1, syncs)
            registry.upsert(
                make_instance(service="svc0", id="i0", node="bench", address="10.9.9.9")
            )
            await _wait(lambda: mirror.stats.pending == 0, 10.0)
            await asyncio.sleep(0.3)
            result["one_change_requests"] = standin.ask("requests")
        finally:
            await mirror.close()
    return result


async def pull(instances: int, services: int) -> dict[str, Any]:
    registry = Registry(Node("bench", "127.0.0.1"))
    async with _standin() as standin:
        standin.ask("foreign", services, instances, max(1, instances // 100))
        standin.ask("requests")  # the setup's are not counted
        settings = MirrorSettings(host="127.0.0.1", port=standin.port, push=False)
        expected = instances + 1  # and the "consul" service of the stand-in's server node
        cpu, ours = standin.cpu(), time.process_time()
        started = time.perf_counter()
        mirror = await start_mirror(registry, settings, node="bench", datacenter="dc1")
        try:
            await _wait(lambda: mirror.stats.pulled == expected)
            took = time.perf_counter() - started
            result: dict[str, Any] = {
                "instances": instances,
                "services": services,
                "seconds": took,
                "standin_cpu_s": standin.cpu() - cpu,
                "mirror_cpu_s": time.process_time() - ours,
            }
            await asyncio.sleep(0.5)  # replies in flight
            result["requests"] = standin.ask("requests")
            await asyncio.sleep(3.0)
            result["idle_3s_requests"] = standin.ask("requests")
            moved = "consul/node-0/r0"
            started = time.perf_counter()
            standin.ask("move", "remote0", "r0", "node-0", 4242)
            await _wait(lambda: registry.snapshot.instances[moved].port == 4242, 10.0)
            result["one_change_ms"] = (time.perf_counter() - started) * 1000
            await asyncio.sleep(0.3)
            result["one_change_requests"] = standin.ask("requests")
        finally:
            await mirror.close()
    return result


# -- main -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.changes:
        results["convergence"] = await convergence(args.changes)
    if args.instances:
        results["push"] = await push(args.instances, args.services)
        results["pull"] = await pull(args.instances, args.services)
    return results


def report(results: dict[str, Any]) -> None:
    conv = results.get("convergence")
    if conv:
        for kind in ("instance", "service", "deregister"):
            figures = conv[kind]
            print(
                f"A->C {kind:<10} n={figures['n']:<3} median {figures['median_ms']:6.1f} ms"
                f"  p90 {figures['p90_ms']:6.1f} ms  max {figures['max_ms']:6.1f} ms"
            )
        print(
            f"A->C burst of {BURST} registrations at once: all on C after "
            f"{conv['burst_ms']:.1f} ms (A's API answered them all after "
            f"{conv['burst_accepted_ms']:.1f} ms)"
        )
        verdict = "PASS" if conv["instance"]["median_ms"] <= TARGET_MEDIAN * 1000 else "FAIL"
        print(f"target: median A->C <= {TARGET_MEDIAN * 1000:.0f} ms (instance): {verdict}")
    for part in ("push", "pull"):
        figures = results.get(part)
        if figures:
            print(
                f"{part} {figures['instances']} instances: {figures['seconds']:.2f} s, "
                f"{_total(figures['requests'])} requests {figures['requests']}; CPU: stand-in "
                f"{figures['standin_cpu_s']:.1f} s, mirror {figures['mirror_cpu_s']:.1f} s"
            )
    if "push" in results:
        push_ = results["push"]
        print(
            f"push, {IDLE_WINDOW:g} s with nothing changed: {push_['idle_full_syncs']} full "
            f"syncs, {push_['requests_per_idle_full_sync']:g} requests each, "
            f"{sum(n for k, n in push_['idle_requests'].items() if k.startswith('PUT'))} writes "
            f"{push_['idle_requests']}"
        )
        print(f"push, one change (a full sync may join): {push_['one_change_requests']}")
    if "pull" in results:
        pull_ = results["pull"]
        print(f"pull, 3 s idle: {pull_['idle_3s_requests']}")
        print(
            f"pull, one remote change: {pull_['one_change_ms']:.1f} ms, "
            f"{pull_['one_change_requests']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["standin"]:
        uvloop.run(_serve_standin())
        return 0
    parser = argparse.ArgumentParser(prog="mirror_sync", description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="A->C changes (0: skip)")
    parser.add_argument("--instances", type=int, default=10000, help="push/pull size (0: skip)")
    parser.add_argument("--services", type=int, default=100, help="services they belong to")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    print(f"$ {' '.join([Path(sys.executable).name, '-m', 'tests.bench.mirror_sync', *argv])}")
    results = uvloop.run(run(args))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
