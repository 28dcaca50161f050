"""Raw sockets against a real waypost DNS server: TCP framing (RFC 7766), malformed input,
limits, failures inside the responder, and the server's own life cycle."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest

from discovery.dns import server as server_module
from discovery.dns.responder import ForwardQuery, Responder
from discovery.dns.server import start_dns
from discovery.dns.settings import DnsSettings
from discovery.model import Node, make_instance
from discovery.registry import Registry

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

TIMEOUT = 2.0
INSTANCES = [
    make_instance(service="web", id="web-1", node="agent", address="10.0.0.1", port=8080),
    make_instance(service="db", id="db-1", node="agent", address="10.0.0.2", port=5432),
]


def wire_query(name: str, rdtype: str = "A", ident: int = 0x1234, **kwargs: Any) -> bytes:
    msg = dns.message.make_query(name, rdtype, **kwargs)
    msg.id = ident
    return msg.to_wire()


def framed(*messages: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


def header(
    ident: int = 0xBEEF, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x07service\x05nomad\x00\x00\x01\x00\x01"  # web.service.nomad. A IN


@pytest.fixture
async def server(start_waypost: StartWaypost) -> RunningDns:
    return await start_waypost(DnsSettings(node_name="agent", tcp_idle_timeout=5.0), INSTANCES)


@asynccontextmanager
async def tcp_client(
    dns_: RunningDns,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(dns_.host, dns_.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):  # the server closed or reset it first
            await writer.wait_closed()


async def read_message(reader: asyncio.StreamReader) -> dns.message.Message:
    async with asyncio.timeout(TIMEOUT):
        (size,) = struct.unpack(">H", await reader.readexactly(2))
        return dns.message.from_wire(await reader.readexactly(size))


async def closed_by_server(reader: asyncio.StreamReader, within: float = TIMEOUT) -> bool:
    """True when the server closes (EOF or reset) within `within` seconds, with nothing sent."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class UdpClient:
    """One connected UDP socket: several sends, replies read in order."""

    def __init__(self, dns_: RunningDns) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((dns_.host, dns_.port))

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await asyncio.get_running_loop().sock_recv(self.sock, 65535)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_client(server: RunningDns) -> Any:
    client = UdpClient(server)
    yield client
    client.close()


async def assert_alive_udp(client: UdpClient, ident: int = 0x4242) -> None:
    """The next datagram is the answer to a fresh query: nothing else was sent before it."""
    await client.send(wire_query("web.service.nomad.", ident=ident))
    reply = dns.message.from_wire(await client.recv())
    assert reply.id == ident
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rd.address for rrset in reply.answer for rd in rrset] == ["10.0.0.1"]


# -- TCP framing -----------------------------------------------------------------------


async def test_pipelined_queries_in_one_write(server: RunningDns) -> None:
    names = ["web.service.nomad.", "db.service.nomad.", "nope.service.nomad.", "nomad."]
    queries = [wire_query(name, "A", ident=100 + i) for i, name in enumerate(names)]
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(*queries))
        replies = [await read_message(reader) for _ in queries]
    by_id = {r.id: r for r in replies}
    assert set(by_id) == {100, 101, 102, 103}
    assert [by_id[100 + i].question[0].name.to_text() for i in range(4)] == names
    assert by_id[100].answer[0][0].address == "10.0.0.1"
    assert by_id[101].answer[0][0].address == "10.0.0.2"
    assert by_id[102].rcode() == dns.rcode.NXDOMAIN
    assert by_id[103].rcode() == dns.rcode.NOERROR


async def test_many_pipelined_queries(server: RunningDns) -> None:
    count = 300
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(*(wire_query("web.service.nomad.", ident=i) for i in range(count))))
        ids = [(await read_message(reader)).id for _ in range(count)]
    assert sorted(ids) == list(range(count))


async def test_client_that_does_not_read_is_not_buffered_for(
    start_waypost: StartWaypost,
) -> None:
    instances = [
        make_instance(service="big", id=f"big-{n}", node="agent", address=f"10.1.0.{n}", port=n)
        for n in range(1, 31)
    ]
    dns_ = await start_waypost(DnsSettings(node_name="agent"), instances)
    count = 20_000  # ~1.5 KiB answers: 30 MB, more than the kernel's socket buffers hold
    query = wire_query("big.service.nomad.", "SRV")
    async with tcp_client(dns_) as (reader, writer):
        writer.write(
            b"".join(framed(ident.to_bytes(2, "big") + query[2:]) for ident in range(count))
        )
        writer.write_eof()  # a half-close must not lose the queries still held back
        await asyncio.sleep(0.5)  # the server answers until the client stops reading
        [conn] = dns_.server._connections
        assert conn._transport is not None
        buffered = conn._transport.get_write_buffer_size()
        assert buffered < 1_000_000  # it stopped reading instead of queueing 30 MB
        seen = bytearray(count)
        async with asyncio.timeout(10 * TIMEOUT):
            for _ in range(count):
                (size,) = struct.unpack(">H", await reader.readexactly(2))
                reply = await reader.readexactly(size)
                seen[int.from_bytes(reply[:2], "big")] += 1
        assert await closed_by_server(reader)  # then it closes: everything was answered
    assert seen == bytearray(b"\x01" * count)


async def test_query_split_across_writes(server: RunningDns) -> None:
    first = framed(wire_query("web.service.nomad.", ident=1))
    second = framed(wire_query("db.service.nomad.", ident=2))
    data = first + second
    # Cut inside the length prefix, inside the first message, and across both messages.
    cuts = [1, 2, 9, len(first) - 3, len(first) + 1, len(data)]
    async with tcp_client(server) as (reader, writer):
        start = 0
        for cut in cuts:
            writer.write(data[start:cut])
            await writer.drain()
            await asyncio.sleep(0.05)
            start = cut
        replies = [await read_message(reader), await read_message(reader)]
    assert [r.id for r in replies] == [1, 2]
    assert [r.answer[0][0].address for r in replies] == ["10.0.0.1", "10.0.0.2"]


async def test_half_close_after_queries_gets_all_answers(server: RunningDns) -> None:
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(*(wire_query("web.service.nomad.", ident=i) for i in range(3))))
        writer.write_eof()
        ids = [(await read_message(reader)).id for _ in range(3)]
        assert await closed_by_server(reader)
    assert ids == [0, 1, 2]


async def test_idle_timeout_closes(start_waypost: StartWaypost) -> None:
    idle = 0.5
    dns_ = await start_waypost(DnsSettings(node_name="agent", tcp_idle_timeout=idle), INSTANCES)
    async with tcp_client(dns_) as (reader, writer):
        # Active: a query every 0.15 s keeps it open well past the timeout.
        for i in range(6):
            writer.write(framed(wire_query("web.service.nomad.", ident=i)))
            assert (await read_message(reader)).id == i
            await asyncio.sleep(0.15)
        started = time.monotonic()
        assert await closed_by_server(reader, within=idle * 5)
        elapsed = time.monotonic() - started
    assert idle / 2 <= elapsed < idle * 4


async def test_idle_connection_without_any_query_closes(start_waypost: StartWaypost) -> None:
    dns_ = await start_waypost(DnsSettings(node_name="agent", tcp_idle_timeout=0.2), INSTANCES)
    async with tcp_client(dns_) as (reader, _):
        assert await closed_by_server(reader, within=1.5)


@pytest.mark.parametrize(
    "bad",
    [b"\x00\x00", b"\x00\x05hello", b"\x00\x0b" + b"x" * 11],
    ids=["zero-length", "5-octets", "11-octets"],
)
async def test_bad_length_closes_after_earlier_answers(server: RunningDns, bad: bytes) -> None:
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(wire_query("web.service.nomad.", ident=7)) + bad)
        assert (await read_message(reader)).id == 7
        assert await closed_by_server(reader)
    async with tcp_client(server) as (reader, writer):  # the server still serves
        writer.write(framed(wire_query("db.service.nomad.", ident=8)))
        assert (await read_message(reader)).id == 8


async def test_truncated_frame_then_eof(server: RunningDns) -> None:
    async with tcp_client(server) as (reader, writer):
        writer.write(b"\x01\x00" + wire_query("web.service.nomad."))  # claims 256 octets
        writer.write_eof()
        assert await closed_by_server(reader)
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(wire_query("web.service.nomad.", ident=9)))
        assert (await read_message(reader)).id == 9


async def test_formerr_over_tcp_keeps_connection(server: RunningDns) -> None:
    async with tcp_client(server) as (reader, writer):
        writer.write(framed(header(ident=0x0101, qd=2) + QUESTION + QUESTION))
        bad = await read_message(reader)
        writer.write(framed(wire_query("web.service.nomad.", ident=0x0102)))
        good = await read_message(reader)
    assert (bad.id, bad.rcode()) == (0x0101, dns.rcode.FORMERR)
    assert (good.id, good.rcode()) == (0x0102, dns.rcode.NOERROR)


# -- malformed UDP ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage!",
        header()[:7],
        header(flags=0x8180) + QUESTION,  # QR=1: a response, never answered
    ],
    ids=["empty", "garbage", "truncated-header", "qr-set"],
)
async def test_dropped_messages_get_no_reply(udp_client: UdpClient, data: bytes) -> None:
    await udp_client.send(data)
    await assert_alive_udp(udp_client)


def decode_error(data: bytes) -> tuple[int, int, int, bytes]:
    """(id, rcode, qdcount, question bytes) of an error reply, read without a parser."""
    ident, flags, qdcount = struct.unpack(">HHH", data[:6])
    assert flags & 0x8000  # QR
    return ident, flags & 0x0F, qdcount, data[12:]


@pytest.mark.parametrize(
    ("data", "rcode", "question"),
    [
        (header(qd=1), dns.rcode.FORMERR, b""),  # QDCOUNT 1 but no question
        (header(qd=0), dns.rcode.FORMERR, b""),
        (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR, b""),
        (header(qd=1) + QUESTION[:9], dns.rcode.FORMERR, b""),  # name cut short
        (header(ar=1) + QUESTION + b"\x00\x00\x29", dns.rcode.FORMERR, QUESTION),  # cut OPT
        (
            header(ar=2) + QUESTION + 2 * b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
            dns.rcode.FORMERR,
            QUESTION,
        ),
        (
            header(flags=dns.opcode.to_flags(dns.opcode.STATUS)) + QUESTION,
            dns.rcode.NOTIMP,
            QUESTION,
        ),
        (
            header(flags=dns.opcode.to_flags(dns.opcode.NOTIFY)) + QUESTION,
            dns.rcode.NOTIMP,
            QUESTION,
        ),
        (
            header(flags=dns.opcode.to_flags(dns.opcode.UPDATE)) + QUESTION,
            dns.rcode.NOTIMP,
            QUESTION,
        ),
    ],
    ids=[
        "no-question",
        "qdcount-0",
        "qdcount-2",
        "cut-name",
        "cut-opt",
        "two-opt",
        "status",
        "notify",
        "update",
    ],
)
async def test_malformed_get_error_then_serving_goes_on(
    udp_client: UdpClient, data: bytes, rcode: int, question: bytes
) -> None:
    await udp_client.send(data)
    ident, got_rcode, qdcount, body = decode_error(await udp_client.recv())
    assert (ident, got_rcode) == (0xBEEF, rcode)
    assert qdcount == (1 if question else 0)
    assert body == question
    await assert_alive_udp(udp_client)


async def test_random_garbage_never_stops_serving(udp_client: UdpClient) -> None:
    rng = random.Random(7766)
    for i in range(200):
        await udp_client.send(header(ident=i) + rng.randbytes(rng.randrange(0, 60)))
    seen = 0
    for _ in range(200):  # every reply to garbage is a response with the sender's id
        try:
            data = await asyncio.wait_for(udp_client.recv(), 0.2)
        except TimeoutError:
            break
        assert data[2] & 0x80
        assert struct.unpack(">H", data[:2])[0] < 200
        seen += 1
    assert seen > 0
    await assert_alive_udp(udp_client)


# -- failures inside the responder ----------------------------------------------------------


class ExplodingResponder(Responder):
    """A real Responder that raises on names starting with "boom" (to test the adapter)."""

    def respond(self, data: bytes, *, client: str, tcp: bool) -> bytes | ForwardQuery | None:
        if data[12:17] == b"\x04boom":
            raise RuntimeError("boom")
        return super().respond(data, client=client, tcp=tcp)


async def test_responder_exception_gives_servfail_and_logs_once(
    start_waypost: StartWaypost, caplog: pytest.LogCaptureFixture
) -> None:
    dns_ = await start_waypost(
        DnsSettings(node_name="agent"), INSTANCES, responder_class=ExplodingResponder
    )
    client = UdpClient(dns_)
    caplog.set_level(logging.ERROR, logger="discovery.dns.server")
    try:
        for ident in (1, 2, 3):
            await client.send(wire_query("boom.service.nomad.", ident=ident))
            reply = dns.message.from_wire(await client.recv())
            assert (reply.id, reply.rcode()) == (ident, dns.rcode.SERVFAIL)
            assert reply.question[0].name.to_text() == "boom.service.nomad."
        await assert_alive_udp(client)
    finally:
        client.close()
    async with tcp_client(dns_) as (reader, writer):
        writer.write(
            framed(
                wire_query("boom.service.nomad.", ident=4),
                wire_query("web.service.nomad.", ident=5),
            )
        )
        replies = [await read_message(reader), await read_message(reader)]
    assert [(r.id, r.rcode()) for r in replies] == [(4, dns.rcode.SERVFAIL), (5, dns.rcode.NOERROR)]
    errors = [r for r in caplog.records if r.name == "discovery.dns.server"]
    assert len(errors) == 1  # four failures, one log line per minute per error type
    assert "RuntimeError" in caplog.text


# -- limits and life cycle -----------------------------------------------------------------


async def test_connection_limit(start_waypost: StartWaypost) -> None:
    # At the cap a new connection gets in and the one idle the longest is closed
    # (RFC 7766 section 6.2.3); tests/integration/test_dns_hardening.py has more.
    dns_ = await start_waypost(DnsSettings(node_name="agent"), INSTANCES, max_tcp_connections=2)
    async with tcp_client(dns_) as (r1, w1), tcp_client(dns_) as (r2, w2):
        for ident, (reader, writer) in enumerate([(r1, w1), (r2, w2)]):
            writer.write(framed(wire_query("web.service.nomad.", ident=ident)))
            assert (await read_message(reader)).id == ident
        async with tcp_client(dns_) as (r3, w3):
            w3.write(framed(wire_query("web.service.nomad.", ident=3)))
            assert (await read_message(r3)).id == 3
            assert await closed_by_server(r1)  # idle the longest
            w2.write(framed(wire_query("web.service.nomad.", ident=4)))
            assert (await read_message(r2)).id == 4
        assert len(dns_.server._connections) <= 2


async def test_close_drops_connections_and_frees_port() -> None:
    registry = Registry(Node("agent", "127.0.0.1"))
    server = await start_dns(Responder(registry, DnsSettings()), "127.0.0.1", 0)
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(framed(wire_query("nomad.", "SOA", ident=1)))
        assert (await read_message(reader)).id == 1
        server.close()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_closed()
        assert await closed_by_server(reader)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    again = await start_dns(Responder(registry, DnsSettings()), "127.0.0.1", port)
    assert again.port == port
    again.close()
    await again.wait_closed()


async def test_busy_port_raises_with_address() -> None:
    responder = Responder(Registry(Node("agent", "127.0.0.1")), DnsSettings())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:
            await start_dns(responder, "127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE
    assert f"TCP socket to 127.0.0.1:{port}" in str(info.value)
    # The UDP socket bound before the TCP failure was closed: the port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))


async def test_port_zero_retries_when_tcp_port_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    real_bind = server_module._bind
    failures: list[int] = []

    def flaky_bind(family: int, kind: int, sockaddr: tuple[Any, ...]) -> socket.socket:
        if kind == socket.SOCK_STREAM and not failures:
            failures.append(sockaddr[1])
            raise OSError(errno.EADDRINUSE, "taken")
        return real_bind(family, kind, sockaddr)

    monkeypatch.setattr(server_module, "_bind", flaky_bind)
    server = await start_dns(
        Responder(Registry(Node("agent", "127.0.0.1")), DnsSettings()), "127.0.0.1", 0
    )
    try:
        assert failures and server.port != 0
        reply = await dns_udp(server.port, wire_query("nomad.", "SOA", ident=5))
        assert reply.id == 5
    finally:
        server.close()
        await server.wait_closed()


async def dns_udp(port: int, data: bytes) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        async with asyncio.timeout(TIMEOUT):
            return dns.message.from_wire(await loop.sock_recv(sock, 65535))
