"""The HTTP API server: aiohttp in front of the endpoint modules' routes.  Adapter.

The only module that imports aiohttp.  :func:`start_http` serves the
:class:`~discovery.api.Route` tuples of the endpoint modules (Consul, Nomad,
waypost's own) on the running event loop (AppRunner + TCPSite, shared with DNS)
and does, for every route, what the endpoint modules must not care about:

- tokens: ``X-Consul-Token``, ``X-Nomad-Token``, ``Authorization: Bearer`` or
  Consul's ``?token=``, checked with :func:`discovery.acl.allowed` before the
  body is even read (403, nothing changed).  Tokens never reach a log line:
  the access log prints the path without its query, and ``token`` is dropped
  from the query the endpoints see.
- blocking reads (``?index=N&wait=D``, Consul's semantics): wait (default 5
  min, at most 10, plus up to wait/16 of jitter) until the index of what the
  route watches passes N; an index above the registry's is a reset and
  answers at once.  Every read answers with ``X-Consul-Index`` and
  ``X-Nomad-Index`` (and the leader headers Consul clients read).
  Consul's hash-based blocking (``?hash=H&wait=D``): a read whose response
  carries ``X-Consul-ContentHash`` waits while that hash is still H.
- one encoding per change: the bodies of watched reads (those with watch
  keys, functions of the snapshot and the query only) are cached per (route,
  path, query without index/wait, snapshot index), so 10,000 watchers woken
  by one change cost one read and one ``json.dumps``.
- errors as JSON: ``{"error": ..., "field": ...}`` for ApiError (4xx),
  unknown routes (404), wrong methods (405), bodies over 1 MiB (413), bodies
  over the JSON limits (400, :func:`discovery.api.check_json_limits`), and
  what aiohttp's parser refuses (400: :class:`_Handler`, with token values
  redacted from the message); any other exception is logged and answered 500,
  and the server keeps serving.  Those log lines are redacted too and at most
  ERROR_LOG_PER_SECOND a second (then a count of the suppressed ones).
- connections: a request head must arrive whole within HEAD_TIMEOUT (else
  408 and close, on the fast path and on aiohttp's), one source address holds
  at most MAX_CLIENT_CONNECTIONS (then 429 and close), and a warning is
  logged when open connections near RLIMIT_NOFILE (:class:`ConnectionLimits`).
- streams (:class:`StreamRoute`): a handler that writes chunks for as long as
  it likes (the event stream), cancelled when the server closes.
- the fast path: each connection is a :class:`_Connection` that frames
  requests itself; a plain ``GET`` of a target whose whole response (status
  line, headers, body) is cached for the current snapshot is answered with
  one write, counted and logged as aiohttp would have; every other request
  goes, in order, to aiohttp's own protocol on that connection (the framing
  is :mod:`discovery.httpwire`'s, pure).  aiohttp's per-request cost (request
  object, routing, middleware, Response) is ~3/4 of a cached lookup's, hence
  this (tests/bench/README.md, HTTP section).

Counters for metrics are in :class:`HttpStats` (requests by method, route and
status, and how many the fast path answered; the number of blocked requests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import resource
import socket
import sys
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import SERVER_SOFTWARE

from discovery.acl import Access, AclSettings, allowed
from discovery.api import (
    MAX_JSON_DIGITS,
    ApiContext,
    ApiError,
    ApiRequest,
    ApiResponse,
    Route,
    check_json_limits,
)
from discovery.blocking import MIN_INDEX, Waiters, watch_index
from discovery.durations import parse_duration
from discovery.errors import NotFoundError, ValidationError
from discovery.httpwire import (
    HEAD_END,
    MAX_HEAD,
    TOKEN_HEADERS,
    RequestHead,
    parse_head,
    parse_token,
)
from discovery.registry import Snapshot

log = logging.getLogger(__name__)
access_log = logging.getLogger(f"{__name__}.access")

MAX_BODY = 1 << 20  # bytes; larger request bodies get 413
DEFAULT_WAIT = 300.0  # seconds; Consul's default for a blocking query
MAX_WAIT = 600.0  # seconds; Consul's maximum
JITTER_DIVISOR = 16  # Consul adds up to wait/16 so that watchers do not return in lockstep
CACHE_ENTRIES = 512  # encoded bodies kept (per route, path, query and index)
CACHE_BYTES = 64 << 20  # and at most this many bytes of them
# Thousands of watchers reconnect at once after a restart; a short accept queue makes
# the kernel drop their SYNs and the clients back off for seconds (Linux caps it at somaxconn).
LISTEN_BACKLOG = 4096
SHUTDOWN_GRACE = 2.0  # seconds for in-flight requests when the server closes
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle connection stays open: aiohttp's default
# A request head must arrive whole within this (Go's http.Server ReadHeaderTimeout; Consul
# and Nomad set it): a client trickling a head a byte at a time holds a connection forever.
HEAD_TIMEOUT = 10.0  # seconds
# Connections from one source address at a time (Consul's http_max_conns_per_client: 200).
MAX_CLIENT_CONNECTIONS = 256
FD_WARN_FRACTION = 0.8  # warn when open connections pass this fraction of RLIMIT_NOFILE
ERROR_LOG_PER_SECOND = 5  # log lines of bad requests and failures a second; the rest counted
BLOCKING_PARAMS = frozenset({"index", "wait", "hash"})
CONTENT_HASH = "X-Consul-ContentHash"  # set by reads that block on ?hash= (Consul's agent/service)
UNMATCHED = "<unmatched>"  # the route label of requests no route matched
# Consul clients (py-consul, consul-template) read these; a single agent is its own leader.
LEADER_HEADERS = {
    "X-Consul-KnownLeader": "true",
    "X-Consul-LastContact": "0",
    "X-Nomad-KnownLeader": "true",
    "X-Nomad-LastContact": "0",
}

Send = Callable[[bytes], Awaitable[None]]
StreamHandler = Callable[[ApiRequest, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamRoute:
    """A GET endpoint whose handler sends chunks until it returns (the event stream).

    The handler may raise ApiError before its first chunk (a 4xx as usual);
    the response starts with the first chunk.  A client that goes away makes
    `send` raise ConnectionResetError; the handler may let it propagate.
    """

    path: str
    handler: StreamHandler
    access: Access = Access.READ
    content_type: str = "application/x-ndjson"
    content_type_of: Callable[[ApiRequest], str] | None = None  # per request, when it varies


class HttpStats:
    """What the metrics endpoint reports about HTTP.  Mutated on the event loop only."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status)
        self.fast = 0  # of those, answered by the fast path (whole cached responses)
        self.waiters = Waiters()

    @property
    def blocked(self) -> int:
        """Requests waiting in a blocking query right now."""
        return self.waiters.count


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A response ready to send: built once, sent to every watcher of that index."""

    status: int
    body: bytes
    headers: Mapping[str, str]  # everything, Content-Type and the index headers included


class _BodyCache:
    """Encoded read responses, least recently used first out."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[object, ...], _Encoded] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[object, ...]) -> _Encoded | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: tuple[object, ...], value: _Encoded) -> None:
        if len(value.body) > CACHE_BYTES // 8:
            return  # one huge body must not flush everything else
        self._entries[key] = value
        self._bytes += len(value.body)
        while len(self._entries) > CACHE_ENTRIES or self._bytes > CACHE_BYTES:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.body)


@dataclass(frozen=True, slots=True)
class _Wire:
    """A cached read's whole HTTP/1.1 response, split around its Date field."""

    index: int  # the snapshot index it answers for
    access: Access
    path: str  # for the access log (never the query)
    label: tuple[str, str, int]  # HttpStats.requests key
    before_date: bytes  # status line and fields up to "Date: "
    after_date: bytes  # the rest of the fields, the blank line and the body


def render_wire(
    index: int, access: Access, path: str, label: tuple[str, str, int], encoded: _Encoded
) -> _Wire | None:
    """The response aiohttp writes for `encoded` (same fields, same order); None if unusual."""
    names = {name.lower() for name in encoded.headers}
    if names & {"content-length", "date", "server", "connection", "transfer-encoding"}:
        return None
    fields = "".join(f"{name}: {value}\r\n" for name, value in encoded.headers.items())
    if fields.count("\r") != len(encoded.headers) or fields.count("\n") != len(encoded.headers):
        return None  # a line break inside a name or value: aiohttp refuses to send it
    status = f"HTTP/1.1 {encoded.status} {HTTPStatus(encoded.status).phrase}\r\n"
    before = f"{status}{fields}Content-Length: {len(encoded.body)}\r\nDate: "
    after = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
    return _Wire(index, access, path, label, before.encode(), after.encode() + encoded.body)


class _WireCache:
    """Whole responses of cached reads by raw target; first in, first out."""

    def __init__(self) -> None:
        self.entries: dict[bytes, _Wire] = {}
        self._bytes = 0
        self._second = 0
        self._date = b""

    def put(
        self,
        target: str,
        path: str,
        index: int,
        access: Access,
        label: tuple[str, str, int],
        encoded: _Encoded,
    ) -> None:
        wire = render_wire(index, access, path, label, encoded)
        if wire is None or len(wire.after_date) > CACHE_BYTES // 8:
            return
        key = target.encode("utf-8", "surrogateescape")  # aiohttp's decoding, undone
        old = self.entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.after_date)
        self.entries[key] = wire
        self._bytes += len(wire.after_date)
        while len(self.entries) > CACHE_ENTRIES or self._bytes > CACHE_BYTES:
            dropped = self.entries.pop(next(iter(self.entries)))
            self._bytes -= len(dropped.after_date)

    def date(self) -> bytes:
        """The Date field's value (RFC 9110 section 5.6.7), refreshed once a second."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection limits of the server (tests shorten them)."""

    head_timeout: float = HEAD_TIMEOUT
    per_client: int = MAX_CLIENT_CONNECTIONS
    # RLIMIT_NOFILE's soft limit when the server started (the agent raises it to the hard one)
    open_files: int = dataclasses.field(
        default_factory=lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    )


class LogBudget:
    """At most `per_second` log lines a second; the lines over are counted, not written.

    :meth:`take` says whether to write a line, and how many were held back
    before it (to be said in that line).  10,000 malformed requests in a few
    seconds once wrote 5 MB of tracebacks; now they write a few lines a second.
    """

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.suppressed = 0
        self._second = -1
        self._used = 0

    def take(self, now: float) -> int | None:
        """None: do not log this one; else the number suppressed since the last logged."""
        second = int(now)
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.per_second:
            self.suppressed += 1
            return None
        self._used += 1
        held, self.suppressed = self.suppressed, 0
        return held


# What aiohttp's parser errors quote of a request (a header line, the request line) may
# carry a token: the value of these fields, and a query's token=, are cut from the
# message before it is logged or answered.
_SECRET_FIELD = re.compile(
    r"(?i)\b((?:x-consul-token|x-nomad-token|authorization|proxy-authorization|cookie)"
    r"\s*:\s*)[^\r\n]*"
)
_SECRET_QUERY = re.compile(r"(?i)(\btoken=)[^&\s'\"#\\]*")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with the values of token fields and of `token=` replaced by [redacted]."""
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", _SECRET_FIELD.sub(rf"\1{REDACTED}", text))


@dataclass(slots=True)
class _State:
    ctx: ApiContext
    acl: AclSettings
    stats: HttpStats
    cache: _BodyCache = dataclasses.field(default_factory=_BodyCache)
    wire: _WireCache = dataclasses.field(default_factory=_WireCache)
    streams: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    connections: set[_Connection] = dataclasses.field(default_factory=set)
    limits: ConnectionLimits = dataclasses.field(default_factory=ConnectionLimits)
    clients: Counter[str] = dataclasses.field(default_factory=Counter)  # connections by address
    errors: LogBudget = dataclasses.field(default_factory=lambda: LogBudget(ERROR_LOG_PER_SECOND))
    handler_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)


STATE = web.AppKey("waypost_http", _State)


class HttpServer:
    """A running HTTP API.  `close()` stops it (blocked requests answer first)."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, stats: HttpStats) -> None:
        self._runner = runner
        self._listener = listener
        bound = listener.sockets[0].getsockname()
        self.host = str(bound[0])
        self.port = int(bound[1])
        self.stats = stats
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener.close()  # no new connections; the open ones close in _on_shutdown
        await self._runner.cleanup()
        await self._listener.wait_closed()


async def start_http(
    ctx: ApiContext,
    routes: Sequence[Route],
    acl: AclSettings,
    host: str,
    port: int,
    *,
    streams: Sequence[StreamRoute] = (),
    stats: HttpStats | None = None,
    limits: ConnectionLimits | None = None,
) -> HttpServer:
    """Serve `routes` (and `streams`) on host:port (0: any free port) on the running loop.

    Error handling: an address that cannot be bound raises OSError; nothing stays open.
    """
    stats = stats or HttpStats()
    stats.waiters.attach(ctx.registry)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app[STATE] = _State(ctx, acl, stats)
    for route in routes:
        app.router.add_route(route.method, route.path, _route_handler(route))
    for stream in streams:
        app.router.add_route("GET", stream.path, _stream_handler(stream))
    app.on_shutdown.append(_on_shutdown)
    # What the runner's web.Server gives each RequestHandler; _Connection makes them.
    handler_args = {
        "access_log_class": _AccessLog,
        "access_log": access_log,
        "keepalive_timeout": KEEPALIVE_TIMEOUT,
    }
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that hangs up stops its blocking query
        shutdown_timeout=SHUTDOWN_GRACE,
        **handler_args,  # type: ignore[arg-type]
    )
    await runner.setup()
    server = runner.server
    assert server is not None  # set by setup()
    state = app[STATE]
    state.handler_args = handler_args
    if limits is not None:
        state.limits = limits
    try:
        # Not a TCPSite: every connection starts as a _Connection, which hands aiohttp
        # (server(), a RequestHandler per connection) what it does not answer itself.
        listener = await asyncio.get_running_loop().create_server(
            lambda: _Connection(server, state), host, port, backlog=LISTEN_BACKLOG
        )
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, listener, stats)


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.stats.waiters.close()  # blocked reads answer now with what they have
    for task in list(state.streams):
        task.cancel()
    for connection in list(state.connections):
        connection.close_if_fast()  # aiohttp's shutdown closes the ones it serves


# -- requests ---------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_token(request: web.BaseRequest) -> str | None:
    """The ACL token of a request: Consul's and Nomad's headers, a bearer token, `?token=`."""
    for header in TOKEN_HEADERS:
        value = request.headers.get(header, "").strip()
        if value:
            return value
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token") or None


def _authorize(request: web.Request, access: Access, acl: AclSettings) -> None:
    if acl.enabled and not allowed(acl, request_token(request), access):
        raise ApiError(403, "Permission denied")


def _api_request(request: web.Request, body: bytes, ctx: ApiContext) -> ApiRequest:
    query = {k: tuple(request.query.getall(k)) for k in set(request.query) if k != "token"}
    return ApiRequest(
        method=request.method,
        path=request.path,
        params=dict(request.match_info),
        query=query,
        body=body,
        datacenter=ctx.datacenter.lower(),
    )


def _route_handler(route: Route) -> Handler:
    cacheable = route.read is not None and route.watch is not None

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        _authorize(request, route.access, state.acl)
        # The hot path of lookups: a non-blocking cached read, found by the raw query
        # string before anything is parsed (the same encoding _read caches).
        quick = None
        if cacheable and "index" not in request.query and "hash" not in request.query:
            snap = state.ctx.registry.snapshot
            quick = (route.path, request.path, request.query_string, snap.index)
            encoded = state.cache.get(quick)
            if encoded is not None:
                return _respond(encoded)
        body = await request.read() if request.body_exists else b""
        req = _api_request(request, body, state.ctx)
        if route.write is not None:
            # Every body within the JSON limits, whichever decoder its endpoint uses.
            check_json_limits(body)
            written = await route.write(req, state.ctx)
            return _respond(_encode(written, written.index))
        encoded = await _read(state, route, req)
        if quick is not None and quick[-1] == state.ctx.registry.snapshot.index:
            state.cache.put(quick, encoded)
            if request.method == "GET":
                label = (request.method, _route_label(request), encoded.status)
                state.wire.put(
                    request.raw_path, request.path, quick[-1], route.access, label, encoded
                )
        return _respond(encoded)

    return handle


async def _read(state: _State, route: Route, req: ApiRequest) -> _Encoded:
    """Run a read, blocking first when asked to.

    Only reads with watch keys are pure functions of the snapshot (and the
    query); their encodings are cached per snapshot index.  The others (health
    of the agent, metrics) may read more than the registry and run every time.
    """
    assert route.read is not None
    snap = state.ctx.registry.snapshot
    if route.watch is None:
        index = max(MIN_INDEX, snap.index)
        return _encode(route.read(req, snap), index, pretty="pretty" in req.query)
    keys = tuple(route.watch(req))
    query = tuple(sorted((k, tuple(v)) for k, v in req.query.items() if k not in BLOCKING_PARAMS))
    blocking = parse_blocking(req)
    if blocking is not None:
        wanted, wait = blocking
        # An index above the registry's own is a reset (a restart): answer at once.
        if wanted <= max(MIN_INDEX, snap.index) and watch_index(snap, keys) <= wanted:
            jitter = random.uniform(0, wait / JITTER_DIVISOR)
            snap = await state.stats.waiters.wait(keys, wanted, wait + jitter)
    encoded = _cached_read(state, route, req, query, snap)
    content_hash = req.arg("hash")
    if blocking is None and content_hash:
        encoded = await _wait_for_hash(state, route, req, query, content_hash, encoded)
    return encoded


def _cached_read(
    state: _State, route: Route, req: ApiRequest, query: tuple[object, ...], snap: Snapshot
) -> _Encoded:
    """The encoded read of a watched route at `snap`, from the cache when it is there."""
    assert route.read is not None and route.watch is not None
    key = (route.method, route.path, req.path, query, snap.index)
    encoded = state.cache.get(key)
    if encoded is None:
        response = route.read(req, snap)
        keys = route.watch(req)
        encoded = _encode(response, watch_index(snap, keys), pretty="pretty" in req.query)
        state.cache.put(key, encoded)
    return encoded


async def _wait_for_hash(
    state: _State,
    route: Route,
    req: ApiRequest,
    query: tuple[object, ...],
    content_hash: str,
    encoded: _Encoded,
) -> _Encoded:
    """Consul's hash-based blocking: re-read on each change while the hash is `content_hash`.

    Ends at the wait (plus jitter), or when a wake-up moved nothing (the server is closing).
    """
    assert route.watch is not None
    keys = tuple(route.watch(req))
    wait = _parse_wait(req)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait + random.uniform(0, wait / JITTER_DIVISOR)
    while encoded.headers.get(CONTENT_HASH) == content_hash:
        before = watch_index(state.ctx.registry.snapshot, keys)
        left = deadline - loop.time()
        if left <= 0:
            break
        snap = await state.stats.waiters.wait(keys, before, left)
        if watch_index(snap, keys) <= before:
            break  # the wait ended, or the waiters closed
        encoded = _cached_read(state, route, req, query, snap)
    return encoded


def parse_blocking(req: ApiRequest) -> tuple[int, float] | None:
    """`?index=N&wait=D` as (N, seconds); None without `index`.  ApiError 400 when invalid."""
    raw = req.arg("index")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(400, f"index: {raw!r} is not a non-negative integer", "index")
    if len(raw) > MAX_JSON_DIGITS:  # int() refuses over 4300 digits with a ValueError
        raise ApiError(400, f"index: more than {MAX_JSON_DIGITS} digits", "index")
    return int(raw), _parse_wait(req)


def _parse_wait(req: ApiRequest) -> float:
    """`?wait=D` in seconds: the default when absent or zero, at most MAX_WAIT."""
    wait_arg = req.arg("wait")
    try:
        wait = parse_duration(wait_arg, "wait") if wait_arg else 0.0
    except ValidationError as err:
        raise ApiError.invalid(err) from None
    if wait <= 0:
        wait = DEFAULT_WAIT  # Consul: no (or a zero) wait means the default
    return min(wait, MAX_WAIT)


def _encode(response: ApiResponse, index: int | None, *, pretty: bool = False) -> _Encoded:
    body = response.body
    headers = dict(LEADER_HEADERS)
    final = response.index if response.index is not None else index
    if final:
        headers["X-Consul-Index"] = headers["X-Nomad-Index"] = str(final)
    if body is None:
        data = b""
    elif isinstance(body, str) and response.content_type.startswith("text/"):
        data = body.encode()
    else:
        text = json.dumps(
            body, indent=4 if pretty else None, separators=None if pretty else (",", ":")
        )
        data = text.encode()
    if data:
        headers["Content-Type"] = response.content_type
    headers.update(response.headers)
    return _Encoded(response.status, data, headers)


def _respond(encoded: _Encoded) -> web.Response:
    return web.Response(body=encoded.body, status=encoded.status, headers=encoded.headers)


# -- streams ----------------------------------------------------------------------------


def _stream_handler(route: StreamRoute) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        _authorize(request, route.access, state.acl)
        req = _api_request(request, b"", state.ctx)
        response = web.StreamResponse(headers=LEADER_HEADERS)
        chosen = route.content_type_of
        response.content_type = route.content_type if chosen is None else chosen(req)

        async def send(chunk: bytes) -> None:
            if not response.prepared:
                await response.prepare(request)
            await response.write(chunk)

        task = asyncio.current_task()
        assert task is not None
        state.streams.add(task)
        try:
            await route.handler(req, send)
        except ConnectionResetError:
            log.debug("%s: client went away", request.path)
            return response
        except ApiError:
            if not response.prepared:
                raise
            log.warning("%s: stream ended with an error after it started", request.path)
        finally:
            state.streams.discard(task)
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        return response

    return handle


# -- errors, counters, access log ---------------------------------------------------------


def _error_response(status: int, message: str, field: str = "") -> web.Response:
    body: dict[str, str] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status, headers=LEADER_HEADERS)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as a JSON error; every request counted by route and status."""
    try:
        response = await handler(request)
    except ApiError as err:
        response = _error_response(err.status, err.message, err.field)
    except ValidationError as err:
        invalid = ApiError.invalid(err)
        response = _error_response(invalid.status, invalid.message, invalid.field)
    except NotFoundError as err:
        response = _error_response(404, str(err))
    except web.HTTPException as exc:
        response = _http_error(request, exc)
    except Exception:
        # The query is left out: it may carry ?token=.
        log.exception("%s %s failed", request.method, request.path)
        response = _error_response(500, "internal error; see the agent's log")
    request.app[STATE].stats.requests[request.method, _route_label(request), response.status] += 1
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, body too large) in our JSON shape."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(exc.allowed_methods))
        response = _error_response(
            405, f"method {exc.method} not allowed on {request.path} (allowed: {allow})"
        )
        response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, web.HTTPNotFound):
        return _error_response(404, f"no such endpoint: {request.method} {request.path}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _error_response(413, f"body: larger than {MAX_BODY} bytes", "body")
    return _error_response(exc.status, exc.reason)


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response in our JSON shape that closes the connection (for
    the fast path's own answers: a head that timed out, a client over its connections)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
    )
    return head.encode() + body


class _Handler(web.RequestHandler):
    """aiohttp's handler of one connection, its own error answers in our JSON shape.

    aiohttp answers what its parser refuses (a bad request line or field, 400) and
    what escapes the application (500) in text/plain, quoting the raw line, and logs
    a traceback for each.  Here: JSON ``{"error"}``, tokens cut out of the message
    (:func:`redact`), one log line per bad request, at most ERROR_LOG_PER_SECOND
    lines a second (:class:`LogBudget`).
    """

    __slots__ = ("_budget",)

    def __init__(self, server: web.Server, budget: LogBudget, **kwargs: Any) -> None:
        super().__init__(server, loop=asyncio.get_running_loop(), **kwargs)
        self._budget = budget

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("%s: error handling a request", request.remote, exc_info=exc)
            text = "internal error; see the agent's log"
        else:
            text = redact(message or HTTPStatus(status).phrase).strip()
            self._log(logging.WARNING, f"bad request from {request.remote}: {status} {text}")
        if request.writer.output_size > 0:  # as aiohttp: a response has begun; hang up
            raise ConnectionError("response already started: cannot send an error")
        response = _error_response(status, text)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's error log lines (with a traceback), redacted and within the budget."""
        try:
            line = str(args[0]) % args[1:] if len(args) > 1 else str(args[0] if args else "")
        except (TypeError, ValueError):
            line = " ".join(map(str, args))
        exc = kw.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        if isinstance(exc, BaseException):
            line += "\n" + "".join(traceback.format_exception(exc)).rstrip()
        self._log(logging.ERROR, line)

    def _log(self, level: int, line: str) -> None:
        held = self._budget.take(time.monotonic())
        if held is None:
            return
        if held:
            line += f" ({held} more such lines suppressed)"
        log.log(level, "%s", redact(line))


class _AccessLog(AbstractAccessLogger):
    """One debug line per request: method, path (never the query: it may hold a token)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %d %.1fms", request.method, request.path, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


# -- the fast path: cached reads answered from their whole response -------------------------

# aiohttp's RequestHandler awaits this future (private: aiohttp has no public "idle") while
# it holds no request of its connection.  Absent, its handler is never idle: once aiohttp
# has answered on a connection, the fast path leaves it alone (slower, never out of order).
_AIOHTTP_WAITER = "_waiter"


class _Connection(asyncio.Protocol):
    """One client connection: cached GETs answered here, everything else by aiohttp.

    Requests are framed here (head, then Content-Length bytes).  A request is
    answered here only when aiohttp holds nothing of this connection (its
    handler, if it has one yet, waits for a request: so responses stay in
    order) and writing is not paused; otherwise the whole request goes to
    aiohttp's handler, created on the first such request.  A request that is
    not plain (see :func:`~discovery.httpwire.parse_head`) makes the
    connection aiohttp's for good, and so does a pipeline deep enough to fill
    aiohttp's queue (it pauses reading): from then on aiohttp's flow control
    bounds what is buffered.

    Error handling: what cannot be answered here is aiohttp's to answer (400,
    413...); an exception in data_received (a bug) is logged and aborts this
    connection, never the loop's problem.  Idle connections close after
    KEEPALIVE_TIMEOUT, as aiohttp's do.
    """

    __slots__ = (
        "_active",
        "_buffer",
        "_client",
        "_handed",
        "_handler",
        "_head_since",
        "_head_timer",
        "_paused",
        "_server",
        "_state",
        "_through",
        "_timer",
        "_transport",
    )

    def __init__(self, server: web.Server, state: _State) -> None:
        self._server = server
        self._state = state
        self._transport: asyncio.Transport | None = None
        self._handler: web.RequestHandler | None = None
        self._buffer = b""
        self._through = False  # everything goes to aiohttp from now on
        self._handed = False  # aiohttp was handed a request since our last answer
        self._paused = False
        self._active = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._client = ""  # the peer's address while it is counted in state.clients
        self._head_since: float | None = None  # when the request head now arriving began
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # as aiohttp does
        state = self._state
        state.connections.add(self)
        self._active = asyncio.get_running_loop().time()
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if state.clients[client] >= state.limits.per_client:
            transport.write(
                error_bytes(429, f"more than {state.limits.per_client} connections from {client}")
            )
            transport.close()
            self._log_limit(f"HTTP: {client} is at its {state.limits.per_client} connections")
            return
        self._client = client
        state.clients[client] += 1
        if len(state.connections) >= state.limits.open_files * FD_WARN_FRACTION:
            self._log_limit(
                f"HTTP: {len(state.connections)} connections open, near the limit of"
                f" {state.limits.open_files} open files (RLIMIT_NOFILE)"
            )
        self._start_timer()

    def _log_limit(self, line: str) -> None:
        held = self._state.errors.take(time.monotonic())
        if held is not None:
            log.warning("%s%s", line, f" ({held} more such lines suppressed)" if held else "")

    def connection_lost(self, exc: BaseException | None) -> None:
        state = self._state
        state.connections.discard(self)
        if self._client:
            state.clients[self._client] -= 1
            if state.clients[self._client] <= 0:
                del state.clients[self._client]
            self._client = ""
        if self._timer is not None:
            self._timer.cancel()
        self._head_done()
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def eof_received(self) -> None:
        if self._handler is not None:
            self._handler.eof_received()  # None: the transport closes, as without us

    def pause_writing(self) -> None:
        self._paused = True
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        if self._handler is not None:
            self._handler.resume_writing()

    def close_if_fast(self) -> None:
        """Close the connection if aiohttp does not serve it (the server is closing)."""
        if self._handler is None and self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            if self._through:
                self._hand_over(data)
                # Whether aiohttp now holds part of a head is known once its loop has run.
                asyncio.get_running_loop().call_soon(self._note_head)
            else:
                self._frame(data)
        except Exception:  # a bug of ours: this connection's end, not the loop's
            log.exception("HTTP connection: error in the fast path; connection aborted")
            if self._transport is not None:
                self._transport.abort()

    def _frame(self, data: bytes) -> None:
        """Answer or hand over each whole request in the buffer; keep a partial one."""
        self._active = asyncio.get_running_loop().time()
        buffer = self._buffer + data if self._buffer else data
        while buffer:
            end = buffer.find(HEAD_END)
            if end < 0:
                if len(buffer) > MAX_HEAD or b"\n\n" in buffer or b"\n\r\n" in buffer:
                    break  # too long, or lines ended by LF alone: aiohttp's to judge
                self._buffer = buffer
                self._head_begun()
                return
            self._head_done()
            head = parse_head(buffer[:end]) if end <= MAX_HEAD else None
            if head is None:
                break  # not plain: this and all that follows is aiohttp's
            size = end + len(HEAD_END) + head.body
            if len(buffer) < size:
                self._buffer = buffer
                return
            if self._answer(head):
                buffer = buffer[size:]
                continue
            self._hand_over(buffer[:size])
            buffer = buffer[size:]
            if not self._reading():
                # aiohttp's queue of pipelined requests is full (its handler is busy
                # or writing is paused): its flow control bounds the rest, as without us.
                break
        else:
            self._buffer = b""
            return
        self._buffer = b""
        self._through = True
        self._hand_over(buffer)
        asyncio.get_running_loop().call_soon(self._note_head)

    def _reading(self) -> bool:
        transport = self._transport
        return transport is not None and transport.is_reading()

    def _answer(self, head: RequestHead) -> bool:
        """Answer a cached read here (True), or leave the request to aiohttp (False)."""
        transport = self._transport
        if head.method != b"GET" or head.minor != 1 or head.body or self._paused:
            return False
        if b"host" not in head.fields:
            return False  # aiohttp answers 400: HTTP/1.1 requires it (RFC 9112 section 3.2)
        state = self._state
        wire = state.wire.entries.get(head.target)
        if wire is None or wire.index != state.ctx.registry.snapshot.index:
            return False
        connection = head.fields.get(b"connection")
        if connection is not None and connection.lower() != b"keep-alive":
            return False
        if state.acl.enabled and wire.access is not Access.NONE:
            token = parse_token(head)
            if token is None and b"token=" in head.target:
                return False  # perhaps in the query: aiohttp parses that
            if not allowed(state.acl, token, wire.access):
                return False  # aiohttp answers 403, counts it and logs it
        if not self._handler_idle() or transport is None or transport.is_closing():
            return False
        if self._handed:  # the connection's idle time is ours to watch again
            self._handed = False
            assert self._handler is not None
            self._handler.keep_alive(True)  # cancels aiohttp's keep-alive timer
            self._start_timer()
        transport.write(wire.before_date + state.wire.date() + wire.after_date)
        state.stats.requests[wire.label] += 1
        state.stats.fast += 1
        if access_log.isEnabledFor(logging.DEBUG):  # _AccessLog's line; no time measured
            access_log.debug("GET %s %d %.1fms", wire.path, wire.label[2], 0.0)
        return True

    def _handler_idle(self) -> bool:
        """Whether aiohttp holds no request of this connection (its loop awaits the next)."""
        if self._handler is None:
            return True
        waiter = getattr(self._handler, _AIOHTTP_WAITER, None)
        return isinstance(waiter, asyncio.Future) and not waiter.done()

    def _hand_over(self, data: bytes) -> None:
        if self._handler is None:
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            state = self._state
            self._handler = _Handler(self._server, state.errors, **state.handler_args)
            self._handler.connection_made(transport)
            if self._paused:
                self._handler.pause_writing()
        self._handed = True
        if self._timer is not None:  # aiohttp's keep-alive timer takes over
            self._timer.cancel()
            self._timer = None
        if data:
            self._handler.data_received(data)

    # -- the head timeout: a request head must arrive whole within limits.head_timeout

    def _head_begun(self) -> None:
        if self._head_since is not None:
            return
        loop = asyncio.get_running_loop()
        self._head_since = loop.time()
        self._head_timer = loop.call_at(
            self._head_since + self._state.limits.head_timeout, self._head_expired
        )

    def _head_done(self) -> None:
        self._head_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _note_head(self) -> None:
        """After aiohttp was handed bytes: if it waits for a request still, a head is
        partly in its parser (its loop wakes on a whole one); else it has a request."""
        if self._transport is None or self._transport.is_closing():
            return
        if self._handler_waiting():
            self._head_begun()
        else:
            self._head_done()

    def _handler_waiting(self) -> bool:
        waiter = getattr(self._handler, _AIOHTTP_WAITER, None)
        return isinstance(waiter, asyncio.Future) and not waiter.done()

    def _head_expired(self) -> None:
        """Answer 408 and close, unless the head has arrived meanwhile (or aiohttp has it)."""
        self._head_timer = None
        transport = self._transport
        if self._head_since is None or transport is None or transport.is_closing():
            return
        if self._through and not self._handler_waiting():
            self._head_since = None  # aiohttp holds a request: the head came whole
            return
        self._head_since = None
        timeout = self._state.limits.head_timeout
        transport.write(error_bytes(408, f"request head not received within {timeout:g}s"))
        transport.close()

    def _start_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._active + KEEPALIVE_TIMEOUT, self._check_idle)

    def _check_idle(self) -> None:
        """Close the connection KEEPALIVE_TIMEOUT after its last bytes (aiohttp holds none)."""
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        due = self._active + KEEPALIVE_TIMEOUT
        if due <= asyncio.get_running_loop().time():
            transport.close()
        else:
            self._start_timer()
