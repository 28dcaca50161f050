"""Entering an allocation's network namespace from a thread of its own.  Adapter.

netsetup never runs processes; a caller that must do something *inside* an
allocation's namespace (the task driver starting a process there, a test opening
a socket there) gives a function to :func:`in_namespace`.  It runs in a new thread
(never a pooled one) that first joins the namespace with setns(2), so the rest of
the process stays where it is, and anything the function creates (a socket, a
child process forked from that thread) belongs to the namespace.  The thread ends
with the call, so its namespace never leaks into other work.

`binds` (optional) gives the thread a private mount namespace first
(unshare(CLONE_NEWNS | CLONE_FS), `/` made a recursive slave so nothing
propagates back to the host) and bind-mounts each (source, target) file pair in
it, as `ip netns exec` does with /etc/netns/<name>/resolv.conf: a process forked
from the thread sees the targets replaced, the host does not.

Error handling: the syscalls' failures are OSError with the errno, the call and
the path; an exception of the function is raised as is.  Pure Python over libc
(ctypes): no pyroute2, so an agent pays nothing for this module in host mode.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000  # sched.h
_CLONE_NEWNS = 0x00020000
_CLONE_FS = 0x00000200
_MS_BIND = 4096  # sys/mount.h
_MS_REC = 16384
_MS_SLAVE = 1 << 19
_libc = ctypes.CDLL(None, use_errno=True)

Binds = Sequence[tuple[str, str]]


def _check(rc: int, what: str, obj: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", obj)


def join_namespace(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, _CLONE_NEWNET), "setns", path)
    finally:
        os.close(fd)


def private_binds(binds: Binds) -> None:
    """Give the calling thread its own mount namespace with `binds` mounted in it."""
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_FS), "unshare mount namespace", "/")
    # A slave of the host's mounts: later host mounts still show, ours never go back.
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "make / rslave", "/")
    for source, target in binds:
        _check(_libc.mount(source.encode(), target.encode(), None, _MS_BIND, None), "bind", target)


def _enter(path: str, binds: Binds) -> None:
    if binds:
        private_binds(binds)
    if path:
        join_namespace(path)


def in_namespace(path: str, fn: Callable[[], T], *, binds: Binds = ()) -> asyncio.Future[T]:
    """Run `fn` in a new thread inside the namespace at `path` ("" stays in this one).

    Returns a future of the running loop with `fn`'s result or exception.  A
    cancelled future does not stop `fn` (a fork cannot be taken back): the
    caller that cancels must not depend on it having run or not.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.cancelled():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            _enter(path, binds)
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=run, name="netsetup-enter", daemon=True).start()
    return future


def call_in_namespace(path: str, fn: Callable[[], T], *, binds: Binds = ()) -> T:
    """The blocking form of :func:`in_namespace`, for code without an event loop."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            _enter(path, binds)
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=run, name="netsetup-enter", daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    result: T = value
    return result
