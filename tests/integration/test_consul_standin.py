"""The Consul stand-in (tests/consul_standin.py) against Consul's documented behaviour.

Real clients on loopback: plain aiohttp for exact shapes, status codes and headers,
and py-consul (the async client on the loop, the sync one in a thread) for the round
trips a Consul client makes.  The key sets are those of Consul's API docs and of the
structs they come from (api.AgentService, structs.HealthCheck, structs.Node,
structs.NodeService, structs.ServiceNode), for a CE agent of the 1.17 era.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio
import pytest
from consul.exceptions import ACLPermissionDenied, BadRequest
from multidict import CIMultiDictProxy

from tests.consul_standin import ConsulStandin, parse_go_duration

T = TypeVar("T")
DEADLINE = 5.0  # seconds for anything that should take milliseconds
AIO_DEPRECATION = "ignore:ssl_context is deprecated:DeprecationWarning"  # py-consul's aio client
TOKEN = "secret-token-0001"

AGENT_SERVICE_KEYS = {
    "ID", "Service", "Tags", "Meta", "Port", "Address", "TaggedAddresses", "Weights",
    "EnableTagOverride", "Datacenter",
}  # fmt: skip
CHECK_KEYS = {
    "Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "ServiceName",
    "ServiceTags", "Type", "Interval", "Timeout", "ExposedPort", "Definition", "CreateIndex",
    "ModifyIndex",
}  # fmt: skip
NODE_KEYS = {
    "ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "CreateIndex", "ModifyIndex",
}  # fmt: skip
NODE_SERVICE_KEYS = {
    "ID", "Service", "Tags", "Address", "TaggedAddresses", "Meta", "Port", "Weights",
    "EnableTagOverride", "Proxy", "Connect", "PeerName", "CreateIndex", "ModifyIndex",
}  # fmt: skip
SERVICE_NODE_KEYS = {
    "ID", "Node", "Address", "Datacenter", "TaggedAddresses", "NodeMeta", "ServiceKind",
    "ServiceID", "ServiceName", "ServiceTags", "ServiceAddress", "ServiceTaggedAddresses",
    "ServiceWeights", "ServiceMeta", "ServicePort", "ServiceSocketPath",
    "ServiceEnableTagOverride", "ServiceProxy", "ServiceConnect", "CreateIndex", "ModifyIndex",
}  # fmt: skip

WEB = {"Name": "web", "ID": "web-1", "Port": 8080, "Address": "10.0.0.5", "Tags": ["v1"]}


@pytest.fixture(autouse=True)
def _no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul reads CONSUL_HTTP_* from the environment; these tests name everything."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandin]:
    async with ConsulStandin() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def put(
    http: aiohttp.ClientSession, server: ConsulStandin, path: str, body: Any = None
) -> tuple[int, str]:
    async with http.put(server.url + path, json=body) as response:
        return response.status, await response.text()


async def get(
    http: aiohttp.ClientSession, server: ConsulStandin, path: str
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.get(server.url + path) as response:
        is_json = response.content_type == "application/json"
        body = await response.json() if is_json else await response.text()
        return response.status, body, response.headers


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not predicate():  # noqa: ASYNC110 - state of a server in this loop
            await asyncio.sleep(0.005)


# -- registration ---------------------------------------------------------------------------


async def test_register_shapes_and_deregister(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    body = WEB | {"Meta": {"external-source": "waypost"}, "Check": {"TTL": "10s"}}
    assert await put(http, standin, "/v1/agent/service/register", body) == (200, "")

    status, services, headers = await get(http, standin, "/v1/agent/services")
    assert status == 200 and "X-Consul-Index" not in headers  # agent endpoints have no index
    assert set(services) == {"web-1"}  # the catalog's "consul" service is not the agent's
    assert set(services["web-1"]) == AGENT_SERVICE_KEYS
    assert services["web-1"]["Weights"] == {"Passing": 1, "Warning": 1}
    assert services["web-1"]["TaggedAddresses"]["lan_ipv4"] == {"Address": "10.0.0.5", "Port": 8080}
    assert services == standin.agent_services()

    _, checks, _ = await get(http, standin, "/v1/agent/checks")
    assert set(checks) == {"service:web-1"}
    assert set(checks["service:web-1"]) == CHECK_KEYS
    check = checks["service:web-1"]
    assert (check["Status"], check["Type"], check["Name"]) == (
        "critical",
        "ttl",
        "Service 'web' check",
    )
    assert checks == standin.checks()

    assert await put(http, standin, "/v1/agent/service/deregister/web-1") == (200, "")
    assert standin.agent_services() == {} and standin.checks() == {}
    status, text = await put(http, standin, "/v1/agent/service/deregister/web-1")
    assert status == 404 and text.startswith('Unknown service ID "web-1"')


async def test_keys_decode_case_insensitively_and_unknown_fields_are_refused(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    body = {"name": "web", "PORT": 80, "enable_tag_override": True, "check": {"ttl": "5s"}}
    assert (await put(http, standin, "/v1/agent/service/register", body))[0] == 200
    service = standin.agent_services()["web"]  # ID defaults to the name
    assert (service["Port"], service["EnableTagOverride"]) == (80, True)

    cases = [
        ({"Name": "x", "Foo": 1}, 'Request decode failed: json: unknown field "Foo"'),
        ({"Name": "x", "Check": {"TTL": "5s", "Bar": 1}}, 'json: unknown field "Bar"'),
        ({"Name": "x", "Namespace": "default"}, 'json: unknown field "Namespace"'),  # CE
        ({"Name": "x", "Port": "80"}, "cannot unmarshal string into Go struct field"),
        ({"Name": "x", "Check": {"TTL": "5 s"}}, 'time: invalid duration "5 s"'),
        ({"Port": 80}, "Missing service name"),
        ({"Name": "x", "Check": {"Status": "passing"}}, "TTL must be > 0 for TTL checks"),
        ({"Name": "x", "Check": {"TTL": "5s", "Status": "up"}}, "Status for checks must"),
        ({"Name": "x", "Meta": {"consul-x": "1"}}, "Invalid Service Meta"),
        ({"Name": "x", "Weights": {"Passing": 0, "Warning": 1}}, "Invalid Weights"),
    ]
    for bad, reason in cases:
        status, text = await put(http, standin, "/v1/agent/service/register", bad)
        assert (status, reason in text) == (400, True), (bad, text)
    assert set(standin.agent_services()) == {"web"}  # nothing half-applied


async def test_check_ids_initial_status_and_re_registration(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    checks = [{"TTL": "10s"}, {"TTL": "10s", "Status": "passing"}, {"CheckID": "own", "TTL": "1m"}]
    await put(http, standin, "/v1/agent/service/register", WEB | {"Checks": checks})
    statuses = {cid: c["Status"] for cid, c in standin.checks().items()}
    assert statuses == {
        "service:web-1:1": "critical",
        "service:web-1:2": "passing",
        "own": "critical",
    }

    index = standin.index
    await put(http, standin, "/v1/agent/service/register", WEB | {"Checks": checks})
    assert standin.index == index  # the same registration changes nothing

    await put(http, standin, "/v1/agent/check/pass/own")
    index = standin.index
    changed = WEB | {"Port": 9090, "Checks": [{"CheckID": "own", "TTL": "1m"}]}
    await put(http, standin, "/v1/agent/service/register", changed)
    assert standin.index == index + 1
    assert standin.agent_services()["web-1"]["Port"] == 9090
    assert standin.checks()["own"]["Status"] == "passing"  # kept across re-registration
    assert len(standin.checks()) == 3  # checks not named again stay, as in Consul...

    path = "/v1/agent/service/register?replace-existing-checks=true"
    await put(http, standin, path, changed)
    assert set(standin.checks()) == {"own"}  # ...unless replace-existing-checks is set


async def test_ttl_updates_and_expiry(standin: ConsulStandin, http: aiohttp.ClientSession) -> None:
    await put(http, standin, "/v1/agent/service/register", WEB | {"Check": {"TTL": "150ms"}})
    for verb, expected in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
        assert (await put(http, standin, f"/v1/agent/check/{verb}/service:web-1?note=n"))[0] == 200
        check = standin.checks()["service:web-1"]
        assert (check["Status"], check["Output"]) == (expected, "n")
    update = {"Status": "passing", "Output": "all good"}
    assert (await put(http, standin, "/v1/agent/check/update/service:web-1", update))[0] == 200
    assert standin.checks()["service:web-1"]["Status"] == "passing"

    loop = asyncio.get_running_loop()
    started = loop.time()
    await until(lambda: standin.checks()["service:web-1"]["Status"] == "critical")
    assert loop.time() - started >= 0.1  # the TTL ran out; nothing refreshed it
    assert standin.checks()["service:web-1"]["Output"].startswith("TTL expired")

    status, text = await put(http, standin, "/v1/agent/check/pass/nope")
    assert status == 404 and text.startswith('Unknown check ID "nope"')
    status, text = await put(
        http, standin, "/v1/agent/check/update/service:web-1", {"Status": "ok"}
    )
    assert (status, text) == (400, "Invalid check status: 'ok'")
    status, text = await put(http, standin, "/v1/agent/check/update/service:web-1", {"X": 1})
    assert status == 400 and 'unknown field "X"' in text


# -- catalog and health ---------------------------------------------------------------------


async def test_catalog_and_health_shapes(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    await put(http, standin, "/v1/agent/service/register", WEB | {"Check": {"TTL": "10s"}})
    standin.register_foreign(
        {"Name": "web", "ID": "web-2", "Port": 80, "Check": {"Status": "passing"}}, node="n2"
    )

    status, services, headers = await get(http, standin, "/v1/catalog/services")
    assert status == 200 and int(headers["X-Consul-Index"]) == standin.index
    assert services == {"consul": [], "web": ["v1"]}  # a real catalog lists its servers too

    _, nodes, _ = await get(http, standin, "/v1/catalog/service/web")
    assert [(n["Node"], n["ServiceID"]) for n in nodes] == [("consul-1", "web-1"), ("n2", "web-2")]
    assert set(nodes[0]) == SERVICE_NODE_KEYS
    assert set(nodes[1]) == SERVICE_NODE_KEYS - {"ServiceTaggedAddresses"}  # no address

    _, entries, _ = await get(http, standin, "/v1/health/service/web")
    assert [set(e) for e in entries] == [{"Node", "Service", "Checks"}] * 2
    assert set(entries[0]["Node"]) == NODE_KEYS
    assert set(entries[0]["Service"]) == NODE_SERVICE_KEYS
    assert all(set(c) == CHECK_KEYS for e in entries for c in e["Checks"])
    serf = entries[0]["Checks"][0]  # every node's serfHealth comes with its services
    assert (serf["CheckID"], serf["Name"], serf["Status"]) == (
        "serfHealth",
        "Serf Health Status",
        "passing",
    )

    _, passing, _ = await get(http, standin, "/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == ["web-2"]  # web-1's TTL check is critical
    _, tagged, _ = await get(http, standin, "/v1/health/service/web?tag=V1")
    assert [e["Service"]["ID"] for e in tagged] == ["web-1"]  # tags match case-insensitively
    _, critical, _ = await get(http, standin, "/v1/health/state/critical")
    assert [c["CheckID"] for c in critical] == ["service:web-1"]
    _, all_nodes, _ = await get(http, standin, "/v1/catalog/nodes")
    assert [n["Node"] for n in all_nodes] == ["consul-1", "n2"]
    assert all(set(n) == NODE_KEYS for n in all_nodes)


async def test_datacenters_filters_and_status(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    meta = {"Meta": {"external-source": "waypost"}}
    await put(http, standin, "/v1/agent/service/register", WEB | meta)
    await put(http, standin, "/v1/agent/service/register", {"Name": "db"})

    status, text, _ = await get(http, standin, "/v1/health/service/web?dc=dc2")
    assert (status, text) == (500, "No path to datacenter")
    assert (await get(http, standin, "/v1/health/service/web?dc=dc1"))[0] == 200

    query = '?filter=Meta["external-source"] == "waypost"'
    _, services, _ = await get(http, standin, "/v1/agent/services" + query)
    assert set(services) == {"web-1"}
    _, services, _ = await get(http, standin, '/v1/agent/services?filter="v1" in Tags')
    assert set(services) == {"web-1"}

    _, leader, _ = await get(http, standin, "/v1/status/leader")
    assert leader == "127.0.0.1:8300"
    _, agent, _ = await get(http, standin, "/v1/agent/self")
    assert (agent["Config"]["Datacenter"], agent["Config"]["NodeName"]) == ("dc1", "consul-1")
    assert (await get(http, standin, "/v1/health/state/bogus"))[:2] == (400, "Bad check state")


async def test_foreign_nodes_and_their_health(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    standin.register_foreign({"Name": "api", "ID": "api-7", "Check": {"Status": "passing"}}, "n2")
    assert standin.agent_services() == {}  # another node's agent owns it
    _, _, headers = await get(http, standin, "/v1/health/service/api?passing")
    index = int(headers["X-Consul-Index"])
    path = f"/v1/health/service/api?passing&index={index}&wait=3s"
    watch = asyncio.create_task(get(http, standin, path))
    await until(lambda: standin.blocked == 1)

    standin.set_check_status("serfHealth", "critical", node="n2")  # the node has failed
    async with asyncio.timeout(1.0):
        _, entries, headers = await watch  # a node check is every one of its services' data
    assert entries == [] and int(headers["X-Consul-Index"]) > index

    standin.deregister_foreign("api-7", "n2")
    assert (await get(http, standin, "/v1/catalog/service/api"))[1] == []
    with pytest.raises(ValueError, match="own node"):
        standin.register_foreign({"Name": "x"}, standin.node)
    with pytest.raises(ValueError, match="unknown field"):
        standin.register_foreign({"Name": "x", "Bogus": 1})


# -- blocking queries -----------------------------------------------------------------------


async def test_blocking_query_returns_on_a_change_to_its_data(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    await put(http, standin, "/v1/agent/service/register", WEB | {"Check": {"TTL": "10s"}})
    _, _, headers = await get(http, standin, "/v1/health/service/web")
    index = int(headers["X-Consul-Index"])

    watch = asyncio.create_task(get(http, standin, f"/v1/health/service/web?index={index}&wait=3s"))
    await until(lambda: standin.blocked == 1)
    await put(http, standin, "/v1/agent/service/register", {"Name": "other"})
    await asyncio.sleep(0.05)
    assert not watch.done()  # another service's change is not this query's...
    _, _, headers = await get(http, standin, "/v1/health/service/web")
    assert int(headers["X-Consul-Index"]) == index  # ...nor in its index (per-service)
    await put(http, standin, "/v1/agent/check/pass/service:web-1")
    async with asyncio.timeout(1.0):
        _, entries, headers = await watch
    assert int(headers["X-Consul-Index"]) > index
    assert entries[0]["Checks"][1]["Status"] == "passing"


async def test_blocking_query_times_out_with_the_same_index(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    _, _, headers = await get(http, standin, "/v1/catalog/services")
    index = int(headers["X-Consul-Index"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, _, headers = await get(http, standin, f"/v1/catalog/services?index={index}&wait=200ms")
    elapsed = loop.time() - started
    assert int(headers["X-Consul-Index"]) == index
    assert 0.2 <= elapsed < 0.2 + 0.2 / 16 + 0.1  # the wait plus Consul's wait/16 jitter at most

    _, _, headers = await get(http, standin, "/v1/health/service/nothing")
    assert int(headers["X-Consul-Index"]) >= 1  # never 0, even for nothing
    status, text, _ = await get(http, standin, "/v1/catalog/services?index=x")
    assert (status, text) == (400, "Invalid index")
    status, text, _ = await get(http, standin, "/v1/catalog/services?index=1&wait=soon")
    assert (status, text) == (400, "Invalid wait time")


async def test_index_reset_goes_backwards_and_releases_blocked_queries(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    for number in range(5):
        await put(http, standin, "/v1/agent/service/register", {"Name": f"s{number}"})
    _, _, headers = await get(http, standin, "/v1/catalog/services")
    index = int(headers["X-Consul-Index"])
    watch = asyncio.create_task(get(http, standin, f"/v1/catalog/services?index={index}&wait=3s"))
    await until(lambda: standin.blocked == 1)

    standin.reset_index()
    async with asyncio.timeout(1.0):
        _, services, headers = await watch
    assert int(headers["X-Consul-Index"]) < index  # a client must notice and resync
    assert set(services) == {"consul", "s0", "s1", "s2", "s3", "s4"}  # the data survived


# -- ACLs and faults ------------------------------------------------------------------------


async def test_acl_tokens(http: aiohttp.ClientSession) -> None:
    async with ConsulStandin(acl_tokens={TOKEN}) as server:
        status, text = await put(http, server, "/v1/agent/service/register", {"Name": "web"})
        assert (status, text) == (403, "Permission denied")
        status, text, _ = await get(http, server, "/v1/catalog/services?token=wrong")
        assert (status, text) == (403, "ACL not found")
        assert (await get(http, server, "/v1/status/leader"))[0] == 200  # needs no token

        headers = {"X-Consul-Token": TOKEN}
        async with http.put(
            server.url + "/v1/agent/service/register", json={"Name": "web"}, headers=headers
        ) as response:
            assert response.status == 200
        assert (await get(http, server, f"/v1/catalog/services?token={TOKEN}"))[0] == 200
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(server.url + "/v1/agent/services", headers=bearer) as response:
            assert response.status == 200


async def test_fail_status_delay_and_request_log(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    standin.fail_status = 503
    assert (await get(http, standin, "/v1/catalog/services"))[0] == 503
    assert (await put(http, standin, "/v1/agent/service/register", {"Name": "a"}))[0] == 503
    assert standin.agent_services() == {}
    standin.fail_status = None

    standin.delay = 0.1
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await get(http, standin, "/v1/catalog/services"))[0] == 200
    assert loop.time() - started >= 0.1
    assert standin.requests == [
        ("GET", "/v1/catalog/services"),
        ("PUT", "/v1/agent/service/register"),
        ("GET", "/v1/catalog/services"),
    ]


async def test_outage_refuses_connections_and_resumes_on_the_same_port(
    standin: ConsulStandin, http: aiohttp.ClientSession
) -> None:
    await put(http, standin, "/v1/agent/service/register", {"Name": "web"})
    index = standin.index
    watch = asyncio.create_task(get(http, standin, f"/v1/catalog/services?index={index}"))
    await until(lambda: standin.blocked == 1)
    port = standin.port

    await standin.stop_listening()
    with pytest.raises(aiohttp.ClientError):  # the parked query's connection is dropped
        async with asyncio.timeout(1.0):
            await watch
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))

    await standin.resume()
    assert standin.port == port
    _, services, _ = await get(http, standin, "/v1/catalog/services")
    assert services == {"consul": [], "web": []}  # state survives the outage


def test_go_durations() -> None:
    cases = {"0": 0.0, "10s": 10.0, "1m30s": 90.0, "250ms": 0.25, "1.5h": 5400.0, "-2s": -2.0}
    assert {text: parse_go_duration(text) for text in cases} == cases
    for bad in ("", "10", "s", "1d", "5 s"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_go_duration(bad)


# -- py-consul as the client ----------------------------------------------------------------


@contextmanager
def sync_client(server: ConsulStandin, token: str | None = None) -> Iterator[consul.Consul]:
    client = consul.Consul(host=server.host, port=server.port, token=token)
    try:
        yield client
    finally:
        client.http.session.close()  # py-consul's close() leaves its requests session open


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A sync py-consul call in a thread (the server runs on this loop), bounded in time."""
    async with asyncio.timeout(DEADLINE):
        return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.mark.filterwarnings(AIO_DEPRECATION)
async def test_pyconsul_aio_round_trip_and_blocking(standin: ConsulStandin) -> None:
    async with consul.aio.Consul(host=standin.host, port=standin.port) as aio:
        async with asyncio.timeout(DEADLINE):
            ok = await aio.agent.service.register(
                "web", service_id="web-1", port=80, tags=["v1"], check=consul.Check.ttl("30s")
            )
            assert ok is True
            assert set(await aio.agent.services()) == {"web-1"}
            index, entries = await aio.health.service("web", passing=True)
            assert entries == []  # the TTL check starts critical
            assert await aio.agent.check.ttl_pass("service:web-1", "up") is True

            watch = asyncio.create_task(aio.health.service("web", index=index, wait="3s"))
            new, entries = await watch  # already past `index`: answers at once
            assert int(new) > int(index)
            assert [e["Service"]["ID"] for e in entries] == ["web-1"]

            watch = asyncio.create_task(aio.health.service("web", index=new, wait="3s"))
            await until(lambda: standin.blocked == 1)
            assert await aio.agent.check.ttl_fail("service:web-1", "down") is True
            newer, entries = await watch
            assert int(newer) > int(new)
            assert entries[0]["Checks"][-1]["Status"] == "critical"

            assert (await aio.catalog.services())[1] == {"consul": [], "web": ["v1"]}
            assert await aio.agent.service.deregister("web-1") is True
            assert await aio.agent.service.deregister("web-1") is False  # py-consul's 404
            assert await aio.status.leader() == "127.0.0.1:8300"


async def test_pyconsul_sync_client_in_a_thread(standin: ConsulStandin) -> None:
    with sync_client(standin) as client:
        check = consul.Check.ttl("30s")
        assert await call(client.agent.service.register, "db", service_id="db-1", check=check)
        assert await call(client.agent.check.ttl_warn, "service:db-1", "slow") is True
        checks = await call(client.agent.checks)
        assert (checks["service:db-1"]["Status"], checks["service:db-1"]["Output"]) == (
            "warning",
            "slow",
        )
        index, nodes = await call(client.catalog.service, "db")
        assert int(index) == standin.index and [n["ServiceID"] for n in nodes] == ["db-1"]
        _, entries = await call(client.health.service, "db", index=index, wait="100ms")
        assert [e["Service"]["ID"] for e in entries] == ["db-1"]  # timed out, same data
        # py-consul answers False to a 404 (serfHealth is the catalog's, not the agent's)
        assert await call(client.agent.check.ttl_pass, "serfHealth") is False
        with pytest.raises(BadRequest):
            await call(client.agent.service.register, "x", port=80, weights={"Passing": 0})
        assert await call(client.agent.service.deregister, "db-1") is True


async def test_pyconsul_acl_denied(http: aiohttp.ClientSession) -> None:
    async with ConsulStandin(acl_tokens={TOKEN}) as server:
        with sync_client(server) as anonymous, pytest.raises(ACLPermissionDenied):
            await call(anonymous.agent.service.register, "web")
        with sync_client(server, TOKEN) as client:
            assert await call(client.agent.service.register, "web") is True
        assert set(server.agent_services()) == {"web"}


async def test_pyconsul_checks_registered_on_their_own(standin: ConsulStandin) -> None:
    with sync_client(standin) as client:
        assert await call(client.agent.service.register, "web", service_id="web-1")
        ttl = consul.Check.ttl("30s")
        assert await call(client.agent.check.register, "maintenance", check=ttl) is True
        index, entries = await call(client.health.service, "web")
        assert [c["CheckID"] for c in entries[0]["Checks"]] == ["maintenance", "serfHealth"]
        assert (await call(client.health.service, "web", passing=True))[1] == []  # node check

        own = consul.Check.ttl("30s")
        ok = await call(
            client.agent.check.register, "db", check_id="c1", service_id="web-1", check=own
        )
        assert ok is True and standin.checks()["c1"]["ServiceID"] == "web-1"
        with pytest.raises(consul.ConsulException, match="does not exist"):
            await call(client.agent.check.register, "x", check=own, service_id="nope")

        assert await call(client.agent.check.deregister, "maintenance") is True
        assert await call(client.agent.check.deregister, "maintenance") is False  # a 404
        new, entries = await call(client.health.service, "web")
        assert int(new) > int(index)
        assert [c["CheckID"] for c in entries[0]["Checks"]] == ["serfHealth", "c1"]
