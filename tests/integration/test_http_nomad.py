"""Tests of Nomad's service endpoints (discovery.api_nomad): shapes, filter, choose, delete.

First the handlers, called with ApiRequest objects on a real Registry (and,
for DELETE, a real Store in a temporary data dir): every shape, status and
error.  Then the same routes over HTTP on a real server
(tests/integration/http_fixtures.py) with aiohttp: headers, JSON errors,
blocking reads, durability before the answer, tokens.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.acl import AclSettings
from discovery.api import ApiContext, ApiError, ApiRequest, ApiResponse
from discovery.api_nomad import (
    FIELDS,
    ROUTES,
    choose_registrations,
    delete_service,
    get_service,
    hash_with,
    list_services,
    parse_choose,
)
from discovery.errors import ValidationError
from discovery.model import Health, Instance, Node, make_instance
from discovery.registry import Registry
from discovery.store import Store, open_store
from tests.integration.http_fixtures import RunningApi, running_api

NODE = Node("node1", "127.0.0.1")


def inst(ident: str, service: str = "web", **changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": service,
        "id": ident,
        "node": "node1",
        "address": "10.0.0.1",
        "port": 8080,
    }
    return make_instance(**{**fields, **changes})


def request(
    method: str = "GET",
    path: str = "/v1/service/web",
    params: Mapping[str, str] | None = None,
    **query: str | Sequence[str],
) -> ApiRequest:
    as_lists = {k: [v] if isinstance(v, str) else list(v) for k, v in query.items()}
    return ApiRequest(method, path, params or {"name": "web"}, as_lists)


@pytest.fixture
def registry() -> Registry:
    reg = Registry(NODE)
    reg.upsert(
        inst("web-1", tags=["v1", "primary"], meta={"version": "1"}, port=8001),
        inst("web-2", tags=["v2"], port=8002, health=Health.CRITICAL),
        inst("web-3", tags=["v1"], port=8003, health=Health.WARNING, alloc_id="a3"),
    )
    reg.upsert(inst("api-1", "api", tags=["x"], address="10.0.0.9", port=9000))
    return reg


def services_of(response: ApiResponse) -> list[str]:
    assert isinstance(response.body, list)
    return [item["ID"] for item in response.body]


# -- GET /v1/services --------------------------------------------------------------------------


def test_list_services_in_nomads_shape(registry: Registry) -> None:
    response = list_services(request(path="/v1/services", params={}), registry.snapshot)
    assert response.status == 200
    assert response.body == [
        {
            "Namespace": "default",
            "Services": [
                {"ServiceName": "api", "Tags": ["x"]},
                {"ServiceName": "web", "Tags": ["primary", "v1", "v2"]},
            ],
        }
    ]
    assert response.index == registry.snapshot.index


def test_list_services_empty_and_other_namespaces(registry: Registry) -> None:
    empty = Registry(NODE)
    assert list_services(request(params={}), empty.snapshot).body == []
    assert list_services(request(params={}, namespace="prod"), registry.snapshot).body == []
    everywhere = list_services(request(params={}, namespace="*"), registry.snapshot).body
    assert isinstance(everywhere, list) and len(everywhere) == 1


# -- GET /v1/service/:name ----------------------------------------------------------------------


def test_service_registrations_in_nomads_shape(registry: Registry) -> None:
    response = get_service(request(), registry.snapshot)
    assert response.status == 200
    assert services_of(response) == ["web-1", "web-2", "web-3"]
    assert isinstance(response.body, list)
    first = response.body[0]
    assert set(first) == {
        "ID", "ServiceName", "Namespace", "NodeID", "Datacenter", "JobID", "AllocID", "Tags",
        "Address", "Port", "CreateIndex", "ModifyIndex", "Health", "Meta",
    }  # fmt: skip
    assert set(first) >= set(field.split(".")[0] for field in FIELDS)
    assert first["ServiceName"] == "web"
    assert first["Namespace"] == "default"
    assert first["Datacenter"] == "dc1"
    assert first["Tags"] == ["v1", "primary"]
    assert first["Port"] == 8001
    assert first["Health"] == "passing"
    assert first["Meta"] == {"version": "1"}
    assert first["CreateIndex"] == first["ModifyIndex"] == 1
    assert len(first["NodeID"]) == 36  # a UUID, stable per node name
    assert response.body[1]["Health"] == "critical"
    assert response.body[2]["AllocID"] == "a3"
    assert response.index == 1  # the service's last change, not the registry's (2)


def test_service_name_is_case_insensitive_and_unknown_is_empty(registry: Registry) -> None:
    upper = get_service(request(params={"name": "WEB"}), registry.snapshot)
    assert services_of(upper) == ["web-1", "web-2", "web-3"]
    missing = get_service(request(params={"name": "nope"}), registry.snapshot)
    assert missing.status == 200 and missing.body == []
    assert missing.index == registry.snapshot.index
    other_ns = get_service(request(namespace="prod"), registry.snapshot)
    assert other_ns.body == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tags contains v1", ["web-1", "web-3"]),
        ("v2 in Tags", ["web-2"]),
        ("Health == passing", ["web-1"]),
        ("Health != critical", ["web-1", "web-3"]),
        ("Port > 1", None),  # not in our subset: a 400
        ('Meta.version == "1"', ["web-1"]),
        ("Meta is empty", ["web-2", "web-3"]),
        ('AllocID == "a3" or Port == 8002', ["web-2", "web-3"]),
        ("ServiceName == web and not Tags contains primary", ["web-2", "web-3"]),
        ('ID matches "-[12]$"', ["web-1", "web-2"]),
        ("", ["web-1", "web-2", "web-3"]),  # an empty filter is no filter
    ],
)
def test_filter(registry: Registry, text: str, expected: list[str] | None) -> None:
    if expected is None:
        with pytest.raises(ApiError) as caught:
            get_service(request(filter=text), registry.snapshot)
        assert caught.value.status == 400
        return
    assert services_of(get_service(request(filter=text), registry.snapshot)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Tags contains", "filter: expected a value, found end of filter at position 14"),
        ("Service.Tags contains v1", "filter: unknown selector 'Service.Tags' at position 1"),
        ("Port = 1", "filter: expected '==' after '=' at position 6"),
    ],
)
def test_bad_filter_is_a_400_naming_the_position(
    registry: Registry, text: str, message: str
) -> None:
    with pytest.raises(ApiError) as caught:
        get_service(request(filter=text), registry.snapshot)
    assert (caught.value.status, caught.value.message, caught.value.field) == (
        400,
        message,
        "filter",
    )


# -- choose ---------------------------------------------------------------------------------------


def test_hash_is_nomads_hash_with() -> None:
    reg = {
        "ID": "_nomad-task-1", "ServiceName": "web", "Namespace": "default",
        "AllocID": "a1", "Address": "10.0.0.1", "Port": 8080, "Tags": ["t1", "t2"],
    }  # fmt: skip
    # Nomad: md5(BigEndian uint64 port, AllocID, ID, Namespace, Address, ServiceName, tags..., key)
    expected = hashlib.md5(
        (8080).to_bytes(8, "big") + b"a1" + b"_nomad-task-1" + b"default" + b"10.0.0.1"
        b"web" + b"t1" + b"t2" + b"alloc-xyz",
        usedforsecurity=False,
    ).hexdigest()
    assert hash_with(reg, "alloc-xyz") == expected


def test_choose_picks_a_stable_subset_per_key(registry: Registry) -> None:
    first = services_of(get_service(request(choose="2|alloc-1"), registry.snapshot))
    again = services_of(get_service(request(choose="2|alloc-1"), registry.snapshot))
    assert len(first) == 2 and first == again
    keys = [f"alloc-{n}" for n in range(40)]
    subsets = {
        tuple(services_of(get_service(request(choose=f"1|{k}"), registry.snapshot))) for k in keys
    }
    assert len(subsets) == 3  # different keys land on different instances
    everything = services_of(get_service(request(choose="10|k"), registry.snapshot))
    assert sorted(everything) == ["web-1", "web-2", "web-3"]  # n above the count: all
    assert get_service(request(choose="0|k"), registry.snapshot).body == []


def test_choose_applies_after_the_filter(registry: Registry) -> None:
    for n in range(20):
        chosen = get_service(
            request(choose=f"1|key-{n}", filter="Health != critical"), registry.snapshot
        )
        assert services_of(chosen) in (["web-1"], ["web-3"])


def test_rendezvous_moves_few_keys_when_an_instance_goes() -> None:
    rng = random.Random(7)
    regs = [
        {"ID": f"web-{i}", "ServiceName": "web", "Namespace": "default", "AllocID": "",
         "Address": f"10.0.{i // 250}.{i % 250}", "Port": 20000 + i, "Tags": []}
        for i in range(20)
    ]  # fmt: skip
    keys = [f"alloc-{rng.random()}" for _ in range(500)]
    before = {k: choose_registrations(regs, f"1|{k}")[0]["ID"] for k in keys}
    gone = regs[5]["ID"]
    after = {k: choose_registrations(regs[:5] + regs[6:], f"1|{k}")[0]["ID"] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)  # only the keys it served
    assert len(moved) < len(keys) / 5
    load = collections.Counter(before.values())
    assert len(load) == 20 and max(load.values()) < 3 * len(keys) / 20  # spread evenly


@pytest.mark.parametrize("value", ["2", "x|key", "2|", "|key", "1.5|k", "-1|k", " 2|k", "\uff12|k"])
def test_malformed_choose_is_a_400(registry: Registry, value: str) -> None:
    with pytest.raises(ApiError) as caught:
        get_service(request(choose=value), registry.snapshot)
    assert caught.value.status == 400
    assert caught.value.field == "choose"
    assert caught.value.message.startswith("failed to choose services: ")


@pytest.mark.parametrize(("value", "parsed"), [("3|k", (3, "k")), ("+1|a|b", (1, "a|b"))])
def test_parse_choose(value: str, parsed: tuple[int, str]) -> None:
    assert parse_choose(value) == parsed
    with pytest.raises(ValidationError):
        parse_choose("3")


# -- DELETE /v1/service/:name/:id ---------------------------------------------------------------


class NoChecks:
    """ApiContext's check runner, unused by these endpoints (DELETE never touches checks)."""

    def ttl_update(self, check_id: str, status: Health, note: str) -> None:
        raise AssertionError("not called")


@pytest.fixture
async def stored(tmp_path: Path, registry: Registry) -> AsyncIterator[tuple[ApiContext, Store]]:
    store = open_store(tmp_path)
    store.attach(registry)
    ctx = ApiContext(registry, store, NoChecks(), "dc1", "node1")
    yield ctx, store
    await store.close()


async def test_delete_removes_durably(stored: tuple[ApiContext, Store], tmp_path: Path) -> None:
    ctx, store = stored
    req = request("DELETE", params={"name": "web", "id": "web-2"})
    response = await delete_service(req, ctx)
    assert response.status == 200 and response.body is None
    assert response.index == ctx.registry.snapshot.index
    assert "web-2" not in ctx.registry.snapshot.instances
    assert store.stats.committed_index >= response.index  # on disk before the answer


@pytest.mark.parametrize(("name", "ident"), [("web", "nope"), ("api", "web-1"), ("nope", "web-1")])
async def test_delete_unknown_is_a_404_and_changes_nothing(
    stored: tuple[ApiContext, Store], name: str, ident: str
) -> None:
    ctx, _ = stored
    before = ctx.registry.snapshot
    with pytest.raises(ApiError) as caught:
        await delete_service(request("DELETE", params={"name": name, "id": ident}), ctx)
    assert caught.value.status == 404
    assert caught.value.field == "id"
    assert ctx.registry.snapshot is before


async def test_delete_by_name_is_case_insensitive(stored: tuple[ApiContext, Store]) -> None:
    ctx, _ = stored
    await delete_service(request("DELETE", params={"name": "WEB", "id": "web-1"}), ctx)
    assert "web-1" not in ctx.registry.snapshot.instances


def test_routes() -> None:
    table = {(r.method, r.path): r for r in ROUTES}
    assert set(table) == {
        ("GET", "/v1/services"),
        ("GET", "/v1/service/{name}"),
        ("DELETE", "/v1/service/{name}/{id}"),
    }
    watch = table["GET", "/v1/service/{name}"].watch
    assert watch is not None and list(watch(request(params={"name": "Web"}))) == ["web"]
    assert table["DELETE", "/v1/service/{name}/{id}"].write is delete_service


# -- over HTTP: a real server (tests/integration/http_fixtures.py) -------------------------------

SECRET = "nomad-write-token"
DEADLINE = 5.0  # seconds for anything on loopback


@pytest.fixture
async def nomad_api(registry: Registry) -> AsyncIterator[RunningApi]:
    instances = list(registry.snapshot.instances.values())
    async with running_api(instances=instances, routes=ROUTES) as api:
        yield api


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


async def test_http_service_list_and_registrations(
    nomad_api: RunningApi, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{nomad_api.url}/v1/services") as resp:
        assert resp.status == 200
        assert resp.headers["X-Nomad-Index"] == resp.headers["X-Consul-Index"]
        assert int(resp.headers["X-Nomad-Index"]) == nomad_api.registry.snapshot.index
        body = await resp.json()
    assert [s["ServiceName"] for s in body[0]["Services"]] == ["api", "web"]
    params = {"filter": 'Tags contains "v1" and Health != critical', "choose": "1|alloc-7"}
    async with http.get(f"{nomad_api.url}/v1/service/web", params=params) as resp:
        assert resp.status == 200
        chosen = await resp.json()
    assert len(chosen) == 1 and chosen[0]["ID"] in ("web-1", "web-3")
    async with http.get(f"{nomad_api.url}/v1/service/web", params=params) as resp:
        assert await resp.json() == chosen  # stable for the key


async def test_http_errors_are_json_naming_the_field(
    nomad_api: RunningApi, http: aiohttp.ClientSession
) -> None:
    url = f"{nomad_api.url}/v1/service/web"
    async with http.get(url, params={"filter": "Tags contains"}) as resp:
        assert resp.status == 400
        assert await resp.json() == {
            "error": "filter: expected a value, found end of filter at position 14",
            "field": "filter",
        }
    async with http.get(url, params={"choose": "many|k"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["field"] == "choose"
    async with http.post(f"{nomad_api.url}/v1/services") as resp:
        assert resp.status == 405
    async with http.delete(f"{url}/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["field"] == "id"


async def test_http_blocking_read_wakes_on_its_service_only(
    nomad_api: RunningApi, http: aiohttp.ClientSession
) -> None:
    url = f"{nomad_api.url}/v1/service/web"
    async with http.get(url) as resp:
        index = int(resp.headers["X-Nomad-Index"])
    waiting = asyncio.ensure_future(http.get(url, params={"index": str(index), "wait": "5s"}))
    await asyncio.sleep(0.1)
    nomad_api.registry.upsert(inst("api-2", "api"))  # another service: keeps waiting
    await asyncio.sleep(0.1)
    assert not waiting.done()
    nomad_api.registry.upsert(inst("web-4", port=8004))
    resp = await asyncio.wait_for(waiting, DEADLINE)
    try:
        assert resp.status == 200
        assert int(resp.headers["X-Nomad-Index"]) > index
        assert "web-4" in [r["ID"] for r in await resp.json()]
    finally:
        resp.release()


async def test_http_delete_is_durable_and_then_gone(
    nomad_api: RunningApi, http: aiohttp.ClientSession
) -> None:
    url = f"{nomad_api.url}/v1/service/web/web-2"
    async with http.delete(url) as resp:
        assert resp.status == 200
        index = int(resp.headers["X-Nomad-Index"])
        assert await resp.read() == b""
    assert index in nomad_api.store.waited  # answered after durable(index)
    assert "web-2" not in nomad_api.registry.snapshot.instances
    async with http.delete(url) as resp:
        assert resp.status == 404


async def test_http_delete_needs_a_write_token(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    acl = AclSettings(enabled=True, default_policy="read", tokens={SECRET: "write"})
    instances = list(registry.snapshot.instances.values())
    async with running_api(instances=instances, routes=ROUTES, acl=acl) as api:
        url = f"{api.url}/v1/service/web/web-1"
        async with http.get(f"{api.url}/v1/service/web") as resp:
            assert resp.status == 200  # reading needs no token with default_policy=read
        async with http.delete(url, headers={"X-Nomad-Token": "wrong-token"}) as resp:
            assert resp.status == 403
        assert "web-1" in api.registry.snapshot.instances
        async with http.delete(url, headers={"X-Nomad-Token": SECRET}) as resp:
            assert resp.status == 200
        assert "web-1" not in api.registry.snapshot.instances
