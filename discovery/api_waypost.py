"""waypost's own endpoints: agent health, metrics, the event stream.  Pure: no I/O.

    GET /v1/agent/health   200 passing, 429 warning (degraded), 503 critical, for load
                           balancers and supervisors (Consul's status codes for health);
                           body {"status", "checks": {name: {"status", "output"}}}
    GET /v1/metrics        Prometheus text (:mod:`discovery.metrics`)
    GET /v1/event/stream   newline-delimited JSON of registry changes (:mod:`discovery.events`)
                           ?index= (resume after it) &topic=Service:web &debounce=100ms

These need the running agent's state, which a registry snapshot does not
hold, so they are built around it: :func:`routes` takes an
:class:`AgentStatus` (the agent implements it, or wraps its parts in
:class:`StatusOf`), and :func:`event_stream` an :class:`~discovery.events.EventLog`,
returning a handler for the HTTP adapter's `add_stream(path, handler)`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from discovery.acl import Access
from discovery.api import ApiError, ApiRequest, ApiResponse, Route
from discovery.durations import format_duration, parse_duration
from discovery.errors import ValidationError
from discovery.events import DEFAULT_DEBOUNCE, HEARTBEAT, EventLog, parse_topics
from discovery.metrics import MetricsSources, render_metrics
from discovery.model import Health
from discovery.registry import Snapshot

# Consul's /v1/agent/health/service/* status codes, which load balancers already know.
HEALTH_STATUS = {Health.PASSING: 200, Health.WARNING: 429, Health.CRITICAL: 503}
_SEVERITY = [Health.PASSING, Health.WARNING, Health.CRITICAL]
SLOW_COMMIT = 1.0  # seconds: a store commit slower than this is "degraded" (a failing disk)
MAX_DEBOUNCE = 60.0  # seconds; longer would starve consumers and hold events in memory

Send = Callable[[bytes], Awaitable[None]]
StreamHandler = Callable[[ApiRequest, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Probe:
    """One part of the agent's health."""

    name: str
    status: Health
    output: str = ""


class AgentStatus(Protocol):
    """What waypost's endpoints read from the running agent (:class:`StatusOf` implements it)."""

    def probes(self) -> Sequence[Probe]:
        """The parts of the agent's health (store, dns...), read at each request."""
        ...

    def metrics_sources(self) -> MetricsSources: ...


class StatusOf:
    """AgentStatus from the agent's parts: the metrics sources and whether DNS serves."""

    def __init__(
        self, sources: MetricsSources, dns_serving: Callable[[], bool] | None = None
    ) -> None:
        self.sources = sources
        self.dns_serving = dns_serving

    def probes(self) -> Sequence[Probe]:
        found = []
        store = self.sources.store
        if store is not None:
            stats = store.stats
            took = format_duration(stats.last_commit_seconds)
            if not store.healthy:
                found.append(Probe("store", Health.CRITICAL, "the last commit failed"))
            elif stats.last_commit_seconds > SLOW_COMMIT:
                found.append(Probe("store", Health.WARNING, f"slow commits: the last took {took}"))
            else:
                found.append(
                    Probe("store", Health.PASSING, f"index {stats.committed_index} on disk")
                )
        if self.sources.mirror is not None:
            mirror = self.sources.mirror()
            # Consul out of reach degrades the agent (429) but local DNS and HTTP go on.
            found.append(
                Probe("consul", Health.PASSING, "in sync")
                if mirror.healthy
                else Probe("consul", Health.WARNING, f"not in sync; {mirror.pending} pending")
            )
        if self.dns_serving is not None:
            up = self.dns_serving()
            found.append(
                Probe("dns", Health.PASSING if up else Health.CRITICAL, "serving" if up else "down")
            )
        return found

    def metrics_sources(self) -> MetricsSources:
        return self.sources


def render_health(probes: Sequence[Probe]) -> ApiResponse:
    """The worst probe decides the status code; the body lists every probe."""
    overall = max((p.status for p in probes), key=_SEVERITY.index, default=Health.PASSING)
    body = {
        "status": overall.value,
        "checks": {p.name: {"status": p.status.value, "output": p.output} for p in probes},
    }
    return ApiResponse(body, status=HEALTH_STATUS[overall])


def routes(status: AgentStatus) -> tuple[Route, ...]:
    """The routes of /v1/agent/health and /v1/metrics, reading `status` at each request."""

    def agent_health(_req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        return render_health(status.probes())

    def metrics(_req: ApiRequest, _snap: Snapshot) -> ApiResponse:
        body, content_type = render_metrics(status.metrics_sources())
        return ApiResponse(body.decode("utf-8"), content_type=content_type)

    return (
        Route("GET", "/v1/agent/health", Access.NONE, read=agent_health),
        Route("GET", "/v1/metrics", Access.READ, read=metrics),
    )


# -- the event stream ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamParams:
    index: int | None
    debounce: float
    topics: Sequence[str]


def parse_stream_params(req: ApiRequest) -> StreamParams:
    """`?index=` (absent: live only), `?debounce=` (Go duration, default 100ms), `?topic=`."""
    raw_index = req.arg("index")
    index = None
    if raw_index is not None and raw_index != "":
        if not raw_index.isascii() or not raw_index.isdigit():
            raise ApiError(400, f"index: {raw_index!r} is not a non-negative integer", "index")
        index = int(raw_index)
    debounce = DEFAULT_DEBOUNCE
    raw_debounce = req.arg("debounce")
    if raw_debounce:
        try:
            debounce = parse_duration(raw_debounce, "debounce")
        except ValidationError as err:
            raise ApiError.invalid(err) from None
        if debounce > MAX_DEBOUNCE:
            limit = format_duration(MAX_DEBOUNCE)
            raise ApiError(400, f"debounce: longer than {limit}", "debounce")
    return StreamParams(index, debounce, tuple(req.query.get("topic", ())))


def encode_line(line: object) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def event_stream(log: EventLog, *, heartbeat: float = HEARTBEAT) -> StreamHandler:
    """The handler of GET /v1/event/stream for the HTTP adapter's `add_stream`.

    Error handling: bad parameters raise ApiError before anything is sent (a
    400); after that the stream runs until the client goes (`send` raises, or
    the task is cancelled) or the log closes; the subscription always ends.
    """

    async def handler(req: ApiRequest, send: Send) -> None:
        params = parse_stream_params(req)
        sub = log.subscribe(params.index, parse_topics(params.topics))
        try:
            # The first line at once (the replay, a snapshot, or `{}`): the client
            # gets the response headers now, not at the first change.
            line = await sub.next(debounce=0, heartbeat=0)
            while line is not None:
                await send(encode_line(line))
                line = await sub.next(debounce=params.debounce, heartbeat=heartbeat)
        finally:
            sub.close()

    return handler
