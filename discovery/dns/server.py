"""DNS over UDP and TCP on one port.  Adapter: asyncio sockets around the Responder.

No DNS logic lives here: every message goes to :meth:`Responder.respond` and
its bytes go back to the client.  The server only frames messages, relays
forwarded queries (:mod:`discovery.dns.forward`) and enforces resource limits.

- UDP: the hot path, answered synchronously: no task, no log line, nothing
  allocated per datagram beyond its bytes, its reply and a list slot.  On Linux
  :class:`_UdpBatchReader` reads up to :data:`UDP_BATCH` datagrams per
  recvmmsg and sends their replies with one sendmmsg (:mod:`discovery.dns.udpbatch`);
  per datagram, recvfrom + sendto + a loop dispatch cost more CPU than the
  answer itself (tests/bench/README.md).  Elsewhere, or with `udp_batch=0`,
  :class:`_UdpProtocol` on asyncio's datagram transport, one datagram per call.
- TCP (RFC 7766): 2-octet length framing, several pipelined queries per
  connection (forwarded ones may be answered out of order, section 6.2.1.1),
  an idle timeout (section 6.2.3), a cap on connections and on outstanding
  queries per connection (section 10: servers should limit TCP resources).
  The cap is shared fairly: one client (source address) holds at most
  `tcp_max_per_client` connections, and a new client arriving at the cap
  gets in by closing the connection idle the longest (section 6.2.3).
- Forwarded queries run as tasks, at most `max_forwards` at a time; beyond
  that, or when every recursor fails, the client gets SERVFAIL.

Error handling: an exception from the responder becomes
:meth:`Responder.servfail` and serving goes on; each exception type is logged
at most once per :data:`ERROR_LOG_INTERVAL` with a count of the ones skipped.
An error on one client's socket only affects that client.  A UDP reply the
kernel refuses is logged at debug level (as asyncio's transport does); replies
the socket has no room for wait, up to :data:`MAX_UDP_BACKLOG` octets, and
beyond that are dropped and logged like errors.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from discovery.dns import udpbatch
from discovery.dns.forward import forward_query
from discovery.dns.responder import ForwardQuery, Responder

log = logging.getLogger(__name__)

# RFC 7766 section 10: a server should limit the TCP resources clients can take.
MAX_TCP_CONNECTIONS = 512
# Forwarded queries outstanding on one TCP connection before we stop reading it.
MAX_TCP_PENDING = 64
# Forwarded queries in flight over the whole server; beyond that: SERVFAIL.
MAX_FORWARDS = 1000
# Port 0: UDP picks a free port, TCP may find it taken (outgoing connections hold
# ports of the same range on a busy host); then try another one.
BIND_ATTEMPTS = 50
# A large receive buffer absorbs bursts instead of dropping them (capped by rmem_max).
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
TCP_BACKLOG = 256
ERROR_LOG_INTERVAL = 60.0  # seconds between two log lines for one exception type
# RFC 1035 section 4.1.1: the header is 12 octets; shorter is not a message.
HEADER_SIZE = 12
# RFC 1035 section 4.2.2: TCP messages carry a 16-bit length prefix.
LENGTH_PREFIX = 2
MAX_TCP_MESSAGE = 65535
# RFC 1035 section 4.1.1: AA is in the header's third octet, RA tops the fourth.
AA_BIT = 0x04
RA_BIT = 0x80
MIN_TIMER = 0.05  # seconds; re-arming the idle timer sooner than this is pointless
# ip(7), ipv6(7): bind to an address that is not (yet, or any more) on an interface,
# so a listener on the bridge gateway outlives the bridge being recreated.
IP_FREEBIND = 15
IPV6_FREEBIND = 78
# Datagrams read (recvmmsg) and answered (sendmmsg) per system call; 0: asyncio's transport.
UDP_BATCH = udpbatch.DEFAULT_SIZE
# Full batches read per readiness event before other callbacks get their turn.
UDP_BATCHES_PER_WAKEUP = 4
# UDP replies queued while the socket's send buffer is full; beyond that they are dropped.
MAX_UDP_BACKLOG = 1024 * 1024  # octets

Send = Callable[[bytes], None]


class _UdpEndpoint(Protocol):
    """The UDP side of a server: one socket for every client (transport or batch reader)."""

    closed: asyncio.Future[None]

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...


class _ErrorLog:
    """Logs each exception type at most once per interval, counting the ones skipped."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[type[BaseException], float] = {}
        self._skipped: dict[type[BaseException], int] = {}

    def report(self, what: str, exc: BaseException) -> None:
        kind = type(exc)
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            what = f"{what} ({skipped} more {kind.__name__} since the last report)"
        log.error("%s", what, exc_info=exc)


class DnsServer:
    """A running DNS server: UDP and TCP on `host`:`port`.  Built by :func:`start_dns`."""

    def __init__(
        self, responder: Responder, *, max_tcp_connections: int, max_forwards: int
    ) -> None:
        self.responder = responder
        self.host = ""
        self.port = 0
        self.max_tcp_connections = max_tcp_connections
        self.max_forwards = max_forwards
        self._udp: _UdpEndpoint | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[_TcpConnection] = set()
        self._per_client: dict[str, int] = {}  # connections by client address
        self._forwards: set[asyncio.Task[None]] = set()
        self._errors = _ErrorLog()
        self._closing = False

    @property
    def serving(self) -> bool:
        """True while both sockets are open and close() has not been called."""
        udp, tcp = self._udp, self._tcp
        return (
            not self._closing
            and udp is not None
            and not udp.is_closing()
            and tcp is not None
            and tcp.is_serving()
        )

    def close(self) -> None:
        """Stop listening, cancel forwarded queries and drop client connections."""
        self._closing = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._forwards):
            task.cancel()
        for conn in list(self._connections):
            conn.abort()

    async def wait_closed(self) -> None:
        """Wait until every socket is closed and every forwarded query has ended."""
        if self._tcp is not None:
            await self._tcp.wait_closed()
        await asyncio.gather(*self._forwards, return_exceptions=True)
        waiters = [conn.closed for conn in self._connections]
        if self._udp is not None:
            waiters.append(self._udp.closed)
        await asyncio.gather(*waiters)

    # -- used by the protocols ---------------------------------------------------

    def failed(self, exc: Exception, data: bytes) -> bytes | None:
        """The reply to `data` after the responder raised `exc`: SERVFAIL, or None."""
        self._errors.report("DNS responder failed; answering SERVFAIL", exc)
        return self.servfail(data)

    def servfail(self, data: bytes) -> bytes | None:
        try:
            return self.responder.servfail(data)
        except Exception as exc:
            self._errors.report("DNS responder could not build SERVFAIL; dropping", exc)
            return None

    def report(self, what: str, exc: BaseException) -> None:
        self._errors.report(what, exc)

    def admit(self, conn: _TcpConnection, client: str) -> bool:
        """Register a new TCP connection from `client`, or refuse it.

        Refused: while closing, or when `client` already holds
        settings.tcp_max_per_client connections.  At max_tcp_connections the
        connection idle the longest is closed to make room (RFC 7766 section
        6.2.3: under pressure a server closes idle connections first; one
        waiting on a recursor goes last), so no client can lock the others out.
        """
        if self._closing:
            return False
        held = self._per_client.get(client, 0)
        if held >= self.responder.settings.tcp_max_per_client:
            return False
        connections = self._connections
        if len(connections) >= self.max_tcp_connections:
            if not connections:
                return False  # a cap of 0 admits nobody
            idlest = min(connections, key=_TcpConnection.eviction_order)
            self.forget(idlest)
            idlest.abort()
        connections.add(conn)
        self._per_client[client] = held + 1
        return True

    def forget(self, conn: _TcpConnection) -> None:
        """Unregister `conn` (idempotent: evicted connections are forgotten twice)."""
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        client = conn.client
        held = self._per_client.get(client, 0) - 1
        if held > 0:
            self._per_client[client] = held
        else:
            self._per_client.pop(client, None)

    def forward(
        self, query: bytes, data: bytes, send: Send, *, tcp: bool
    ) -> asyncio.Task[None] | None:
        """Start relaying `query` to the recursors; the reply (or SERVFAIL) goes to `send`.

        Returns the task, or None when none was started (closing, or over the
        limit: then SERVFAIL was sent at once).
        """
        if self._closing:
            return None
        if len(self._forwards) >= self.max_forwards:
            reply = self.servfail(data)
            if reply is not None and len(reply) >= HEADER_SIZE:
                send(_as_forwarder(reply))
            return None
        task = asyncio.get_running_loop().create_task(self._relay(query, data, send, tcp))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)
        return task

    async def _relay(self, query: bytes, data: bytes, send: Send, tcp: bool) -> None:
        settings = self.responder.settings
        try:
            reply = await forward_query(
                query,
                settings.recursors,
                settings.recursor_timeout,
                tcp=tcp,
                max_payload=settings.edns_max_payload,
            )
        except Exception as exc:
            self._errors.report("DNS forwarding failed; answering SERVFAIL", exc)
            reply = None
        if reply is None:
            reply = self.servfail(data)
        if reply is not None and len(reply) >= HEADER_SIZE:
            send(_as_forwarder(reply))


def _as_forwarder(reply: bytes) -> bytes:
    """`reply` with the header bits of a forwarder (RFC 1035 section 4.1.1).

    RA=1: the client may recurse through us (the responder checked), whatever
    the upstream said (an authoritative upstream sends RA=0).  AA=0: we are
    not an authority for that name, whatever the upstream is.
    """
    flags = bytes(((reply[2] & ~AA_BIT) & 0xFF, reply[3] | RA_BIT))
    return reply[:2] + flags + reply[4:]


class _UdpProtocol(asyncio.DatagramProtocol):
    """One socket for every UDP client; answers in `datagram_received`."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._respond = server.responder.respond
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto: Callable[[bytes, Any], None] = _discard
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: asyncio's own UDP transport only subclasses DatagramTransport from 3.12.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self._transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            reply = self._respond(data, client=addr[0], tcp=False)
        except Exception as exc:
            reply = self._server.failed(exc, data)
        if reply is None:
            return
        if isinstance(reply, ForwardQuery):
            self._server.forward(reply.query, data, self._sender(addr), tcp=False)
            return
        self._sendto(reply, addr)

    def _sender(self, addr: tuple[str | Any, int]) -> Send:
        def send(reply: bytes) -> None:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.sendto(reply, addr)

        return send

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) about an earlier reply: that client is gone.
        log.debug("DNS UDP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _discard(data: bytes, addr: Any) -> None:
    """The `sendto` of a protocol whose transport is not there yet."""


class _UdpBatchReader:
    """One socket for every UDP client, read and answered in batches (recvmmsg/sendmmsg).

    On readiness one recvmmsg takes up to a batch of queries; their replies
    leave in one sendmmsg, addressed with the peers' sockaddrs as received.
    Replies the socket has no room for wait in a bounded backlog, sent one by
    one with sendto when the socket is writable again (as asyncio's transport does).
    """

    def __init__(self, server: DnsServer, sock: socket.socket, size: int) -> None:
        self._server = server
        self._respond = server.responder.respond
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._backlog: deque[tuple[bytes, Any]] = deque()
        self._backlog_size = 0
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._batch = udpbatch.UdpBatch(self._fd, size)
        try:
            self._loop.add_reader(self._fd, self._readable)
        except BaseException:
            self._batch.close()
            raise

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._loop.remove_reader(self._fd)
        if self._backlog:
            self._loop.remove_writer(self._fd)
            self._backlog.clear()
        self._sock.close()
        self._batch.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def is_closing(self) -> bool:
        return self._sock.fileno() < 0

    def _readable(self) -> None:
        batch = self._batch
        for _ in range(UDP_BATCHES_PER_WAKEUP):
            try:
                count = batch.receive()
            except OSError as exc:
                # ICMP errors about an earlier reply (that client is gone) and the like.
                log.debug("DNS UDP socket error: %s", exc)
                return
            if not count:
                return
            self._answer(count)
            if count < batch.size or self._sock.fileno() < 0:
                return

    def _answer(self, count: int) -> None:
        batch, server, respond = self._batch, self._server, self._respond
        # The responder reads `client` only for the recursion allow-list: text
        # for the address is made only when recursors are configured.
        recursion = bool(server.responder.settings.recursors)
        replies: list[bytes | None] = []
        for i, data in enumerate(batch.datagrams(count)):
            try:
                reply = respond(data, client=batch.client(i) if recursion else "", tcp=False)
            except Exception as exc:
                reply = server.failed(exc, data)
            if isinstance(reply, ForwardQuery):
                server.forward(reply.query, data, self._sender(batch.peer(i)), tcp=False)
                reply = None
            replies.append(reply)
        unsent = batch.send(replies)
        if unsent is None:
            return
        for _, error in unsent.failed:
            log.debug("DNS UDP reply not sent: %s", error)
        for i in unsent.blocked:
            reply = replies[i]
            if reply is not None:
                self._queue(reply, batch.peer(i))

    def _sender(self, addr: Any) -> Send:
        return lambda reply: self._sendto(reply, addr)

    def _sendto(self, reply: bytes, addr: Any) -> None:
        """Send one reply now, or queue it behind the ones waiting for room."""
        if self._sock.fileno() < 0:
            return
        if not self._backlog:
            try:
                self._sock.sendto(reply, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.debug("DNS UDP reply to %s not sent: %s", addr, exc)
                return
        self._queue(reply, addr)

    def _queue(self, reply: bytes, addr: Any) -> None:
        if self._backlog_size + len(reply) > MAX_UDP_BACKLOG:
            self._server.report(
                "DNS UDP send buffer full; dropping replies",
                OSError(errno.ENOBUFS, f"{self._backlog_size} octets of replies queued"),
            )
            return
        if not self._backlog:
            self._loop.add_writer(self._fd, self._writable)
        self._backlog.append((reply, addr))
        self._backlog_size += len(reply)

    def _writable(self) -> None:
        backlog = self._backlog
        while backlog:
            reply, addr = backlog[0]
            try:
                self._sock.sendto(reply, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("DNS UDP reply to %s not sent: %s", addr, exc)
            backlog.popleft()
            self._backlog_size -= len(reply)
        self._loop.remove_writer(self._fd)


class _TcpConnection(asyncio.Protocol):
    """One TCP client (RFC 7766): framing, pipelining, idle timeout, backpressure."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._respond = server.responder.respond
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.client = ""
        self._buffer = bytearray()
        self._pending = 0  # forwarded queries not answered yet
        self._last_active = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        if not self._server.admit(self, self.client):
            self._transport.abort()
            return
        self._arm_timer(self._server.responder.settings.tcp_idle_timeout)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def eof_received(self) -> bool | None:
        self._eof = True
        # Keep our half open while answers are still to come (forwarded queries,
        # or queries held back while the client did not read).
        return True if self._owing() else None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()  # the queries left in the buffer while the client was not reading

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def eviction_order(self) -> tuple[bool, float]:
        """Sorts first the connection to close first: not waiting on a recursor, then
        idle the longest (the loop time of its last query or answer, or of its start)."""
        return bool(self._pending), self._last_active

    # -- framing -------------------------------------------------------------------

    def _drain(self) -> None:
        """Answer the complete messages in the buffer while the limits allow.

        Stops at MAX_TCP_PENDING forwarded queries, or when the client does not
        read its answers (pause_writing): what is left waits in the buffer.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        buf = self._buffer
        end = len(buf)
        pos = 0
        while (
            end - pos >= LENGTH_PREFIX
            and self._pending < MAX_TCP_PENDING
            and not self._write_paused
        ):
            size = buf[pos] << 8 | buf[pos + 1]
            if size < HEADER_SIZE:
                # A zero length or a message shorter than a header: the stream
                # cannot be resynchronised, so close it.
                self._close()
                return
            stop = pos + LENGTH_PREFIX + size
            if stop > end:
                break
            self._answer(bytes(buf[pos + LENGTH_PREFIX : stop]))
            pos = stop
            if transport.is_closing():
                return
        if pos:
            del buf[:pos]
        if self._eof and not self._owing():
            transport.close()  # the client half-closed and has every answer: flush, close
            return
        self._update_reading()

    def _answer(self, message: bytes) -> None:
        self._last_active = self._loop.time()
        try:
            reply = self._respond(message, client=self.client, tcp=True)
        except Exception as exc:
            reply = self._server.failed(exc, message)
        if reply is None:
            return
        if isinstance(reply, ForwardQuery):
            task = self._server.forward(
                reply.query, message, lambda answer: self._send(answer, message), tcp=True
            )
            if task is not None:
                self._pending += 1
                task.add_done_callback(self._forward_done)
            return
        self._send(reply, message)

    def _send(self, reply: bytes, query: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if len(reply) > MAX_TCP_MESSAGE:
            self._server.report(
                "DNS reply does not fit a TCP frame; answering SERVFAIL",
                OverflowError(f"reply of {len(reply)} octets > {MAX_TCP_MESSAGE}"),
            )
            servfail = self._server.servfail(query)
            if servfail is None or len(servfail) > MAX_TCP_MESSAGE:
                return
            reply = servfail
        transport.write(len(reply).to_bytes(LENGTH_PREFIX, "big") + reply)
        self._last_active = self._loop.time()

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        self._pending -= 1
        self._last_active = self._loop.time()
        self._drain()

    def _owing(self) -> bool:
        """True while a forwarded answer is pending or a complete query is buffered."""
        buf = self._buffer
        return bool(self._pending) or (
            len(buf) >= LENGTH_PREFIX and len(buf) >= LENGTH_PREFIX + (buf[0] << 8 | buf[1])
        )

    # -- limits ----------------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._eof:
            return  # nothing more to read; resuming would only report EOF again
        want_paused = self._write_paused or self._pending >= MAX_TCP_PENDING
        if want_paused and not self._read_paused:
            transport.pause_reading()
        elif not want_paused and self._read_paused:
            transport.resume_reading()
        self._read_paused = want_paused

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._loop.call_later(max(delay, MIN_TIMER), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        timeout = self._server.responder.settings.tcp_idle_timeout
        idle = self._loop.time() - self._last_active
        if idle < timeout:
            self._arm_timer(timeout - idle)
        elif self._pending and not self._transport.is_closing():
            self._arm_timer(timeout)  # waiting for the recursors is not idling
        else:
            # RFC 7766 section 6.2.3: the server closes connections that stay idle
            # (or that stay unread while we flush our last answers).
            self._close()

    def _close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if transport.is_closing() or transport.get_write_buffer_size():
            transport.abort()  # the client does not read: do not wait for it
        else:
            transport.close()


async def start_dns(
    responder: Responder,
    host: str,
    port: int,
    *,
    max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    max_forwards: int = MAX_FORWARDS,
    udp_batch: int = UDP_BATCH,
    freebind: bool = False,
) -> DnsServer:
    """Serve DNS for `responder` on `host`:`port`, UDP and TCP; port 0 picks a free port.

    `udp_batch` datagrams are read and answered per system call where the
    platform has recvmmsg/sendmmsg; 0 (or a platform without them) uses
    asyncio's datagram transport, one datagram per call.  `freebind` sets
    IP_FREEBIND (Linux): the sockets stay bound while their address leaves and
    comes back with its interface (the allocations' DNS on the bridge gateway).

    Error handling: an address that cannot be resolved or bound raises OSError
    naming the protocol and address (errno kept); nothing stays open then.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot resolve DNS listen address {host!r}: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    attempts = BIND_ATTEMPTS if port == 0 else 1
    udp_sock, tcp_sock = _bind_pair(family, sockaddr, attempts=attempts, freebind=freebind)
    server = DnsServer(
        responder, max_tcp_connections=max_tcp_connections, max_forwards=max_forwards
    )
    server.host, server.port = udp_sock.getsockname()[:2]
    try:
        server._udp = await _start_udp(server, udp_sock, udp_batch)
    except BaseException:
        udp_sock.close()
        tcp_sock.close()
        raise
    try:
        server._tcp = await loop.create_server(
            lambda: _TcpConnection(server), sock=tcp_sock, backlog=TCP_BACKLOG
        )
    except BaseException:
        tcp_sock.close()
        server.close()
        await server.wait_closed()
        raise
    log.debug("DNS serving on %s port %d (UDP and TCP)", server.host, server.port)
    return server


async def _start_udp(server: DnsServer, sock: socket.socket, batch: int) -> _UdpEndpoint:
    """The batch reader when asked for and possible, else asyncio's datagram transport."""
    if batch > 0 and udpbatch.available():
        return _UdpBatchReader(server, sock, batch)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(lambda: _UdpProtocol(server), sock=sock)
    return protocol


def _bind_pair(
    family: int, sockaddr: tuple[Any, ...], *, attempts: int, freebind: bool = False
) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same port (UDP first when the port is 0)."""
    for attempt in range(attempts):
        # Only when asked: _bind keeps its three-argument form for everyone else.
        options = {"freebind": True} if freebind else {}
        udp = _bind(family, socket.SOCK_DGRAM, sockaddr, **options)
        port = udp.getsockname()[1]
        try:
            tcp_addr = (sockaddr[0], port, *sockaddr[2:])
            tcp = _bind(family, socket.SOCK_STREAM, tcp_addr, **options)
        except OSError as exc:
            udp.close()
            if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                continue  # port 0: the TCP side of this port is taken, try another
            raise
        return udp, tcp
    raise AssertionError("unreachable: the last attempt returns or raises")


def _bind(
    family: int, kind: int, sockaddr: tuple[Any, ...], *, freebind: bool = False
) -> socket.socket:
    proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    sock = socket.socket(family, kind)
    try:
        if freebind and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        elif freebind:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only, for UDP and TCP alike (asyncio does this for TCP).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = (
            f"[{sockaddr[0]}]:{sockaddr[1]}"
            if ":" in sockaddr[0]
            else f"{sockaddr[0]}:{sockaddr[1]}"
        )
        raise OSError(
            exc.errno, f"cannot bind DNS {proto} socket to {where}: {exc.strerror}"
        ) from exc
    return sock
