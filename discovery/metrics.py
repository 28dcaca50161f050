"""Prometheus metrics of the agent, read at scrape time.  Adapter: the only prometheus_client user.

Nothing is counted here: the parts keep their own plain counters (the DNS
responder's ``counts``, the HTTP adapter's ``counts``, the blocking-query
``Waiters.count``, the store's ``stats``) and :class:`AgentCollector` turns
what they hold into metric families when ``GET /v1/metrics`` is scraped, on a
private :class:`~prometheus_client.CollectorRegistry` (never the global one,
so tests and several agents in one process do not collide).

    waypost_dns_queries_total{qtype,rcode}        DNS queries answered ("FORWARDED" to recursors)
    waypost_http_requests_total{method,route,status}  HTTP requests by route pattern and status
    waypost_registry_instances / _services / _index
    waypost_service_instances{service,health}     instances per service and health
    waypost_blocking_queries                      blocked requests waiting right now
    waypost_event_subscribers                     event stream consumers
    waypost_store_healthy / _committed_index / _transactions_total /
    waypost_store_commit_failures_total / _last_commit_seconds
    process_*                                     prometheus_client's process collector
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from discovery.model import Health
from discovery.registry import Registry

# The text format every Prometheus server parses (0.26's default names version 1.0.0,
# which older servers do not know; for our ASCII names the bytes are the same).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
FORWARDED = -1  # discovery.dns.responder.FORWARDED: queries handed to the recursors
MALFORMED = 0  # the qtype under which the responder counts messages it could not parse

# RFC 1035 section 3.2.2 and the IANA registry: the types worth a name; others are TYPE<n>
# (RFC 3597 section 5).
QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG",
    47: "NSEC", 48: "DNSKEY", 52: "TLSA", 64: "SVCB", 65: "HTTPS", 99: "SPF", 251: "IXFR",
    252: "AXFR", 255: "ANY", 257: "CAA",
}  # fmt: skip
# RFC 1035 section 4.1.1, RFC 6891 (BADVERS); ours: FORWARDED.
RCODES = {
    FORWARDED: "FORWARDED", 0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN",
    4: "NOTIMP", 5: "REFUSED", 16: "BADVERS",
}  # fmt: skip


def qtype_name(qtype: int) -> str:
    if qtype == MALFORMED:
        return "malformed"
    return QTYPES.get(qtype, f"TYPE{qtype}")


def rcode_name(rcode: int) -> str:
    return RCODES.get(rcode, f"RCODE{rcode}")


class StoreStatsView(Protocol):
    """What is read of discovery.store.StoreStats."""

    @property
    def committed_index(self) -> int: ...
    @property
    def transactions(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def last_commit_seconds(self) -> float: ...


class StoreView(Protocol):
    """What is read of discovery.store.Store."""

    @property
    def healthy(self) -> bool: ...
    @property
    def stats(self) -> StoreStatsView: ...


class MirrorStatsView(Protocol):
    """What is read of discovery.mirror.MirrorStats."""

    @property
    def healthy(self) -> bool: ...
    @property
    def push_ok(self) -> bool: ...
    @property
    def pull_ok(self) -> bool: ...
    @property
    def last_push(self) -> float | None: ...
    @property
    def last_pull(self) -> float | None: ...
    @property
    def pending(self) -> int: ...
    @property
    def pushed(self) -> int: ...
    @property
    def pulled(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def watched(self) -> int: ...
    @property
    def polled(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MetricsSources:
    """Where the numbers live; any part the agent does not run is None."""

    registry: Registry
    # lambda: responder.counts
    dns_counts: Callable[[], Mapping[tuple[int, int], int]] | None = None
    # HttpStats.requests: (method, route pattern, status) -> n
    http_counts: Mapping[tuple[str, str, int], int] | None = None
    waiters: Callable[[], int] | None = None  # lambda: waiters.count
    store: StoreView | None = None
    event_subscribers: Callable[[], int] | None = None  # lambda: event_log.subscribers
    mirror: Callable[[], MirrorStatsView] | None = None  # lambda: mirror.stats


class AgentCollector(Collector):
    """Builds every waypost_* family from :class:`MetricsSources` at each scrape."""

    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        if src.dns_counts is not None:
            yield _dns(src.dns_counts())
        if src.http_counts is not None:
            yield _http(src.http_counts)
        yield from _registry(src.registry)
        if src.waiters is not None:
            yield GaugeMetricFamily(
                "waypost_blocking_queries",
                "HTTP blocking queries waiting for a change",
                value=src.waiters(),
            )
        if src.event_subscribers is not None:
            yield GaugeMetricFamily(
                "waypost_event_subscribers",
                "Consumers of /v1/event/stream",
                value=src.event_subscribers(),
            )
        if src.store is not None:
            yield from _store(src.store)
        if src.mirror is not None:
            yield from _mirror(src.mirror())


def _dns(counts: Mapping[tuple[int, int], int]) -> Metric:
    family = CounterMetricFamily(
        "waypost_dns_queries",
        "DNS queries answered, by question type and response code (FORWARDED: to the recursors)",
        labels=("qtype", "rcode"),
    )
    totals: dict[tuple[str, str], int] = {}
    for (qtype, rcode), n in dict(counts).items():
        labels = (qtype_name(qtype), rcode_name(rcode))
        totals[labels] = totals.get(labels, 0) + n
    for labels, n in sorted(totals.items()):
        family.add_metric(labels, n)
    return family


def _http(counts: Mapping[tuple[str, str, int], int]) -> Metric:
    family = CounterMetricFamily(
        "waypost_http_requests",
        "HTTP API requests answered, by method, route pattern and status code",
        labels=("method", "route", "status"),
    )
    for (method, route, status), n in sorted(dict(counts).items()):
        family.add_metric((method, route, str(status)), n)
    return family


def _registry(registry: Registry) -> Iterator[Metric]:
    snap = registry.snapshot
    yield GaugeMetricFamily(
        "waypost_registry_instances", "Service instances registered", value=len(snap.instances)
    )
    yield GaugeMetricFamily(
        "waypost_registry_services", "Services with at least one instance", value=len(snap.services)
    )
    yield GaugeMetricFamily("waypost_registry_index", "The registry's index", value=snap.index)
    family = GaugeMetricFamily(
        "waypost_service_instances",
        "Instances of each service by health",
        labels=("service", "health"),
    )
    for key in sorted(snap.services):
        by_health = dict.fromkeys(Health, 0)
        for inst in snap.services[key]:
            by_health[inst.health] += 1
        for health, n in by_health.items():
            family.add_metric((key, health.value), n)
    yield family


def _store(store: StoreView) -> Iterator[Metric]:
    stats = store.stats
    yield GaugeMetricFamily(
        "waypost_store_healthy",
        "1 while the last commit succeeded, else 0",
        value=1 if store.healthy else 0,
    )
    yield GaugeMetricFamily(
        "waypost_store_committed_index",
        "Highest registry index on disk",
        value=stats.committed_index,
    )
    yield CounterMetricFamily(
        "waypost_store_transactions", "Commits to the database", value=stats.transactions
    )
    yield CounterMetricFamily(
        "waypost_store_commit_failures", "Commits that failed", value=stats.failures
    )
    yield GaugeMetricFamily(
        "waypost_store_last_commit_seconds",
        "Duration of the last commit",
        value=stats.last_commit_seconds,
    )


def _mirror(stats: MirrorStatsView) -> Iterator[Metric]:
    """The Consul mirror's sync state: is it in sync, since when, what is waiting."""
    yield GaugeMetricFamily(
        "waypost_consul_healthy", "1 while push and pull succeed, else 0", value=int(stats.healthy)
    )
    for part, ok, last in (
        ("push", stats.push_ok, stats.last_push),
        ("pull", stats.pull_ok, stats.last_pull),
    ):
        yield GaugeMetricFamily(
            f"waypost_consul_{part}_ok", f"1 while the last {part} succeeded", value=int(ok)
        )
        yield GaugeMetricFamily(
            f"waypost_consul_last_{part}_timestamp_seconds",
            f"Unix time of the last successful {part} (0: never)",
            value=last or 0.0,
        )
    yield GaugeMetricFamily(
        "waypost_consul_pending_changes", "Local changes not in Consul yet", value=stats.pending
    )
    yield GaugeMetricFamily(
        "waypost_consul_pushed_instances", "Our entries in Consul", value=stats.pushed
    )
    yield GaugeMetricFamily(
        "waypost_consul_pulled_instances", "Instances pulled from Consul", value=stats.pulled
    )
    yield GaugeMetricFamily(
        "waypost_consul_refused_registrations",
        "Our registrations Consul refused (400); retried when they change",
        value=stats.refused,
    )
    yield GaugeMetricFamily(
        "waypost_consul_watched_services", "Services pulled by blocking query", value=stats.watched
    )
    yield GaugeMetricFamily(
        "waypost_consul_polled_services",
        "Services pulled by polling (beyond the blocking-query limit)",
        value=stats.polled,
    )
    yield CounterMetricFamily(
        "waypost_consul_requests", "HTTP requests made to Consul", value=stats.requests
    )
    yield CounterMetricFamily(
        "waypost_consul_request_errors", "Requests to Consul that failed", value=stats.errors
    )


def build_registry(sources: MetricsSources, *, process: bool = True) -> CollectorRegistry:
    """A private registry with the agent's collector (and the process one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(sources))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render_metrics(sources: MetricsSources) -> tuple[bytes, str]:
    """The Prometheus text exposition of everything in `sources`, and its content type."""
    return generate_latest(build_registry(sources)), CONTENT_TYPE
