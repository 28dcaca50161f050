"""Tests of discovery.checks: the health check runner against real servers on 127.0.0.1:0.

Targets are a real aiohttp server (status and body set per test) and plain
asyncio servers that answer raw bytes, hold connections open or never
answer; "closed" ports are bound sockets that do not listen (connection
refused).  Statuses are read back from the registry and from DNS answers of
the real Responder.  The pure halves (status line, URL, headers) are
table-tested at the top.  Intervals are 0.05-1 s; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from dnslib import QTYPE, DNSRecord
from pytest_aiohttp import AiohttpServer

from discovery import checks
from discovery.checks import (
    MAX_BODY,
    CheckRunner,
    HttpTarget,
    Outcome,
    ProbeError,
    http_health,
    parse_header_line,
    parse_http_url,
    parse_status_line,
    parse_tcp_target,
    probe_http,
    probe_tcp,
    render_request,
)
from discovery.dns.responder import Responder
from discovery.dns.settings import DnsSettings
from discovery.errors import NotFoundError, ValidationError
from discovery.model import Check, CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Registry

LOCAL = Node("agent", "127.0.0.1")
DEADLINE = 5.0  # seconds any expected change may take on a loaded machine
POLL = 0.01

# -- pure halves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\n", (200, "OK")),
        (b"HTTP/1.0 404 Not Found\r\n", (404, "Not Found")),
        (b"HTTP/1.1 429 Too Many Requests\r\n", (429, "Too Many Requests")),
        (b"HTTP/1.1 503 Service  Unavailable\n", (503, "Service  Unavailable")),
        (b"HTTP/1.1 200\r\n", (200, "")),  # the reason phrase is optional (RFC 9112 4)
        (b"HTTP/1.1 200 \r\n", (200, "")),
        (b"HTTP/1.1 302 Found", (302, "Found")),
        (b"HTTP/1.1 200 \xe9t\xe9\r\n", (200, "\xe9t\xe9")),  # obs-text, read as latin-1
    ],
)
def test_parse_status_line(line: bytes, expected: tuple[int, str]) -> None:
    assert parse_status_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r\n",
        b"HTTP/1.1\r\n",
        b"HTTP/1.1 \r\n",
        b"HTTP/2 200 OK\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1 abc OK\r\n",
        b"HTTP/1.1 \xb200 OK\r\n",  # a latin-1 superscript digit is not a digit here
        b"HTTP/1.1 099 Odd\r\n",
        b"http/1.1 200 OK\r\n",  # the version is case-sensitive (RFC 9112 2.3)
        b"ICY 200 OK\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b" HTTP/1.1 200 OK\r\n",
    ],
)
def test_parse_status_line_rejects(line: bytes) -> None:
    with pytest.raises(ProbeError, match="malformed"):
        parse_status_line(line)


@pytest.mark.parametrize(
    ("code", "health"),
    [
        (200, Health.PASSING),
        (201, Health.PASSING),
        (204, Health.PASSING),
        (299, Health.PASSING),
        (429, Health.WARNING),
        (199, Health.CRITICAL),
        (300, Health.CRITICAL),
        (304, Health.CRITICAL),
        (404, Health.CRITICAL),
        (428, Health.CRITICAL),
        (500, Health.CRITICAL),
        (503, Health.CRITICAL),
    ],
)
def test_http_health(code: int, health: Health) -> None:
    assert http_health(code) is health


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080/health", ("127.0.0.1", 8080, False, "127.0.0.1:8080", "/health")),
        ("http://127.0.0.1", ("127.0.0.1", 80, False, "127.0.0.1", "/")),
        ("https://LocalHost/a?b=1&c", ("localhost", 443, True, "localhost", "/a?b=1&c")),
        ("http://[::1]:81/x", ("::1", 81, False, "[::1]:81", "/x")),
        ("http://user:pw@127.0.0.1:9/", ("127.0.0.1", 9, False, "127.0.0.1:9", "/")),
    ],
)  # fmt: skip
def test_parse_http_url(url: str, expected: tuple[str, int, bool, str, str]) -> None:
    assert parse_http_url(url) == HttpTarget(*expected)


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/", "127.0.0.1:80", "http://", "http://127.0.0.1:99999/",
     "http://127.0.0.1/a b", "http://127.0.0.1/\r\nX-Evil: 1", "http://127.0.0.1/\u00e9"],
)  # fmt: skip
def test_parse_http_url_rejects(url: str) -> None:
    with pytest.raises(ProbeError):
        parse_http_url(url)


def test_render_request() -> None:
    request = render_request(parse_http_url("http://[::1]:8080/health?x=1"))
    assert request == (
        b"GET /health?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: waypost\r\n"
        b"Accept: text/plain, text/*, */*\r\nConnection: close\r\n\r\n"
    )


def test_parse_header_line() -> None:
    assert parse_header_line(b"Content-Length: 12\r\n") == ("content-length", "12")
    assert parse_header_line(b"Location:/x \r\n") == ("location", "/x")
    for bad in (b"no colon\r\n", b"Bad Name: x\r\n", b": x\r\n"):
        with pytest.raises(ProbeError):
            parse_header_line(bad)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:53", ("::1", 53)), ("db:5432", ("db", 5432))],
)
def test_parse_tcp_target(address: str, expected: tuple[str, int]) -> None:
    assert parse_tcp_target(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", ":80", "127.0.0.1:0", "127.0.0.1:65536", "h:x"])
def test_parse_tcp_target_rejects(address: str) -> None:
    with pytest.raises(ProbeError):
        parse_tcp_target(address)


# -- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    """An aiohttp server whose /health answers `status` with `body`; counts the hits."""

    status: int = 200
    body: str = "ok"
    hits: int = 0
    base: str = ""

    @property
    def url(self) -> str:
        return f"{self.base}/health"


def target_app(target: Target) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        target.hits += 1
        return web.Response(status=target.status, text=target.body)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/health")

    async def circle(request: web.Request) -> web.Response:
        raise web.HTTPFound("/circle")

    async def big(request: web.Request) -> web.Response:
        return web.Response(text="x" * (MAX_BODY * 3))

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/moved", moved)
    app.router.add_get("/circle", circle)
    app.router.add_get("/big", big)
    app.router.add_get("/chunked", chunked)
    return app


MakeTarget = Callable[[], Awaitable[Target]]


@pytest.fixture
def make_target(aiohttp_server: AiohttpServer) -> MakeTarget:
    async def make() -> Target:
        target = Target()
        server = await aiohttp_server(target_app(target), host="127.0.0.1")
        target.base = f"http://127.0.0.1:{server.port}"
        return target

    return make


@pytest.fixture
async def target(make_target: MakeTarget) -> Target:
    return await make_target()


@dataclass
class RawServer:
    """A plain TCP server on 127.0.0.1:0: reads a request head, writes `reply` (None:
    nothing), then holds the connection until the client closes it if `hold`.
    Counts connections, and the most open at once."""

    reply: bytes | None
    hold: bool = False
    connections: int = 0
    open_now: int = 0
    max_open: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.reply is not None:
                writer.write(self.reply)
                await writer.drain()
            if self.hold or self.reply is None:
                await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            self.handlers.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


MakeRaw = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def make_raw() -> AsyncIterator[MakeRaw]:
    started: list[RawServer] = []

    async def make(reply: bytes | None, *, hold: bool = False) -> RawServer:
        server = await RawServer(reply, hold).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def listener() -> AsyncIterator[int]:
    """A TCP port that accepts connections (and closes them)."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, backlog=1024)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


# -- registry, runner and DNS --------------------------------------------------------


@pytest.fixture
def registry() -> Registry:
    return Registry(LOCAL)


@pytest.fixture
async def runner(registry: Registry) -> AsyncIterator[CheckRunner]:
    runner = CheckRunner(registry, min_interval=0.0, stagger=0.01)
    runner.start()
    yield runner
    await runner.close()


def instance(
    ident: str,
    *check_list: Check,
    service: str = "web",
    source: str = "api",
    tags: tuple[str, ...] = (),
) -> Instance:
    return make_instance(
        service=service,
        id=ident,
        node=LOCAL.name,
        address="127.0.0.1",
        port=8080,
        tags=tags,
        source=source,
        checks=check_list,
    )


def ttl_check(
    cid: str = "service:web-1", ttl: float = 0.3, deregister_after: float | None = None
) -> Check:
    return make_check(
        id=cid, name="ttl", kind=CheckKind.TTL, ttl=ttl, deregister_after=deregister_after
    )


def http_check(
    url: str,
    cid: str = "service:web-1",
    interval: float = 0.05,
    timeout: float = 1.0,
    deregister_after: float | None = None,
    status: str | None = None,
) -> Check:
    return make_check(
        id=cid,
        name="http",
        kind=CheckKind.HTTP,
        target=url,
        interval=interval,
        timeout=timeout,
        deregister_after=deregister_after,
        status=status,
    )


def tcp_check(
    address: str, cid: str = "service:web-1", interval: float = 0.05, timeout: float = 1.0
) -> Check:
    return make_check(
        id=cid, name="tcp", kind=CheckKind.TCP, target=address, interval=interval, timeout=timeout
    )


def state(registry: Registry, cid: str = "service:web-1") -> Check:
    owner = registry.check_owner(cid)
    assert owner is not None, f"no instance has check {cid}"
    return next(c for c in owner.checks if c.id == cid)


async def eventually(predicate: Callable[[], bool], what: str, within: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        assert loop.time() < end, f"not within {within}s: {what}"
        await asyncio.sleep(POLL)


async def status_becomes(
    registry: Registry, health: Health, cid: str = "service:web-1", within: float = DEADLINE
) -> Check:
    await eventually(lambda: state(registry, cid).status is health, f"{cid} {health}", within)
    return state(registry, cid)


def srv_count(responder: Responder, name: str = "web.service.nomad.") -> int:
    reply = responder.respond(DNSRecord.question(name, "SRV").pack(), client="127.0.0.1", tcp=False)
    assert isinstance(reply, bytes)
    return sum(1 for rr in DNSRecord.parse(reply).rr if rr.rtype == QTYPE.SRV)


# -- TTL ---------------------------------------------------------------------------------


async def test_ttl_starts_critical_and_updates_with_notes(
    registry: Registry, runner: CheckRunner
) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=5.0)))
    assert state(registry).status is Health.CRITICAL  # Consul: critical until the first update
    for status, note in [
        (Health.PASSING, "all good"),
        (Health.WARNING, "disk 91%"),
        (Health.CRITICAL, "db down"),
        (Health.PASSING, ""),
    ]:
        runner.ttl_update("service:web-1", status, note)
        assert (state(registry).status, state(registry).output) == (status, note)
        assert registry.snapshot.instances["web-1"].health is status


async def test_ttl_expires_to_critical(registry: Registry, runner: CheckRunner) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=0.2)))
    runner.ttl_update("service:web-1", Health.PASSING, "")
    start = asyncio.get_running_loop().time()
    check = await status_becomes(registry, Health.CRITICAL)
    assert asyncio.get_running_loop().time() - start >= 0.19
    assert check.output == "TTL expired"


async def test_ttl_expiry_keeps_the_last_note(registry: Registry, runner: CheckRunner) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=0.1)))
    runner.ttl_update("service:web-1", Health.WARNING, "slow disk")
    check = await status_becomes(registry, Health.CRITICAL)
    assert check.output == "TTL expired (last output before timeout follows): slow disk"


async def test_ttl_updates_faster_than_ttl_keep_it_passing(
    registry: Registry, runner: CheckRunner
) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=0.6)))
    seen: set[Health] = set()
    for n in range(15):  # 15 updates 0.1 s apart: 1.5 s, well past the 0.6 s TTL
        runner.ttl_update("service:web-1", Health.PASSING, f"beat {n}")
        await asyncio.sleep(0.1)
        seen.add(state(registry).status)
    assert seen == {Health.PASSING}
    await status_becomes(registry, Health.CRITICAL)  # and it expires once the updates stop


async def test_ttl_update_errors(registry: Registry, runner: CheckRunner, target: Target) -> None:
    registry.upsert(instance("web-1", http_check(target.url, interval=5.0)))
    with pytest.raises(NotFoundError):
        runner.ttl_update("service:nope", Health.PASSING, "")
    with pytest.raises(ValidationError, match="does not have associated TTL") as err:
        runner.ttl_update("service:web-1", Health.PASSING, "")
    assert err.value.field == "check"


async def test_ttl_update_before_start_is_recorded(registry: Registry) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=5.0)))
    runner = CheckRunner(registry, min_interval=0.0)
    runner.ttl_update("service:web-1", Health.PASSING, "early")
    assert (state(registry).status, state(registry).output) == (Health.PASSING, "early")
    await runner.close()


async def test_ttl_note_is_capped(registry: Registry, runner: CheckRunner) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=5.0)))
    runner.ttl_update("service:web-1", Health.PASSING, "n" * 10_000)
    assert len(state(registry).output) == 4096


# -- HTTP probes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "health"),
    [(200, Health.PASSING), (201, Health.PASSING), (429, Health.WARNING),
     (500, Health.CRITICAL), (404, Health.CRITICAL), (503, Health.CRITICAL)],
)  # fmt: skip
async def test_http_status_codes(target: Target, code: int, health: Health) -> None:
    target.status, target.body = code, f"body {code}"
    outcome = await probe_http(target.url, 2.0)
    reason = web.Response(status=code).reason
    assert outcome == Outcome(health, f"HTTP GET {target.url}: {code} {reason} Output: body {code}")


async def test_http_check_in_the_registry(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url)))
    check = await status_becomes(registry, Health.PASSING)
    assert check.output == f"HTTP GET {target.url}: 200 OK Output: ok"
    target.status = 429
    await status_becomes(registry, Health.WARNING)
    target.status = 500
    await status_becomes(registry, Health.CRITICAL)
    await eventually(lambda: target.hits >= 5, "probes every interval")


async def test_a_status_change_is_logged_on_one_line(
    registry: Registry, runner: CheckRunner, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    target.body = "<!DOCTYPE HTML>\n<html>\n<body>a page</body>\n</html>\n"
    caplog.set_level(logging.INFO, logger="discovery.checks")
    registry.upsert(instance("web-1", http_check(target.url)))
    check = await status_becomes(registry, Health.PASSING)
    assert "\n<html>" in check.output  # the check keeps the whole output
    (line,) = [r.getMessage() for r in caplog.records if "-> passing" in r.getMessage()]
    assert line == (
        f"check 'service:web-1': critical -> passing: HTTP GET {target.url}: 200 OK"
        " Output: <!DOCTYPE HTML>..."
    )


async def test_output_only_changes_are_written_at_most_every_refresh(
    registry: Registry, target: Target
) -> None:
    runner = CheckRunner(registry, min_interval=0.0, stagger=0.01, output_refresh=1.0)
    runner.start()
    try:
        registry.upsert(instance("web-1", http_check(target.url)))
        await eventually(lambda: state(registry).output.endswith("Output: ok"), "first output")
        index, hits = registry.snapshot.index, target.hits
        target.body = "changed"
        await asyncio.sleep(0.3)
        assert target.hits > hits  # probed, same status: nothing published yet
        assert registry.snapshot.index == index
        await eventually(lambda: state(registry).output.endswith("Output: changed"), "refresh")
        target.status = 500  # a status change goes in at once, with its output
        await eventually(lambda: state(registry).status is Health.CRITICAL, "critical", 1.0)
    finally:
        await runner.close()


async def test_http_timeout_is_critical(make_raw: MakeRaw) -> None:
    silent = await make_raw(None)  # accepts, reads, never answers
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcome = await probe_http(silent.url, 0.2)
    took = loop.time() - start
    assert outcome == Outcome(Health.CRITICAL, f'Get "{silent.url}": timeout after 200ms')
    assert 0.19 <= took < 2.0
    assert silent.connections == 1


async def test_http_timeout_in_the_registry(
    registry: Registry, runner: CheckRunner, make_raw: MakeRaw
) -> None:
    silent = await make_raw(None)
    registry.upsert(instance("web-1", http_check(silent.url, timeout=0.1)))
    await eventually(lambda: "timeout after 100ms" in state(registry).output, "timeout output")
    assert state(registry).status is Health.CRITICAL


async def test_http_refused_is_critical(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/health"
    outcome = await probe_http(url, 2.0)
    expected = f'Get "{url}": dial tcp 127.0.0.1:{closed_port}: connect: Connection refused'
    assert outcome == Outcome(Health.CRITICAL, expected)


async def test_http_refused_in_the_registry(
    registry: Registry, runner: CheckRunner, closed_port: int
) -> None:
    check = http_check(f"http://127.0.0.1:{closed_port}/", status="passing")
    registry.upsert(instance("web-1", check))
    check = await status_becomes(registry, Health.CRITICAL)
    assert "Connection refused" in check.output


async def test_http_follows_redirects(target: Target) -> None:
    outcome = await probe_http(f"{target.base}/moved", 2.0)
    assert outcome == Outcome(Health.PASSING, f"HTTP GET {target.base}/moved: 200 OK Output: ok")
    assert target.hits == 1
    outcome = await probe_http(f"{target.base}/circle", 2.0)
    assert outcome.status is Health.CRITICAL
    assert outcome.output == f'Get "{target.base}/circle": stopped after 10 redirects'


async def test_http_body_is_capped_and_chunks_are_decoded(target: Target) -> None:
    outcome = await probe_http(f"{target.base}/big", 2.0)
    assert outcome.status is Health.PASSING
    assert outcome.output.endswith("Output: " + "x" * MAX_BODY)
    outcome = await probe_http(f"{target.base}/chunked", 2.0)
    assert outcome.output == f"HTTP GET {target.base}/chunked: 200 OK Output: one two three"


async def test_http_status_decides_when_the_body_stalls(make_raw: MakeRaw) -> None:
    stalled = await make_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", hold=True)
    outcome = await probe_http(stalled.url, 0.3)
    assert outcome == Outcome(Health.PASSING, f"HTTP GET {stalled.url}: 200 OK Output: partial")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nBroken header\r\n\r\n", "malformed HTTP header line"),
        (b"HTTP/1.1 200 OK\r\n", "connection closed before the end of the response head"),
        (b"", "connection closed before the end of the response head"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 10_000 + b"\r\n\r\n", "limit"),
    ],
)
async def test_http_malformed_answers_are_critical(
    make_raw: MakeRaw, reply: bytes, error: str
) -> None:
    server = await make_raw(reply)
    outcome = await probe_http(server.url, 2.0)
    assert outcome.status is Health.CRITICAL
    assert outcome.output.startswith(f'Get "{server.url}": ')
    assert error in outcome.output


async def test_https_to_a_plain_server_is_critical(target: Target) -> None:
    url = target.url.replace("http://", "https://")
    outcome = await probe_http(url, 2.0)
    assert outcome.status is Health.CRITICAL
    assert outcome.output.startswith(f'Get "{url}": tls: ')
    assert target.hits == 0


# -- TCP probes -----------------------------------------------------------------------------


async def test_tcp_open_and_closed(listener: int, closed_port: int) -> None:
    address = f"127.0.0.1:{listener}"
    assert await probe_tcp(address, 1.0) == Outcome(
        Health.PASSING, f"TCP connect {address}: Success"
    )
    address = f"127.0.0.1:{closed_port}"
    assert await probe_tcp(address, 1.0) == Outcome(
        Health.CRITICAL, f"dial tcp {address}: connect: Connection refused"
    )


async def test_tcp_checks_in_the_registry(
    registry: Registry, runner: CheckRunner, listener: int, closed_port: int
) -> None:
    registry.upsert(
        instance("web-1", tcp_check(f"127.0.0.1:{listener}")),
        instance("web-2", tcp_check(f"127.0.0.1:{closed_port}", "service:web-2", interval=0.05)),
    )
    passing = await status_becomes(registry, Health.PASSING)
    assert passing.output == f"TCP connect 127.0.0.1:{listener}: Success"
    await eventually(lambda: state(registry, "service:web-2").output != "", "web-2 probed")
    failing = state(registry, "service:web-2")
    assert (failing.status, failing.output) == (
        Health.CRITICAL,
        f"dial tcp 127.0.0.1:{closed_port}: connect: Connection refused",
    )


# -- the runner: registry and DNS ------------------------------------------------------------


async def test_status_change_reaches_dns_at_once(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    responder = Responder(registry, DnsSettings(node_name=LOCAL.name))
    registry.upsert(instance("web-1", http_check(target.url)))
    assert srv_count(responder) == 0  # critical until the first probe
    await status_becomes(registry, Health.PASSING)
    assert srv_count(responder) == 1
    target.status = 500
    await status_becomes(registry, Health.CRITICAL)
    assert registry.snapshot.instances["web-1"].health is Health.CRITICAL
    assert srv_count(responder) == 0
    target.status = 200
    await status_becomes(registry, Health.PASSING)
    assert srv_count(responder) == 1


async def test_ttl_status_reaches_dns(registry: Registry, runner: CheckRunner) -> None:
    responder = Responder(registry, DnsSettings(node_name=LOCAL.name))
    registry.upsert(instance("web-1", ttl_check(ttl=0.2)))
    assert srv_count(responder) == 0
    runner.ttl_update("service:web-1", Health.PASSING, "")
    assert srv_count(responder) == 1
    await status_becomes(registry, Health.CRITICAL)
    assert srv_count(responder) == 0


async def test_deregister_critical_service_after(registry: Registry, runner: CheckRunner) -> None:
    registry.upsert(
        instance("web-1", ttl_check(ttl=10.0, deregister_after=0.5)),
        instance("web-2", ttl_check("service:web-2", ttl=10.0, deregister_after=0.5)),
    )
    runner.ttl_update("service:web-2", Health.PASSING, "")  # web-2 is not critical
    await asyncio.sleep(0.1)
    assert "web-1" in registry.snapshot.instances
    await eventually(lambda: "web-1" not in registry.snapshot.instances, "web-1 reaped")
    assert runner.running == {"service:web-2"}
    await asyncio.sleep(0.6)
    assert "web-2" in registry.snapshot.instances


async def test_deregister_needs_continuous_critical(
    registry: Registry, runner: CheckRunner
) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=10.0, deregister_after=1.0)))
    await asyncio.sleep(0.5)
    runner.ttl_update("service:web-1", Health.PASSING, "")  # critical for 0.5 s only
    runner.ttl_update("service:web-1", Health.CRITICAL, "")  # critical again: 1 s from now
    await asyncio.sleep(0.7)  # past the first critical's 1 s
    assert "web-1" in registry.snapshot.instances
    await eventually(lambda: "web-1" not in registry.snapshot.instances, "web-1 reaped")


async def test_deregister_after_failing_http_probes(
    registry: Registry, runner: CheckRunner, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    target.status = 503
    registry.upsert(instance("web-1", http_check(target.url, deregister_after=0.2)))
    with caplog.at_level(logging.WARNING, logger="discovery.checks"):
        await eventually(lambda: "web-1" not in registry.snapshot.instances, "web-1 reaped")
    assert "deregistering service instance 'web-1'" in caplog.text
    assert runner.running == frozenset()


async def test_reregistering_with_another_check_restarts_it(
    registry: Registry, runner: CheckRunner, make_target: MakeTarget
) -> None:
    first, second = await make_target(), await make_target()
    registry.upsert(instance("web-1", http_check(first.url)))
    await eventually(lambda: first.hits >= 1, "first target probed")
    registry.upsert(instance("web-1", http_check(second.url)))
    await eventually(lambda: second.hits >= 2, "second target probed")
    await asyncio.sleep(0.1)  # a probe of the first in flight at the switch has landed
    hits = first.hits
    await asyncio.sleep(0.3)
    assert first.hits == hits


async def test_unrelated_changes_do_not_restart_probes(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url, interval=2.0)))
    await eventually(lambda: target.hits == 1, "first probe")
    await status_becomes(registry, Health.PASSING)
    for n in range(20):
        current = registry.snapshot.instances["web-1"]
        registry.upsert(
            dataclasses.replace(current, tags=(f"t{n}",)),  # same instance, same checks
            instance(f"web-x{n}"),  # same service
            instance(f"db-{n}", service="db"),  # another service
        )
        await asyncio.sleep(0)
    await asyncio.sleep(0.2)  # a restarted check would probe within its 0.01 s stagger
    assert target.hits == 1
    assert runner.running == {"service:web-1"}


async def test_unrelated_changes_do_not_rearm_ttl(registry: Registry, runner: CheckRunner) -> None:
    registry.upsert(instance("web-1", ttl_check(ttl=0.4)))
    runner.ttl_update("service:web-1", Health.PASSING, "ok")
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    n = 0
    while state(registry).status is Health.PASSING:
        assert loop.time() < end, "the TTL never expired: re-armed by unrelated changes"
        current = registry.snapshot.instances["web-1"]
        registry.upsert(dataclasses.replace(current, tags=(f"t{n}",)), instance(f"web-x{n}"))
        n += 1
        await asyncio.sleep(0.03)
    assert n >= 5  # changes kept coming during the TTL
    assert state(registry).output.startswith("TTL expired")


async def test_reregistering_the_same_check_keeps_it_running(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url, interval=2.0)))
    await eventually(lambda: target.hits == 1, "first probe")
    registry.upsert(instance("web-1", http_check(target.url, interval=2.0), tags=("v2",)))
    await asyncio.sleep(0.2)
    assert target.hits == 1


async def test_a_rewritten_output_is_restored_by_the_next_probe(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url)))
    await eventually(lambda: state(registry).output.endswith("Output: ok"), "first output")
    # Re-registered by its owner, same definition and status, output lost: no
    # OUTPUT_REFRESH wait for the probe's output to be back.
    registry.upsert(instance("web-1", http_check(target.url, status="passing")))
    assert state(registry).output == ""
    await eventually(lambda: state(registry).output.endswith("Output: ok"), "output back")


async def test_removing_an_instance_stops_its_checks(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url)), instance("web-2", ttl_check("t2")))
    await eventually(lambda: target.hits >= 2, "probes")
    registry.remove("web-1", "web-2")
    assert runner.running == frozenset()
    await asyncio.sleep(0.1)
    hits = target.hits
    await asyncio.sleep(0.3)  # six intervals
    assert target.hits == hits


async def test_dropping_a_check_stops_it(
    registry: Registry, runner: CheckRunner, target: Target
) -> None:
    registry.upsert(instance("web-1", http_check(target.url)))
    await eventually(lambda: target.hits >= 1, "probes")
    registry.upsert(instance("web-1"))  # re-registered without checks
    assert runner.running == frozenset()
    await asyncio.sleep(0.1)
    hits = target.hits
    await asyncio.sleep(0.2)
    assert target.hits == hits


async def test_renamed_service_keeps_its_checks(
    registry: Registry, runner: CheckRunner, listener: int
) -> None:
    check = tcp_check(f"127.0.0.1:{listener}")
    registry.upsert(instance("web-1", check))
    await status_becomes(registry, Health.PASSING)
    registry.upsert(instance("web-1", check, service="api"))  # same id, another service
    assert runner.running == {"service:web-1"}
    await status_becomes(registry, Health.PASSING)
    registry.remove("web-1")
    assert runner.running == frozenset()


async def test_config_instances_are_checked_too(
    registry: Registry, listener: int, closed_port: int
) -> None:
    registry.upsert(  # present before start: start() picks them up
        instance("web-1", tcp_check(f"127.0.0.1:{listener}"), source="config"),
        instance("web-2", tcp_check(f"127.0.0.1:{closed_port}", "c2"), source="config"),
    )
    runner = CheckRunner(registry, min_interval=0.0, stagger=0.01)
    runner.start()
    try:
        await status_becomes(registry, Health.PASSING)
        await eventually(lambda: state(registry, "c2").output != "", "c2 probed")
        assert state(registry, "c2").status is Health.CRITICAL
        assert state(registry, "c2").output.startswith("dial tcp")
    finally:
        await runner.close()


async def test_unexpected_probe_error_does_not_stop_the_runner(
    registry: Registry,
    runner: CheckRunner,
    listener: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = checks.probe_tcp
    calls = 0

    async def flaky(address: str, within: float) -> Outcome:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("probe bug")
        return await real(address, within)

    monkeypatch.setattr(checks, "probe_tcp", flaky)
    with caplog.at_level(logging.ERROR, logger="discovery.checks"):
        registry.upsert(instance("web-1", tcp_check(f"127.0.0.1:{listener}")))
        await status_becomes(registry, Health.PASSING)
    assert "probe bug" in caplog.text
    assert calls >= 3


async def test_probes_in_flight_are_bounded(registry: Registry, make_raw: MakeRaw) -> None:
    silent = await make_raw(None)
    runner = CheckRunner(registry, min_interval=0.0, max_in_flight=3, stagger=0.01)
    runner.start()
    try:
        registry.upsert(
            *(instance(f"web-{n}", http_check(silent.url, f"c{n}", timeout=0.1)) for n in range(12))
        )
        await eventually(lambda: silent.connections >= 12, "every check probed")
        await eventually(
            lambda: all(state(registry, f"c{n}").output for n in range(12)), "outcomes"
        )
    finally:
        await runner.close()
    assert silent.max_open <= 3


async def test_results_arriving_together_are_one_registry_change(
    registry: Registry, closed_port: int
) -> None:
    count = 50
    registry.upsert(
        *(instance(f"web-{n}", tcp_check(f"127.0.0.1:{closed_port}", f"c{n}", interval=5.0))
          for n in range(count))
    )  # fmt: skip
    index = registry.snapshot.index
    runner = CheckRunner(
        registry, min_interval=0.0, stagger=0.0
    )  # every first probe at once: all refused
    runner.start()
    try:
        await eventually(
            lambda: all(state(registry, f"c{n}").output for n in range(count)), "all probed"
        )
    finally:
        await runner.close()
    assert 1 <= registry.snapshot.index - index < count // 2


async def test_many_checks(registry: Registry, listener: int) -> None:
    runner = CheckRunner(registry, min_interval=0.0, stagger=0.2)
    runner.start()
    try:
        registry.upsert(
            *(instance(f"web-{n}", tcp_check(f"127.0.0.1:{listener}", f"c{n}", interval=0.5))
              for n in range(500))
        )  # fmt: skip
        assert len(runner.running) == 500
        await eventually(
            lambda: all(i.health is Health.PASSING for i in registry.snapshot.instances.values()),
            "all 500 passing",
            within=3 * DEADLINE,  # 500 connections on a loaded machine
        )
    finally:
        await runner.close()


async def test_close_leaves_no_tasks(
    registry: Registry, make_raw: MakeRaw, listener: int, target: Target
) -> None:
    silent = await make_raw(None)
    registry.upsert(
        instance("web-1", http_check(silent.url, "c1", timeout=5.0)),  # probe in flight
        instance("web-2", http_check(target.url, "c2")),
        instance("web-3", tcp_check(f"127.0.0.1:{listener}", "c3")),
        instance("web-4", ttl_check("c4", ttl=0.2, deregister_after=0.1)),
    )
    runner = CheckRunner(registry, min_interval=0.0, stagger=0.01)
    runner.start()
    await eventually(lambda: silent.open_now == 1 and target.hits >= 1, "probes running")
    runner.ttl_update("c4", Health.PASSING, "")  # expires in 0.2 s, then reaped 0.1 s later
    await runner.close()
    # The runner names its tasks "check <id>"; servers' handler tasks may still be finishing.
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("check ")] == []
    assert runner.running == frozenset()
    index = registry.snapshot.index
    await asyncio.sleep(0.4)  # past the TTL and the reaping time: nothing fires any more
    assert registry.snapshot.index == index
    assert "web-4" in registry.snapshot.instances
    await eventually(lambda: silent.open_now == 0, "the in-flight probe's connection closed")


async def test_an_interval_below_a_second_is_raised_to_it(
    registry: Registry, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="discovery.checks")
    runner = CheckRunner(registry, stagger=0.01)  # Consul's minimum: 1 s
    runner.start()
    try:
        registry.upsert(instance("web-1", http_check(target.url, interval=0.001)))
        await status_becomes(registry, Health.PASSING)
        await asyncio.sleep(1.5)
        assert 1 <= target.hits <= 3  # not hundreds: once a second at most
        assert any("below minimum of 1s" in r.getMessage() for r in caplog.records)
    finally:
        await runner.close()
