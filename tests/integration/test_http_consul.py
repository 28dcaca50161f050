"""The Consul-shaped HTTP API on a real server, called with aiohttp's client.

Every endpoint of discovery.api_consul, its status codes, headers and errors;
blocking queries (wake on change, timeout, many waiters, keyed wake-ups,
resets); ACL tokens; body limits; streams; what the adapter counts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from discovery import api_consul
from discovery.acl import Access, AclSettings
from discovery.api import ApiError, ApiRequest, ApiResponse, Route
from discovery.httpapi import MAX_BODY, MAX_WAIT, StreamRoute, parse_blocking
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Snapshot
from tests.integration.http_fixtures import LOCAL_NODE, RunningApi, running_api

DEADLINE = 5.0  # seconds for anything that should take milliseconds on loopback
WRITE_TOKEN = "write-secret-0001"
READ_TOKEN = "read-secret-00001"


def inst(service: str, ident: str, port: int = 80, **kwargs: Any) -> Instance:
    fields: dict[str, Any] = {"node": LOCAL_NODE.name, "address": "127.0.0.1"} | kwargs
    return make_instance(service=service, id=ident, port=port, **fields)


class Client:
    """aiohttp's client against one API, returning (status, headers, decoded body)."""

    def __init__(self, api: RunningApi, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.session = session

    async def call(
        self, method: str, path: str, body: object = None, *, raw: bytes | None = None, **kw: Any
    ) -> tuple[int, Mapping[str, str], Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with asyncio.timeout(DEADLINE + MAX_WAIT / 100):
            async with self.session.request(method, self.api.url + path, data=data, **kw) as r:
                text = await r.text()
                decoded: Any = text
                if r.content_type == "application/json" and text:
                    decoded = json.loads(text)
                return r.status, r.headers, decoded

    async def get(self, path: str, **kw: Any) -> tuple[int, Mapping[str, str], Any]:
        return await self.call("GET", path, **kw)

    async def put(
        self, path: str, body: object = None, **kw: Any
    ) -> tuple[int, Mapping[str, str], Any]:
        return await self.call("PUT", path, body, **kw)

    async def register(self, body: Mapping[str, object], **kw: Any) -> None:
        status, _, answer = await self.put("/v1/agent/service/register", body, **kw)
        assert (status, answer) == (200, ""), answer


@pytest.fixture
async def api() -> AsyncIterator[RunningApi]:
    async with running_api() as running:
        yield running


@pytest.fixture
async def client(api: RunningApi) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(api, session)


async def until(condition: Callable[[], bool], within: float = DEADLINE) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polls another component's counter
            await asyncio.sleep(0.01)


# -- register and the agent endpoints ------------------------------------------------------


async def test_register_minimal_then_agent_services(client: Client) -> None:
    await client.register({"Name": "web"})
    status, headers, services = await client.get("/v1/agent/services")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert services == {
        "web": {
            "ID": "web",
            "Service": "web",
            "Tags": [],
            "Meta": {},
            "Port": 0,
            "Address": "127.0.0.1",  # the node's address when none is given
            "TaggedAddresses": {
                "lan_ipv4": {"Address": "127.0.0.1", "Port": 0},
                "wan_ipv4": {"Address": "127.0.0.1", "Port": 0},
            },
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Datacenter": "dc1",
        }
    }
    registered = client.api.registry.snapshot.instances["web"]
    assert registered.source == "api" and registered.node == "agent"
    assert client.api.store.waited == [client.api.registry.snapshot.index]  # durable before 200


async def test_register_every_field(client: Client) -> None:
    await client.register(
        {
            "Name": "web",
            "ID": "web-1",
            "Tags": ["v1", "primary", "v1"],
            "Address": "10.0.0.5",
            "Port": 8080,
            "Meta": {"version": "1.2"},
            "Weights": {"Passing": 10, "Warning": 2},
            "EnableTagOverride": False,
            "Check": {"TTL": "30s", "Notes": "pushed by the app", "Name": "alive"},
        }
    )
    _, _, services = await client.get("/v1/agent/services")
    web = services["web-1"]
    assert (web["Tags"], web["Address"], web["Port"]) == (["v1", "primary"], "10.0.0.5", 8080)
    assert web["Meta"] == {"version": "1.2"}
    assert web["Weights"] == {"Passing": 10, "Warning": 2}
    _, _, checks = await client.get("/v1/agent/checks")
    assert checks == {
        "service:web-1": {
            "Node": "agent",
            "CheckID": "service:web-1",
            "Name": "alive",
            "Status": "critical",  # TTL checks start critical, as in Consul
            "Notes": "pushed by the app",
            "Output": "",
            "ServiceID": "web-1",
            "ServiceName": "web",
            "ServiceTags": ["v1", "primary"],
            "Type": "ttl",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {
                "HTTP": "",
                "TCP": "",
                "Interval": "0s",
                "Timeout": "0s",
                "DeregisterCriticalServiceAfter": "0s",
            },
            "CreateIndex": 2,
            "ModifyIndex": 2,
        }
    }


async def test_register_keys_are_case_insensitive_with_snake_case_aliases(client: Client) -> None:
    """py-consul sends lower-case keys; Consul's decoder also takes snake_case aliases."""
    await client.register(
        {
            "name": "api",
            "id": "api-1",
            "port": 9000,
            "tags": ["x"],
            "checks": [{"ttl": "10s", "deregister_critical_service_after": "1m", "check_id": "c1"}],
            "enable_tag_override": True,
        }
    )
    check = client.api.registry.snapshot.instances["api-1"].checks[0]
    assert (check.id, check.kind, check.ttl, check.deregister_after) == (
        "c1",
        CheckKind.TTL,
        10,
        60,
    )


async def test_check_ids_default_ids_numbering_and_explicit_ids(client: Client) -> None:
    await client.register(
        {
            "Name": "db",
            "ID": "db-1",
            "Check": {"TTL": "10s"},
            "Checks": [{"TTL": "20s"}, {"TTL": "30s", "CheckID": "mine"}, {}],
        }
    )
    checks = client.api.registry.snapshot.instances["db-1"].checks
    # Consul: `service:<id>:<n>` (1-based) when there are several; an empty check is skipped.
    assert [c.id for c in checks] == ["service:db-1:1", "service:db-1:2", "mine"]
    await client.register({"Name": "one", "Checks": [{"TTL": "5s"}]})
    assert [c.id for c in client.api.registry.snapshot.instances["one"].checks] == ["service:one"]


async def test_check_status_sets_the_initial_status(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "10s", "Status": "passing"}})
    _, _, entries = await client.get("/v1/health/service/web?passing")
    assert [e["Checks"][0]["Status"] for e in entries] == ["passing"]


async def test_http_and_tcp_check_definitions(client: Client) -> None:
    target = f"127.0.0.1:{client.api.server.port}"
    await client.register(
        {
            "Name": "web",
            "Checks": [
                {"HTTP": f"http://{target}/v1/agent/services", "Interval": "10s"},
                {"TCP": target, "Interval": "15s", "Timeout": "2s", "Method": "GET"},
            ],
        }
    )
    _, _, checks = await client.get("/v1/agent/checks")
    http, tcp = checks["service:web:1"], checks["service:web:2"]
    assert (http["Type"], http["Interval"], http["Timeout"]) == ("http", "10s", "10s")
    assert http["Definition"]["HTTP"] == f"http://{target}/v1/agent/services"
    assert (tcp["Type"], tcp["Interval"], tcp["Timeout"]) == ("tcp", "15s", "2s")
    assert tcp["Definition"]["TCP"] == target


async def test_durations_as_numbers_are_nanoseconds_as_in_consul(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": 5_000_000_000}})
    assert client.api.registry.snapshot.instances["web"].checks[0].ttl == 5.0


W = {"Name": "w"}  # a valid start for bodies that are wrong further in
BAD_REGISTRATIONS: list[tuple[str, bytes | dict[str, Any], str, str]] = [
    # (case, body, field, words in the message)
    ("empty body", b"", "body", "empty"),
    ("invalid JSON", b'{"Name": "web",', "body", "not valid JSON"),
    ("not an object", b'["web"]', "body", "JSON object"),
    ("not UTF-8", b'{"Name": "\xff"}', "body", "UTF-8"),
    ("deep nesting", b"[" * 100_000, "body", "nested"),
    ("unknown field", W | {"Colour": "red"}, "Colour", "unknown field"),
    ("unsupported field", W | {"Connect": {"Native": True}}, "Connect", "not supported"),
    ("twice", b'{"Name": "web", "name": "api"}', "Name", "twice"),
    ("no name", {"Port": 80}, "Name", "non-empty"),
    ("bad name", {"Name": "web_1"}, "Name", "DNS label"),
    ("port range", W | {"Port": 70000}, "Port", "out of range"),
    ("port type", W | {"Port": "80"}, "Port", "integer"),
    ("negative port", W | {"Port": -1}, "Port", "out of range"),
    ("address", W | {"Address": "web.example"}, "Address", "IPv4 or IPv6"),
    ("tags", W | {"Tags": "a,b"}, "Tags", "list"),
    ("tag type", W | {"Tags": ["a", 1]}, "Tags[1]", "string"),
    ("meta", W | {"Meta": {"v": 1}}, "Meta.v", "string"),
    ("weights", W | {"Weights": {"Passing": 0}}, "Weights.Passing", "range"),
    ("check kinds", W | {"Check": {"TTL": "5s", "TCP": "a:1"}}, "Check", "one of"),
    ("ttl", W | {"Check": {"TTL": "soon"}}, "Check.TTL", "duration"),
    ("interval", W | {"Checks": [{"TTL": "1s"}, {"TCP": "a:1"}]}, "Checks[1].Interval", "required"),
    ("http url", W | {"Check": {"HTTP": "ftp://x", "Interval": "1s"}}, "Check.HTTP", "URL"),
    ("status", W | {"Check": {"TTL": "1s", "Status": "fine"}}, "Check.Status", "passing"),
    ("check field", W | {"Check": {"TTL": "1s", "Args": ["sh"]}}, "Check.Args", "not supported"),
    ("check unknown", W | {"Check": {"TTL": "1s", "Every": 1}}, "Check.Every", "unknown"),
    ("checks type", W | {"Checks": {"TTL": "1s"}}, "Checks", "list"),
    ("check ids", W | {"Checks": [{"TTL": "1s", "CheckID": "c"}] * 2}, "Checks", "unique"),
    ("tag override", W | {"EnableTagOverride": "yes"}, "EnableTagOverride", "boolean"),
]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [case[1:] for case in BAD_REGISTRATIONS],
    ids=[case[0] for case in BAD_REGISTRATIONS],
)
async def test_bad_registrations_are_400_naming_the_field(
    client: Client, body: bytes | dict[str, Any], field: str, words: str
) -> None:
    before = client.api.registry.snapshot
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = await client.put("/v1/agent/service/register", raw=raw)
    assert status == 400, answer
    assert answer["field"] == field
    assert answer["error"].startswith(f"{field}: ")
    assert words in answer["error"]
    assert client.api.registry.snapshot is before  # nothing applied
    assert client.api.store.waited == []


async def test_check_id_of_another_service_is_refused(client: Client) -> None:
    await client.register({"Name": "a", "Check": {"TTL": "5s", "CheckID": "shared"}})
    status, _, answer = await client.put(
        "/v1/agent/service/register", {"Name": "b", "Check": {"TTL": "5s", "CheckID": "shared"}}
    )
    assert (status, answer["field"]) == (400, "Checks")
    assert "b" not in client.api.registry.snapshot.instances


async def test_reregistering_keeps_check_state_and_unlisted_checks(client: Client) -> None:
    await client.register({"Name": "web", "Checks": [{"TTL": "30s"}, {"TTL": "30s"}]})
    assert (await client.put("/v1/agent/check/pass/service:web:1?note=up"))[0] == 200
    # Same first check, second one dropped from the request: Consul keeps it...
    await client.register({"Name": "web", "Port": 81, "Checks": [{"TTL": "30s"}, {}]})
    checks = {c.id: c for c in client.api.registry.snapshot.instances["web"].checks}
    assert (checks["service:web"].status, checks["service:web:1"].status) == (
        Health.CRITICAL,
        Health.PASSING,
    )
    assert checks["service:web:1"].output == "up"
    assert set(checks) == {"service:web", "service:web:1", "service:web:2"}
    # ...unless asked to replace them.
    status, _, _ = await client.put(
        "/v1/agent/service/register?replace-existing-checks=true",
        {"Name": "web", "Checks": [{"TTL": "30s", "CheckID": "service:web:1"}]},
    )
    assert status == 200
    checks = {c.id: c for c in client.api.registry.snapshot.instances["web"].checks}
    assert list(checks) == ["service:web:1"]
    assert checks["service:web:1"].status is Health.PASSING  # same ID and kind: state kept


async def test_deregister(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "10s"}})
    status, _, body = await client.put("/v1/agent/service/deregister/web")
    assert (status, body) == (200, "")
    assert len(client.api.registry.snapshot.instances) == 0
    assert client.api.registry.check_owner("service:web") is None
    assert client.api.store.waited[-1] == client.api.registry.snapshot.index
    status, _, body = await client.put("/v1/agent/service/deregister/web")
    assert (status, body["field"]) == (404, "id")
    assert "Unknown service ID" in body["error"]


async def test_deregister_only_the_local_agents_instances() -> None:
    remote = inst("web", "remote-1", node="other", datacenter="dc2")
    configured = inst("cfg", "cfg-1", source="config")
    # pulled from Consul, from a Consul node that has our node's name: still not ours
    pulled = inst("db", "consul/x/db-1", node=LOCAL_NODE.name, source="consul")
    async with (
        running_api(instances=[remote, configured, pulled]) as api,
        aiohttp.ClientSession() as s,
    ):
        client = Client(api, s)
        assert (await client.put("/v1/agent/service/deregister/remote-1"))[0] == 404
        assert (await client.put("/v1/agent/service/deregister/consul%2Fx%2Fdb-1"))[0] == 404
        assert "consul/x/db-1" not in (await client.get("/v1/agent/services"))[2]
        assert (await client.put("/v1/agent/service/deregister/cfg-1"))[0] == 200  # until reload
        assert sorted(api.registry.snapshot.instances) == ["consul/x/db-1", "remote-1"]


async def test_ttl_pass_warn_fail_with_note(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "30s"}})
    for action, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
        code, _, body = await client.put(f"/v1/agent/check/{action}/service:web?note=by%20{action}")
        assert (code, body) == (200, "")
        _, _, checks = await client.get("/v1/agent/checks")
        assert (checks["service:web"]["Status"], checks["service:web"]["Output"]) == (
            status,
            f"by {action}",
        )
    assert client.api.store.waited[-1] == client.api.registry.snapshot.index


async def test_check_update_endpoint(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "30s"}})
    status, _, _ = await client.put(
        "/v1/agent/check/update/service:web", {"Status": "warning", "Output": "slow"}
    )
    assert status == 200
    check = client.api.registry.snapshot.instances["web"].checks[0]
    assert (check.status, check.output) == (Health.WARNING, "slow")
    for bad, field in (({"Status": "ok"}, "Status"), ({"Status": "passing", "Out": ""}, "Out")):
        status, _, body = await client.put("/v1/agent/check/update/service:web", bad)
        assert (status, body["field"]) == (400, field)


async def test_ttl_errors(client: Client) -> None:
    target = f"127.0.0.1:{client.api.server.port}"
    await client.register({"Name": "web", "Check": {"TCP": target, "Interval": "30s"}})
    status, _, body = await client.put("/v1/agent/check/pass/nope")
    assert (status, body["field"]) == (404, "check_id")
    status, _, body = await client.put("/v1/agent/check/pass/service:web")
    assert status == 400 and "not a TTL check" in body["error"]
    status, _, body = await client.put("/v1/agent/check/update/nope", {"Status": "passing"})
    assert status == 404


# -- catalog and health --------------------------------------------------------------------

PASSING = make_check(id="p", name="p", kind=CheckKind.TTL, ttl=60, status="passing")
WARNING = make_check(id="w", name="w", kind=CheckKind.TTL, ttl=60, status="warning")
CRITICAL = make_check(id="c", name="c", kind=CheckKind.TTL, ttl=60)


def catalog() -> list[Instance]:
    return [
        inst("web", "web-1", 8001, tags=["v1", "Primary"], checks=[PASSING]),
        inst("web", "web-2", 8002, tags=["v2"], checks=[WARNING], meta={"zone": "a"}),
        inst("web", "web-3", 8003, tags=["v1"], checks=[CRITICAL]),
        inst("db", "db-1", 5432, tags=["main"]),
        inst("web", "web-remote", 8004, node="far", address="10.9.0.1", datacenter="dc2"),
    ]


@pytest.fixture
async def cat() -> AsyncIterator[Client]:
    far = Node("far", "10.9.0.1", datacenter="dc2", meta={"rack": "r9"})
    async with running_api(instances=catalog(), nodes=[far]) as api, aiohttp.ClientSession() as s:
        yield Client(api, s)


async def test_catalog_services(cat: Client) -> None:
    status, headers, body = await cat.get("/v1/catalog/services")
    assert status == 200
    assert body == {"db": ["main"], "web": ["Primary", "v1", "v2"]}
    assert headers["X-Consul-Index"] == str(cat.api.registry.snapshot.index)
    _, _, remote = await cat.get("/v1/catalog/services?dc=dc2")
    assert remote == {"web": []}
    _, _, filtered = await cat.get(
        "/v1/catalog/services", params={"filter": 'ServiceMeta.zone == "a"'}
    )
    assert filtered == {"web": ["v2"]}


async def test_catalog_service_shape_and_tags(cat: Client) -> None:
    status, _, body = await cat.get("/v1/catalog/service/web")
    assert status == 200
    assert [e["ServiceID"] for e in body] == ["web-1", "web-2", "web-3"]  # any health
    first = body[0]
    assert first == {
        "ID": api_consul.node_id("agent"),
        "Node": "agent",
        "Address": "127.0.0.1",
        "Datacenter": "dc1",
        "TaggedAddresses": {
            "lan": "127.0.0.1",
            "lan_ipv4": "127.0.0.1",
            "wan": "127.0.0.1",
            "wan_ipv4": "127.0.0.1",
        },
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": "web-1",
        "ServiceName": "web",
        "ServiceTags": ["v1", "Primary"],
        "ServiceAddress": "127.0.0.1",
        "ServiceTaggedAddresses": {
            "lan_ipv4": {"Address": "127.0.0.1", "Port": 8001},
            "wan_ipv4": {"Address": "127.0.0.1", "Port": 8001},
        },
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceMeta": {},
        "ServicePort": 8001,
        "ServiceSocketPath": "",
        "ServiceEnableTagOverride": False,
        "ServiceProxy": {"MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "CreateIndex": cat.api.registry.snapshot.service_index["web"],
        "ModifyIndex": cat.api.registry.snapshot.service_index["web"],
    }
    _, _, v1 = await cat.get("/v1/catalog/service/WEB?tag=V1")  # case-insensitive
    assert [e["ServiceID"] for e in v1] == ["web-1", "web-3"]
    _, _, both = await cat.get("/v1/catalog/service/web?tag=v1&tag=primary")  # AND-ed
    assert [e["ServiceID"] for e in both] == ["web-1"]
    status, headers, none = await cat.get("/v1/catalog/service/nothing")
    assert (status, none) == (200, [])
    assert int(headers["X-Consul-Index"]) >= 1


async def test_health_service(cat: Client) -> None:
    _, _, entries = await cat.get("/v1/health/service/web")
    assert [e["Service"]["ID"] for e in entries] == ["web-1", "web-2", "web-3"]
    assert [[c["Status"] for c in e["Checks"]] for e in entries] == [
        ["passing"],
        ["warning"],
        ["critical"],
    ]
    assert entries[0]["Node"]["Node"] == "agent"
    assert set(entries[0]) == {"Node", "Service", "Checks"}
    _, _, passing = await cat.get("/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]
    _, _, passing = await cat.get("/v1/health/service/web?passing=false")
    assert len(passing) == 3
    _, _, tagged = await cat.get("/v1/health/service/web?tag=v1&passing=1")
    assert [e["Service"]["ID"] for e in tagged] == ["web-1"]


async def test_health_service_filter(cat: Client) -> None:
    cases = {
        'Service.Meta.zone == "a"': ["web-2"],
        '"v1" in Service.Tags': ["web-1", "web-3"],
        'Checks.Status != "passing" and Service.Tags contains "v1"': ["web-3"],
        'not (Service.ID matches "^web-[12]$")': ["web-3"],
    }
    for expression, ids in cases.items():
        status, _, entries = await cat.get("/v1/health/service/web", params={"filter": expression})
        assert status == 200, (expression, entries)
        assert [e["Service"]["ID"] for e in entries] == ids, expression
    status, _, body = await cat.get("/v1/health/service/web", params={"filter": "Service.ID =="})
    assert (status, body["field"]) == (400, "filter")
    assert "position" in body["error"]


async def test_datacenters(cat: Client) -> None:
    _, _, remote = await cat.get("/v1/health/service/web?dc=dc2")
    assert [e["Service"]["ID"] for e in remote] == ["web-remote"]
    assert remote[0]["Node"]["Datacenter"] == "dc2"
    assert remote[0]["Node"]["Meta"] == {"rack": "r9"}
    _, _, local = await cat.get("/v1/health/service/web?dc=DC1")
    assert [e["Service"]["ID"] for e in local] == ["web-1", "web-2", "web-3"]
    status, _, body = await cat.get("/v1/health/service/web?dc=mars")
    assert (status, body["field"]) == (500, "dc")  # Consul: "No path to datacenter"
    _, _, racked = await cat.get("/v1/catalog/service/web?dc=dc2&node-meta=rack:r9")
    assert len(racked) == 1
    _, _, racked = await cat.get("/v1/catalog/service/web?dc=dc2&node-meta=rack:r1")
    assert racked == []
    status, _, _ = await cat.get("/v1/catalog/service/web?node-meta=rack")
    assert status == 400


async def test_health_state(cat: Client) -> None:
    for state, ids in (("passing", ["p"]), ("warning", ["w"]), ("critical", ["c"])):
        status, _, checks = await cat.get(f"/v1/health/state/{state}")
        assert (status, [c["CheckID"] for c in checks]) == (200, ids)
    _, _, every = await cat.get("/v1/health/state/any")
    assert sorted(c["CheckID"] for c in every) == ["c", "p", "w"]
    status, _, body = await cat.get("/v1/health/state/bad")
    assert (status, body["field"]) == (400, "state")


async def test_agent_health_endpoints_for_load_balancers(cat: Client) -> None:
    for ident, code, text in (("web-1", 200, "passing"), ("web-2", 429, "warning")):
        status, headers, body = await cat.get(f"/v1/agent/health/service/id/{ident}")
        assert (status, body) == (code, text)
        assert headers["Content-Type"].startswith("text/plain")
    status, _, body = await cat.get("/v1/agent/health/service/id/web-3?format=json")
    assert status == 503
    assert body["AggregatedStatus"] == "critical"
    assert body["Service"]["ID"] == "web-3"
    assert [c["CheckID"] for c in body["Checks"]] == ["c"]
    status, _, body = await cat.get("/v1/agent/health/service/name/web?format=json")
    assert status == 503  # the worst of the local instances (the remote one is not the agent's)
    assert [i["Service"]["ID"] for i in body] == ["web-1", "web-2", "web-3"]
    assert (await cat.get("/v1/agent/health/service/name/db"))[:3:2] == (200, "passing")
    for path in ("id/nope", "id/web-remote", "name/nope"):
        assert (await cat.get(f"/v1/agent/health/service/{path}"))[0] == 404


async def test_agent_services_filter(cat: Client) -> None:
    _, _, services = await cat.get("/v1/agent/services", params={"filter": 'Service == "web"'})
    assert sorted(services) == ["web-1", "web-2", "web-3"]
    _, _, services = await cat.get("/v1/agent/services")
    assert "web-remote" not in services
    _, _, checks = await cat.get("/v1/agent/checks", params={"filter": 'Status == "warning"'})
    assert list(checks) == ["w"]


# -- headers and indexes ---------------------------------------------------------------------


async def test_every_read_has_index_and_leader_headers(cat: Client) -> None:
    paths = [
        "/v1/agent/services",
        "/v1/agent/checks",
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/health/service/db",
        "/v1/health/state/any",
        "/v1/agent/health/service/name/db",
    ]
    for path in paths:
        status, headers, _ = await cat.get(path)
        assert status == 200, path
        assert headers["X-Consul-Index"] == headers["X-Nomad-Index"], path
        assert int(headers["X-Consul-Index"]) >= 1, path
        assert headers["X-Consul-KnownLeader"] == "true", path
        assert headers["X-Consul-LastContact"] == "0", path


async def test_index_of_a_service_is_its_last_change(client: Client) -> None:
    _, headers, _ = await client.get("/v1/health/service/web")
    empty = int(headers["X-Consul-Index"])
    await client.register({"Name": "web"})
    _, headers, _ = await client.get("/v1/health/service/web")
    web = int(headers["X-Consul-Index"])
    assert web > empty
    await client.register({"Name": "db"})
    _, headers, _ = await client.get("/v1/health/service/web")
    assert int(headers["X-Consul-Index"]) == web  # another service's change
    _, headers, _ = await client.get("/v1/catalog/services")
    assert int(headers["X-Consul-Index"]) == client.api.registry.snapshot.index > web
    await client.put("/v1/agent/service/deregister/web")
    _, headers, _ = await client.get("/v1/health/service/web")
    assert int(headers["X-Consul-Index"]) > web  # a removal moves it too; never backwards


async def test_create_and_modify_indexes(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "30s"}})
    created = client.api.registry.snapshot.index
    await client.register({"Name": "db"})
    await client.register({"Name": "web", "Port": 81, "Check": {"TTL": "30s"}})
    modified = client.api.registry.snapshot.index
    _, _, (entry,) = await client.get("/v1/catalog/service/web")
    assert (entry["CreateIndex"], entry["ModifyIndex"]) == (created, modified)
    _, _, (health,) = await client.get("/v1/health/service/web")
    assert (health["Service"]["CreateIndex"], health["Service"]["ModifyIndex"]) == (
        created,
        modified,
    )
    assert health["Checks"][0]["ModifyIndex"] == modified


# -- blocking queries ------------------------------------------------------------------------


async def index_of(client: Client, path: str) -> int:
    _, headers, _ = await client.get(path)
    return int(headers["X-Consul-Index"])


async def test_blocking_read_returns_on_change(client: Client) -> None:
    await client.register({"Name": "web", "Check": {"TTL": "30s"}})
    index = await index_of(client, "/v1/health/service/web")
    watch = asyncio.create_task(client.get(f"/v1/health/service/web?index={index}&wait=30s"))
    await until(lambda: client.api.server.stats.blocked == 1)
    started = time.monotonic()
    await client.put("/v1/agent/check/pass/service:web")
    status, headers, entries = await watch
    assert time.monotonic() - started < 1.0
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert entries[0]["Checks"][0]["Status"] == "passing"
    assert client.api.server.stats.blocked == 0


async def test_blocking_read_times_out_with_the_same_index(client: Client) -> None:
    await client.register({"Name": "web"})
    index = await index_of(client, "/v1/health/service/web")
    started = time.monotonic()
    status, headers, entries = await client.get(f"/v1/health/service/web?index={index}&wait=300ms")
    elapsed = time.monotonic() - started
    assert status == 200 and int(headers["X-Consul-Index"]) == index
    assert [e["Service"]["ID"] for e in entries] == ["web"]
    assert 0.3 <= elapsed < 0.3 + 0.3 / 16 + 1.0  # wait plus at most wait/16 of jitter


async def test_many_waiters_woken_by_their_change_only(client: Client) -> None:
    await client.register({"Name": "web"})
    index = await index_of(client, "/v1/health/service/web")
    path = f"/v1/health/service/web?index={index}&wait=30s"
    stats = client.api.server.stats
    # One connection per watcher (aiohttp's client pools 100 by default).
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        watching = Client(client.api, session)
        watchers = [asyncio.create_task(watching.get(path)) for _ in range(200)]
        try:
            await until(lambda: stats.blocked == 200)
            woken = stats.waiters.woken
            await client.register({"Name": "db"})  # another service: wakes none of them
            await asyncio.sleep(0.2)
            assert stats.waiters.woken == woken
            assert stats.blocked == 200 and not any(w.done() for w in watchers)
            await client.register({"Name": "web", "Port": 81})
            async with asyncio.timeout(DEADLINE):
                answers = await asyncio.gather(*watchers)
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    indexes = {int(headers["X-Consul-Index"]) for _, headers, _ in answers}
    assert indexes == {client.api.registry.snapshot.index}
    assert {entries[0]["Service"]["Port"] for _, _, entries in answers} == {81}
    assert stats.blocked == 0 and stats.waiters.woken == woken + 200


async def test_index_ahead_of_the_registry_is_a_reset(client: Client) -> None:
    current = client.api.registry.snapshot.index
    started = time.monotonic()
    status, headers, _ = await client.get(f"/v1/health/service/web?index={current + 50}&wait=10s")
    assert time.monotonic() - started < 1.0
    assert status == 200 and int(headers["X-Consul-Index"]) <= current
    status, _, _ = await client.get("/v1/catalog/services?index=0&wait=10s")  # 0: at once
    assert status == 200 and time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("index=abc", "index"),
        ("index=-1", "index"),
        ("index=1.5", "index"),
        ("index=1&wait=x", "wait"),
    ],
)
async def test_bad_blocking_parameters_are_400(client: Client, query: str, field: str) -> None:
    status, _, body = await client.get(f"/v1/catalog/services?{query}")
    assert (status, body["field"]) == (400, field)


def test_wait_defaults_and_limits() -> None:
    def blocking(**query: str) -> tuple[int, float] | None:
        req = ApiRequest("GET", "/", {}, {k: (v,) for k, v in query.items()})
        return parse_blocking(req)

    assert blocking() is None
    assert blocking(index="7") == (7, 300.0)
    assert blocking(index="7", wait="0s") == (7, 300.0)
    assert blocking(index="7", wait="1m") == (7, 60.0)
    assert blocking(index="7", wait="2h") == (7, MAX_WAIT)


async def test_a_client_that_hangs_up_leaves_no_waiter(api: RunningApi) -> None:
    url = f"{api.url}/v1/health/service/web?index={api.registry.snapshot.index}&wait=60s"
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(url))
        await until(lambda: api.server.stats.blocked == 1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await until(lambda: api.server.stats.blocked == 0)


async def test_close_answers_blocked_reads() -> None:
    async with running_api() as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        index = api.registry.snapshot.index
        watch = asyncio.create_task(client.get(f"/v1/catalog/services?index={index}&wait=60s"))
        await until(lambda: api.server.stats.blocked == 1)
        started = time.monotonic()
        await api.server.close()
        status, _, body = await watch
        assert (status, body) == (200, {})
        assert time.monotonic() - started < 2.0


# -- one read per change -----------------------------------------------------------------------


async def test_reads_are_encoded_once_per_index() -> None:
    calls: list[int] = []

    def counted(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        calls.append(snap.index)
        return ApiResponse({"n": len(snap.instances), "q": sorted(req.query)})

    route = Route("GET", "/v1/counted", Access.READ, read=counted, watch=lambda _: ("*",))
    unwatched = Route("GET", "/v1/live", Access.READ, read=counted)  # may read more than snap
    routes = (*api_consul.ROUTES, route, unwatched)
    async with running_api(routes=routes) as api, aiohttp.ClientSession() as s:
        client = Client(api, s)
        for _ in range(5):
            assert (await client.get("/v1/counted?index=0"))[2] == {"n": 0, "q": ["index"]}
        assert len(calls) == 1  # index/wait are not part of the cache key...
        await client.get("/v1/counted?x=1")
        assert len(calls) == 2  # ...the rest of the query is
        await client.register({"Name": "web"})
        assert (await client.get("/v1/counted"))[2]["n"] == 1
        assert len(calls) == 3
        for _ in range(3):
            await client.get("/v1/live")
        assert len(calls) == 6  # reads without watch keys are not cached


# -- tokens -------------------------------------------------------------------------------------

ACL = AclSettings(enabled=True, tokens={WRITE_TOKEN: "write", READ_TOKEN: "read"})


async def test_acl_writes_need_a_write_token() -> None:
    async with running_api(acl=ACL) as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        body = {"Name": "web"}
        for headers in ({}, {"X-Consul-Token": READ_TOKEN}, {"X-Consul-Token": "wrong-token-123"}):
            status, _, answer = await client.put(
                "/v1/agent/service/register", body, headers=headers
            )
            assert (status, answer) == (403, {"error": "Permission denied"})
        assert len(api.registry.snapshot.instances) == 0 and api.store.waited == []
        status, _, _ = await client.put(f"/v1/agent/service/register?token={READ_TOKEN}", body)
        assert status == 403
        ways: list[dict[str, Any]] = [
            {"headers": {"X-Consul-Token": WRITE_TOKEN}},
            {"headers": {"X-Nomad-Token": WRITE_TOKEN}},
            {"headers": {"Authorization": f"Bearer {WRITE_TOKEN}"}},
            {"params": {"token": WRITE_TOKEN}},
        ]
        for way in ways:
            await client.register(body, **way)
            assert list(api.registry.snapshot.instances) == ["web"]
            assert (await client.put("/v1/agent/service/deregister/web", **way))[0] == 200
            assert len(api.registry.snapshot.instances) == 0


async def test_acl_reads() -> None:
    async with running_api(acl=ACL) as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        assert (await client.get("/v1/catalog/services"))[0] == 403
        ok = {"X-Consul-Token": READ_TOKEN}
        assert (await client.get("/v1/catalog/services", headers=ok))[0] == 200
    readable = AclSettings(enabled=True, default_policy="read", tokens={WRITE_TOKEN: "write"})
    async with running_api(acl=readable) as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        assert (await client.get("/v1/catalog/services"))[0] == 200
        assert (await client.put("/v1/agent/service/register", {"Name": "web"}))[0] == 403


async def test_tokens_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    def boom(req: ApiRequest, snap: Snapshot) -> ApiResponse:
        raise RuntimeError("read failed")

    route = Route("GET", "/v1/boom", Access.READ, read=boom)
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's included
    async with running_api(acl=ACL, routes=(route,)) as api, aiohttp.ClientSession() as s:
        client = Client(api, s)
        status, _, body = await client.get(f"/v1/boom?token={READ_TOKEN}")
        assert status == 500 and "internal error" in body["error"]
        status, _, _ = await client.get("/v1/boom", headers={"X-Consul-Token": WRITE_TOKEN})
        assert status == 500  # and still serving
    assert "RuntimeError: read failed" in caplog.text
    assert "/v1/boom" in caplog.text
    assert READ_TOKEN not in caplog.text and WRITE_TOKEN not in caplog.text


# -- limits, unknown routes, counters -------------------------------------------------------------


async def test_body_over_1_mib_is_413(client: Client) -> None:
    body = json.dumps({"Name": "web", "Meta": {"pad": "x" * MAX_BODY}}).encode()
    async with client.session.put(
        f"{client.api.url}/v1/agent/service/register", data=io.BytesIO(body)
    ) as response:
        status, answer = response.status, await response.json()
    assert (status, answer["field"]) == (413, "body")
    assert len(client.api.registry.snapshot.instances) == 0


async def test_unknown_routes_and_wrong_methods(client: Client) -> None:
    status, headers, body = await client.get("/v1/agent/nothing")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert "no such endpoint" in body["error"]
    status, headers, body = await client.call("DELETE", "/v1/agent/services")
    assert status == 405 and headers["Allow"] == "GET"
    assert "not allowed" in body["error"]
    status, _, _ = await client.get("/v1/agent/service/register")
    assert status == 405


async def test_requests_are_counted_by_route_and_status(client: Client) -> None:
    await client.register({"Name": "web"})
    await client.get("/v1/health/service/web")
    await client.get("/v1/health/service/db")
    await client.get("/v1/health/service/web?index=x")
    await client.get("/nope")
    counts = client.api.server.stats.requests
    assert counts["PUT", "/v1/agent/service/register", 200] == 1
    assert counts["GET", "/v1/health/service/{name}", 200] == 2
    assert counts["GET", "/v1/health/service/{name}", 400] == 1
    assert counts["GET", "<unmatched>", 404] == 1


# -- streams ------------------------------------------------------------------------------------


async def test_stream_routes() -> None:
    endless = asyncio.Event()

    async def numbers(req: ApiRequest, send: Callable[[bytes], Any]) -> None:
        count = int(req.arg("count", "3") or 3)
        if count < 0:
            raise ApiError(400, "count: must not be negative", "count")
        for n in range(count):
            await send(b'{"n":%d}\n' % n)
        if req.flag("forever"):
            endless.set()
            await asyncio.Event().wait()  # until the server closes

    streams = [StreamRoute("/v1/numbers", numbers)]
    async with running_api(acl=ACL, streams=streams) as api, aiohttp.ClientSession() as s:
        client = Client(api, s)
        ok = {"X-Consul-Token": READ_TOKEN}
        status, headers, body = await client.get("/v1/numbers", headers=ok)
        assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
        assert [json.loads(line) for line in body.splitlines()] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert (await client.get("/v1/numbers"))[0] == 403
        status, _, body = await client.get("/v1/numbers?count=-1", headers=ok)
        assert (status, body["field"]) == (400, "count")
        async with s.get(f"{api.url}/v1/numbers?forever", headers=ok) as response:
            assert await response.content.readline() == b'{"n":0}\n'
            await asyncio.wait_for(endless.wait(), DEADLINE)
            started = time.monotonic()
            await api.server.close()  # cancels the stream
            assert time.monotonic() - started < 2.0
