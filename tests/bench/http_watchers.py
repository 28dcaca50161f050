"""Thousands of blocked HTTP watchers in one client process.  Adapter (and its child's entry point).

The child (``python -m tests.bench.http_watchers``, pinned to the client
core, on uvloop) opens ``--count`` TCP connections to 127.0.0.1:PORT, at most
``--concurrency`` connects at a time, and sends one blocking GET on each
(raw asyncio protocols: the lowest per-connection overhead a Python client
gets).  It prints one JSON line when every request is sent::

    {"event": "sent", "connected": 10000, "failed": 0, "seconds": 1.9}

then waits until every watcher has its whole response (status line, headers,
``Content-Length`` bytes of body) or ``--deadline`` seconds pass, and prints::

    {"event": "done", "answered": 10000, "times": [...], "statuses": {"200": 10000},
     "indexes": [min, max], "with_expected": 10000, "errors": 0, "cpu": 1.2}

and keeps its connections open until its stdin reaches end of file (the
parent's ``close()``), so that 10,000 disconnects are not in what the parent
measures.  ``times`` are the ``time.monotonic()`` instants (CLOCK_MONOTONIC, the same
clock in every process) at which each response was complete, so the parent
subtracts the instant it made its change.  ``with_expected`` counts bodies
that contain ``--expect``.

:func:`start_watchers` is the parent's side: it spawns the child with the
same RLIMIT_NOFILE raise and reads its two lines (bounded waits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

import uvloop

from tests.bench.http_servers import CLIENT_CORE, HOST, REPO

CONNECT_CONCURRENCY = 200  # connects in flight; the agent's listen backlog is 4096
CONNECT_TIMEOUT = 10.0  # seconds for one connect
EXIT_TIMEOUT = 10.0  # seconds for the child to exit once told to
FD_MARGIN = 256  # descriptors beyond one per watcher (stdio, the loop, imports)
HEADER_END = b"\r\n\r\n"


def ensure_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to at least `needed` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


# -- the child ------------------------------------------------------------------------------


class _Watch(asyncio.Protocol):
    """One connection, one request, one response; notes when the response is complete."""

    def __init__(self, request: bytes, tally: _Tally) -> None:
        self._request = request
        self._tally = tally
        self._buffer = bytearray()
        self._need = -1  # bytes of the whole response, once the headers are in
        self._done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if self._need < 0:
            end = self._buffer.find(HEADER_END)
            if end < 0:
                return
            self._need = self._head(bytes(self._buffer[:end]), end + len(HEADER_END))
        if len(self._buffer) >= self._need:
            self._done = True
            body = bytes(self._buffer[self._need - self._length : self._need])
            self._tally.answer(time.monotonic(), self._status, self._index, body)

    def _head(self, head: bytes, body_start: int) -> int:
        lines = head.decode("latin-1").split("\r\n")
        self._status = int(lines[0].split()[1])
        self._index = 0
        self._length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                self._length = int(value)
            elif lowered == "x-consul-index":
                self._index = int(value)
        return body_start + self._length

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            self._done = True
            self._tally.lost()


@dataclass
class _Tally:
    expect: bytes
    count: int
    times: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    indexes: list[int] = field(default_factory=list)
    with_expected: int = 0
    errors: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, at: float, status: int, index: int, body: bytes) -> None:
        self.times.append(at)
        self.statuses[status] += 1
        self.indexes.append(index)
        if self.expect and self.expect in body:
            self.with_expected += 1
        self._check()

    def lost(self) -> None:
        self.errors += 1
        self._check()

    def _check(self) -> None:
        if len(self.times) + self.errors >= self.count:
            self.finished.set()


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _watch(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\nAccept: */*\r\n\r\n"
    ).encode()
    tally = _Tally(args.expect.encode(), args.count)
    gate = asyncio.Semaphore(args.concurrency)
    transports: list[asyncio.Transport] = []
    failed = 0

    async def connect() -> None:
        nonlocal failed
        async with gate:
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Watch(request, tally), HOST, args.port),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError):
                failed += 1
                tally.lost()
                return
            transports.append(transport)

    started = time.monotonic()
    await asyncio.gather(*(connect() for _ in range(args.count)))
    _emit(
        {
            "event": "sent",
            "connected": len(transports),
            "failed": failed,
            "seconds": time.monotonic() - started,
        }
    )
    with contextlib.suppress(TimeoutError):  # report what came, however much
        await asyncio.wait_for(tally.finished.wait(), args.deadline)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _emit(
        {
            "event": "done",
            "answered": len(tally.times),
            "times": tally.times,
            "statuses": {str(k): v for k, v in tally.statuses.items()},
            "indexes": [min(tally.indexes, default=0), max(tally.indexes, default=0)],
            "with_expected": tally.with_expected,
            "errors": tally.errors,
            "cpu": usage.ru_utime + usage.ru_stime,
        }
    )
    # Hold the connections until the parent closes our stdin (it may still be measuring
    # the agent, and 10,000 disconnects are work for the agent), then drop them all.
    closed = asyncio.Event()
    await loop.connect_read_pipe(lambda: _UntilEof(closed), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closed.wait(), args.deadline)
    for transport in transports:
        transport.abort()


class _UntilEof(asyncio.Protocol):
    """Sets `closed` when the pipe it reads reaches end of file."""

    def __init__(self, closed: asyncio.Event) -> None:
        self._closed = closed

    def eof_received(self) -> bool | None:
        self._closed.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http_watchers")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="the blocking GET, with ?index=&wait=")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--expect", default="", help="text every changed body should contain")
    parser.add_argument("--concurrency", type=int, default=CONNECT_CONCURRENCY)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after sending")
    args = parser.parse_args(argv)
    ensure_nofile(args.count + FD_MARGIN)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_watch(args))
    return 0


# -- the parent's side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    connected: int
    failed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Answers:
    answered: int
    times: tuple[float, ...]  # CLOCK_MONOTONIC instants, sorted
    statuses: dict[str, int]
    indexes: tuple[int, int]  # lowest and highest X-Consul-Index seen
    with_expected: int
    errors: int
    cpu: float  # the child's CPU seconds


class Watchers:
    """A running watcher child.  `close()` ends it by pid."""

    def __init__(self, proc: subprocess.Popen[bytes], command: Sequence[str], errors: IO[bytes]):
        self.proc = proc
        self.command = tuple(command)
        self._errors = errors
        self._pending = b""

    def _line(self, timeout: float) -> dict[str, Any]:
        """The child's next JSON line, within `timeout` seconds."""
        stdout = self.proc.stdout
        assert stdout is not None
        end = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = end - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"watcher process silent for {timeout:.0f} s")
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError(f"watcher process ended ({self.proc.poll()}): {self.log()}")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def log(self) -> str:
        """The tail of the child's stderr."""
        self._errors.seek(0)
        return self._errors.read().decode(errors="replace")[-2000:]

    def sent(self, timeout: float) -> Sent:
        doc = self._line(timeout)
        return Sent(doc["connected"], doc["failed"], doc["seconds"])

    def answers(self, timeout: float) -> Answers:
        doc = self._line(timeout)
        return Answers(
            answered=doc["answered"],
            times=tuple(sorted(doc["times"])),
            statuses=doc["statuses"],
            indexes=(doc["indexes"][0], doc["indexes"][1]),
            with_expected=doc["with_expected"],
            errors=doc["errors"],
            cpu=doc["cpu"],
        )

    def close(self) -> None:
        """Let the child drop its connections and exit (EOF on its stdin); else end it by pid."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(EXIT_TIMEOUT)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._errors.close()


def start_watchers(
    port: int, path: str, count: int, *, expect: str, deadline: float, core: int = CLIENT_CORE
) -> Watchers:
    """The watcher child on `core`; read its `sent()` line, make the change, then `answers()`."""
    command = ["taskset", "-c", str(core), sys.executable, "-m", "tests.bench.http_watchers"]
    command += ["--port", str(port), "--path", path, "--count", str(count)]
    command += ["--expect", expect, "--deadline", f"{deadline:g}"]
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (Watchers.close closes it)
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=REPO,
            bufsize=0,
        )
    except BaseException:
        errors.close()
        raise
    return Watchers(proc, command, errors)


if __name__ == "__main__":
    sys.exit(child_main())
