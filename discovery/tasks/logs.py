"""Task logs: the pipes tasks write to, rotated files, and reading them back.  Adapter.

Each task's stdout and stderr go into named pipes in the allocation's log dir,
`.<task>.stdout.fifo` and `.<task>.stderr.fifo` (Nomad's names).  The task's end
is opened read-write, so the task never gets SIGPIPE: when the agent is down (a
restart, `kill -9`) its output waits in the pipe (:data:`PIPE_SIZE`), and a task
that writes more than that waits for the agent to come back and read it; the
agent reopens the pipes when it adopts the task, so logging continues.

:class:`LogPipe` reads a pipe on the event loop (add_reader, non-blocking) into a
:class:`LogRotator`, which appends to `<task>.<stdout|stderr>.<n>` as Nomad's
logmon does: a file holds at most `max_file_size` bytes, cut after the last
complete line that fits when there is one; the next index is opened when it is
full; the oldest files go when there are more than `max_files`.  An agent that
restarts appends to the highest index.

Reading (`GET /v1/client/fs/logs`): :func:`log_files` lists a task's files by
index and :func:`find_start` is Nomad's findClosest: the (file, offset) where
`offset` bytes from the start, or from the end (origin "end"), fall across the
rotated files.  :class:`LogNotifier` wakes readers that follow a log when new
bytes are written.

Error handling: a write that fails (disk full) is logged once per pipe and the
bytes are dropped, so a task is never blocked by a full disk; a pipe that cannot
be opened is an OSError for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20  # bytes a pipe holds while nobody reads it (the kernel's default max)
READ_CHUNK = 1 << 16
READS_PER_WAKEUP = 16  # chunks read per readable event before yielding to the loop
_F_SETPIPE_SZ = 1031  # fcntl.h (Linux)
KINDS = ("stdout", "stderr")


def fifo_path(log_dir: Path, task: str, kind: str) -> Path:
    return log_dir / f".{task}.{kind}.fifo"


def ensure_fifo(path: Path) -> None:
    """Make the named pipe at `path` unless it is there."""
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)


def open_task_end(path: Path) -> int:
    """The descriptor the task writes to (read-write: no SIGPIPE, never blocks opening)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def open_null() -> int:
    return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


# -- rotated files ---------------------------------------------------------------------


def log_files(log_dir: Path, task: str, kind: str) -> list[tuple[int, Path]]:
    """(index, path) of `task`'s `kind` log files, by index (Nomad's logIndexes)."""
    prefix = f"{task}.{kind}."
    found = []
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    for name in names:
        rest = name[len(prefix) :] if name.startswith(prefix) else ""
        if rest.isdigit() and rest.isascii():
            found.append((int(rest), log_dir / name))
    return sorted(found)


def find_start(sizes: list[int], offset: int, *, from_end: bool) -> tuple[int, int]:
    """(position in `sizes`, offset in that file) of `offset` bytes into the logs.

    Pure (Nomad's findClosest): from the start, `offset` past the last file's end
    is that end; from the end, beyond the first file is its start.  One
    difference: from the end with offset 0 Nomad starts at the top of the last
    file (its loop stops at offset 0 before stepping back); here it is the end,
    what `tail -f` means.
    """
    if not sizes:
        raise ValueError("no log files")
    if from_end:
        i, back = len(sizes) - 1, offset
        while back > sizes[i] and i > 0:
            back -= sizes[i]
            i -= 1
        return i, max(0, sizes[i] - back)
    i, forward = 0, offset
    while forward > sizes[i] and i < len(sizes) - 1:
        forward -= sizes[i]
        i += 1
    return i, min(forward, sizes[i])


def cut(data: bytes | memoryview, room: int, *, empty: bool) -> int:
    """How many bytes of `data` go into a file with `room` bytes left.  Pure.

    All when they fit; else up to the last newline that fits; a file that is
    still `empty` takes what fits even mid-line (a line longer than a file).
    """
    if len(data) <= room:
        return len(data)
    cut_at = bytes(data[:room]).rfind(b"\n")
    if cut_at >= 0:
        return cut_at + 1
    return room if empty else 0


class LogNotifier:
    """Wakes the readers that follow one log when bytes are written to it."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until the next write, or `seconds`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait([fut], timeout=seconds)
        finally:
            self._waiters.discard(fut)
            fut.cancel()


class LogRotator:
    """Appends to `<base>.<n>` files in `log_dir`, rotating as Nomad's logmon does."""

    def __init__(self, log_dir: Path, base: str, max_files: int, max_size: int) -> None:
        self._dir = log_dir
        self._base = base
        self._max_files = max_files
        self._max_size = max_size
        self.notifier = LogNotifier()
        task, kind = base.rsplit(".", 1)
        existing = log_files(log_dir, task, kind)
        self._index = existing[-1][0] if existing else 0
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        path = self._dir / f"{self._base}.{self._index}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append `data`, opening the next file whenever one is full."""
        view = memoryview(data)
        while view:
            room = self._max_size - self._size
            n = cut(view, room, empty=self._size == 0) if room > 0 else 0
            if n == 0:
                self._rotate()
                continue
            written = os.write(self._fd, view[:n])
            self._size += written
            view = view[written:]
        self.notifier.notify()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._index += 1
        self._open()
        task, kind = self._base.rsplit(".", 1)
        files = log_files(self._dir, task, kind)
        for _, path in files[: max(0, len(files) - self._max_files)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.notifier.notify()


@dataclass(eq=False, slots=True)
class LogPipe:
    """Reads one task pipe into its rotator on the loop, until every writer is gone."""

    path: Path
    rotator: LogRotator
    on_eof: Callable[[], None] = lambda: None
    _fd: int = -1
    _loop: asyncio.AbstractEventLoop | None = None
    _failing: bool = False

    def open(self) -> None:
        """Open the reading end (non-blocking) and start reading.  OSError if it cannot."""
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, PIPE_SIZE)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        """Error handling: a loop callback; a failing write drops the bytes (logged once)."""
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("log pipe %s: %s", self.path, exc)
                self.close()
                return
            if not data:  # every writer has closed it: the task and its children are gone
                self.close()
                self.on_eof()
                return
            try:
                self.rotator.write(data)
                self._failing = False
            except OSError as exc:
                if not self._failing:
                    log.error("cannot write the log of %s (%s): dropping it", self.path, exc)
                self._failing = True
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def drain(self) -> None:
        """Read what is in the pipe now (before closing it)."""
        if self._fd >= 0:
            self._readable()

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
