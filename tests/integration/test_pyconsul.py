"""py-consul, the Python Consul client no one here wrote, pointed at waypost.

The sync client (`consul.Consul`, requests) runs in a thread through
asyncio.to_thread, since the server shares the test's event loop; the async
one (`consul.aio.Consul`, aiohttp) runs on the loop.  Results are asserted
exactly: py-consul answers False (not an exception) to some 404s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import consul
import consul.aio
import pytest
from consul.exceptions import ACLPermissionDenied, BadRequest

from discovery.acl import AclSettings
from tests.integration.http_fixtures import RunningApi, running_api, sync_client

T = TypeVar("T")
DEADLINE = 10.0  # seconds for a call that should take milliseconds (blocking ones excepted)
WRITE_TOKEN = "write-secret-0001"
READ_TOKEN = "read-secret-00001"
# py-consul's aio client passes aiohttp's deprecated `ssl_context` to its connector.
AIO_DEPRECATION = "ignore:ssl_context is deprecated:DeprecationWarning"


@pytest.fixture(autouse=True)
def _no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul reads CONSUL_HTTP_* from the environment; these tests name everything."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def api() -> AsyncIterator[RunningApi]:
    async with running_api() as running:
        yield running


@pytest.fixture
def sync(api: RunningApi) -> Iterator[consul.Consul]:
    with sync_client(api) as client:
        yield client


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync py-consul call in a thread, bounded in time."""
    async with asyncio.timeout(DEADLINE):
        return await asyncio.to_thread(fn, *args, **kwargs)


async def until_blocked(api: RunningApi, count: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while api.server.stats.blocked != count:  # noqa: ASYNC110 - another component's counter
            await asyncio.sleep(0.01)


# -- the sync client ------------------------------------------------------------------------


async def test_register_ttl_pass_fail_and_reads(api: RunningApi, sync: consul.Consul) -> None:
    ok = await call(
        sync.agent.service.register,
        "web",
        service_id="web-1",
        port=8080,
        tags=["v1"],
        meta={"version": "1"},
        check=consul.Check.ttl("30s"),
    )
    assert ok is True
    services = await call(sync.agent.services)
    assert services["web-1"]["Service"] == "web"
    assert (services["web-1"]["Port"], services["web-1"]["Tags"]) == (8080, ["v1"])
    checks = await call(sync.agent.checks)
    assert checks["service:web-1"]["Status"] == "critical"  # TTL checks start critical

    _, passing = await call(sync.health.service, "web", passing=True)
    assert passing == []
    assert await call(sync.agent.check.ttl_pass, "service:web-1", "all good") is True
    index, passing = await call(sync.health.service, "web", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]
    assert passing[0]["Checks"][0]["Output"] == "all good"
    assert int(index) == api.registry.snapshot.service_index["web"]

    assert await call(sync.agent.check.ttl_warn, "service:web-1") is True
    assert (await call(sync.health.service, "web", passing=True))[1] == []
    assert await call(sync.agent.check.ttl_fail, "service:web-1", "down") is True
    _, critical = await call(sync.health.state, "critical")
    assert [(c["CheckID"], c["Output"]) for c in critical] == [("service:web-1", "down")]

    _, names = await call(sync.catalog.services)
    assert names == {"web": ["v1"]}
    _, nodes = await call(sync.catalog.service, "web", tag="v1")
    assert [(n["ServiceID"], n["ServicePort"], n["Node"]) for n in nodes] == [
        ("web-1", 8080, "agent")
    ]
    assert (await call(sync.catalog.service, "web", tag="v2"))[1] == []


async def test_deregister_and_unknown_ids(api: RunningApi, sync: consul.Consul) -> None:
    assert await call(sync.agent.service.register, "web", check=consul.Check.ttl("9s")) is True
    assert await call(sync.agent.service.deregister, "web") is True
    assert await call(sync.agent.services) == {}
    assert len(api.registry.snapshot.instances) == 0
    # py-consul turns these 404s into False rather than raising.
    assert await call(sync.agent.service.deregister, "web") is False
    assert await call(sync.agent.check.ttl_pass, "service:web") is False
    assert (await call(sync.health.service, "web"))[1] == []


async def test_http_and_tcp_checks_from_py_consul(api: RunningApi, sync: consul.Consul) -> None:
    url = f"http://127.0.0.1:{api.server.port}/v1/agent/services"
    http = consul.Check.http(url, "10s", timeout="2s", deregister="1m")
    tcp = consul.Check.tcp("127.0.0.1", api.server.port, "15s")
    ok = await call(sync.agent.service.register, "web", check=http, extra_checks=[tcp])
    assert ok is True
    checks = await call(sync.agent.checks)
    assert checks["service:web:1"]["Definition"]["HTTP"] == url
    assert checks["service:web:1"]["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s"
    assert checks["service:web:2"]["Definition"]["TCP"] == f"127.0.0.1:{api.server.port}"
    # Check headers are a Consul feature waypost does not have: refused, not ignored.
    with_header = consul.Check.http(url, "10s", header={"Host": ["example"]})
    with pytest.raises(BadRequest, match=r"Checks\[0\]\.Header: is not supported"):
        await call(sync.agent.service.register, "api", check=with_header)


async def test_bad_registration_is_bad_request(sync: consul.Consul) -> None:
    with pytest.raises(BadRequest, match=r"400 .*Port: 70000 is out of range"):
        await call(sync.agent.service.register, "web", port=70000)


async def test_replace_existing_checks(api: RunningApi, sync: consul.Consul) -> None:
    two = [consul.Check.ttl("30s"), consul.Check.ttl("30s")]
    assert await call(sync.agent.service.register, "web", check=two[0], extra_checks=two[1:])
    assert set(await call(sync.agent.checks)) == {"service:web:1", "service:web:2"}
    assert await call(
        sync.agent.service.register,
        "web",
        check=consul.Check.ttl("30s"),
        replace_existing_checks=True,
    )
    assert set(await call(sync.agent.checks)) == {"service:web"}


async def test_blocking_reads(api: RunningApi, sync: consul.Consul) -> None:
    assert await call(sync.agent.service.register, "web", check=consul.Check.ttl("30s"))
    index, _ = await call(sync.health.service, "web")
    # Timeout: the same index back after `wait`.
    again, entries = await call(sync.health.service, "web", index=index, wait="300ms")
    assert again == index and len(entries) == 1
    # Change: the blocked read returns with the new state and a higher index.
    watch = asyncio.create_task(call(sync.health.service, "web", index=index, wait="30s"))
    await until_blocked(api, 1)
    assert await call(sync.agent.check.ttl_pass, "service:web") is True
    new, entries = await watch
    assert int(new) > int(index)
    assert entries[0]["Checks"][0]["Status"] == "passing"
    # The catalog, blocking on every service.
    cindex, _ = await call(sync.catalog.services)
    watch_catalog = asyncio.create_task(call(sync.catalog.services, index=cindex, wait="30s"))
    await until_blocked(api, 1)
    assert await call(sync.agent.service.register, "db") is True
    new, names = await watch_catalog
    assert int(new) > int(cindex) and names == {"db": [], "web": []}


async def test_tokens() -> None:
    acl = AclSettings(enabled=True, tokens={WRITE_TOKEN: "write", READ_TOKEN: "read"})
    async with running_api(acl=acl) as api:
        with sync_client(api) as anonymous:
            with pytest.raises(ACLPermissionDenied):
                await call(anonymous.agent.service.register, "web")
            with pytest.raises(ACLPermissionDenied):
                await call(anonymous.catalog.services)
        with sync_client(api, READ_TOKEN) as reader:
            with pytest.raises(ACLPermissionDenied):
                await call(reader.agent.service.register, "web")
            assert (await call(reader.catalog.services))[1] == {}
        assert len(api.registry.snapshot.instances) == 0
        with sync_client(api, WRITE_TOKEN) as writer:
            assert await call(writer.agent.service.register, "web") is True
            with pytest.raises(ACLPermissionDenied):  # a per-call token wins
                await call(writer.agent.service.deregister, "web", token=READ_TOKEN)
        assert list(api.registry.snapshot.instances) == ["web"]


# -- the async client ----------------------------------------------------------------------


@pytest.mark.filterwarnings(AIO_DEPRECATION)
async def test_aio_client(api: RunningApi) -> None:
    async with consul.aio.Consul(host=api.server.host, port=api.server.port) as aio:
        async with asyncio.timeout(DEADLINE):
            ok = await aio.agent.service.register(
                "web", service_id="web-1", port=80, check=consul.Check.ttl("30s")
            )
            assert ok is True
            assert await aio.agent.check.ttl_pass("service:web-1", "up") is True
            index, entries = await aio.health.service("web", passing=True)
            assert [e["Service"]["ID"] for e in entries] == ["web-1"]
            assert (await aio.catalog.services())[1] == {"web": []}
            _, nodes = await aio.catalog.service("web")
            assert [n["ServiceID"] for n in nodes] == ["web-1"]

        watch = asyncio.create_task(aio.health.service("web", index=index, wait="30s"))
        await until_blocked(api, 1)
        async with asyncio.timeout(DEADLINE):
            assert await aio.agent.check.ttl_fail("service:web-1", "down") is True
            new, entries = await watch
            assert int(new) > int(index)
            assert entries[0]["Checks"][0]["Status"] == "critical"
            assert (await aio.health.service("web", passing=True))[1] == []

            assert await aio.agent.service.deregister("web-1") is True
            assert await aio.agent.service.deregister("web-1") is False
            assert await aio.agent.services() == {}
