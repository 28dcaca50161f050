"""The lookup fast path (discovery.httpapi._Connection) on a real server, raw sockets and aiohttp.

A cached read is answered with its whole response from the wire cache; these
tests hold that it says byte for byte what aiohttp says (Date aside), that it
is counted, refused without a token when ACLs are on, never stale, never
ahead of a request aiohttp is still answering on the same connection, and
that everything it does not answer still works (blocking queries, writes,
Connection: close, HTTP/1.0, chunked bodies).  `HttpStats.fast` tells which
requests it answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
import uvloop

from discovery import httpapi, httpwire
from discovery.acl import AclSettings
from discovery.model import Check, CheckKind, Health, Instance, make_instance
from tests.integration.http_fixtures import LOCAL_NODE, RunningApi, running_api

DEADLINE = 5.0  # seconds for anything that should take milliseconds on loopback
LOOKUP = "/v1/health/service/web?passing"
ROUTE = ("GET", "/v1/health/service/{name}", 200)
READ_TOKEN = "read-secret-00001"
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def inst(service: str, ident: str, port: int = 80) -> Instance:
    return make_instance(
        service=service, id=ident, port=port, node=LOCAL_NODE.name, address="127.0.0.1"
    )


class Raw:
    """One keep-alive connection: raw requests out, (head, body) responses back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> tuple[bytes, bytes]:
        async with asyncio.timeout(DEADLINE):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"\r\nContent-Length: (\d+)", head)[1])  # type: ignore[index]
            return head, await self.reader.readexactly(length)

    async def get(self, target: str, fields: str = "") -> tuple[bytes, bytes]:
        self.send(f"GET {target} HTTP/1.1\r\nHost: t\r\n{fields}\r\n".encode())
        return await self.response()

    async def closed(self) -> bool:
        """True when the server closes the connection (within DEADLINE)."""
        async with asyncio.timeout(DEADLINE):
            return await self.reader.read(1) == b""


async def connect(api: RunningApi) -> Raw:
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    return Raw(reader, writer)


@pytest.fixture
async def api() -> AsyncIterator[RunningApi]:
    async with running_api(instances=[inst("web", "web-1"), inst("web", "web-2")]) as running:
        yield running


@pytest.fixture
async def raw(api: RunningApi) -> AsyncIterator[Raw]:
    conn = await connect(api)
    try:
        yield conn
    finally:
        conn.writer.close()
        await conn.writer.wait_closed()


def status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def test_a_cached_read_is_answered_fast_with_aiohttps_bytes(
    api: RunningApi, raw: Raw
) -> None:
    slow = await raw.get(LOOKUP)
    assert api.server.stats.fast == 0
    fast = await raw.get(LOOKUP)
    assert api.server.stats.fast == 1
    assert DATE.sub(b"\r\nDate: -\r\n", fast[0]) == DATE.sub(b"\r\nDate: -\r\n", slow[0])
    assert fast[1] == slow[1]
    assert [i["Service"]["ID"] for i in json.loads(fast[1])] == ["web-1", "web-2"]
    for field in (b"X-Consul-Index: ", b"X-Nomad-Index: ", b"X-Consul-KnownLeader: true"):
        assert field in fast[0]
    assert b"Content-Type: application/json\r\n" in fast[0]
    assert api.server.stats.requests[ROUTE] == 2  # counted as aiohttp's are


async def test_fast_answers_are_counted_exactly(api: RunningApi, raw: Raw) -> None:
    for _ in range(20):
        head, _ = await raw.get(LOOKUP, "Connection: keep-alive\r\n")
        assert status(head) == 200
    assert api.server.stats.requests[ROUTE] == 20
    assert api.server.stats.fast == 19


async def test_a_change_is_never_answered_stale(api: RunningApi, raw: Raw) -> None:
    await raw.get(LOOKUP)
    before = await raw.get(LOOKUP)
    api.registry.apply(upserts=[inst("web", "web-3")])
    after = await raw.get(LOOKUP)
    assert [i["Service"]["ID"] for i in json.loads(after[1])] == ["web-1", "web-2", "web-3"]
    index = re.compile(rb"X-Consul-Index: (\d+)")
    assert int(index.search(after[0])[1]) > int(index.search(before[0])[1])  # type: ignore[index]
    assert api.server.stats.fast == 1  # the first after the change was aiohttp's again
    await raw.get(LOOKUP)
    assert api.server.stats.fast == 2


async def test_each_query_is_its_own_entry(api: RunningApi, raw: Raw) -> None:
    for target, wanted in (
        ("/v1/health/service/web?pretty", 2),
        ("/v1/health/service/web?tag=x", 0),
    ):
        first = await raw.get(target)
        second = await raw.get(target)
        assert second[1] == first[1]
        assert len(json.loads(second[1])) == wanted
    assert b"\n    " in (await raw.get("/v1/health/service/web?pretty"))[1]
    assert api.server.stats.fast == 3


async def test_acl_refuses_a_token_less_request_of_a_cached_read() -> None:
    acl = AclSettings(enabled=True, tokens={READ_TOKEN: "read"})
    async with running_api(instances=[inst("web", "web-1")], acl=acl) as api:
        conn = await connect(api)
        try:
            token = f"X-Consul-Token: {READ_TOKEN}\r\n"
            assert status((await conn.get(LOOKUP, token))[0]) == 200
            assert status((await conn.get(LOOKUP, token))[0]) == 200
            assert api.server.stats.fast == 1
            for fields in (
                "",
                "X-Consul-Token: wrong-secret-000\r\n",
                "Authorization: Basic x\r\n",
            ):
                head, body = await conn.get(LOOKUP, fields)
                assert status(head) == 403, fields
                assert json.loads(body) == {"error": "Permission denied"}
            bearer = f"Authorization: Bearer {READ_TOKEN}\r\n"
            assert status((await conn.get(LOOKUP, bearer))[0]) == 200
            assert status((await conn.get(LOOKUP, f"X-Nomad-Token: {READ_TOKEN}\r\n"))[0]) == 200
            assert api.server.stats.fast == 3
            # In the query: aiohttp parses it (not the fast path), and it still works.
            in_query = f"/v1/health/service/web?passing&token={READ_TOKEN}"
            for _ in range(2):
                assert status((await conn.get(in_query))[0]) == 200
            assert status((await conn.get(LOOKUP + "&token=wrong-secret-000"))[0]) == 403
            assert api.server.stats.fast == 3
            assert api.server.stats.requests["GET", "/v1/health/service/{name}", 403] == 4
        finally:
            conn.writer.close()
            await conn.writer.wait_closed()


async def test_a_pipelined_read_waits_for_the_blocking_query_before_it(
    api: RunningApi, raw: Raw
) -> None:
    await raw.get(LOOKUP)  # cached now
    index = api.registry.snapshot.index
    blocking = f"/v1/catalog/services?index={index}&wait=300ms"
    started = time.monotonic()
    raw.send(f"GET {blocking} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    raw.send(f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    first = await raw.response()
    assert time.monotonic() - started >= 0.3
    assert json.loads(first[1]) == {"web": []}  # the blocking query's answer comes first
    second = await raw.response()
    assert len(json.loads(second[1])) == 2
    assert api.server.stats.fast == 0  # aiohttp held a request: it answered both
    await raw.get(LOOKUP)
    assert api.server.stats.fast == 1  # and the connection is fast again


async def test_an_unknown_route_then_a_cached_read_in_one_write(api: RunningApi, raw: Raw) -> None:
    await raw.get(LOOKUP)
    raw.send(
        f"GET /v1/nope HTTP/1.1\r\nHost: t\r\n\r\nGET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    )
    assert status((await raw.response())[0]) == 404
    assert status((await raw.response())[0]) == 200
    assert api.server.stats.requests["GET", httpapi.UNMATCHED, 404] == 1


@pytest.mark.parametrize(
    "fields",
    ["", "Host: t\r\nHost: u\r\n", "Host: t\r\nbad field: x\r\n", "Host: t\r\n folded\r\n"],
)
async def test_requests_aiohttp_refuses_are_refused(api: RunningApi, raw: Raw, fields: str) -> None:
    await raw.get(LOOKUP)
    raw.send(f"GET {LOOKUP} HTTP/1.1\r\n{fields}\r\n".encode())
    async with asyncio.timeout(DEADLINE):
        head = await raw.reader.readuntil(b"\r\n\r\n")
    assert status(head) == 400
    assert api.server.stats.fast == 0


async def test_fast_answers_are_in_the_access_log_without_the_query(
    api: RunningApi, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="discovery.httpapi.access"):
        await raw.get(LOOKUP + "&token=secret-in-query")
        await raw.get(LOOKUP + "&token=secret-in-query")
    lines = [r.getMessage() for r in caplog.records if r.name == "discovery.httpapi.access"]
    assert (len(lines), api.server.stats.fast) == (2, 1)
    assert all(line.startswith("GET /v1/health/service/web 200 ") for line in lines), lines
    assert "secret" not in caplog.text


async def test_a_request_split_across_writes_is_answered(api: RunningApi, raw: Raw) -> None:
    await raw.get(LOOKUP)
    request = f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    for cut in (5, len(request) - 3, len(request) - 1):
        raw.send(request[:cut])
        await asyncio.sleep(0.01)
        raw.send(request[cut:])
        assert status((await raw.response())[0]) == 200
    assert api.server.stats.fast == 3


@pytest.mark.parametrize(
    ("request_head", "closes"),
    [
        (f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", True),
        (f"GET {LOOKUP} HTTP/1.0\r\n\r\n", True),
        (f"HEAD {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n", False),
        (f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{{}}", False),
    ],
)
async def test_requests_the_fast_path_leaves_to_aiohttp(
    api: RunningApi, raw: Raw, request_head: str, closes: bool
) -> None:
    await raw.get(LOOKUP)
    raw.send(request_head.encode())
    async with asyncio.timeout(DEADLINE):
        head = await raw.reader.readuntil(b"\r\n\r\n")
    assert status(head) in (200, 405)
    assert api.server.stats.fast == 0
    if closes:
        assert b"Connection: close" in head or b"HTTP/1.0" in request_head.encode()
        await raw.reader.read()  # the body, then the end
        assert raw.reader.at_eof()


async def test_writes_and_fast_reads_share_a_keep_alive_connection(api: RunningApi) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"http://{api.server.host}:{api.server.port}"
        for n in range(3, 6):
            async with http.get(url + LOOKUP) as r:
                assert len(await r.json()) == n - 1
            async with http.get(url + LOOKUP) as r:
                assert len(await r.json()) == n - 1
            body: dict[str, Any] = {"Name": "web", "ID": f"web-{n}", "Port": 80 + n}
            async with http.put(url + "/v1/agent/service/register", json=body) as r:
                assert r.status == 200
    assert api.server.stats.fast == 3
    assert api.server.stats.requests["PUT", "/v1/agent/service/register", 200] == 3


async def test_a_chunked_body_makes_the_connection_aiohttps(api: RunningApi, raw: Raw) -> None:
    body = json.dumps({"Name": "web", "ID": "web-9", "Port": 99}).encode()
    raw.send(
        b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    assert status((await raw.response())[0]) == 200
    for _ in range(3):
        assert len(json.loads((await raw.get(LOOKUP))[1])) == 3
    assert api.server.stats.fast == 0


async def test_an_idle_fast_connection_closes(
    api: RunningApi, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpapi, "KEEPALIVE_TIMEOUT", 0.3)
    other = await connect(api)  # its timer runs on the patched timeout
    try:
        await other.get(LOOKUP)
        for _ in range(4):  # busy for longer than the timeout: stays open
            await asyncio.sleep(0.1)
            assert status((await other.get(LOOKUP))[0]) == 200
        started = time.monotonic()
        assert await other.closed()
        assert 0.2 <= time.monotonic() - started < DEADLINE
    finally:
        other.writer.close()
        await other.writer.wait_closed()


async def test_aiohttps_idle_timer_does_not_close_a_busy_fast_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(httpapi, "KEEPALIVE_TIMEOUT", 0.3)  # aiohttp's too: set at start
    async with running_api(instances=[inst("web", "web-1")]) as api:
        conn = await connect(api)
        try:
            await conn.get(LOOKUP)  # aiohttp answers: its keep-alive timer starts
            for _ in range(6):  # fast answers for twice its timeout
                await asyncio.sleep(0.1)
                assert status((await conn.get(LOOKUP))[0]) == 200
            assert api.server.stats.fast == 6
            assert await conn.closed()  # then idle: closed
        finally:
            conn.writer.close()
            await conn.writer.wait_closed()


async def test_closing_the_server_closes_fast_connections(raw: Raw, api: RunningApi) -> None:
    await raw.get(LOOKUP)
    await raw.get(LOOKUP)
    assert api.server.stats.fast == 1
    await api.server.close()
    assert await raw.closed()


def test_the_fast_path_on_uvloop() -> None:
    async def run() -> tuple[int, int]:
        async with running_api(instances=[inst("web", "web-1")]) as api:
            conn = await connect(api)
            try:
                for _ in range(3):
                    assert status((await conn.get(LOOKUP))[0]) == 200
            finally:
                conn.writer.close()
                await conn.writer.wait_closed()
            return api.server.stats.fast, api.server.stats.requests[ROUTE]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(run()) == (2, 3)


async def statuses_until_quiet(conn: Raw) -> list[int]:
    """The status of every response the server sends before it closes or goes quiet (0.3 s)."""
    data = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.3):
            while chunk := await conn.reader.read(65536):
                data += chunk
    codes = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        codes.append(status(head))
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        data = data[int(length[1]) if length else 0 :]
    return codes


NOPE = b"GET /v1/nope HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "wanted"),
    [
        (NOPE + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400]),
        (NOPE + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", [400]),
        (NOPE + b"Content-Length: 4\r\nContent-Length: 0\r\n\r\nabcd", [400]),
        (NOPE + b"Content-Length: +4\r\n\r\nabcd", [400]),
        (NOPE + b"Content-Length: 004\r\n\r\nabcd", [404, 200]),
        (NOPE + b"Content-Length:  4 \r\n\r\nabcd", [404, 200]),
        (NOPE + b"X: a\r\n Content-Length: 4\r\n\r\nabcd", [400]),  # obs-fold
        (b"GET /v1/nope HTTP/1.1\nHost: t\n\n", [400]),  # bare LF
        (NOPE + b"X: a\x00b\r\n\r\n", [400]),
        (NOPE + b"X: a\x01b\r\n\r\n", [400]),
        (f"GET http://t{LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode(), [200, 200]),
        (f"GET {LOOKUP} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode(), [200, 200]),
        (
            b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: t\r\n"
            b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
            [100, 400, 200],
        ),
    ],
)
async def test_what_aiohttp_frames_is_never_answered_here(
    api: RunningApi, raw: Raw, request_bytes: bytes, wanted: list[int]
) -> None:
    await raw.get(LOOKUP)  # cached: the pipelined read below could be answered fast
    raw.send(request_bytes + f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert await statuses_until_quiet(raw) == wanted
    assert api.server.stats.fast == 0


async def test_a_content_length_of_5000_digits_is_aiohttps(api: RunningApi, raw: Raw) -> None:
    await raw.get(LOOKUP)
    raw.send(NOPE + b"Content-Length: " + b"0" * 5000 + b"1\r\n\r\nx")
    # aiohttp reads 1 and answers; the connection is not dropped by a ValueError of int().
    assert await statuses_until_quiet(raw) == [404]


async def test_an_error_in_the_fast_path_aborts_its_connection_only(
    api: RunningApi, raw: Raw, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    parse_head = httpapi.parse_head

    def failing(head: bytes) -> httpwire.RequestHead | None:
        if b"X-Fail" in head:
            raise RuntimeError("a bug")
        return parse_head(head)

    monkeypatch.setattr(httpapi, "parse_head", failing)
    await raw.get(LOOKUP)
    with caplog.at_level(logging.ERROR):
        raw.send(f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\nX-Fail: 1\r\n\r\n".encode())
        assert await raw.closed()
    assert [r.name for r in caplog.records] == ["discovery.httpapi"]
    other = await connect(api)
    try:
        assert status((await other.get(LOOKUP))[0]) == 200
        assert len(api.server._runner.app[httpapi.STATE].connections) == 1  # the other one
    finally:
        other.writer.close()
        await other.writer.wait_closed()


async def test_pipelined_requests_split_at_every_byte(api: RunningApi, raw: Raw) -> None:
    register = json.dumps({"Name": "web", "ID": "web-9", "Port": 99}).encode()
    get = f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    pipeline = (
        get
        + b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: t\r\n"
        + f"Content-Length: {len(register)}\r\n\r\n".encode()
        + register
        + get
        + NOPE
        + b"\r\n"
        + get
    )
    raw.writer.transport.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    await raw.get(LOOKUP)
    for cut in range(1, len(pipeline)):
        raw.send(pipeline[:cut])
        await asyncio.sleep(0.001)  # two segments, read apart
        raw.send(pipeline[cut:])
        answers = [await raw.response() for _ in range(5)]
        assert [status(head) for head, _ in answers] == [200, 200, 200, 404, 200], cut
        for _, body in answers[2::2]:
            assert [i["Service"]["ID"] for i in json.loads(body)] == ["web-1", "web-2", "web-9"]
    assert api.server.stats.fast > len(pipeline)  # most of those reads were the fast path's


async def test_a_deep_pipeline_never_read_stays_bounded() -> None:
    many = [inst("web", f"web-{n}") for n in range(40)]  # big answers: writing pauses soon
    async with running_api(instances=many) as api:
        conn = await connect(api)
        try:
            await conn.get(LOOKUP)
            # About 230 KB of requests (a read or four of the server's), answered with
            # 70 MB: the socket buffers fill and writing pauses long before the last.
            count = 3000
            conn.send(f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * count)
            (fast,) = api.server._runner.app[httpapi.STATE].connections
            for _ in range(100):  # until aiohttp holds requests the client does not read
                if fast._handler is not None:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert fast._handler is not None
            # aiohttp's own bound is 32 queued requests (then it stops reading); the
            # fast path must not queue the rest of a read behind it one by one.
            assert len(fast._handler._messages) <= 64
            assert fast._transport is not None
            assert fast._transport.get_write_buffer_size() <= 1 << 20
            for _ in range(count):
                head, body = await conn.response()
                assert status(head) == 200
                assert len(json.loads(body)) == 40
        finally:
            conn.writer.close()
            await conn.writer.wait_closed()
    assert api.server.stats.requests[ROUTE] == count + 1


async def test_without_aiohttps_waiter_reads_after_aiohttp_are_aiohttps(
    api: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path reads aiohttp's private `_waiter`; renamed, it is slower, never wrong."""
    monkeypatch.setattr(httpapi, "_AIOHTTP_WAITER", "_no_such_attribute")
    conn = await connect(api)
    try:
        await conn.get(LOOKUP)  # aiohttp's: the connection has its handler now
        index = api.registry.snapshot.index
        blocking = f"/v1/catalog/services?index={index}&wait=200ms"
        conn.send(f"GET {blocking} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        conn.send(f"GET {LOOKUP} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert json.loads((await conn.response())[1]) == {"web": []}  # in order
        for _ in range(3):
            assert len(json.loads((await conn.get(LOOKUP))[1])) == 2
        assert api.server.stats.fast == 0
    finally:
        conn.writer.close()
        await conn.writer.wait_closed()
    fresh = await connect(api)  # a connection aiohttp never served is still fast
    try:
        await fresh.get(LOOKUP)
        assert api.server.stats.fast == 1
    finally:
        fresh.writer.close()
        await fresh.writer.wait_closed()


async def test_a_fast_answers_date_is_now(api: RunningApi, raw: Raw) -> None:
    await raw.get(LOOKUP)
    await asyncio.sleep(1.1)  # the cached Date field is per second
    head, _ = await raw.get(LOOKUP)
    assert api.server.stats.fast == 1
    date = re.search(rb"\r\nDate: ([^\r]*)\r\n", head)
    assert date is not None
    assert abs(parsedate_to_datetime(date[1].decode()).timestamp() - time.time()) < 1.5


async def test_a_percent_encoded_query_token_is_never_answered_fast() -> None:
    acl = AclSettings(enabled=True, tokens={READ_TOKEN: "read"})
    async with running_api(instances=[inst("web", "web-1")], acl=acl) as api:
        conn = await connect(api)
        try:
            token = f"X-Consul-Token: {READ_TOKEN}\r\n"
            assert status((await conn.get(LOOKUP, token))[0]) == 200  # cached now
            encoded = LOOKUP + f"&%74oken={READ_TOKEN}"  # aiohttp decodes the name: token
            for _ in range(2):
                assert status((await conn.get(encoded))[0]) == 200
            for _ in range(2):
                assert status((await conn.get(LOOKUP + "&%74oken=wrong-secret-000"))[0]) == 403
            assert api.server.stats.fast == 0  # a second of each was cached, and aiohttp's
        finally:
            conn.writer.close()
            await conn.writer.wait_closed()


async def test_a_health_or_output_change_is_never_answered_stale() -> None:
    check = Check("ttl-web-1", "ttl", CheckKind.TTL, ttl=60.0, status=Health.PASSING, output="a")
    web = make_instance(
        service="web",
        id="web-1",
        port=80,
        node=LOCAL_NODE.name,
        address="127.0.0.1",
        checks=[check],
    )
    async with running_api(instances=[web]) as api:
        conn = await connect(api)
        try:
            target = "/v1/health/service/web"
            for output, health in (("b", Health.PASSING), ("b", Health.WARNING)):
                await conn.get(target)
                fast = api.server.stats.fast
                assert status((await conn.get(target))[0]) == 200
                assert api.server.stats.fast == fast + 1  # cached: answered fast
                api.registry.update_check("ttl-web-1", health, output=output)
                (entry,) = json.loads((await conn.get(target))[1])
                assert [
                    (c["Status"], c["Output"])
                    for c in entry["Checks"]
                    if c["CheckID"] == "ttl-web-1"
                ] == [(health.value, output)]
                assert api.server.stats.fast == fast + 1  # the change was aiohttp's
        finally:
            conn.writer.close()
            await conn.writer.wait_closed()
