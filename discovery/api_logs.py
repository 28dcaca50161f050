"""A task's logs over HTTP, as Nomad's client serves them.  Adapter: reads the log files.

    GET /v1/client/fs/logs/:alloc_id?task=&type=stdout|stderr
        &origin=start|end&offset=N&follow=true|false&plain=true|false

The bytes of `<task>.<type>.<n>` in the allocation's log directory
(discovery.tasks.logs), across its rotated files, from `offset` bytes after the
start or before the end (`origin`).  `plain=true` streams the bytes as they are
(text/plain); otherwise as Nomad's StreamFrames, one JSON object per chunk:
`{"Data": <base64>, "File": "alloc/logs/<file>", "Offset": <offset in the file
after the data>}` (and `{}` heartbeats while following).  `follow=true` keeps
the stream open and sends new bytes as the task writes them (woken by the log's
writer, and at most :data:`POLL` seconds late), into the next files as they
rotate, until the client goes, or the allocation is stopped and everything is
sent, or it is purged.  The allocation may be given by a unique id prefix.

Errors (before anything is sent), as Nomad's: 400 for a missing task, a type
other than stdout or stderr, a bad origin, offset or boolean; 404 for an unknown
allocation, a task it does not have, or no log yet (without follow).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

from discovery.allocations import JobRunner
from discovery.api import ApiError, ApiRequest
from discovery.api_jobs import find_alloc, parse_bool
from discovery.httpapi import Send, StreamHandler, StreamRoute
from discovery.registry import Registry
from discovery.tasks.logs import KINDS, find_start, log_files

CHUNK = 1 << 16  # bytes read and sent at once
POLL = 0.5  # seconds between looks at the files while following with no writer to wake us
HEARTBEAT = 10.0  # seconds between `{}` frames while following and idle (framed only)
PATH = "/v1/client/fs/logs/{alloc_id}"


class _Params:
    def __init__(self, req: ApiRequest) -> None:
        self.task = req.arg("task") or ""
        if not self.task:
            raise ApiError(400, "must include task name", "task")
        self.kind = req.arg("type") or ""
        if self.kind not in KINDS:
            raise ApiError(400, "must provide a valid log type (stdout or stderr)", "type")
        self.follow = parse_bool(req.arg("follow"), "follow")
        self.plain = parse_bool(req.arg("plain"), "plain")
        origin = req.arg("origin") or "start"
        if origin not in ("start", "end"):
            raise ApiError(400, 'origin must be "start" or "end"', "origin")
        self.from_end = origin == "end"
        raw = req.arg("offset") or "0"
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise ApiError(
                400, f"error parsing offset: {raw!r} is not a non-negative integer", "offset"
            )
        self.offset = int(raw)


def content_type(req: ApiRequest) -> str:
    return (
        "text/plain; charset=utf-8" if parse_bool(req.arg("plain"), "plain") else "application/json"
    )


def logs_route(runner: JobRunner, registry: Registry) -> StreamRoute:
    return StreamRoute(PATH, logs_handler(runner, registry), content_type_of=content_type)


def logs_handler(runner: JobRunner, registry: Registry) -> StreamHandler:
    """The handler of the logs endpoint (see the module docstring)."""

    async def handler(req: ApiRequest, send: Send) -> None:
        params = _Params(req)
        alloc = find_alloc(registry.snapshot, req.params["alloc_id"])
        if params.task not in dict(alloc.tasks):
            raise ApiError(404, f"unknown task name {params.task!r}", "task")
        log_dir = runner.alloc_root / alloc.id / "alloc" / "logs"
        files = log_files(log_dir, params.task, params.kind)
        if not files and not params.follow:
            raise ApiError(
                404,
                f"log entry for task {params.task!r} and log type {params.kind!r} not found",
                "task",
            )
        reader = _Reader(log_dir, params, send)
        await reader.seek(files)
        while True:
            await reader.pump()
            if not params.follow:
                return
            current = registry.snapshot.allocations.get(alloc.id)
            if current is None:
                return  # purged
            if current.terminal and reader.at_end():
                return
            notifier = runner.notifier(alloc.id, params.task, params.kind)
            if notifier is not None:
                await notifier.wait(POLL)
            else:
                await asyncio.sleep(POLL)
            await reader.idle(POLL)

    return handler


class _Reader:
    """Where a reader is in a task's rotated log files, and sending what comes next."""

    def __init__(self, log_dir: Path, params: _Params, send: Send) -> None:
        self._dir = log_dir
        self._params = params
        self._send = send
        self._index = -1  # the file index being read (-1: none yet)
        self._offset = 0
        self._quiet = 0.0  # seconds without sending anything (heartbeats)

    async def seek(self, files: list[tuple[int, Path]]) -> None:
        if not files:
            return
        sizes = [_size(path) for _, path in files]
        position, offset = find_start(sizes, self._params.offset, from_end=self._params.from_end)
        self._index, self._offset = files[position][0], offset

    def _files(self) -> list[tuple[int, Path]]:
        return log_files(self._dir, self._params.task, self._params.kind)

    def at_end(self) -> bool:
        files = self._files()
        if not files:
            return True
        last_index, last_path = files[-1]
        return self._index == last_index and self._offset >= _size(last_path)

    async def pump(self) -> None:
        """Send everything there is from where the reader is, across rotations."""
        if self._index < 0:
            files = self._files()
            if not files:
                return
            self._index, self._offset = files[0][0], 0
        while True:
            path = self._dir / f"{self._params.task}.{self._params.kind}.{self._index}"
            await self._send_file(path)
            later = [i for i, _ in self._files() if i > self._index]
            if not later:
                return
            # A later file exists, so this one is complete: its last bytes, then the next.
            await self._send_file(path)
            self._index, self._offset = later[0], 0

    async def _send_file(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # rotated out from under us
            return False
        sent = False
        try:
            while True:
                data = os.pread(fd, CHUNK, self._offset)
                if not data:
                    return sent
                self._offset += len(data)
                await self._send_chunk(data, path.name)
                sent = True
        finally:
            os.close(fd)

    async def _send_chunk(self, data: bytes, name: str) -> None:
        self._quiet = 0.0
        if self._params.plain:
            await self._send(data)
            return
        frame = {
            "Data": base64.b64encode(data).decode(),
            "File": f"alloc/logs/{name}",
            "Offset": self._offset,
        }
        await self._send(json.dumps(frame).encode() + b"\n")

    async def idle(self, seconds: float) -> None:
        """Count quiet time; a `{}` heartbeat frame every HEARTBEAT seconds of it."""
        self._quiet += seconds
        if self._quiet >= HEARTBEAT and not self._params.plain:
            self._quiet = 0.0
            await self._send(b"{}\n")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
