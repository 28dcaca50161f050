"""Forwarding out-of-zone queries to recursors: a second real waypost server is the upstream.

A scripted upstream (FakeUpstream below) is used only where a real server cannot be
made to misbehave on purpose: replies with a wrong ID or question, and slow replies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from discovery.dns.forward import forward_query, parse_recursor
from discovery.dns.server import MAX_TCP_PENDING
from discovery.dns.settings import DnsSettings
from discovery.model import Instance, make_instance

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

TIMEOUT = 2.0
SHORT = 0.3  # recursor_timeout for the tests that wait for it
LOCAL = [make_instance(service="web", id="web-1", node="agent", address="10.0.0.1", port=8080)]


def api(n: int) -> Instance:
    return make_instance(
        service="api",
        id=f"api-{n}",
        node="agent",
        address=f"10.9.0.{n}",
        port=9000 + n,
        tags=[f"i{n}"],  # `i<n>.api.service.example.` is this one instance
    )


def front_settings(*recursors: str, **kwargs: Any) -> DnsSettings:
    return DnsSettings(
        node_name="agent",
        recursors=recursors,
        recursor_timeout=kwargs.pop("timeout", 1.0),
        **kwargs,
    )


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == dns.rdatatype.A
    )


@pytest.fixture
async def upstream(start_waypost: StartWaypost) -> RunningDns:
    """A real waypost server authoritative for `example.`."""
    settings = DnsSettings(domain="example.", node_name="upstream", edns_max_payload=512)
    return await start_waypost(settings, [api(n) for n in range(1, 31)])


@pytest.fixture
async def front(start_waypost: StartWaypost, upstream: RunningDns) -> RunningDns:
    return await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)


@pytest.fixture
def dead_port() -> Any:
    """A port with a UDP socket that never answers and a TCP listener that never replies."""
    for _ in range(20):  # the UDP port's TCP twin may be taken: pick another pair
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            tcp.listen()
            yield port
            return
    raise RuntimeError("no free UDP+TCP port pair on 127.0.0.1 after 20 tries")


@pytest.fixture
def closed_port() -> int:
    """A port nobody listens on (UDP gets ICMP port unreachable at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- forwarding through a real upstream --------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_out_of_zone_is_forwarded(front: RunningDns, transport: str) -> None:
    ask = front.udp if transport == "udp" else front.tcp
    reply = await ask(dns.message.make_query("i1.api.service.example.", "A", use_edns=0))
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.RA
    assert not reply.flags & dns.flags.AA  # authoritative upstream, but we are not
    assert addresses(reply) == ["10.9.0.1"]  # the upstream's data: only it has `example.`
    # Mixed case is echoed; 30 A records fit the client's 1232 octets (not the upstream's
    # UDP cap of 512: over UDP this needs the TCP retry).
    reply = await ask(dns.message.make_query("ApI.SeRvIcE.eXaMpLe.", "A", use_edns=0, payload=1232))
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.RA
    assert not reply.flags & dns.flags.TC
    assert reply.question[0].name.to_text() == "ApI.SeRvIcE.eXaMpLe."
    assert addresses(reply) == sorted(f"10.9.0.{n}" for n in range(1, 31))


async def test_in_zone_answer_says_recursion_available(front: RunningDns) -> None:
    reply = await front.udp(dns.message.make_query("web.service.nomad.", "A"))
    assert reply.flags & dns.flags.AA
    assert reply.flags & dns.flags.RA
    assert addresses(reply) == ["10.0.0.1"]


async def test_upstream_nxdomain_relayed(front: RunningDns) -> None:
    reply = await front.udp(dns.message.make_query("nope.service.example.", "SRV"))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.RA
    assert [rrset.name.to_text() for rrset in reply.authority] == ["example."]


async def test_client_not_allowed_is_refused(
    start_waypost: StartWaypost, upstream: RunningDns
) -> None:
    only_v6 = (ipaddress.ip_network("::1/128"),)
    dns_ = await start_waypost(
        front_settings(f"127.0.0.1:{upstream.port}", recursion_allowed=only_v6), LOCAL
    )
    reply = await dns_.udp(dns.message.make_query("api.service.example.", "A"))
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & dns.flags.RA
    assert reply.answer == []
    inside = await dns_.udp(dns.message.make_query("web.service.nomad.", "A"))
    assert not inside.flags & dns.flags.RA


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_dead_recursor_gives_servfail_after_timeout(
    start_waypost: StartWaypost, dead_port: int, transport: str
) -> None:
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{dead_port}", timeout=SHORT), LOCAL)
    ask = dns_.udp if transport == "udp" else dns_.tcp
    started = time.monotonic()
    reply = await ask(dns.message.make_query("api.service.example.", "A"))
    elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.flags & dns.flags.RA
    assert reply.question[0].name.to_text() == "api.service.example."
    assert SHORT * 0.9 <= elapsed < TIMEOUT


async def test_sequential_skips_dead_then_refusing_recursor(
    start_waypost: StartWaypost, upstream: RunningDns, dead_port: int
) -> None:
    refusing = await start_waypost()  # authoritative for nomad. only: REFUSED for example.
    dns_ = await start_waypost(
        front_settings(
            f"127.0.0.1:{dead_port}",
            f"127.0.0.1:{refusing.port}",
            f"127.0.0.1:{upstream.port}",
            timeout=SHORT,
        ),
        LOCAL,
    )
    started = time.monotonic()
    reply = await dns_.udp(dns.message.make_query("i7.api.service.example.", "A"))
    assert time.monotonic() - started >= SHORT * 0.9  # the dead one was waited for
    assert reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == ["10.9.0.7"]


async def test_only_refusing_recursors_give_servfail(start_waypost: StartWaypost) -> None:
    refusing = await start_waypost()
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{refusing.port}"), LOCAL)
    reply = await dns_.tcp(dns.message.make_query("api.service.example.", "A"))
    assert reply.rcode() == dns.rcode.SERVFAIL


async def test_unreachable_recursor_skipped_at_once(
    start_waypost: StartWaypost, upstream: RunningDns, closed_port: int
) -> None:
    dns_ = await start_waypost(
        front_settings(f"127.0.0.1:{closed_port}", f"127.0.0.1:{upstream.port}", timeout=1.5),
        LOCAL,
    )
    started = time.monotonic()
    reply = await dns_.udp(dns.message.make_query("i2.api.service.example.", "A"))
    assert time.monotonic() - started < 1.0  # ICMP port unreachable, not the timeout
    assert addresses(reply) == ["10.9.0.2"]


async def test_recursors_added_by_update_settings(
    start_waypost: StartWaypost, upstream: RunningDns
) -> None:
    dns_ = await start_waypost(DnsSettings(node_name="agent"), LOCAL)
    query = dns.message.make_query("i4.api.service.example.", "A")
    assert (await dns_.udp(query)).rcode() == dns.rcode.REFUSED
    dns_.responder.update_settings(front_settings(f"127.0.0.1:{upstream.port}"))  # SIGHUP
    for ask in (dns_.udp, dns_.tcp):
        assert addresses(await ask(query)) == ["10.9.0.4"]


# -- truncation upstream --------------------------------------------------------------------


async def test_truncated_upstream_reply_retried_over_tcp(
    start_waypost: StartWaypost, upstream: RunningDns
) -> None:
    # The client asks for 4096 octets and the front allows that much.
    settings = front_settings(f"127.0.0.1:{upstream.port}", edns_max_payload=4096)
    front = await start_waypost(settings, LOCAL)
    query = dns.message.make_query("api.service.example.", "SRV", use_edns=0, payload=4096)
    direct = await upstream.udp(query)
    assert direct.flags & dns.flags.TC  # the upstream caps UDP at 512 octets
    wire = await front.udp_raw(query.to_wire())
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert not reply.flags & dns.flags.TC
    assert reply.flags & dns.flags.RA
    assert sum(len(rrset) for rrset in reply.answer) == 30  # all of them, from the TCP retry
    assert 512 < len(wire) <= 4096


async def test_truncated_reply_kept_when_full_one_exceeds_client_size(front: RunningDns) -> None:
    query = dns.message.make_query("api.service.example.", "SRV", use_edns=False)
    wire = await front.udp_raw(query.to_wire())
    assert wire is not None
    assert len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert reply.flags & dns.flags.RA
    full = await front.tcp(query)  # what the client does next
    assert not full.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in full.answer) == 30


async def test_full_reply_over_the_edns_cap_is_truncated(front: RunningDns) -> None:
    # The client asks for 4096, the front caps it at edns_max_payload (1232): the
    # 30 SRV with glue from the TCP retry (~1.9 KB) are cut to whole answers, TC=1.
    query = dns.message.make_query("api.service.example.", "SRV", use_edns=0, payload=4096)
    wire = await front.udp_raw(query.to_wire())
    assert wire is not None
    assert len(wire) <= DnsSettings().edns_max_payload
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert reply.edns == 0  # the OPT is kept


# -- a scripted upstream ------------------------------------------------------------------------

Script = Callable[[dns.message.Message], list[tuple[float, bytes]]]


class FakeUpstream:
    """FAKE recursor (UDP+TCP on one port): replies as `script` says, with delays.

    Used because no real server sends wrong IDs or questions on request.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ids: list[int] = []
        self.active = 0  # TCP exchanges in progress, and the most seen at once
        self.peak = 0
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handles: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        fake = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                fake._udp = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                query = dns.message.from_wire(data)
                fake.ids.append(query.id)
                for delay, reply in fake.script(query):
                    fake._handles.append(loop.call_later(delay, fake._send_udp, reply, addr))

        for _ in range(5):  # UDP picks the port; its TCP twin may be taken: try another
            await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            assert self._udp is not None
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", self.port)
                return
            except OSError:
                self._udp.close()
        pytest.fail("no port free for both UDP and TCP")

    def _send_udp(self, reply: bytes, addr: Any) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            (size,) = struct.unpack(">H", await reader.readexactly(2))
            query = dns.message.from_wire(await reader.readexactly(size))
            self.ids.append(query.id)
            for delay, reply in self.script(query):
                await asyncio.sleep(delay)
                writer.write(struct.pack(">H", len(reply)) + reply)
            await writer.drain()
            await reader.read()  # until the client closes
        finally:
            self.active -= 1
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        for handle in self._handles:
            handle.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def answer(
    query: dns.message.Message, address: str, *, ident: int | None = None, name: str | None = None
) -> bytes:
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    owner = name or query.question[0].name.to_text()
    reply.answer.append(dns.rrset.from_text(owner, 60, "IN", "A", address))
    if name is not None:
        reply.question = [
            dns.rrset.RRset(
                dns.name.from_text(name), reply.question[0].rdclass, reply.question[0].rdtype
            )
        ]
    if ident is not None:
        reply.id = ident
    return reply.to_wire()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Script], Any]]:
    started: list[FakeUpstream] = []

    async def start(script: Script) -> FakeUpstream:
        upstream = FakeUpstream(script)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def misleading(query: dns.message.Message) -> list[tuple[float, bytes]]:
    """A wrong ID, then a wrong question, then the right reply."""
    return [
        (0.0, answer(query, "192.0.2.1", ident=(query.id + 1) % 65536)),
        (0.01, answer(query, "192.0.2.2", name="other.example.")),
        (0.02, answer(query, "192.0.2.3")),
    ]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_replies_with_wrong_id_or_question_ignored(
    start_waypost: StartWaypost, fake: Any, transport: str
) -> None:
    upstream = await fake(misleading)
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)
    ask = dns_.udp if transport == "udp" else dns_.tcp
    for ident in (0x1111, 0x2222):
        query = dns.message.make_query("svc.example.", "A")
        query.id = ident
        reply = await ask(query)
        assert reply.id == ident
        assert addresses(reply) == ["192.0.2.3"]
    # RFC 5452: the upstream sees our random IDs, not the client's.
    assert len(upstream.ids) == 2
    assert upstream.ids != [0x1111, 0x2222]


async def test_forwarded_answers_may_come_out_of_order_over_tcp(
    start_waypost: StartWaypost, fake: Any
) -> None:
    upstream = await fake(lambda q: [(0.2, answer(q, "192.0.2.9"))])
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)
    slow = dns.message.make_query("slow.example.", "A")
    slow.id = 1
    quick = dns.message.make_query("web.service.nomad.", "A")
    quick.id = 2
    reader, writer = await asyncio.open_connection(dns_.host, dns_.port)
    try:
        writer.write(
            b"".join(struct.pack(">H", len(w)) + w for w in (slow.to_wire(), quick.to_wire()))
        )
        writer.write_eof()  # half-close: the pending forwarded answer must still come
        replies = []
        async with asyncio.timeout(TIMEOUT):
            for _ in range(2):
                (size,) = struct.unpack(">H", await reader.readexactly(2))
                replies.append(dns.message.from_wire(await reader.readexactly(size)))
            assert await reader.read() == b""  # then the server closes
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    assert [r.id for r in replies] == [2, 1]
    assert addresses(replies[0]) == ["10.0.0.1"]
    assert addresses(replies[1]) == ["192.0.2.9"]


async def test_outstanding_forwards_per_tcp_connection_are_capped(
    start_waypost: StartWaypost, fake: Any
) -> None:
    upstream = await fake(lambda q: [(0.2, answer(q, "192.0.2.8"))])
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)
    count = MAX_TCP_PENDING + 36
    queries = []
    for ident in range(count):
        query = dns.message.make_query(f"q{ident}.example.", "A")
        query.id = ident
        queries.append(query.to_wire())
    reader, writer = await asyncio.open_connection(dns_.host, dns_.port)
    try:
        writer.write(b"".join(struct.pack(">H", len(w)) + w for w in queries))
        ids = []
        async with asyncio.timeout(5 * TIMEOUT):
            for _ in range(count):
                (size,) = struct.unpack(">H", await reader.readexactly(2))
                ids.append(dns.message.from_wire(await reader.readexactly(size)).id)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    assert sorted(ids) == list(range(count))
    # Forwarded concurrently, but never more than the cap: the rest waited in the buffer.
    assert MAX_TCP_PENDING // 2 <= upstream.peak <= MAX_TCP_PENDING


async def test_forward_limit_gives_servfail_at_once(
    start_waypost: StartWaypost, dead_port: int
) -> None:
    slow = 1.0
    dns_ = await start_waypost(
        front_settings(f"127.0.0.1:{dead_port}", timeout=slow), LOCAL, max_forwards=1
    )
    started = time.monotonic()
    first = asyncio.create_task(dns_.udp(dns.message.make_query("one.example.", "A")))
    await asyncio.sleep(0.05)  # the first forward is in flight
    second = await dns_.udp(dns.message.make_query("two.example.", "A"))
    assert time.monotonic() - started < slow / 2
    assert second.rcode() == dns.rcode.SERVFAIL
    assert second.flags & dns.flags.RA
    assert (await first).rcode() == dns.rcode.SERVFAIL


async def test_close_cancels_forwards(start_waypost: StartWaypost, dead_port: int) -> None:
    dns_ = await start_waypost(front_settings(f"127.0.0.1:{dead_port}", timeout=30.0), LOCAL)
    client = dns_.udp_raw(dns.message.make_query("x.example.", "A").to_wire(), wait=0.5)
    pending = asyncio.create_task(client)
    await asyncio.sleep(0.05)
    started = time.monotonic()
    dns_.server.close()
    await dns_.server.wait_closed()
    assert time.monotonic() - started < 1.0
    assert await pending is None  # no answer: the forward was cancelled


# -- forward_query and parse_recursor directly ------------------------------------------------


async def test_forward_query_without_recursors_is_none() -> None:
    query = dns.message.make_query("x.example.", "A").to_wire()
    assert await forward_query(query, (), 0.1, tcp=False) is None
    assert await forward_query(b"\x00" * 5, ("127.0.0.1",), 0.1, tcp=False) is None


async def test_forward_query_restores_client_id(upstream: RunningDns) -> None:
    query = dns.message.make_query("i3.api.service.example.", "A")
    query.id = 0xABCD
    reply = await forward_query(query.to_wire(), [f"127.0.0.1:{upstream.port}"], 1.0, tcp=True)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.id == 0xABCD
    assert addresses(message) == ["10.9.0.3"]


async def test_invalid_recursor_skipped_and_logged_once(
    upstream: RunningDns, caplog: pytest.LogCaptureFixture
) -> None:
    query = dns.message.make_query("i5.api.service.example.", "A").to_wire()
    recursors = ["127.0.0.1:0", f"127.0.0.1:{upstream.port}"]
    caplog.set_level("WARNING", logger="discovery.dns.forward")
    for _ in range(3):
        reply = await forward_query(query, recursors, 1.0, tcp=False)
        assert reply is not None
        assert addresses(dns.message.from_wire(reply)) == ["10.9.0.5"]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping recursor: recursor '127.0.0.1:0': port '0' is not a number 1-65535"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.0.0.1:53 ", ("10.0.0.1", 53)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("2001:DB8::1", ("2001:db8::1", 53)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_parse_recursor(text: str, expected: tuple[str, int]) -> None:
    assert parse_recursor(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("dns.google", "not an IPv4 or IPv6 address"),
        ("dns.google:53", "not an IPv4 or IPv6 address"),
        ("127.0.0.1:0", "port '0'"),
        ("127.0.0.1:65536", "port '65536'"),
        ("127.0.0.1:x", "port 'x'"),
        ("127.0.0.1:", "port ''"),
        ("[::1", "missing ']'"),
        ("[::1]53", "expected ':port'"),
        ("[::1]:", "expected ':port'"),
        ("[127.0.0.1]:53", "brackets are for IPv6"),
        ("300.0.0.1", "not an IPv4 or IPv6 address"),
    ],
)
def test_parse_recursor_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="recursor") as info:
        parse_recursor(text)
    assert message in str(info.value)


# -- oversized UDP replies from the upstream ------------------------------------------------

BIG = 150  # A records: 150 * 16 octets is well over 1232


def oversized(query: dns.message.Message) -> list[tuple[float, bytes]]:
    """One UDP reply with BIG A records and no TC, whatever size the client asked for."""
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    owner = query.question[0].name.to_text()
    addresses = [f"198.51.{n // 250}.{n % 250}" for n in range(BIG)]
    reply.answer.append(dns.rrset.from_text_list(owner, 60, "IN", "A", addresses))
    return [(0.0, reply.to_wire(max_size=65535))]


@pytest.mark.parametrize(
    ("use_edns", "payload", "limit"),
    [(False, 0, 512), (0, 512, 512), (0, 1000, 1000), (0, 4096, 1232), (0, 100, 512)],
)
async def test_oversized_upstream_udp_reply_cut_to_the_client_size(
    start_waypost: StartWaypost,
    fake: Callable[[Script], Any],
    use_edns: Any,
    payload: int,
    limit: int,
) -> None:
    upstream = await fake(oversized)
    front = await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)
    query = dns.message.make_query("big.example.", "A", use_edns=use_edns, payload=payload)
    wire = await front.udp_raw(query.to_wire())
    assert wire is not None
    assert len(wire) <= limit
    reply = dns.message.from_wire(wire)  # whole records only: it parses
    assert reply.id == query.id
    assert reply.flags & dns.flags.TC
    assert reply.flags & dns.flags.RA
    assert reply.question == query.question
    kept = sum(len(rrset) for rrset in reply.answer)
    assert 0 < kept < BIG
    assert len(wire) + 16 > limit  # as many as fit: one more A record would not
    assert (reply.edns >= 0) == (use_edns is not False)


async def test_oversized_upstream_reply_whole_over_tcp(
    start_waypost: StartWaypost, fake: Callable[[Script], Any]
) -> None:
    upstream = await fake(oversized)
    front = await start_waypost(front_settings(f"127.0.0.1:{upstream.port}"), LOCAL)
    reply = await front.tcp(dns.message.make_query("big.example.", "A"))
    assert not reply.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in reply.answer) == BIG
