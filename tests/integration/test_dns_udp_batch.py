"""UDP in batches (recvmmsg/sendmmsg, :mod:`discovery.dns.udpbatch`) on real loopback sockets.

Bursts are sent synchronously from several client sockets before the event
loop runs again, so the server finds them all waiting and reads full
batches; a spy on :meth:`UdpBatch.receive` proves it did.  A partial
sendmmsg is the kernel's own (a reply over the IPv4 datagram limit fails with
EMSGSIZE after the replies before it went out).  Loopback never runs out of
send buffer, so EAGAIN comes from a stand-in for libc's sendmmsg
(:class:`BlockingLibc`); everything else is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import select
import socket
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from discovery.dns import server as server_module
from discovery.dns import udpbatch
from discovery.dns.responder import ForwardQuery, Responder
from discovery.dns.settings import DnsSettings
from discovery.dns.udpbatch import UdpBatch
from discovery.model import make_instance

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

TIMEOUT = 2.0
# Loopback delivers a datagram within sendto(); this covers a deferred softirq on a busy host.
SETTLE = 0.02
SETTINGS = DnsSettings(node_name="agent")
WEB = [
    make_instance(service="web", id=f"web-{n}", node="agent", address=f"10.0.1.{n}", port=80)
    for n in (1, 2, 3)
]
WEB_ADDRESSES = ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
UPSTREAM = [make_instance(service="api", id="api-1", node="up", address="10.9.0.1", port=90)]
IPV4_MAX_PAYLOAD = 65507  # 65,535 - 20 (IP header) - 8 (UDP header)
# (name, type, expected rcode): the mix of a burst, cycled through
MIX: list[tuple[str, str, int]] = [
    ("web.service.nomad.", "A", dns.rcode.NOERROR),
    ("web.service.nomad.", "SRV", dns.rcode.NOERROR),
    ("nope.service.nomad.", "A", dns.rcode.NXDOMAIN),
]

pytestmark = pytest.mark.skipif(not udpbatch.available(), reason="needs recvmmsg/sendmmsg")


def query(name: str, rdtype: str, ident: int) -> bytes:
    msg = dns.message.make_query(name, rdtype)
    msg.id = ident
    return msg.to_wire()


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == dns.rdatatype.A
    )


@contextlib.contextmanager
def clients(count: int, family: int = socket.AF_INET) -> Iterator[list[socket.socket]]:
    """`count` non-blocking UDP sockets on loopback, closed afterwards."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            sock.bind((host, 0))
            sock.setblocking(False)
            socks.append(sock)
        yield socks


async def receive(sock: socket.socket, count: int) -> list[dns.message.Message]:
    """The next `count` replies on `sock`; fails after TIMEOUT."""
    loop = asyncio.get_running_loop()
    replies = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(count):
            replies.append(dns.message.from_wire(await loop.sock_recv(sock, 65535)))
    return replies


async def nothing_on(sock: socket.socket, wait: float = 0.2) -> bool:
    """True when no datagram arrives on `sock` within `wait` seconds."""
    try:
        async with asyncio.timeout(wait):
            await asyncio.get_running_loop().sock_recv(sock, 65535)
    except TimeoutError:
        return True
    return False


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The count of every non-empty UdpBatch.receive() while the test runs."""
    sizes: list[int] = []
    original = UdpBatch.receive

    def spy(self: UdpBatch) -> int:
        count = original(self)
        if count:
            sizes.append(count)
        return count

    monkeypatch.setattr(UdpBatch, "receive", spy)
    return sizes


def send_burst(
    socks: Sequence[socket.socket], dest: tuple[str, int], per_client: int
) -> dict[int, tuple[str, str, int]]:
    """`per_client` queries from each socket, round-robin, without yielding to the loop.

    Returns ident -> (name, type, rcode) for every query; idents are unique.
    """
    sent = {}
    for j in range(per_client):
        for k, sock in enumerate(socks):
            ident = k * 1000 + j
            name, rdtype, rcode = MIX[(j + k) % len(MIX)]
            sock.sendto(query(name, rdtype, ident), dest)
            sent[ident] = (name, rdtype, rcode)
    return sent


def check_replies(
    replies: Sequence[dns.message.Message], sent: dict[int, tuple[str, str, int]], client: int
) -> None:
    """Every reply answers one query this client sent, each query exactly once."""
    assert sorted(r.id for r in replies) == sorted(i for i in sent if i // 1000 == client)
    for reply in replies:
        name, rdtype, rcode = sent[reply.id]
        assert reply.question[0].name.to_text() == name
        assert dns.rdatatype.to_text(reply.question[0].rdtype) == rdtype
        assert reply.rcode() == rcode
        if rdtype == "A" and rcode == dns.rcode.NOERROR:
            assert addresses(reply) == WEB_ADDRESSES
        if rdtype == "SRV":
            assert len(reply.answer[0]) == len(WEB)


# -- the server ---------------------------------------------------------------------------


@pytest.mark.parametrize("udp_batch", [server_module.UDP_BATCH, 8, 0])
async def test_burst_from_several_clients_answered(
    start_waypost: StartWaypost, batch_sizes: list[int], udp_batch: int
) -> None:
    dns_ = await start_waypost(SETTINGS, WEB, udp_batch=udp_batch)
    per_client = 40
    with clients(6) as socks:
        sent = send_burst(socks, (dns_.host, dns_.port), per_client)
        got = await asyncio.gather(*(receive(sock, per_client) for sock in socks))
        for k, replies in enumerate(got):
            check_replies(replies, sent, k)
        assert all([await nothing_on(sock, 0.05) for sock in socks])  # no duplicates
    if udp_batch:
        # All 240 were waiting: full batches (the loop may wake before the last ones land).
        assert max(batch_sizes) == udp_batch
        assert sum(batch_sizes) == len(sent)
    else:
        assert batch_sizes == []  # asyncio's transport, one datagram at a time


async def test_ipv6_clients_answered_in_a_batch(
    start_waypost: StartWaypost, batch_sizes: list[int]
) -> None:
    dns_ = await start_waypost(SETTINGS, WEB, host="::1")
    per_client = 10
    with clients(3, socket.AF_INET6) as socks:
        sent = send_burst(socks, (dns_.host, dns_.port), per_client)
        got = await asyncio.gather(*(receive(sock, per_client) for sock in socks))
        for k, replies in enumerate(got):
            check_replies(replies, sent, k)
    assert max(batch_sizes) > 1


@pytest.fixture
async def upstream(start_waypost: StartWaypost) -> RunningDns:
    """A real waypost server authoritative for `example.`: the recursor of the tests below."""
    settings = DnsSettings(domain="example.", node_name="up")
    return await start_waypost(settings, UPSTREAM)


def forwarding(upstream: RunningDns, *allowed: str) -> DnsSettings:
    return DnsSettings(
        node_name="agent",
        recursors=(f"127.0.0.1:{upstream.port}",),
        recursion_allowed=tuple(ipaddress.ip_network(net) for net in allowed),
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_forwarded_query_in_the_middle_of_a_batch(
    start_waypost: StartWaypost, upstream: RunningDns, batch_sizes: list[int], host: str
) -> None:
    front = await start_waypost(forwarding(upstream, "127.0.0.0/8", "::1/128"), WEB, host=host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with clients(2, family) as socks:
        first, second = socks
        dest = (front.host, front.port)
        for ident in range(10):
            first.sendto(query("web.service.nomad.", "A", ident), dest)
        first.sendto(query("api.service.example.", "A", 99), dest)  # out of the zone
        for ident in range(10, 20):
            first.sendto(query("web.service.nomad.", "A", ident), dest)
        second.sendto(query("web.service.nomad.", "A", 500), dest)
        replies = {r.id: r for r in await receive(first, 21)}
        [other] = await receive(second, 1)
    assert sorted(replies) == [*range(20), 99]
    assert all(addresses(replies[i]) == WEB_ADDRESSES for i in range(20))
    assert (other.id, addresses(other)) == (500, WEB_ADDRESSES)
    forwarded = replies[99]
    assert forwarded.rcode() == dns.rcode.NOERROR
    assert addresses(forwarded) == ["10.9.0.1"]  # only the upstream has `example.`
    assert forwarded.flags & dns.flags.RA
    assert not forwarded.flags & dns.flags.AA
    assert max(batch_sizes) >= 22  # the forwarded query was read with the others


@pytest.mark.parametrize(("host", "allowed", "rcode"), [
    ("::1", "::1/128", dns.rcode.NOERROR),
    ("::1", "127.0.0.1/32", dns.rcode.REFUSED),
    ("127.0.0.1", "127.0.0.1/32", dns.rcode.NOERROR),
    ("127.0.0.1", "::1/128", dns.rcode.REFUSED),
])  # fmt: skip
async def test_recursion_allow_list_sees_the_sender(
    start_waypost: StartWaypost, upstream: RunningDns, host: str, allowed: str, rcode: int
) -> None:
    front = await start_waypost(forwarding(upstream, allowed), WEB, host=host)
    reply = await front.udp(dns.message.make_query("api.service.example.", "A"))
    assert reply.rcode() == rcode


class HugeReplies(Responder):
    """Answers `huge.service.nomad.` with more octets than an IPv4 datagram can carry."""

    def respond(self, data: bytes, *, client: str, tcp: bool) -> bytes | ForwardQuery | None:
        if b"\x04huge" in data:
            return data[:12] + bytes(IPV4_MAX_PAYLOAD + 1 - 12)
        return super().respond(data, client=client, tcp=tcp)


async def test_reply_the_kernel_refuses_does_not_stop_the_batch(
    start_waypost: StartWaypost, batch_sizes: list[int]
) -> None:
    dns_ = await start_waypost(SETTINGS, WEB, responder_class=HugeReplies)
    with clients(2) as (first, second):
        dest = (dns_.host, dns_.port)
        for ident in range(5):
            first.sendto(query("web.service.nomad.", "A", ident), dest)
        second.sendto(query("huge.service.nomad.", "A", 50), dest)
        for ident in range(5, 10):
            first.sendto(query("web.service.nomad.", "A", ident), dest)
        replies = await receive(first, 10)
        assert await nothing_on(second)
        assert sorted(r.id for r in replies) == list(range(10))
        second.sendto(query("web.service.nomad.", "A", 51), dest)  # still served
        [after] = await receive(second, 1)
    assert after.id == 51
    assert max(batch_sizes) == 11


class BlockingLibc:
    """libc for UdpBatch with a sendmmsg that reports EAGAIN (loopback never does).

    recvmmsg is the real one; sendmmsg fails with EAGAIN `blocked` times, then
    is the real one too.
    """

    def __init__(self, blocked: int) -> None:
        real = udpbatch._LIBC
        assert real is not None
        self.recvmmsg = real.recvmmsg
        self._real_send = real.sendmmsg
        self.blocked = blocked
        self.refused = 0

    def sendmmsg(self, fd: int, hdrs: Any, count: int, flags: int) -> int:
        if self.refused < self.blocked:
            self.refused += 1
            ctypes.set_errno(errno.EAGAIN)
            return -1
        sent: int = self._real_send(fd, hdrs, count, flags)
        return sent


async def test_replies_wait_for_room_when_the_socket_is_full(
    start_waypost: StartWaypost, monkeypatch: pytest.MonkeyPatch, batch_sizes: list[int]
) -> None:
    libc = BlockingLibc(blocked=1)
    monkeypatch.setattr(udpbatch, "_LIBC", libc)
    dns_ = await start_waypost(SETTINGS, WEB)
    per_client = 10
    with clients(3) as socks:
        sent = send_burst(socks, (dns_.host, dns_.port), per_client)
        got = await asyncio.gather(*(receive(sock, per_client) for sock in socks))
        for k, replies in enumerate(got):
            check_replies(replies, sent, k)
    assert libc.refused == 1
    assert max(batch_sizes) == len(sent)  # one batch, its replies all sent by sendto


async def test_replies_beyond_the_backlog_are_dropped(
    start_waypost: StartWaypost,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    libc = BlockingLibc(blocked=1)
    monkeypatch.setattr(udpbatch, "_LIBC", libc)
    monkeypatch.setattr(server_module, "MAX_UDP_BACKLOG", 100)  # room for one reply (82 octets)
    dns_ = await start_waypost(SETTINGS, WEB)
    with clients(1) as (sock,), caplog.at_level(logging.ERROR):
        dest = (dns_.host, dns_.port)
        for ident in range(3):
            sock.sendto(query("web.service.nomad.", "A", ident), dest)
        [kept] = await receive(sock, 1)
        assert await nothing_on(sock)
        sock.sendto(query("web.service.nomad.", "A", 7), dest)  # sendmmsg works again
        [after] = await receive(sock, 1)
    assert (kept.id, after.id) == (0, 7)
    assert len(kept.to_wire()) <= 100 < 2 * len(kept.to_wire())
    assert "dropping replies" in caplog.text


async def test_close_with_replies_waiting(
    start_waypost: StartWaypost, monkeypatch: pytest.MonkeyPatch, batch_sizes: list[int]
) -> None:
    monkeypatch.setattr(udpbatch, "_LIBC", BlockingLibc(blocked=1))
    dns_ = await start_waypost(SETTINGS, WEB)
    with clients(1) as (sock,):
        sock.sendto(query("web.service.nomad.", "A", 1), (dns_.host, dns_.port))
        for _ in range(100):  # loop iterations until the reader has run
            if batch_sizes:
                break
            await asyncio.sleep(0)
        # This task runs before the writer callback the reader armed: the reply waits.
        assert batch_sizes == [1]
        assert len(dns_.server._udp._backlog) == 1  # type: ignore[union-attr]
        dns_.server.close()
        await dns_.server.wait_closed()
        assert not dns_.server.serving
        assert await nothing_on(sock)


# -- UdpBatch itself ----------------------------------------------------------------------


@contextlib.contextmanager
def batch_on(host: str, size: int = 8) -> Iterator[tuple[socket.socket, UdpBatch]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        batch = UdpBatch(sock.fileno(), size)
        try:
            yield sock, batch
        finally:
            batch.close()
            batch.close()  # idempotent


def wait_readable(sock: socket.socket) -> None:
    """Until a datagram waits on `sock`, and a moment for the rest of a burst to land."""
    readable, _, _ = select.select([sock], [], [], TIMEOUT)
    assert readable, "no datagram arrived"
    time.sleep(SETTLE)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_batch_reads_senders_as_recvfrom_does(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with batch_on(host) as (server, batch), clients(3, family) as socks:
        assert batch.receive() == 0  # nothing waiting
        for k, sock in enumerate(socks):
            sock.sendto(b"q%d" % k + bytes(k * 1000), server.getsockname())
        wait_readable(server)
        assert batch.receive() == 3
        assert batch.datagrams(3) == [b"q%d" % k + bytes(k * 1000) for k in range(3)]
        assert [batch.peer(i) for i in range(3)] == [sock.getsockname() for sock in socks]
        assert [batch.client(i) for i in range(3)] == [host] * 3
        assert batch.send([b"r0", None, b"r2"]) is None
        assert socks[0].recv(100) == b"r0"
        assert socks[2].recv(100) == b"r2"
        with pytest.raises(BlockingIOError):
            socks[1].recv(100)


def test_partial_sendmmsg_resumes_after_the_failed_reply() -> None:
    with batch_on("127.0.0.1") as (server, batch), clients(4) as socks:
        for sock in socks:
            sock.sendto(b"query", server.getsockname())
        wait_readable(server)
        assert batch.receive() == len(socks)
        # The kernel sends r0, then fails on the oversized one: sendmmsg returns 1, the
        # next call fails with EMSGSIZE and the one after sends r2 and r3.
        too_big = bytes(IPV4_MAX_PAYLOAD + 1)
        unsent = batch.send([b"r0", too_big, b"r2", b"r3"])
        assert unsent is not None
        assert unsent.blocked == ()
        [(index, error)] = unsent.failed
        assert (index, error.errno) == (1, errno.EMSGSIZE)
        assert [socks[i].recv(100) for i in (0, 2, 3)] == [b"r0", b"r2", b"r3"]
        # The slots are clean again for the next batch: a full-size datagram fits.
        socks[1].sendto(bytes(2000), server.getsockname())
        wait_readable(server)
        assert batch.receive() == 1
        assert batch.datagrams(1) == [bytes(2000)]


def test_reply_larger_than_a_slot_fails_without_a_system_call() -> None:
    with batch_on("127.0.0.1") as (server, batch), clients(1) as (sock,):
        sock.sendto(b"query", server.getsockname())
        wait_readable(server)
        assert batch.receive() == 1
        unsent = batch.send([bytes(udpbatch.SLOT + 1)])
        assert unsent is not None
        [(index, error)] = unsent.failed
        assert (index, error.errno) == (0, errno.EMSGSIZE)


def test_blocked_replies_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udpbatch, "_LIBC", BlockingLibc(blocked=1))
    with batch_on("127.0.0.1") as (server, batch), clients(2) as socks:
        for sock in socks:
            sock.sendto(b"query", server.getsockname())
        wait_readable(server)
        assert batch.receive() == 2
        unsent = batch.send([b"r0", b"r1"])
        assert unsent == udpbatch.Unsent(blocked=(0, 1), failed=())


def test_receive_error_raises_with_errno() -> None:
    with batch_on("127.0.0.1") as (_server, batch):
        batch.fd = 10_000  # not an open descriptor (nothing here opens that many)
        with pytest.raises(OSError) as caught:
            batch.receive()
        assert caught.value.errno == errno.EBADF


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        UdpBatch(0, 0)
