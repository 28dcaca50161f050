"""TCP fairness of the DNS server (RFC 7766 sections 6.2.3 and 10), on real sockets.

The connection cap is shared: one client address holds at most
`tcp_max_per_client` connections, and a new client arriving at the cap gets
in by closing the connection idle the longest.  Clients use distinct source
addresses on 127.0.0.0/8 (Linux routes the whole /8 to loopback).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import TYPE_CHECKING

import dns.message
import pytest

from discovery.dns.settings import DnsSettings
from discovery.model import make_instance

if TYPE_CHECKING:
    from tests.integration.conftest import RunningDns, StartWaypost

TIMEOUT = 2.0
INSTANCES = [make_instance(service="web", id="web-1", node="agent", address="10.0.0.1", port=80)]

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def client(server: RunningDns, source: str = "127.0.0.1") -> AsyncIterator[Stream]:
    """A TCP connection to `server` from `source` (port picked by the kernel)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
    except OSError:
        sock.close()
        pytest.skip(f"cannot bind {source}")
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


async def ask(stream: Stream, ident: int) -> int:
    """Send one query on `stream` and return the ID of the reply."""
    reader, writer = stream
    query = dns.message.make_query("web.service.nomad.", "A", id=ident).to_wire()
    writer.write(struct.pack(">H", len(query)) + query)
    async with asyncio.timeout(TIMEOUT):
        (size,) = struct.unpack(">H", await reader.readexactly(2))
        return dns.message.from_wire(await reader.readexactly(size)).id


async def closed(stream: Stream) -> bool:
    """True when the server closes `stream` (EOF or reset) within TIMEOUT."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await stream[0].read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_per_client_limit(start_waypost: StartWaypost) -> None:
    settings = DnsSettings(node_name="agent", tcp_max_per_client=3)
    server = await start_waypost(settings, INSTANCES, max_tcp_connections=16)
    async with AsyncExitStack() as stack:
        mine = [await stack.enter_async_context(client(server)) for _ in range(3)]
        for n, stream in enumerate(mine):
            assert await ask(stream, n) == n
        extra = await stack.enter_async_context(client(server))
        assert await closed(extra)  # a fourth from the same address is refused
        other = await stack.enter_async_context(client(server, "127.0.0.2"))
        assert await ask(other, 10) == 10  # another client is not affected
        for n, stream in enumerate(mine):
            assert await ask(stream, 20 + n) == 20 + n  # nor are the three
    # once they close, the client may connect again
    for _ in range(40):
        async with client(server) as stream:
            with suppress(asyncio.IncompleteReadError, ConnectionResetError):
                if await ask(stream, 30) == 30:
                    break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the client was not admitted again after closing its connections")


async def test_full_server_closes_the_longest_idle_for_a_new_client(
    start_waypost: StartWaypost,
) -> None:
    cap = 6
    settings = DnsSettings(node_name="agent", tcp_max_per_client=64)
    server = await start_waypost(settings, INSTANCES, max_tcp_connections=cap)
    async with AsyncExitStack() as stack:
        # One greedy client takes every connection; all but the first then query.
        greedy = [await stack.enter_async_context(client(server)) for _ in range(cap)]
        for n, stream in enumerate(greedy[1:], start=1):
            assert await ask(stream, n) == n
        # A new client always gets in: the first connection is idle the longest.
        newcomer = await stack.enter_async_context(client(server, "127.0.0.2"))
        assert await ask(newcomer, 100) == 100
        assert await closed(greedy[0])
        # Then the next longest idle (greedy[1]), and so on, never the active ones.
        second = await stack.enter_async_context(client(server, "127.0.0.3"))
        assert await ask(second, 101) == 101
        assert await closed(greedy[1])
        for n, stream in enumerate(greedy[2:], start=2):
            assert await ask(stream, 200 + n) == 200 + n
        assert await ask(newcomer, 102) == 102
        assert len(server.server._connections) == cap
