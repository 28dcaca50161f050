"""Health checks: runs the TTL, HTTP and TCP checks of the registry's instances.  State + adapters.

:class:`CheckRunner` is the state.  It subscribes to the registry and keeps,
per check of every instance (whatever its source: config, api, job...), one
timer (TTL) or one sleeping task (HTTP, TCP).  Results go back to the
registry as real changes only (what :meth:`Registry.update_check` does,
batched per event-loop iteration), so a status change reaches DNS and
blocking queries at once.  A check that stays critical for its
DeregisterCriticalServiceAfter removes its instance.

The probes are adapters on plain asyncio streams (no third-party library):
:func:`probe_http` is a minimal HTTP/1.1 GET client, :func:`probe_tcp` a TCP
connect.  Their parsing and rendering halves (:func:`parse_http_url`,
:func:`render_request`, :func:`parse_status_line`, :func:`http_health`...)
are pure.

Consul's agent is the reference (agent/checks/check.go): any 2xx is passing,
429 warning, anything else (or no answer within the timeout) critical;
outputs "HTTP GET <url>: 200 OK Output: <body>", "TCP connect <addr>: Success"
and "TTL expired"; a TTL check is critical until its first update.  As in
Consul, an HTTP or TCP check runs at most every second (:data:`MIN_INTERVAL`: a
shorter interval is raised to it, with a warning), and outputs are bounded
(:data:`MAX_BODY` bytes of an HTTP body, notes at MAX_OUTPUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from discovery.durations import format_duration
from discovery.errors import NotFoundError, ValidationError
from discovery.model import MAX_OUTPUT, PROBED_KINDS, Check, CheckKind, Health, Instance
from discovery.registry import Registry, Snapshot

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes of an HTTP check's body kept in its output (Consul's default)
MAX_HEAD_LINE = 8192  # longest status or header line read (also the stream buffer limit)
MAX_HEADERS = 100  # header lines read before giving up on a response
MAX_REDIRECTS = 10  # Go's http.Client, which Consul's HTTP checks use, follows 10
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
MIN_INTERVAL = 1.0  # seconds: Consul's checks.MinInterval; a shorter interval is raised to it
MAX_STAGGER = 1.0  # seconds: a new check first runs within this (or its interval)
MAX_IN_FLIGHT = 256  # probes at once; more checks wait for a slot (sockets, CPU)
# Consul's check_update_interval: an output-only change (same status) of a
# probed check is written at most this often, so a body with a timestamp in it
# does not wake every watcher of the service at each interval.
OUTPUT_REFRESH = 300.0
CLOSE_GRACE = 1.0  # seconds given to a probe connection to close
USER_AGENT = "waypost"
TTL_EXPIRED = "TTL expired"  # Consul's output when a TTL check expires

# RFC 9112 section 4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2


class ProbeError(ValueError):
    """A probe target or answer this module cannot use; the text becomes the check output."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one run of a check."""

    status: Health
    output: str


# -- HTTP: pure halves ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Where and what an HTTP check asks."""

    host: str  # to connect to: a name or an IP, without brackets
    port: int
    tls: bool
    host_header: str  # RFC 9110 section 7.2: host, [v6], and the port unless default
    path: str  # origin-form: path and query, at least "/"


def parse_http_url(url: str) -> HttpTarget:
    """The target of an http:// or https:// URL.  Pure; ProbeError if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ProbeError(f"{url!r} is not a valid URL: {err}") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ProbeError(f"{url!r} is not an http:// or https:// URL")
    tls = parts.scheme == "https"
    shown = f"[{host}]" if ":" in host else host
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = shown if port is None else f"{shown}:{port}"
    if not (path + head).isascii() or any(ord(c) <= 32 or ord(c) == 127 for c in path + head):
        raise ProbeError(f"{url!r} has characters that cannot go in a request line")
    return HttpTarget(host, port or (443 if tls else 80), tls, head, path)


def render_request(target: HttpTarget) -> bytes:
    """The GET request for `target`; `Connection: close` so the body ends at EOF."""
    return (
        f"GET {target.path} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: text/plain, text/*, */*\r\n"  # what Consul's HTTP checks send
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def parse_status_line(line: bytes) -> tuple[int, str]:
    """(status code, reason phrase) of an HTTP/1.x status line.  Pure; ProbeError if malformed."""
    match = _STATUS_LINE.fullmatch(line.rstrip(b"\r\n"))
    if match is None:
        raise ProbeError(f"malformed HTTP response: {line[:80]!r}")
    code = int(match[1])
    if code < 100:
        raise ProbeError(f"malformed HTTP status code {code:03d}")
    return code, (match[2] or b"").decode("latin-1").strip()


def parse_header_line(line: bytes) -> tuple[str, str]:
    """(lower-case name, value) of a header field line.  Pure; ProbeError if malformed."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise ProbeError(f"malformed HTTP header line: {line[:80]!r}")
    return name.decode("ascii").lower(), value.strip().decode("latin-1")


def http_health(code: int) -> Health:
    """Consul's mapping: 2xx passing, 429 Too Many Requests warning, the rest critical."""
    if 200 <= code <= 299:
        return Health.PASSING
    if code == 429:
        return Health.WARNING
    return Health.CRITICAL


def render_http_output(url: str, code: int, reason: str, body: bytes) -> str:
    """Consul's output of a completed HTTP check: `HTTP GET <url>: 200 OK Output: <body>`."""
    status = f"{code} {reason}".rstrip()
    return f"HTTP GET {url}: {status} Output: {body[:MAX_BODY].decode('utf-8', 'replace')}"


def parse_tcp_target(address: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port".  Pure; ProbeError if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ProbeError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def describe_error(err: BaseException) -> str:
    """Short text of a socket/TLS error ("Connection refused"), for check outputs."""
    if isinstance(err, ssl.SSLError):
        return f"tls: {err.reason or err}"
    if isinstance(err, OSError) and err.errno and err.errno > 0:
        return os.strerror(err.errno)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


# -- probes: adapters on asyncio streams ----------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    code: int
    reason: str
    location: str
    body: bytes


async def probe_http(url: str, within: float, *, context: ssl.SSLContext | None = None) -> Outcome:
    """GET `url` (following redirects) within `within` seconds; the check's outcome.

    `context` verifies https targets (a default one is made if None).
    Error handling: never raises but CancelledError; a refused connection,
    TLS failure, malformed answer or timeout is a critical outcome whose
    output says what happened (in Go's words where Consul shows Go's).
    """
    deadline = asyncio.get_running_loop().time() + within
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_http_url(current)
            if target.tls and context is None:
                context = ssl.create_default_context()
            answer = await _exchange(target, context, deadline)
            if answer.code in REDIRECT_CODES and answer.location:
                current = urljoin(current, answer.location)
                continue
            return Outcome(
                http_health(answer.code),
                render_http_output(url, answer.code, answer.reason, answer.body),
            )
    except TimeoutError:
        took = format_duration(within)
        return Outcome(Health.CRITICAL, f'Get "{current}": timeout after {took}')
    except (OSError, ValueError, EOFError) as err:
        return Outcome(Health.CRITICAL, f'Get "{current}": {describe_error(err)}')
    return Outcome(Health.CRITICAL, f'Get "{current}": stopped after {MAX_REDIRECTS} redirects')


async def _exchange(
    target: HttpTarget, context: ssl.SSLContext | None, deadline: float
) -> _Response:
    """One request and its response head, then as much body as comes before the deadline."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout_at(deadline):
            try:
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=context if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                    limit=MAX_HEAD_LINE,
                )
            except ssl.SSLError as err:
                raise ProbeError(describe_error(err)) from err
            except OSError as err:
                host = f"[{target.host}]" if ":" in target.host else target.host
                where = f"{host}:{target.port}"
                raise ProbeError(f"dial tcp {where}: connect: {describe_error(err)}") from err
            writer.write(render_request(target))
            await writer.drain()
            code, reason, headers = await _read_head(reader)
        body = bytearray()
        # The status decides; a body cut short (timeout, reset) is kept as far as it came.
        with contextlib.suppress(TimeoutError, OSError, ValueError, EOFError):
            async with asyncio.timeout_at(deadline):
                await _read_body(reader, headers, body)
        return _Response(code, reason, headers.get("location", ""), bytes(body))
    finally:
        if writer is not None:
            await _close(writer)


async def _readline(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()  # ValueError beyond MAX_HEAD_LINE
    if not line.endswith(b"\n"):
        raise ProbeError("connection closed before the end of the response head")
    return line


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    code, reason = parse_status_line(await _readline(reader))
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = await _readline(reader)
        if line in (b"\r\n", b"\n"):
            return code, reason, headers
        name, value = parse_header_line(line)
        headers[name] = value
    raise ProbeError(f"more than {MAX_HEADERS} header lines")


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], sink: bytearray
) -> None:
    """Append up to MAX_BODY bytes of the body to `sink` (RFC 9112 section 6.3 framing)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        await _read_chunked(reader, sink)
        return
    length = headers.get("content-length")
    want = MAX_BODY if length is None else min(int(length), MAX_BODY)
    while len(sink) < want:
        data = await reader.read(want - len(sink))
        if not data:
            return
        sink += data


async def _read_chunked(reader: asyncio.StreamReader, sink: bytearray) -> None:
    """RFC 9112 section 7.1: size line (hex, maybe extensions), data, CRLF; size 0 ends."""
    while len(sink) < MAX_BODY:
        size = int((await _readline(reader)).split(b";", 1)[0].strip(), 16)
        if size <= 0:
            return
        take = min(size, MAX_BODY - len(sink))
        sink += await reader.readexactly(take)
        if take < size:
            return
        await reader.readexactly(2)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()


async def probe_tcp(address: str, within: float) -> Outcome:
    """Connect to "host:port" within `within` seconds; passing if it accepts.

    Error handling: never raises but CancelledError; a failure is a critical
    outcome with the error (Go's "dial tcp <addr>: ..." shape, as Consul shows).
    """
    loop = asyncio.get_running_loop()
    try:
        host, port = parse_tcp_target(address)
        async with asyncio.timeout(within):
            transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
    except TimeoutError:
        return Outcome(Health.CRITICAL, f"dial tcp {address}: i/o timeout")
    except (OSError, ValueError) as err:
        return Outcome(Health.CRITICAL, f"dial tcp {address}: connect: {describe_error(err)}")
    transport.close()
    return Outcome(Health.PASSING, f"TCP connect {address}: Success")


# -- the runner: state ------------------------------------------------------------


def _probed(inst: Instance) -> list[Check]:
    """The checks of `inst` this runner runs (not those set by their owner: task checks)."""
    return [c for c in inst.checks if c.kind in PROBED_KINDS]


def _definition(check: Check) -> tuple[object, ...]:
    """What makes a check run differently; a change of any of these restarts it."""
    return (check.kind, check.target, check.ttl, check.interval, check.timeout)


@dataclass(eq=False, slots=True)
class _Running:
    """One check being run: its definition, last known state, and its timers."""

    check: Check
    instance_id: str
    status: Health
    output: str
    note: str = ""  # the last TTL update's note (Consul's "last output" of an expired TTL)
    written: float = float("-inf")  # loop time of our last write of this check
    task: asyncio.Task[None] | None = None  # HTTP and TCP
    ttl_timer: asyncio.TimerHandle | None = None  # TTL
    reap_timer: asyncio.TimerHandle | None = None  # critical with deregister_after


@dataclass(eq=False, slots=True)
class _Tracked:
    """An instance with checks, as last seen, and its running checks by id."""

    instance: Instance
    checks: dict[str, _Running]


class CheckRunner:
    """Runs every check of the registry's instances; implements discovery.api.ChecksControl."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        stagger: float = MAX_STAGGER,
        output_refresh: float = OUTPUT_REFRESH,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        """`min_interval`: HTTP and TCP checks run at most this often (Consul's 1s)."""
        self.registry = registry
        self._min_interval = min_interval
        self._stagger = stagger
        self._output_refresh = output_refresh
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tracked: dict[str, _Tracked] = {}  # instance id -> its checks
        self._by_key: dict[str, set[str]] = {}  # service key -> tracked instance ids
        self._by_check: dict[str, _Running] = {}  # check id -> running check
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._writing = False  # inside our own registry write: skip our subscriber
        self._pending: dict[str, tuple[_Running, Outcome]] = {}  # check id -> latest result
        self._flush_handle: asyncio.Handle | None = None
        self._tls: ssl.SSLContext | None = None

    @property
    def running(self) -> frozenset[str]:
        """Ids of the checks being run."""
        return frozenset(self._by_check)

    def start(self) -> None:
        """Run the checks of every instance, and follow the registry from now on.

        Needs a running event loop.  Calling it twice is harmless.
        """
        if self._unsubscribe is not None:
            return
        asyncio.get_running_loop()  # RuntimeError now rather than in a subscriber call
        self._unsubscribe = self.registry.subscribe(self._changed)
        snap = self.registry.snapshot
        self._changed(snap, frozenset(snap.services))

    async def close(self) -> None:
        """Stop following the registry; cancel every timer and probe, and wait for them."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for ident in list(self._tracked):
            self._untrack(ident)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def ttl_update(self, check_id: str, status: Health, note: str) -> None:
        """A TTL check's new status, output `note`; re-arms its TTL.

        Error handling: NotFoundError for an unknown check; ValidationError
        (field "check") when the check is not a TTL check, as Consul refuses it.
        """
        owner = self.registry.check_owner(check_id)
        check = next((c for c in owner.checks if c.id == check_id), None) if owner else None
        if owner is None or check is None:
            raise NotFoundError(f"unknown check {check_id!r}")
        if check.kind is not CheckKind.TTL:
            raise ValidationError("check", f'CheckID "{check_id}" does not have associated TTL')
        output = note[:MAX_OUTPUT]
        run = self._by_check.get(check_id)
        if run is None or run.instance_id != owner.id:  # not started: record it only
            self.registry.update_check(check_id, status, output=output)
            return
        run.note = output
        self._arm_ttl(run)
        self._pending.pop(check_id, None)  # this update is newer than a queued expiry
        self._commit([(run, Outcome(status, output))])  # now: the API answers after it

    # -- following the registry ------------------------------------------------

    def _changed(self, snap: Snapshot, keys: frozenset[str]) -> None:
        """Registry subscriber: start, restart or stop the checks of the changed services.

        Cost: one identity test per instance of each changed service, plus a
        definition comparison for the instances that were replaced; unchanged
        checks keep their timers.  Our own status writes are skipped entirely.
        Error handling: runs inside the registry's publish, which logs and
        swallows an exception; nothing here does I/O.
        """
        if self._writing:
            return
        for key in keys:
            for ident in list(self._by_key.get(key, ())):
                current = snap.instances.get(ident)
                if current is None or current.key != key:
                    self._untrack(ident)
            for inst in snap.services.get(key, ()):
                tracked = self._tracked.get(inst.id)
                if tracked is None:
                    if _probed(inst):
                        self._track(inst)
                elif tracked.instance is not inst:
                    self._resync(tracked, inst)

    def _track(self, inst: Instance) -> None:
        tracked = _Tracked(inst, {c.id: self._start_check(inst.id, c) for c in _probed(inst)})
        self._tracked[inst.id] = tracked
        self._by_key.setdefault(inst.key, set()).add(inst.id)

    def _untrack(self, ident: str) -> None:
        tracked = self._tracked.pop(ident, None)
        if tracked is None:
            return
        self._leave_key(tracked.instance.key, ident)
        for run in tracked.checks.values():
            self._stop_check(run)

    def _leave_key(self, key: str, ident: str) -> None:
        members = self._by_key.get(key)
        if members is not None:
            members.discard(ident)
            if not members:
                del self._by_key[key]

    def _resync(self, tracked: _Tracked, inst: Instance) -> None:
        """The instance was replaced: restart changed checks, keep the others running."""
        if tracked.instance.key != inst.key:  # same id, renamed service
            self._leave_key(tracked.instance.key, inst.id)
            self._by_key.setdefault(inst.key, set()).add(inst.id)
        tracked.instance = inst
        wanted = {c.id: c for c in _probed(inst)}
        for check_id, run in list(tracked.checks.items()):
            check = wanted.get(check_id)
            if check is None or _definition(check) != _definition(run.check):
                self._stop_check(run)
                del tracked.checks[check_id]
        for check_id, check in wanted.items():
            running = tracked.checks.get(check_id)
            if running is None:
                tracked.checks[check_id] = self._start_check(inst.id, check)
            else:
                running.check = check  # same definition; name, notes or reaping may differ
                if (check.status, check.output) != (running.status, running.output):
                    running.written = float("-inf")  # rewritten by someone: next result goes in
                self._observe(running, check.status, check.output)
        if not tracked.checks:
            self._untrack(inst.id)

    def _start_check(self, instance_id: str, check: Check) -> _Running:
        run = _Running(check, instance_id, check.status, check.output)
        self._by_check[check.id] = run
        if check.kind is CheckKind.TTL:
            self._arm_ttl(run)
        else:
            task = asyncio.get_running_loop().create_task(
                self._probe_loop(run), name=f"check {check.id}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            run.task = task
        self._observe(run, check.status, check.output)
        return run

    def _stop_check(self, run: _Running) -> None:
        for handle in (run.task, run.ttl_timer, run.reap_timer):
            if handle is not None:
                handle.cancel()
        run.task = run.ttl_timer = run.reap_timer = None
        if self._by_check.get(run.check.id) is run:
            del self._by_check[run.check.id]

    # -- results -------------------------------------------------------------

    def _observe(self, run: _Running, status: Health, output: str) -> None:
        """Record a check's status; (dis)arm the DeregisterCriticalServiceAfter timer."""
        run.status, run.output = status, output
        after = run.check.deregister_after
        if status is Health.CRITICAL and after is not None:
            if run.reap_timer is None:
                loop = asyncio.get_running_loop()
                run.reap_timer = loop.call_later(after, self._reap, run)
        elif run.reap_timer is not None:
            run.reap_timer.cancel()
            run.reap_timer = None

    def _write(self, run: _Running, outcome: Outcome, *, force: bool = False) -> None:
        """Queue an outcome for the registry, if it changes something (see OUTPUT_REFRESH).

        Queued outcomes are written at the end of this loop iteration, in one
        registry change for all the checks whose results came in together: the
        registry's cost per change grows with its size, and after a restart or
        an outage thousands of checks flip within a second.
        """
        check_id = run.check.id
        if outcome.status is run.status and (
            outcome.output == run.output
            or (not force and self._now() - run.written < self._output_refresh)
        ):
            self._pending.pop(check_id, None)  # the latest result wins
            return
        self._pending[check_id] = (run, outcome)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write the queued outcomes.  Error handling: a loop callback; the loop logs errors."""
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        self._commit(list(pending.values()))

    def _commit(self, results: list[tuple[_Running, Outcome]]) -> None:
        """Write outcomes of running checks in one registry change.

        Registry.update_checks does the writing (the instance's health is its
        worst check); a check stopped in the meantime, or whose instance is
        gone, is skipped.
        """
        by_instance: dict[str, dict[str, Outcome]] = {}
        for run, outcome in results:
            if self._by_check.get(run.check.id) is run:
                by_instance.setdefault(run.instance_id, {})[run.check.id] = outcome
        updates = {
            check_id: (o.status, o.output)
            for outcomes in by_instance.values()
            for check_id, o in outcomes.items()
        }
        self._writing = True
        try:
            snap = self.registry.update_checks(updates)
        finally:
            self._writing = False
        now = self._now()
        for ident, outcomes in by_instance.items():
            tracked = self._tracked.get(ident)
            current = snap.instances.get(ident)
            if tracked is None or current is None:
                continue
            tracked.instance = current  # keeps the identity test of _changed cheap
            for check_id, outcome in outcomes.items():
                written = tracked.checks.get(check_id)
                if written is None:
                    continue
                if outcome.status is not written.status:
                    log.info(
                        "check %r: %s -> %s: %s",
                        check_id,
                        written.status,
                        outcome.status,
                        _first_line(outcome.output),
                    )
                written.written = now
                self._observe(written, outcome.status, outcome.output)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _arm_ttl(self, run: _Running) -> None:
        if run.ttl_timer is not None:
            run.ttl_timer.cancel()
        run.ttl_timer = asyncio.get_running_loop().call_later(run.check.ttl, self._expire, run)

    def _expire(self, run: _Running) -> None:
        """TTL timer: no update came in time, the check goes critical (Consul's wording).

        Error handling: runs as a loop callback; an exception is logged by the loop.
        """
        run.ttl_timer = None
        text = TTL_EXPIRED
        if run.note:
            text = f"{TTL_EXPIRED} (last output before timeout follows): {run.note}"
        self._write(run, Outcome(Health.CRITICAL, text), force=True)

    def _reap(self, run: _Running) -> None:
        """DeregisterCriticalServiceAfter: the check stayed critical that long; remove the instance.

        Error handling: runs as a loop callback; an exception is logged by the
        loop.  Nothing happens if the check is no longer critical in the registry.
        """
        run.reap_timer = None
        inst = self.registry.snapshot.instances.get(run.instance_id)
        if inst is None or not any(
            c.id == run.check.id and c.status is Health.CRITICAL for c in inst.checks
        ):
            return
        log.warning(
            "deregistering service instance %r (%s): check %r critical for %s "
            "(DeregisterCriticalServiceAfter)",
            inst.id,
            inst.service,
            run.check.id,
            format_duration(run.check.deregister_after or 0.0),
        )
        self.registry.apply(removals=[inst.id])

    # -- probing -------------------------------------------------------------

    async def _probe_loop(self, run: _Running) -> None:
        """Run an HTTP or TCP check soon, then every interval, until cancelled.

        Error handling: a failed probe is a critical outcome, not an exception;
        anything unexpected is logged and the loop goes on at the next interval.
        Only cancellation (instance removed, check changed, close) ends it.
        """
        interval = run.check.interval
        if interval < self._min_interval:
            log.warning(
                "check %r has interval below minimum of %s; it runs every %s",
                run.check.id,
                format_duration(self._min_interval),
                format_duration(self._min_interval),
            )
            interval = self._min_interval
        await asyncio.sleep(random.uniform(0, min(interval, self._stagger)))
        while True:
            try:
                async with self._slots:
                    outcome = await self._probe(run.check)
                self._write(run, outcome)
            except Exception:
                log.exception("check %r: unexpected error; trying again", run.check.id)
            await asyncio.sleep(interval)

    async def _probe(self, check: Check) -> Outcome:
        if check.kind is CheckKind.HTTP:
            tls = check.target[:6].lower() == "https:"
            return await probe_http(
                check.target, check.timeout, context=self._tls_context() if tls else None
            )
        return await probe_tcp(check.target, check.timeout)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # verifies certificates and names
        return self._tls


def _first_line(output: str, limit: int = 200) -> str:
    """A check's output as one log line: its first line, at most `limit` characters."""
    line = output.split("\n", 1)[0].rstrip()
    return line[:limit] + ("..." if len(line) > limit or "\n" in output else "")
