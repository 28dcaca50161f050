"""The Consul endpoints that Consul clients call first, on a real server.

agent/self, status/leader and peers, agent/service/:id (ContentHash, hash-based
blocking), catalog datacenters/nodes/node, health node/checks: raw aiohttp for
exact shapes, headers, status codes, ACLs and blocking; py-consul (the sync
client in a thread, the async one on the loop) for what a Consul client does
with them.  Key sets are those of Consul's API docs and structs (api.AgentService,
structs.Node, structs.NodeService, structs.HealthCheck), CE 1.17 era.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio
import pytest
from consul.exceptions import ACLPermissionDenied

from discovery.acl import AclSettings
from discovery.api_consul_node import CONSUL_API_VERSION, node_id
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from tests.integration.http_fixtures import LOCAL_NODE, RunningApi, running_api, sync_client

T = TypeVar("T")
DEADLINE = 5.0  # seconds for anything that should take milliseconds on loopback
READ_TOKEN = "read-secret-00001"
WRITE_TOKEN = "write-secret-0001"
AIO_DEPRECATION = "ignore:ssl_context is deprecated:DeprecationWarning"  # py-consul's aio client
LEADER = "127.0.0.1:8300"

AGENT_SERVICE_KEYS = {
    "ID", "Service", "Tags", "Meta", "Port", "Address", "TaggedAddresses", "Weights",
    "EnableTagOverride", "Datacenter", "ContentHash",
}  # fmt: skip
NODE_KEYS = {
    "ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "CreateIndex", "ModifyIndex",
}  # fmt: skip
NODE_SERVICE_KEYS = {
    "ID", "Service", "Tags", "Address", "TaggedAddresses", "Meta", "Port", "Weights",
    "EnableTagOverride", "Proxy", "Connect", "CreateIndex", "ModifyIndex",
}  # fmt: skip
CHECK_KEYS = {
    "Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "ServiceName",
    "ServiceTags", "Type", "Interval", "Timeout", "ExposedPort", "Definition", "CreateIndex",
    "ModifyIndex",
}  # fmt: skip
PEER = Node("peer", "10.0.0.7", meta={"rack": "r1"})
FAR = Node("far", "10.9.0.1", datacenter="dc2", meta={"rack": "r9"})


@pytest.fixture(autouse=True)
def _no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul reads CONSUL_HTTP_* from the environment; these tests name everything."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


def ttl(ident: str, status: str | None = None) -> Any:
    return make_check(id=ident, name=ident, kind=CheckKind.TTL, ttl=60, status=status)


def inst(service: str, ident: str, port: int = 80, **kwargs: Any) -> Instance:
    fields: dict[str, Any] = {"node": LOCAL_NODE.name, "address": "127.0.0.1"} | kwargs
    return make_instance(service=service, id=ident, port=port, **fields)


def catalog() -> list[Instance]:
    return [
        inst("web", "web-1", 8001, tags=["v1"], checks=[ttl("web-1-ttl", "passing")]),
        inst("web", "web-2", 8002, checks=[ttl("web-2-ttl")], meta={"zone": "a"}),
        inst("db", "db-1", 5432, checks=[ttl("db-1-ttl", "passing")]),
        inst("web", "web-p", 8003, node="peer", address="10.0.0.7", source="consul"),
        inst("api", "api-x", 9000, node="ghost", address="10.0.0.9", source="consul"),
        inst("web", "web-far", 8004, node="far", address="10.9.0.1", datacenter="dc2"),
    ]


class Client:
    """aiohttp's client against one API: (status, headers, decoded body)."""

    def __init__(self, api: RunningApi, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.session = session

    async def call(
        self, method: str, path: str, body: object = None, **kw: Any
    ) -> tuple[int, Mapping[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        async with asyncio.timeout(DEADLINE * 2):
            async with self.session.request(method, self.api.url + path, data=data, **kw) as r:
                text = await r.text()
                decoded: Any = json.loads(text) if r.content_type == "application/json" else text
                return r.status, r.headers, decoded

    async def get(self, path: str, **kw: Any) -> tuple[int, Mapping[str, str], Any]:
        return await self.call("GET", path, **kw)

    async def text(self, path: str) -> str:
        async with asyncio.timeout(DEADLINE), self.session.get(self.api.url + path) as r:
            assert r.status == 200
            return await r.text()

    async def ok(self, path: str, **kw: Any) -> Any:
        status, _, body = await self.get(path, **kw)
        assert status == 200, body
        return body


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync py-consul call in a thread, bounded in time."""
    async with asyncio.timeout(DEADLINE * 2):
        return await asyncio.to_thread(fn, *args, **kwargs)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():  # noqa: ASYNC110 - another component's state
            await asyncio.sleep(0.01)


@pytest.fixture
async def api() -> AsyncIterator[RunningApi]:
    async with running_api(instances=catalog(), nodes=[PEER, FAR]) as running:
        yield running


@pytest.fixture
async def client(api: RunningApi) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(api, session)


# -- agent/self and status ----------------------------------------------------------------


async def test_agent_self_shape(client: Client) -> None:
    status, headers, body = await client.get("/v1/agent/self")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(body) == {"Config", "Member", "Meta"}
    assert body["Config"] == {
        "Datacenter": "dc1",
        "PrimaryDatacenter": "dc1",
        "NodeName": "agent",
        "NodeID": node_id("agent"),
        "Revision": "waypost",
        "Server": True,
        "Version": CONSUL_API_VERSION,
    }
    member = body["Member"]
    assert (member["Name"], member["Addr"], member["Status"]) == ("agent", "127.0.0.1", 1)
    assert member["Tags"]["dc"] == "dc1" and isinstance(member["Port"], int)
    assert body["Meta"] == {}


async def test_agent_self_meta_and_datacenter_of_the_agent() -> None:
    node = Node("box-7", "192.0.2.10", meta={"env": "prod"})
    async with running_api(node=node, datacenter="eu-west") as api, aiohttp.ClientSession() as s:
        body = await Client(api, s).ok("/v1/agent/self")
        leader = await Client(api, s).ok("/v1/status/leader")
    assert body["Config"]["Datacenter"] == "eu-west" and body["Config"]["NodeName"] == "box-7"
    assert body["Member"]["Addr"] == "192.0.2.10" and body["Meta"] == {"env": "prod"}
    assert leader == "192.0.2.10:8300"


async def test_status_leader_and_peers(client: Client) -> None:
    status, headers, body = await client.get("/v1/status/leader")
    assert (status, body) == (200, LEADER) and headers["Content-Type"] == "application/json"
    assert await client.ok("/v1/status/peers") == [LEADER]
    assert json.loads(await client.text("/v1/status/leader?pretty")) == LEADER


async def test_status_leader_of_an_ipv6_node() -> None:
    async with running_api(node=Node("six", "::1")) as api, aiohttp.ClientSession() as session:
        assert await Client(api, session).ok("/v1/status/leader") == "[::1]:8300"
        assert await Client(api, session).ok("/v1/status/peers") == ["[::1]:8300"]


async def test_agent_self_pretty(client: Client) -> None:
    text = await client.text("/v1/agent/self?pretty")
    assert "\n    " in text and json.loads(text)["Config"]["NodeName"] == "agent"


# -- agent/service/:id ----------------------------------------------------------------------


async def test_agent_service_shape_and_hash_header(client: Client) -> None:
    status, headers, body = await client.get("/v1/agent/service/web-1")
    assert status == 200 and set(body) == AGENT_SERVICE_KEYS
    assert (body["ID"], body["Service"], body["Port"], body["Tags"]) == (
        "web-1",
        "web",
        8001,
        ["v1"],
    )
    assert body["Datacenter"] == "dc1"
    assert headers["X-Consul-ContentHash"] == body["ContentHash"]
    assert len(body["ContentHash"]) == 16 and int(body["ContentHash"], 16) >= 0
    other = await client.ok("/v1/agent/service/web-2")
    assert other["ContentHash"] != body["ContentHash"]


async def test_agent_service_404s(client: Client) -> None:
    for path in ("/v1/agent/service/nope", "/v1/agent/service/web-p"):  # web-p: another node's
        status, headers, body = await client.get(path)
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert "unknown service ID" in body["error"]
    status, _, _ = await client.get("/v1/agent/service/register")
    assert status == 405  # PUT's path, as in Consul


async def test_agent_service_hash_blocks_until_the_definition_changes(client: Client) -> None:
    first = await client.ok("/v1/agent/service/web-1")
    digest = first["ContentHash"]
    waiter = asyncio.create_task(client.get(f"/v1/agent/service/web-1?hash={digest}&wait=10s"))
    await until(lambda: client.api.server.stats.blocked == 1)
    client.api.checks.ttl_update("web-1-ttl", Health.CRITICAL, "down")  # health: same definition
    await asyncio.sleep(0.2)
    assert not waiter.done() and client.api.server.stats.blocked == 1
    changed = inst("web", "web-1", 8011, tags=["v1"], checks=[ttl("web-1-ttl", "passing")])
    await client.api.ctx.register(changed)
    status, headers, body = await waiter
    assert status == 200 and body["Port"] == 8011
    assert body["ContentHash"] != digest == first["ContentHash"]
    assert headers["X-Consul-ContentHash"] == body["ContentHash"]


async def test_agent_service_stale_hash_answers_at_once(client: Client) -> None:
    async with asyncio.timeout(1.0):
        body = await client.ok("/v1/agent/service/web-1?hash=0123456789abcdef&wait=30s")
    assert body["ID"] == "web-1"


async def test_agent_service_hash_wait_ends_with_the_same_hash(client: Client) -> None:
    digest = (await client.ok("/v1/agent/service/db-1"))["ContentHash"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = await client.ok(f"/v1/agent/service/db-1?hash={digest}&wait=200ms")
    assert body["ContentHash"] == digest and loop.time() - started >= 0.2


async def test_agent_service_hash_wait_sees_a_deregistration(client: Client) -> None:
    digest = (await client.ok("/v1/agent/service/db-1"))["ContentHash"]
    waiter = asyncio.create_task(client.get(f"/v1/agent/service/db-1?hash={digest}&wait=10s"))
    await until(lambda: client.api.server.stats.blocked == 1)
    status, _, _ = await client.call("PUT", "/v1/agent/service/deregister/db-1")
    assert status == 200
    status, _, body = await waiter
    assert status == 404 and "unknown service ID" in body["error"]


async def test_agent_service_same_hash_twice_blocks_both_times(client: Client) -> None:
    """A hash request is never answered from the read caches (it would not block)."""
    digest = (await client.ok("/v1/agent/service/db-1"))["ContentHash"]
    loop = asyncio.get_running_loop()
    for _ in range(2):
        started = loop.time()
        await client.ok(f"/v1/agent/service/db-1?hash={digest}&wait=150ms")
        assert loop.time() - started >= 0.15


# -- catalog ----------------------------------------------------------------------------------


async def test_catalog_datacenters(client: Client) -> None:
    status, _, body = await client.get("/v1/catalog/datacenters")
    assert (status, body) == (200, ["dc1", "dc2"])


async def test_catalog_nodes_shape_and_selection(client: Client) -> None:
    status, headers, body = await client.get("/v1/catalog/nodes")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert [n["Node"] for n in body] == ["agent", "ghost", "peer"]  # ghost: named by api-x only
    assert all(set(n) == NODE_KEYS for n in body)
    peer = body[2]
    assert (peer["ID"], peer["Address"], peer["Datacenter"]) == (node_id("peer"), "10.0.0.7", "dc1")
    assert peer["Meta"] == {"rack": "r1"} and peer["TaggedAddresses"]["lan"] == "10.0.0.7"
    far = await client.ok("/v1/catalog/nodes?dc=dc2")
    assert [(n["Node"], n["Datacenter"]) for n in far] == [("far", "dc2")]
    assert [n["Node"] for n in await client.ok("/v1/catalog/nodes?node-meta=rack:r1")] == ["peer"]
    filtered = await client.ok('/v1/catalog/nodes?filter=Address == "127.0.0.1"')
    assert [n["Node"] for n in filtered] == ["agent"]


async def test_catalog_nodes_errors(client: Client) -> None:
    status, _, body = await client.get("/v1/catalog/nodes?dc=nowhere")
    assert status == 500 and "No path to datacenter" in body["error"]
    status, _, body = await client.get("/v1/catalog/nodes?filter=Node ==")
    assert status == 400 and body["field"].startswith("filter")
    status, _, body = await client.get("/v1/catalog/nodes?node-meta=rack")
    assert status == 400 and body["field"] == "node-meta"


async def test_catalog_node_shape(client: Client) -> None:
    status, headers, body = await client.get("/v1/catalog/node/agent")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert set(body) == {"Node", "Services"} and set(body["Node"]) == NODE_KEYS
    assert body["Node"]["Node"] == "agent" and body["Node"]["ID"] == node_id("agent")
    assert sorted(body["Services"]) == ["db-1", "web-1", "web-2"]
    web1 = body["Services"]["web-1"]
    assert set(web1) == NODE_SERVICE_KEYS and (web1["Service"], web1["Port"]) == ("web", 8001)
    same = await client.ok("/v1/catalog/node/AGENT")  # node names are case-insensitive
    assert sorted(same["Services"]) == ["db-1", "web-1", "web-2"]
    only = await client.ok('/v1/catalog/node/agent?filter=Service == "db"')
    assert list(only["Services"]) == ["db-1"] and only["Node"]["Node"] == "agent"


async def test_catalog_node_of_other_nodes_and_datacenters(client: Client) -> None:
    peer = await client.ok("/v1/catalog/node/peer")
    assert peer["Node"]["Meta"] == {"rack": "r1"} and list(peer["Services"]) == ["web-p"]
    ghost = await client.ok("/v1/catalog/node/ghost")
    assert ghost["Node"]["Address"] == "10.0.0.9" and list(ghost["Services"]) == ["api-x"]
    assert (await client.ok("/v1/catalog/node/far?dc=dc2"))["Node"]["Datacenter"] == "dc2"
    assert await client.text("/v1/catalog/node/peer?dc=dc2") == "null"  # peer is in dc1


async def test_catalog_node_unknown_is_null_as_in_consul(client: Client) -> None:
    status, headers, body = await client.get("/v1/catalog/node/nope")
    assert (status, body) == (200, None) and int(headers["X-Consul-Index"]) >= 1
    assert headers["Content-Type"] == "application/json"


# -- health -----------------------------------------------------------------------------------


async def test_health_node(client: Client) -> None:
    status, headers, body = await client.get("/v1/health/node/agent")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert [c["CheckID"] for c in body] == ["db-1-ttl", "web-1-ttl", "web-2-ttl"]
    assert all(set(c) == CHECK_KEYS and c["Node"] == "agent" for c in body)
    assert [c["Status"] for c in body] == ["passing", "passing", "critical"]
    critical = await client.ok('/v1/health/node/agent?filter=Status == "critical"')
    assert [c["CheckID"] for c in critical] == ["web-2-ttl"]
    assert await client.ok("/v1/health/node/nope") == []
    assert await client.ok("/v1/health/node/peer") == []  # web-p has no checks


async def test_health_checks(client: Client) -> None:
    status, headers, body = await client.get("/v1/health/checks/web")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert [(c["ServiceID"], c["CheckID"]) for c in body] == [
        ("web-1", "web-1-ttl"),
        ("web-2", "web-2-ttl"),
    ]
    assert all(set(c) == CHECK_KEYS for c in body)
    assert len(await client.ok("/v1/health/checks/web?passing")) == 2  # not a filter here
    assert await client.ok("/v1/health/checks/nope") == []
    assert await client.ok("/v1/health/checks/WEB") == body
    passing = await client.ok('/v1/health/checks/web?filter=Status == "passing"')
    assert [c["CheckID"] for c in passing] == ["web-1-ttl"]
    assert await client.ok("/v1/health/checks/web?node-meta=rack:r1") == []


# -- blocking on the index ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/catalog/nodes", "/v1/catalog/node/agent", "/v1/health/node/agent"]
)
async def test_node_reads_block_until_a_change(client: Client, path: str) -> None:
    status, headers, _ = await client.get(path)
    index = int(headers["X-Consul-Index"])
    waiter = asyncio.create_task(client.get(f"{path}?index={index}&wait=10s"))
    await until(lambda: client.api.server.stats.blocked == 1)
    assert not waiter.done()
    await client.api.ctx.register(inst("cache", "cache-1", 6379, checks=[ttl("cache-ttl")]))
    status, headers, body = await waiter
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert "cache-1" in json.dumps(body) or path == "/v1/catalog/nodes"


async def test_health_checks_blocks_on_its_service_only(client: Client) -> None:
    _, headers, _ = await client.get("/v1/health/checks/web")
    index = int(headers["X-Consul-Index"])
    waiter = asyncio.create_task(client.get(f"/v1/health/checks/web?index={index}&wait=10s"))
    await until(lambda: client.api.server.stats.blocked == 1)
    client.api.checks.ttl_update("db-1-ttl", Health.CRITICAL, "db down")  # another service
    await asyncio.sleep(0.2)
    assert not waiter.done()
    client.api.checks.ttl_update("web-2-ttl", Health.PASSING, "up")
    status, headers, body = await waiter
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert [c["Status"] for c in body] == ["passing", "passing"]


async def test_blocking_wait_ends_with_the_same_index(client: Client) -> None:
    _, headers, _ = await client.get("/v1/catalog/nodes")
    index = headers["X-Consul-Index"]
    status, after, _ = await client.get(f"/v1/catalog/nodes?index={index}&wait=100ms")
    assert status == 200 and after["X-Consul-Index"] == index


# -- ACLs -----------------------------------------------------------------------------------

NEEDS_READ = [
    "/v1/agent/self",
    "/v1/agent/service/web-1",
    "/v1/catalog/nodes",
    "/v1/catalog/node/agent",
    "/v1/health/node/agent",
    "/v1/health/checks/web",
]
OPEN = ["/v1/status/leader", "/v1/status/peers", "/v1/catalog/datacenters"]


@pytest.fixture
async def acl_client() -> AsyncIterator[Client]:
    acl = AclSettings(
        enabled=True, default_policy="deny", tokens={READ_TOKEN: "read", WRITE_TOKEN: "write"}
    )
    async with (
        running_api(instances=catalog(), nodes=[PEER, FAR], acl=acl) as api,
        aiohttp.ClientSession() as session,
    ):
        yield Client(api, session)


@pytest.mark.parametrize("path", NEEDS_READ)
async def test_reads_need_a_read_token(acl_client: Client, path: str) -> None:
    status, _, body = await acl_client.get(path)
    assert status == 403 and body["error"] == "Permission denied"
    status, _, _ = await acl_client.get(path, headers={"X-Consul-Token": "not-a-known-token"})
    assert status == 403
    for token in (READ_TOKEN, WRITE_TOKEN):
        status, _, _ = await acl_client.get(path, headers={"X-Consul-Token": token})
        assert status == 200
    status, _, _ = await acl_client.get(f"{path}?token={READ_TOKEN}")
    assert status == 200


@pytest.mark.parametrize("path", OPEN)
async def test_status_and_datacenters_need_no_token(acl_client: Client, path: str) -> None:
    for _ in range(2):  # the second may come from the fast path's cache
        status, _, _ = await acl_client.get(path)
        assert status == 200


# -- py-consul -------------------------------------------------------------------------------


async def test_pyconsul_sync(api: RunningApi) -> None:
    with sync_client(api) as c:
        me = await call(c.agent.self)
        assert me["Config"]["Datacenter"] == "dc1" and me["Config"]["NodeName"] == "agent"
        assert await call(c.status.leader) == LEADER
        assert await call(c.status.peers) == [LEADER]
        definition = await call(c.agent.service_definition, "web-1")
        assert definition["Port"] == 8001 and len(definition["ContentHash"]) == 16
        assert await call(c.agent.service_definition, "nope") is None  # py-consul: 404 -> None
        assert await call(c.catalog.datacenters) == ["dc1", "dc2"]
        index, nodes = await call(c.catalog.nodes)
        assert int(index) >= 1 and [n["Node"] for n in nodes] == ["agent", "ghost", "peer"]
        _, node = await call(c.catalog.node, "agent")
        assert sorted(node["Services"]) == ["db-1", "web-1", "web-2"]
        assert (await call(c.catalog.node, "nope"))[1] is None
        _, checks = await call(c.health.node, "agent")
        assert len(checks) == 3
        _, checks = await call(c.health.checks, "web")
        assert [ch["ServiceID"] for ch in checks] == ["web-1", "web-2"]
        _, far = await call(c.catalog.nodes, dc="dc2")
        assert [n["Node"] for n in far] == ["far"]


async def test_pyconsul_sync_blocking_catalog_nodes(api: RunningApi) -> None:
    with sync_client(api) as c:
        index, _ = await call(c.catalog.nodes)
        waiter = asyncio.create_task(call(c.catalog.nodes, index=index, wait="10s"))
        await until(lambda: api.server.stats.blocked == 1)
        await api.ctx.register(inst("new", "new-1", 1234, node="fresh", address="10.0.0.11"))
        new_index, nodes = await waiter
        assert int(new_index) > int(index) and "fresh" in [n["Node"] for n in nodes]


async def test_pyconsul_sync_acl(acl_api: RunningApi) -> None:
    with sync_client(acl_api) as anonymous:
        assert await call(anonymous.status.leader) == LEADER  # no token needed
        with pytest.raises(ACLPermissionDenied):
            await call(anonymous.agent.self)
        with pytest.raises(ACLPermissionDenied):
            await call(anonymous.catalog.nodes)
    with sync_client(acl_api, token=READ_TOKEN) as reader:
        _, checks = await call(reader.health.checks, "web")
        assert len(checks) == 2
        _, nodes = await call(reader.catalog.nodes)
        assert len(nodes) == 3
        # py-consul 1.8 sends no token with agent.self() (nor agent.service_definition()):
        # against Consul as against waypost, those need an anonymous policy that reads.
        with pytest.raises(ACLPermissionDenied):
            await call(reader.agent.self)


async def test_pyconsul_agent_self_with_an_anonymous_read_policy() -> None:
    acl = AclSettings(enabled=True, default_policy="read", tokens={WRITE_TOKEN: "write"})
    async with running_api(instances=catalog(), acl=acl) as api:
        with sync_client(api) as anonymous:
            assert (await call(anonymous.agent.self))["Config"]["NodeName"] == "agent"
            assert (await call(anonymous.agent.service_definition, "web-1"))["Port"] == 8001


@pytest.fixture
async def acl_api() -> AsyncIterator[RunningApi]:
    acl = AclSettings(enabled=True, default_policy="deny", tokens={READ_TOKEN: "read"})
    async with running_api(instances=catalog(), nodes=[PEER, FAR], acl=acl) as api:
        yield api


@pytest.mark.filterwarnings(AIO_DEPRECATION)
async def test_pyconsul_aio(api: RunningApi) -> None:
    async with consul.aio.Consul(host=api.server.host, port=api.server.port) as c:
        me = await c.agent.self()
        assert me["Config"]["Datacenter"] == "dc1" and me["Member"]["Addr"] == "127.0.0.1"
        assert await c.status.leader() == LEADER
        assert await c.status.peers() == [LEADER]
        assert (await c.agent.service_definition("db-1"))["Service"] == "db"
        assert await c.catalog.datacenters() == ["dc1", "dc2"]
        _, nodes = await c.catalog.nodes(node_meta={"rack": "r1"})
        assert [n["Node"] for n in nodes] == ["peer"]
        index, node = await c.catalog.node("agent")
        assert int(index) >= 1 and node["Node"]["Node"] == "agent"
        _, checks = await c.health.node("agent")
        assert {ch["CheckID"] for ch in checks} == {"db-1-ttl", "web-1-ttl", "web-2-ttl"}
        index, checks = await c.health.checks("web")
        waiter = asyncio.create_task(c.health.checks("web", index=index, wait="10s"))
        await until(lambda: api.server.stats.blocked == 1)
        api.checks.ttl_update("web-2-ttl", Health.WARNING, "slow")
        async with asyncio.timeout(DEADLINE):
            new_index, checks = await waiter
        assert int(new_index) > int(index)
        assert [ch["Status"] for ch in checks] == ["passing", "warning"]
