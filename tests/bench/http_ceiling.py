"""How fast could the lookup be in Python?  Ceilings next to the agent and nginx.  Composition root.

The lookup benchmark (http_api.py) compares the agent with nginx.  This one
answers the follow-up question, what to change, by serving the agent's very
body (same headers) from four kinds of server, each a child process pinned to
core 0 on uvloop like the agent, loaded by wrk on core 1, interleaved:

- ``agent``: the agent itself (``python -m discovery agent``);
- ``aiohttp-app``: a minimal ``web.Application``, one route, a handler that
  returns a prepared body: the agent's HTTP stack with nothing of waypost's;
- ``aiohttp-lowlevel``: ``aiohttp.web.Server`` with that handler (no
  Application, router or middlewares);
- ``raw``: an ``asyncio.Protocol`` that finds the end of each request's
  headers and writes one pre-encoded response (status line, headers, body):
  what a fast path for cached reads would cost;
- ``nginx``: as in http_api.py.

Requests/s and requests per server CPU-second (robust when the host is
shared).  A scratch tool for decisions, not a target; nothing here is imported
by the agent.

    .venv/bin/python -m tests.bench.http_ceiling [--duration 5] [--rounds 2] [--realtime]
    .venv/bin/python -m tests.bench.http_ceiling serve MODE BODY_FILE   # one server (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import uvloop

from tests.bench.dns_servers import Server
from tests.bench.http_report import PEAK_CONNECTIONS
from tests.bench.http_servers import (
    CLIENT_CORE,
    HOST,
    SERVER_CORE,
    from_log,
    http_get,
    spawn,
    start_agent,
    start_nginx,
)
from tests.bench.http_wrk import run_wrk

PATH = "/v1/health/service/web"
QUERY = "?passing"
MODES = ("aiohttp-app", "aiohttp-lowlevel", "raw")
WARMUP = 1.0  # seconds
HEADER_END = b"\r\n\r\n"


# -- the servers (child side) -----------------------------------------------------------------


class _Raw(asyncio.Protocol):
    """Answers every request on a connection with the same pre-encoded response."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while (end := self._buffer.find(HEADER_END)) >= 0:
            self._buffer = self._buffer[end + len(HEADER_END) :]
            self._transport.write(self._response)


def render_raw_response(body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 200 response with `headers`, Content-Length and a fixed Date."""
    lines = ["HTTP/1.1 200 OK", *(f"{k}: {v}" for k, v in headers.items())]
    lines += [f"Content-Length: {len(body)}", "Date: Thu, 01 Jan 2026 00:00:00 GMT"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _serve(mode: str, body: bytes, headers: dict[str, str]) -> None:
    from aiohttp import web

    async def handler(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, headers=headers)

    loop = asyncio.get_running_loop()
    if mode == "aiohttp-app":
        app = web.Application()
        app.router.add_get("/v1/health/service/{name}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = int(runner.addresses[0][1])
    elif mode == "aiohttp-lowlevel":
        lowlevel = web.Server(handler, access_log=None)
        server = await loop.create_server(lowlevel, HOST, 0)
        port = int(server.sockets[0].getsockname()[1])
    else:
        response = render_raw_response(body, headers)
        server = await loop.create_server(lambda: _Raw(response), HOST, 0)
        port = int(server.sockets[0].getsockname()[1])
    print(f"waypost: http listening on {HOST}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def serve_main(mode: str, body_file: str) -> int:
    body = Path(body_file).read_bytes()
    headers = {
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
        "X-Nomad-KnownLeader": "true",
        "X-Nomad-LastContact": "0",
        "X-Consul-Index": "2",
        "X-Nomad-Index": "2",
        "Content-Type": "application/json",
    }
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(mode, body, headers))
    return 0


# -- the measurement (parent side) ------------------------------------------------------------


def start_ceiling(mode: str, body: bytes) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-http-{mode}-"))
    body_file = workdir / "body.json"
    body_file.write_bytes(body)
    command = [sys.executable, "-m", "tests.bench.http_ceiling", "serve", mode, str(body_file)]
    return spawn(
        mode,
        command,
        workdir,
        find_port=from_log,
        probe=PATH + QUERY,
        deadline=30.0,
        core=SERVER_CORE,
    )


def measure(server: Server, duration: float, realtime: bool) -> tuple[float, float]:
    """Requests/s and the server's CPU share of one full-speed wrk run (after a warm-up)."""
    run_wrk(server.port, PATH + QUERY, duration=WARMUP, connections=PEAK_CONNECTIONS)
    if realtime:
        server.set_realtime(True)
    try:
        cpu, wall = server.cpu_seconds(), time.monotonic()
        result = run_wrk(
            server.port,
            PATH + QUERY,
            duration=duration,
            connections=PEAK_CONNECTIONS,
            realtime=realtime,
        )
        share = (server.cpu_seconds() - cpu) / (time.monotonic() - wall)
    finally:
        if realtime and server.alive():
            server.set_realtime(False)
    return result.ok_rate, share


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http_ceiling")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--realtime", action="store_true", help="SCHED_FIFO server and wrk")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {CLIENT_CORE})
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    best: dict[str, tuple[float, float]] = {}
    with contextlib.ExitStack() as stack:
        agent = start_agent()
        stack.callback(agent.close)
        body = http_get(agent.port, PATH + QUERY).body
        servers = {"agent": agent}
        for mode in MODES:
            servers[mode] = start_ceiling(mode, body)
            stack.callback(servers[mode].close)
        servers["nginx"] = start_nginx(PATH, body, "application/json")
        stack.callback(servers["nginx"].close)
        for n in range(args.rounds):
            for name, server in servers.items():
                print(f"  round {n + 1}/{args.rounds} {name} ...", file=sys.stderr, flush=True)
                rate, share = measure(server, args.duration, args.realtime)
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, share)
    print(f"command: .venv/bin/python -m tests.bench.http_ceiling {' '.join(argv)}")
    print(f"{'server':18} {'req/s':>9} {'CPU':>5} {'req/CPU-s':>10} {'x nginx/CPU-s':>14}")
    ref = best["nginx"][0] / best["nginx"][1] if best["nginx"][1] > 0 else 0.0
    for name, (rate, share) in best.items():
        per_cpu = rate / share if share > 0 else 0.0
        ratio = per_cpu / ref if ref else 0.0
        print(f"{name:18} {rate:9,.0f} {share:5.0%} {per_cpu:10,.0f} {ratio:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
