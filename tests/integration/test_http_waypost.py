"""waypost's own endpoints on a real server: /v1/agent/health, /v1/metrics, /v1/event/stream.

:func:`running_agent` builds what the agent builds (a Registry, a real Store
in a temporary data dir, a CheckRunner, a DNS Responder served on UDP/TCP, an
EventLog, the HTTP server with the Nomad and waypost routes) on 127.0.0.1
port 0; the tests use aiohttp as a client, dnspython for DNS traffic, and
prometheus_client's own parser on the scraped text.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery import api_nomad
from discovery.acl import AclSettings
from discovery.api import ApiContext
from discovery.api_waypost import StatusOf, event_stream, routes
from discovery.checks import CheckRunner
from discovery.dns.responder import Responder
from discovery.dns.server import DnsServer, start_dns
from discovery.dns.settings import DnsSettings
from discovery.events import EventLog
from discovery.httpapi import HttpServer, HttpStats, StreamRoute, start_http
from discovery.metrics import MetricsSources
from discovery.model import Health, Instance, Node, make_instance
from discovery.registry import Registry
from discovery.store import Store, open_store

NODE = Node("agent", "127.0.0.1")
DEADLINE = 5.0  # seconds for anything on loopback
SECRET = "s3cret-read-token"


def inst(ident: str, service: str = "web", **changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": service,
        "id": ident,
        "node": "agent",
        "address": "10.0.0.1",
        "port": 8080,
    }
    return make_instance(**{**fields, **changes})


@dataclass
class Agent:
    registry: Registry
    store: Store
    dns_server: DnsServer
    http: HttpServer
    log: EventLog
    dns_up: list[bool]  # what the health probe of DNS reports (the agent's wiring decides)

    @property
    def url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}"

    async def dns_query(self, name: str, rdtype: str) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.udp(
            query, self.dns_server.host, port=self.dns_server.port, timeout=2.0
        )


@asynccontextmanager
async def running_agent(tmp_path: Path, *, acl: AclSettings | None = None) -> AsyncIterator[Agent]:
    store = open_store(tmp_path, busy_timeout=0.05)
    registry = Registry(NODE, index=store.load().index + 1)
    store.attach(registry)
    checks = CheckRunner(registry)
    checks.start()
    responder = Responder(registry, DnsSettings())
    dns_server = await start_dns(responder, "127.0.0.1", 0)
    log = EventLog(registry)
    stats = HttpStats()
    dns_up = [True]
    sources = MetricsSources(
        registry,
        dns_counts=lambda: responder.counts,
        http_counts=stats.requests,
        waiters=lambda: stats.blocked,
        store=store,
        event_subscribers=lambda: log.subscribers,
    )
    status = StatusOf(sources, dns_serving=lambda: dns_up[0])
    ctx = ApiContext(registry, store, checks, "dc1", NODE.name)
    stream = StreamRoute("/v1/event/stream", event_stream(log, heartbeat=0.2))
    http = await start_http(
        ctx,
        api_nomad.ROUTES + routes(status),
        acl or AclSettings(),
        "127.0.0.1",
        0,
        streams=[stream],
        stats=stats,
    )
    try:
        yield Agent(registry, store, dns_server, http, log, dns_up)
    finally:
        await http.close()
        log.close()
        dns_server.close()
        await dns_server.wait_closed()
        await checks.close()
        await store.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    async with running_agent(tmp_path) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


# -- /v1/agent/health --------------------------------------------------------------------------


async def health(agent: Agent, http: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{agent.url}/v1/agent/health") as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_health_passing(agent: Agent, http: aiohttp.ClientSession) -> None:
    status, body = await health(agent, http)
    assert status == 200
    assert body["status"] == "passing"
    assert body["checks"]["store"]["status"] == "passing"
    assert body["checks"]["dns"] == {"status": "passing", "output": "serving"}


async def test_health_critical_when_dns_is_down(agent: Agent, http: aiohttp.ClientSession) -> None:
    agent.dns_up[0] = False
    status, body = await health(agent, http)
    assert status == 503
    assert body["status"] == "critical"
    assert body["checks"]["dns"]["status"] == "critical"
    assert body["checks"]["store"]["status"] == "passing"


async def test_health_critical_while_the_store_cannot_commit(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    blocker = sqlite3.connect(agent.store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: commits fail
        snap = agent.registry.upsert(inst("web-1"))
        with pytest.raises(Exception, match="locked"):
            await asyncio.wait_for(agent.store.durable(snap.index), DEADLINE)
        status, body = await health(agent, http)
        assert status == 503
        assert body["checks"]["store"] == {"status": "critical", "output": "the last commit failed"}
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    snap = agent.registry.upsert(inst("web-2"))
    await asyncio.wait_for(agent.store.durable(snap.index), DEADLINE)
    status, body = await health(agent, http)
    assert (status, body["status"]) == (200, "passing")


async def test_health_needs_no_token_but_metrics_do(tmp_path: Path) -> None:
    acl = AclSettings(enabled=True, tokens={SECRET: "read"})
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with (
        running_agent(tmp_path, acl=acl) as agent,
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        async with http.get(f"{agent.url}/v1/agent/health") as resp:
            assert resp.status == 200
        async with http.get(f"{agent.url}/v1/metrics") as resp:
            assert resp.status == 403
        headers = {"X-Nomad-Token": SECRET}
        async with http.get(f"{agent.url}/v1/metrics", headers=headers) as resp:
            assert resp.status == 200
        async with http.get(f"{agent.url}/v1/event/stream") as resp:
            assert resp.status == 403


# -- /v1/metrics --------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(agent: Agent, http: aiohttp.ClientSession) -> Samples:
    async with http.get(f"{agent.url}/v1/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_follow_the_registry(agent: Agent, http: aiohttp.ClientSession) -> None:
    before = await scrape(agent, http)
    assert sample(before, "waypost_registry_instances") == 0
    assert sample(before, "waypost_store_healthy") == 1
    assert sample(before, "process_resident_memory_bytes") > 0
    agent.registry.upsert(
        inst("web-1"),
        inst("web-2", health=Health.CRITICAL),
        inst("web-3", health=Health.WARNING),
        inst("api-1", "api"),
    )
    await agent.store.durable(agent.registry.snapshot.index)
    after = await scrape(agent, http)
    assert sample(after, "waypost_registry_instances") == 4
    assert sample(after, "waypost_registry_services") == 2
    assert sample(after, "waypost_registry_index") == agent.registry.snapshot.index
    assert sample(after, "waypost_store_committed_index") == agent.registry.snapshot.index
    for health_state, n in (("passing", 1), ("warning", 1), ("critical", 1)):
        assert sample(after, "waypost_service_instances", service="web", health=health_state) == n
    assert sample(after, "waypost_service_instances", service="api", health="passing") == 1


async def test_metrics_count_dns_queries_and_http_requests(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    agent.registry.upsert(inst("web-1"))
    before = await scrape(agent, http)
    for _ in range(2):  # the second is answered from the replies the first one kept
        reply = await agent.dns_query("web.service.nomad.", "SRV")
        assert reply.rcode() == dns.rcode.NOERROR
        reply = await agent.dns_query("nope.service.nomad.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN
    async with http.get(f"{agent.url}/v1/service/web") as resp:
        assert resp.status == 200
    async with http.get(f"{agent.url}/v1/service/web?filter=bad") as resp:
        assert resp.status == 400
    after = await scrape(agent, http)
    srv = ("waypost_dns_queries_total", {"qtype": "SRV", "rcode": "NOERROR"})
    nx = ("waypost_dns_queries_total", {"qtype": "A", "rcode": "NXDOMAIN"})
    for name, labels in (srv, nx):
        assert sample(after, name, **labels) == sample(before, name, **labels) + 2
    route = {"method": "GET", "route": "/v1/service/{name}"}
    for status, n in (("200", 1), ("400", 1)):
        name = "waypost_http_requests_total"
        assert (
            sample(after, name, **route, status=status)
            == sample(before, name, **route, status=status) + n
        )
    scrapes = {"method": "GET", "route": "/v1/metrics", "status": "200"}
    assert sample(after, "waypost_http_requests_total", **scrapes) >= 1


async def test_metrics_show_blocked_queries(agent: Agent, http: aiohttp.ClientSession) -> None:
    agent.registry.upsert(inst("web-1"))
    index = agent.registry.snapshot.index
    url = f"{agent.url}/v1/service/web?index={index}&wait=5s"
    blocked = [asyncio.ensure_future(http.get(url)) for _ in range(3)]
    try:
        samples: Samples = {}
        for _ in range(100):
            samples = await scrape(agent, http)
            if sample(samples, "waypost_blocking_queries") == 3:
                break
            await asyncio.sleep(0.02)
        assert sample(samples, "waypost_blocking_queries") == 3
        agent.registry.upsert(inst("web-2"))
        for resp in await asyncio.wait_for(asyncio.gather(*blocked), DEADLINE):
            assert resp.status == 200
            assert int(resp.headers["X-Nomad-Index"]) > index
            resp.release()
    finally:
        for task in blocked:
            task.cancel()
    assert sample(await scrape(agent, http), "waypost_blocking_queries") == 0


# -- /v1/event/stream ---------------------------------------------------------------------------


async def read_line(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    line = await asyncio.wait_for(resp.content.readline(), DEADLINE)
    assert line.endswith(b"\n"), line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


async def read_events(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next line that is not a heartbeat."""
    for _ in range(50):
        line = await read_line(resp)
        if line:
            return line
    raise AssertionError("only heartbeats")


async def test_stream_sends_changes_as_ndjson(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{agent.url}/v1/event/stream?debounce=0") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        assert await read_line(resp) == {}  # at once: the stream is live
        snap = agent.registry.upsert(inst("web-1", tags=["v1"]))
        line = await read_events(resp)
        assert line["Index"] == snap.index
        [event] = line["Events"]
        assert (event["Topic"], event["Type"], event["Key"]) == (
            "Service",
            "ServiceRegistration",
            "web-1",
        )
        assert event["Payload"]["Service"]["Tags"] == ["v1"]
        agent.registry.set_health("web-1", Health.CRITICAL)
        line = await read_events(resp)
        assert [e["Type"] for e in line["Events"]] == ["HealthChanged"]
        assert line["Events"][0]["Payload"]["Service"]["Health"] == "critical"
        agent.registry.remove("web-1")
        line = await read_events(resp)
        assert [e["Type"] for e in line["Events"]] == ["ServiceDeregistration"]
    await wait_for(lambda: agent.log.subscribers == 0)  # the client went: unsubscribed


async def test_stream_debounce_coalesces_a_burst(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{agent.url}/v1/event/stream?debounce=300ms") as resp:
        assert await read_line(resp) == {}
        for n in range(20):
            agent.registry.upsert(inst(f"web-{n}"))
            await asyncio.sleep(0.005)
        line = await read_events(resp)
        assert len(line["Events"]) == 20
        assert line["Index"] == agent.registry.snapshot.index


async def test_stream_heartbeats(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{agent.url}/v1/event/stream") as resp:
        assert [await read_line(resp) for _ in range(3)] == [{}, {}, {}]


async def test_stream_resumes_from_an_index_or_starts_with_a_snapshot(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    start = agent.registry.snapshot.index
    agent.registry.upsert(inst("web-1"))
    agent.registry.upsert(inst("api-1", "api"))
    async with http.get(f"{agent.url}/v1/event/stream?index={start + 1}") as resp:
        line = await read_line(resp)
        assert [e["Key"] for e in line["Events"]] == ["api-1"]
        assert "Snapshot" not in line
    async with http.get(f"{agent.url}/v1/event/stream?index={start - 1}") as resp:
        line = await read_line(resp)
        assert line["Snapshot"] is True
        assert sorted(e["Key"] for e in line["Events"]) == ["api-1", "web-1"]
    url = f"{agent.url}/v1/event/stream?index=0&topic=Service:api"
    async with http.get(url) as resp:
        line = await read_line(resp)
        assert [e["Key"] for e in line["Events"]] == ["api-1"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("index=x", "index"),
        ("index=-1", "index"),
        ("debounce=fast", "debounce"),
        ("debounce=2h", "debounce"),
    ],
)
async def test_stream_bad_parameters_are_a_400(
    agent: Agent, http: aiohttp.ClientSession, query: str, field: str
) -> None:
    async with http.get(f"{agent.url}/v1/event/stream?{query}") as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["field"] == field
    assert agent.log.subscribers == 0


async def test_stream_ends_cleanly_when_the_event_log_closes(tmp_path: Path) -> None:
    """At shutdown the agent closes the event log first: every stream ends with a clean EOF."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with running_agent(tmp_path) as agent, aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{agent.url}/v1/event/stream") as resp:
            assert await read_line(resp) == {}
            agent.log.close()
            rest = await asyncio.wait_for(resp.content.read(), DEADLINE)
            assert all(json.loads(line) == {} for line in rest.splitlines())
            assert resp.content.at_eof()
        assert agent.log.subscribers == 0


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")
