"""Consul's node-level reads and agent/service's ContentHash, as pure functions of a snapshot."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from discovery import api_consul, api_consul_node
from discovery.api import ApiError, ApiRequest
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Registry, Snapshot

LOCAL = Node("agent", "127.0.0.1")


def request(
    path: str = "/", params: Mapping[str, str] | None = None, **query: Sequence[str]
) -> ApiRequest:
    return ApiRequest("GET", path, dict(params or {}), dict(query))


def inst(ident: str, service: str = "web", port: int = 80, **kwargs: Any) -> Instance:
    fields: dict[str, Any] = {"node": "agent", "address": "127.0.0.1"} | kwargs
    return make_instance(service=service, id=ident, port=port, **fields)


def snapshot(*instances: Instance, nodes: Sequence[Node] = (), local: Node = LOCAL) -> Snapshot:
    registry = Registry(local, index=1)
    registry.apply(upserts=instances, nodes=nodes)
    return registry.snapshot


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "127.0.0.1:8300"),
        ("10.1.2.3", "10.1.2.3:8300"),
        ("::1", "[::1]:8300"),
        ("fd00::7", "[fd00::7]:8300"),
    ],
)
def test_server_address(address: str, expected: str) -> None:
    assert api_consul_node.server_address(Node("n", address)) == expected
    snap = snapshot(local=Node("n", address))
    assert api_consul_node.status_leader(request(), snap).body == expected
    assert api_consul_node.status_peers(request(), snap).body == [expected]


def test_render_self() -> None:
    body = api_consul_node.render_self(Node("Box", "10.0.0.1", meta={"k": "v"}), "dc9")
    assert body["Config"]["Datacenter"] == body["Config"]["PrimaryDatacenter"] == "dc9"
    assert body["Config"]["NodeName"] == "Box"
    assert body["Config"]["NodeID"] == api_consul_node.node_id("box")  # stable, case-blind
    assert body["Config"]["Version"] == "1.17.0" and body["Config"]["Revision"] == "waypost"
    assert body["Member"]["Addr"] == "10.0.0.1" and body["Meta"] == {"k": "v"}


@pytest.mark.parametrize(
    ("instances", "nodes", "expected"),
    [
        ((), (), ["dc1"]),
        ((inst("x", datacenter="dc3"),), (Node("n", "10.0.0.1", "DC2"),), ["dc1", "dc2", "dc3"]),
        ((inst("x", datacenter="dc1"),), (), ["dc1"]),  # the local one once
    ],
)
def test_catalog_datacenters(
    instances: Sequence[Instance], nodes: Sequence[Node], expected: list[str]
) -> None:
    snap = snapshot(*instances, nodes=nodes)
    assert api_consul_node.catalog_datacenters(request(), snap).body == expected


def test_nodes_in_includes_nodes_only_instances_name() -> None:
    snap = snapshot(
        inst("a", node="zed", address="10.0.0.5"),
        inst("b", node="far", address="10.9.0.1", datacenter="dc2"),
        nodes=[Node("peer", "10.0.0.7")],
    )
    names = [n.name for n in api_consul_node.nodes_in(snap, "dc1", "dc1")]
    assert names == ["agent", "peer", "zed"]
    assert [n.name for n in api_consul_node.nodes_in(snap, "dc2", "dc1")] == ["far"]


def test_catalog_nodes_node_meta_and_unknown_dc() -> None:
    snap = snapshot(nodes=[Node("peer", "10.0.0.7", meta={"rack": "r1"})])
    body = api_consul_node.catalog_nodes(request(**{"node-meta": ["rack:r1"]}), snap).body
    assert isinstance(body, list) and [n["Node"] for n in body] == ["peer"]
    with pytest.raises(ApiError) as err:
        api_consul_node.catalog_nodes(request(dc=["nowhere"]), snap)
    assert err.value.status == 500


def test_content_hash_follows_the_definition_not_the_health() -> None:
    ttl = make_check(id="t", name="t", kind=CheckKind.TTL, ttl=10, status="passing")
    base = inst("web-1", checks=[ttl])
    failing = dataclasses.replace(
        base, checks=(dataclasses.replace(ttl, status=Health.CRITICAL, output="down"),)
    )
    moved = inst("web-1", port=81, checks=[ttl])
    req = request(params={"id": "web-1"})

    def digest(i: Instance) -> str:
        response = api_consul.agent_service(req, snapshot(i))
        assert isinstance(response.body, dict)
        assert response.headers[api_consul.CONTENT_HASH] == response.body["ContentHash"]
        return str(response.body["ContentHash"])

    assert digest(base) == digest(base) == digest(failing)
    assert digest(moved) != digest(base)
    assert len(digest(base)) == api_consul.HASH_DIGITS


def test_agent_service_only_the_local_agents() -> None:
    snap = snapshot(inst("mine"), inst("theirs", node="peer", address="10.0.0.7"))
    assert api_consul.agent_service(request(params={"id": "mine"}), snap).status == 200
    for ident in ("theirs", "nope"):
        with pytest.raises(ApiError) as err:
            api_consul.agent_service(request(params={"id": ident}), snap)
        assert err.value.status == 404 and err.value.field == "id"


def test_catalog_node_unknown_is_json_null() -> None:
    response = api_consul.catalog_node(request(params={"node": "nope"}), snapshot())
    assert response is api_consul.JSON_NULL and response.body == "null"
    assert response.headers["Content-Type"] == "application/json"


def test_health_checks_ignores_passing_and_tag() -> None:
    checks = [
        make_check(id=f"c{n}", name="c", kind=CheckKind.TTL, ttl=10, status=s)
        for n, s in enumerate(("passing", "critical"))
    ]
    snap = snapshot(inst("w1", checks=[checks[0]], tags=["a"]), inst("w2", checks=[checks[1]]))
    req = request(params={"name": "web"}, passing=[""], tag=["a"])
    body = api_consul.health_checks(req, snap).body
    assert isinstance(body, list) and [c["CheckID"] for c in body] == ["c0", "c1"]
