"""Batched UDP I/O: recvmmsg(2) and sendmmsg(2) on one socket.  Adapter (Linux, via ctypes).

Why ctypes: Python's `socket` module has no recvmmsg/sendmmsg, and per
datagram the recvfrom + sendto pair (and the event-loop dispatch around them)
cost more CPU than answering the query.  ctypes ships with CPython and calls
libc directly: no compiler, no binary wheel per platform for two syscalls.
Its per-call overhead (~1 us) is paid once per batch, not per datagram.

:class:`UdpBatch` owns preallocated buffers for `size` datagrams: one
`struct mmsghdr` array, one iovec and one `sockaddr_storage` per slot, and one
64 KiB payload slot each (anonymous mmap: only the pages datagrams touch
become resident).  The same headers serve both directions: after recvmmsg
each header names its peer in the raw form the kernel wrote; a reply is copied
over its query in the same slot and sendmmsg sends the headers back as they
are, so the hot path converts no address.  :meth:`UdpBatch.peer` turns one
into a `socket`-style tuple, for the rare reply sent later or one by one.

Layout assumptions (LP64 Linux: glibc or musl) are checked at construction
from the ctypes structures; :func:`available` says whether this platform has
both calls.

Error handling: :meth:`UdpBatch.receive` returns 0 when nothing is waiting
and raises OSError (errno kept) for anything else.  :meth:`UdpBatch.send`
never raises for a datagram: replies the socket could not take now (EAGAIN)
and replies the kernel refused (EMSGSIZE, EINVAL...) come back in :class:`Unsent`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# A UDP payload is at most 65,535 octets (RFC 768 length field), so one slot
# holds any datagram whole (no MSG_TRUNC) and any reply.
SLOT = 65536
NAME_SIZE = 128  # sizeof(struct sockaddr_storage)
DEFAULT_SIZE = 64  # datagrams per recvmmsg/sendmmsg
EINTR_RETRIES = 3  # sendmmsg interrupted by a signal this often: the rest counts as failed
_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


_HDR_SIZE = ctypes.sizeof(_Mmsghdr)
_IOV_SIZE = ctypes.sizeof(_Iovec)
# Indexes into the headers seen as 32-bit words (hot-path reads and writes).
_WORDS = _HDR_SIZE // 4
_NAMELEN = _Msghdr.msg_namelen.offset // 4
_MSG_LEN = _Mmsghdr.msg_len.offset // 4
# Index of iov_len in the iovecs seen as size_t words.
_IOV_WORDS = _IOV_SIZE // ctypes.sizeof(ctypes.c_size_t)
_IOV_LEN = _Iovec.iov_len.offset // ctypes.sizeof(ctypes.c_size_t)


@dataclass(frozen=True, slots=True)
class Unsent:
    """What :meth:`UdpBatch.send` could not send.

    `blocked`: indexes of replies the socket had no room for (EAGAIN); send them
    later.  `failed`: (index, error) of replies the kernel refused; drop them.
    """

    blocked: tuple[int, ...]
    failed: tuple[tuple[int, OSError], ...]


def _load_libc() -> Any:
    """libc with recvmmsg and sendmmsg, or None.

    The interpreter's own symbols come first: CPython links libc, and
    `ctypes.util.find_library` would run ldconfig in a subprocess.
    """
    for name in (None, "libc.so.6"):
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            recv, send = libc.recvmmsg, libc.sendmmsg
        except (OSError, AttributeError):
            continue
        recv.restype = send.restype = ctypes.c_int
        return libc
    return None


_LIBC = _load_libc() if sys.platform == "linux" else None


def available() -> bool:
    """True when libc has recvmmsg and sendmmsg and the structures have Linux's LP64 layout."""
    return (
        _LIBC is not None
        and _HDR_SIZE == 64
        and _Msghdr.msg_namelen.offset == 8
        and _Mmsghdr.msg_len.offset == 56
        and ctypes.sizeof(_Iovec) == 16
        and ctypes.sizeof(ctypes.c_size_t) == 8
    )


def _os_error(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


class UdpBatch:
    """recvmmsg/sendmmsg buffers for one non-blocking UDP socket (`fd`); close() frees them.

    Usage per batch: `n = receive()`, `datagrams(n)`, then `send(replies)` with
    one entry per datagram.  :meth:`peer` and :meth:`client` read datagram
    `i`'s sender and are valid until the next receive().
    """

    def __init__(self, fd: int, size: int = DEFAULT_SIZE) -> None:
        if _LIBC is None or not available():
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available through libc")
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        self.fd = fd
        self.size = size
        self._recvmmsg = _LIBC.recvmmsg
        self._sendmmsg = _LIBC.sendmmsg
        self._hdrs = (_Mmsghdr * size)()
        self._iovs = (_Iovec * size)()
        self._names = (ctypes.c_char * (NAME_SIZE * size))()
        self._payload = mmap.mmap(-1, SLOT * size)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._payload)
        base = ctypes.addressof(self._anchor)
        names = ctypes.addressof(self._names)
        for i in range(size):
            self._iovs[i].iov_base = base + i * SLOT
            self._iovs[i].iov_len = SLOT
            hdr = self._hdrs[i].msg_hdr
            hdr.msg_name = names + i * NAME_SIZE
            hdr.msg_namelen = NAME_SIZE
            hdr.msg_iov = ctypes.pointer(self._iovs[i])
            hdr.msg_iovlen = 1
        self._hdr_bytes = memoryview(self._hdrs).cast("B")
        self._iov_bytes = memoryview(self._iovs).cast("B")
        self._words = self._hdr_bytes.cast("I")
        self._iov_words = self._iov_bytes.cast("Q")  # size_t
        self._name_bytes = memoryview(self._names).cast("B")
        # The headers and iovecs as set up: receive() copies them back over the
        # slots the last batch used (recvmmsg wrote name lengths, send() reply lengths).
        self._clean_hdrs = memoryview(self._hdr_bytes.tobytes())
        self._clean_iovs = memoryview(self._iov_bytes.tobytes())
        self._count = 0  # slots the last receive() filled (and send() may have changed)

    def close(self) -> None:
        """Free the buffers; the socket is the caller's.  Idempotent."""
        if self._anchor is None:
            return
        for view in (self._words, self._iov_words, self._hdr_bytes, self._iov_bytes):
            view.release()
        self._name_bytes.release()
        self._anchor = None  # release the export before unmapping
        self._payload.close()

    def receive(self) -> int:
        """Read up to `size` waiting datagrams; how many (0: none waiting, or interrupted)."""
        used = self._count
        if used:  # undo what the last batch wrote over the slots
            self._hdr_bytes[: used * _HDR_SIZE] = self._clean_hdrs[: used * _HDR_SIZE]
            self._iov_bytes[: used * _IOV_SIZE] = self._clean_iovs[: used * _IOV_SIZE]
            self._count = 0
        n: int = self._recvmmsg(self.fd, self._hdrs, self.size, socket.MSG_DONTWAIT, None)
        if n < 0:
            code = ctypes.get_errno()
            if code in _RETRY_LATER or code == errno.EINTR:
                return 0
            raise _os_error(code, f"recvmmsg on fd {self.fd}")
        self._count = n
        return n

    def datagrams(self, n: int) -> list[bytes]:
        """The payloads of the first `n` datagrams of the last receive()."""
        payload, words = self._payload, self._words
        return [payload[i * SLOT : i * SLOT + words[i * _WORDS + _MSG_LEN]] for i in range(n)]

    def send(self, replies: Sequence[bytes | None]) -> Unsent | None:
        """Send `replies[i]` to the sender of datagram `i` (None: no reply); None if all went.

        Consecutive replies go out in one sendmmsg; a call that stops short
        (an error after some messages) is resumed after the message that failed.
        """
        payload, iov_words = self._payload, self._iov_words
        blocked: list[int] = []
        failed: list[tuple[int, OSError]] = []
        start = -1
        for i, reply in enumerate(replies):
            if reply is not None and (size := len(reply)) <= SLOT:
                offset = i * SLOT
                payload[offset : offset + size] = reply
                iov_words[i * _IOV_WORDS + _IOV_LEN] = size
                if start < 0:
                    start = i
                continue
            if reply is not None:
                failed.append((i, _os_error(errno.EMSGSIZE, f"reply of {len(reply)} octets")))
            if start >= 0:
                self._send_run(start, i, blocked, failed)
                start = -1
        if start >= 0:
            self._send_run(start, len(replies), blocked, failed)
        if blocked or failed:
            return Unsent(tuple(blocked), tuple(failed))
        return None

    def _send_run(
        self, start: int, stop: int, blocked: list[int], failed: list[tuple[int, OSError]]
    ) -> None:
        """sendmmsg the prepared slots start..stop-1, resuming after partial sends."""
        interrupted = 0
        while start < stop:
            ref = ctypes.byref(self._hdrs, start * _HDR_SIZE)
            sent: int = self._sendmmsg(self.fd, ref, stop - start, socket.MSG_DONTWAIT)
            if sent > 0:
                start += sent
                continue
            code = ctypes.get_errno() if sent < 0 else errno.EIO
            if code in _RETRY_LATER:
                blocked.extend(range(start, stop))
                return
            if code == errno.EINTR and interrupted < EINTR_RETRIES:
                interrupted += 1
                continue
            failed.append((start, _os_error(code, f"sendmmsg to {self.peer(start)}")))
            start += 1

    def peer(self, i: int) -> tuple[Any, ...]:
        """Datagram `i`'s sender as `socket.recvfrom` gives it: (host, port[, flow, scope])."""
        offset = i * NAME_SIZE
        name = self._name_bytes[offset : offset + self._words[i * _WORDS + _NAMELEN]]
        family = int.from_bytes(name[:2], sys.byteorder)
        port = int.from_bytes(name[2:4], "big")
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, name[4:8]), port
        if family == socket.AF_INET6:
            host = socket.inet_ntop(socket.AF_INET6, name[8:24])
            flow = int.from_bytes(name[4:8], "big")
            scope = int.from_bytes(name[24:28], sys.byteorder)
            if scope:
                host = f"{host}%{_scope_name(scope)}"
            return host, port, flow, scope
        raise _os_error(errno.EAFNOSUPPORT, f"sender of datagram {i} has address family {family}")

    def client(self, i: int) -> str:
        """Datagram `i`'s sender IP as text (IPv6 with %scope when link-local)."""
        host: str = self.peer(i)[0]
        return host


def _scope_name(scope: int) -> str:
    """The interface name `socket.recvfrom` puts after '%' (its index when it has none)."""
    try:
        return socket.if_indextoname(scope)
    except OSError:
        return str(scope)
