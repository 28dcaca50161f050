"""The mirror's scenarios against a real Consul agent.  Opt-in: set CONSUL_HTTP_ADDR.

    CONSUL_HTTP_ADDR=127.0.0.1:8500 [CONSUL_HTTP_TOKEN=...] .venv/bin/pytest \\
        tests/integration/test_mirror_real_consul.py

Skipped without CONSUL_HTTP_ADDR (there is no Consul binary on the build machines;
tests/integration/test_mirror.py runs the same scenarios against the stand-in).
Everything this module creates carries a per-run tag (node names, service names and
IDs start with "wpt<hex>") and is deregistered at the end, failed or not; entries
without the tag are only read.  The token needs agent and service write, node read.

Outages go through a TCP proxy on loopback in front of the agent, which the test
stops and restarts.  An index going backwards cannot be caused from outside a real
Consul, so that scenario is skipped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import dns.message
import dns.rdatatype
import pytest

from discovery.config import MirrorSettings, parse_consul_address
from discovery.dns.settings import DnsSettings
from discovery.mirror import Mirror, MirrorTiming, start_mirror
from discovery.mirror_plan import CHECK_SUFFIX
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Registry
from tests.integration.conftest import RunningDns, StartWaypost

ADDRESS = os.environ.get("CONSUL_HTTP_ADDR", "")
TOKEN = os.environ.get("CONSUL_HTTP_TOKEN", "")
pytestmark = pytest.mark.skipif(
    not ADDRESS, reason="CONSUL_HTTP_ADDR is not set: no real Consul agent to test against"
)
RUN = f"wpt{secrets.token_hex(3)}"  # in every name this module creates
NODE, OTHER = f"{RUN}a", f"{RUN}b"  # waypost node names (ours and another agent's)
WEB, API = f"{RUN}-web", f"{RUN}-api"
DEADLINE = 30.0  # a real agent syncs its catalog within seconds
TIMING = MirrorTiming(debounce=0.05, anti_entropy=1.0, wait=10.0, backoff_min=0.1, backoff_max=1.0)


def sid(ident: str, node: str = NODE) -> str:
    return f"_waypost-{node}-{ident}"


def settings(address: str = ADDRESS, **kw: Any) -> MirrorSettings:
    scheme, host, port = parse_consul_address(address, "CONSUL_HTTP_ADDR")
    return MirrorSettings(host=host, port=port, scheme=scheme, token=TOKEN, **kw)


class Consul:
    """The real agent's HTTP API, for arranging and checking (not the code under test)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.url = settings().url
        self.headers = {"X-Consul-Token": TOKEN} if TOKEN else {}

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path, headers=self.headers) as resp:
            assert resp.status == 200, f"GET {path}: {resp.status} {await resp.text()}"
            return await resp.json()

    async def put(self, path: str, body: Any = None) -> int:
        async with self.session.put(self.url + path, json=body, headers=self.headers) as resp:
            await resp.read()
            return resp.status

    async def services(self) -> dict[str, dict[str, Any]]:
        """This run's entries on the agent."""
        found = await self.get("/v1/agent/services")
        return {k: v for k, v in found.items() if RUN in k}

    async def checks(self) -> dict[str, dict[str, Any]]:
        found = await self.get("/v1/agent/checks")
        return {k: v for k, v in found.items() if RUN in k}

    async def datacenter(self) -> str:
        return str((await self.get("/v1/agent/self"))["Config"]["Datacenter"])

    async def cleanup(self) -> None:
        for ident in await self.services():
            await self.put(f"/v1/agent/service/deregister/{ident}")


@pytest.fixture
async def consul() -> AsyncIterator[Consul]:
    async with aiohttp.ClientSession() as session:
        real = Consul(session)
        await real.cleanup()  # a previous run's leftovers (another tag) stay untouched
        try:
            yield real
        finally:
            await real.cleanup()
            assert await real.services() == {}


class Proxy:
    """A TCP forwarder on 127.0.0.1 in front of the agent, to cut it off and back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [self._pipe(reader, up_writer), self._pipe(up_reader, writer)]
        tasks = [asyncio.create_task(p) for p in pipes]
        self._pipes.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pipes.difference_update(tasks)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self.stop()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


def instance(ident: str, *, port: int = 8080, **kw: Any) -> Instance:
    return make_instance(
        service=WEB, id=ident, node=NODE, address="127.0.0.1", port=port, source="api", **kw
    )


async def eventually(what: str, check: Callable[[], Any], deadline: float = DEADLINE) -> None:
    """Await `check()` (a coroutine function) every 50 ms until truthy."""
    async with asyncio.timeout(deadline):
        while not await check():  # noqa: ASYNC110 - the state is in the Consul agent
            await asyncio.sleep(0.05)
    assert await check(), what


async def pushed(consul: Consul, registry: Registry, node: str = NODE) -> bool:
    services, checks = await consul.services(), await consul.checks()
    mine = {k: v for k, v in services.items() if v["Meta"].get("waypost-node") == node}
    local = [i for i in registry.snapshot.instances.values() if i.source != "consul"]
    if set(mine) != {sid(i.id, node) for i in local}:
        return False
    for inst in local:
        svc, check = mine[sid(inst.id, node)], checks.get(sid(inst.id, node) + CHECK_SUFFIX)
        if svc["Port"] != inst.port or check is None or check["Status"] != inst.health.value:
            return False
    return True


@asynccontextmanager
async def mirror(
    registry: Registry, *, address: str = ADDRESS, datacenter: str = "dc1", **kw: Any
) -> AsyncIterator[Mirror]:
    running = await start_mirror(
        registry,
        settings(address, **kw),
        node=registry.local_node.name,
        datacenter=datacenter,
        timing=TIMING,
    )
    try:
        yield running
    finally:
        await running.close()


async def test_push_deregistration_and_health(consul: Consul) -> None:
    registry = Registry(Node(NODE, "127.0.0.1"))
    check = make_check(id=f"service:{RUN}-1", name="web", kind=CheckKind.TTL, ttl=60.0)
    registry.upsert(instance("web-1", checks=[check], tags=["v1"]), instance("web-2"))
    async with mirror(registry, push=True, pull=False):
        await eventually("pushed", lambda: pushed(consul, registry))
        web1 = (await consul.services())[sid("web-1")]
        assert web1["Meta"]["external-source"] == "waypost"
        assert web1["Tags"] == ["v1"]
        for health in (Health.PASSING, Health.WARNING, Health.CRITICAL):
            registry.update_check(f"service:{RUN}-1", health)
            await eventually(f"{health}", lambda: pushed(consul, registry))
        registry.remove("web-1")
        await eventually("deregistered", lambda: pushed(consul, registry))
        assert sid("web-1") + CHECK_SUFFIX not in await consul.checks()


async def test_anti_entropy_and_foreign_entries(consul: Consul) -> None:
    other = {"ID": sid("web-1", OTHER), "Name": WEB, "Port": 1, "Meta": {"waypost-node": OTHER}}
    plain = {"ID": f"{RUN}-plain", "Name": WEB, "Port": 2}
    for body in (other, plain):
        assert await consul.put("/v1/agent/service/register", body) == 200
    registry = Registry(Node(NODE, "127.0.0.1"))
    registry.upsert(*(instance(f"web-{n}") for n in range(3)))
    async with mirror(registry, pull=False):
        await eventually("pushed", lambda: pushed(consul, registry))
        assert await consul.put(f"/v1/agent/service/deregister/{sid('web-0')}") == 200
        altered = {"ID": sid("web-1"), "Name": WEB, "Port": 9, "Meta": {"waypost-node": NODE}}
        assert await consul.put("/v1/agent/service/register", altered) == 200
        assert await consul.put(f"/v1/agent/check/fail/{sid('web-2')}{CHECK_SUFFIX}") == 200
        await eventually("repaired", lambda: pushed(consul, registry))
        registry.remove("web-0", "web-1", "web-2")
        await eventually("ours gone", lambda: pushed(consul, registry))
        await asyncio.sleep(TIMING.anti_entropy * 2)
        assert set(await consul.services()) == {other["ID"], plain["ID"]}


async def test_outage_during_100_registrations(consul: Consul) -> None:
    scheme, host, port = parse_consul_address(ADDRESS, "CONSUL_HTTP_ADDR")
    if scheme != "http":
        pytest.skip("the outage proxy forwards plain HTTP only")
    proxy = Proxy(host, port)
    await proxy.start()
    registry = Registry(Node(NODE, "127.0.0.1"))
    registry.upsert(*(instance(f"old-{n}") for n in range(10)))
    try:
        async with mirror(registry, address=f"127.0.0.1:{proxy.port}", pull=False) as running:
            await eventually("pushed", lambda: pushed(consul, registry))
            await proxy.stop()
            for n in range(100):
                registry.upsert(instance(f"new-{n}", port=9000 + n))
                await asyncio.sleep(0.005)
            registry.remove("old-0")

            async def down() -> bool:
                return not running.healthy

            await eventually("unhealthy", down)
            assert running.stats.pending == 101
            await asyncio.sleep(1.0)
            await proxy.start()
            await eventually("converged", lambda: pushed(consul, registry))
            assert len(await consul.services()) == 109
    finally:
        await proxy.close()


async def test_pull_foreign_services_into_dns(consul: Consul, start_waypost: StartWaypost) -> None:
    dc = await consul.datacenter()
    agent: RunningDns = await start_waypost(DnsSettings(datacenter=dc, node_name="agent"))
    api = {
        "ID": f"{RUN}-api-1",
        "Name": API,
        "Port": 7001,
        "Address": "127.0.0.9",
        "Check": {"CheckID": f"{RUN}-api-1:ttl", "TTL": "60s", "Status": "passing"},
    }
    other = {"ID": sid("web-1", OTHER), "Name": WEB, "Port": 7002, "Address": "127.0.0.8"}
    other["Meta"] = {"waypost-node": OTHER}
    for body in (api, other):
        assert await consul.put("/v1/agent/service/register", body) == 200
    registry = agent.registry
    registry.upsert(
        make_instance(service=WEB, id=f"{RUN}-1", node="agent", address="127.0.0.1", port=7000)
    )
    async with mirror(registry, datacenter=dc, services=(API, WEB)):

        async def both() -> bool:
            snap = registry.snapshot
            return len(snap.service(API)) == 1 and len(snap.service(WEB)) == 2

        await eventually("pulled", both)
        pulled = registry.snapshot.service(API)[0]
        assert (pulled.source, pulled.port, pulled.datacenter) == ("consul", 7001, "")
        reply = await agent.udp(dns.message.make_query(f"{WEB}.service.{dc}.nomad", "SRV"))
        ports = sorted(
            rr.port for rrset in reply.answer if rrset.rdtype == dns.rdatatype.SRV for rr in rrset
        )
        assert ports == [7000, 7002]  # ours once (not pulled back), the other agent's once


async def test_index_reset() -> None:
    pytest.skip("a real Consul's index cannot be made to go backwards from a test")
