"""Consul's node-level endpoints and the node and datacenter helpers of the Consul API.  Pure.

What a Consul client asks a local agent before (or instead of) asking about
services: who the agent is, whether there is a leader, which datacenters and
nodes exist:

    GET /v1/agent/self            GET /v1/status/leader   GET /v1/status/peers
    GET /v1/catalog/datacenters   GET /v1/catalog/nodes

and what :mod:`discovery.api_consul` shares with them: the requested datacenter
(`?dc=`), the node of an instance, Consul's `Node` shape, `?node-meta=` and
`?filter=`.

waypost is a single agent that is its own (only) server: it is the leader of
its datacenter and its only peer.  Consul reports servers by their RPC address
(port 8300); waypost has no RPC port, so it reports the local node's address
with Consul's server port, ``"<address>:8300"``: a value of the shape clients
parse, that names this node, and that nothing listens on.  `/v1/status/*` need
no token, as in Consul; `/v1/catalog/datacenters` neither (Consul: ACL none).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from discovery.acl import Access
from discovery.api import WATCH_ALL, ApiError, ApiRequest, ApiResponse, Read, Route
from discovery.errors import ValidationError
from discovery.filter import parse_filter_arg
from discovery.model import Instance, Node
from discovery.registry import Snapshot

Json = dict[str, Any]
# Node IDs are UUIDs in Consul; ours are derived from the node name so they are stable.
NODE_ID_NAMESPACE = uuid.UUID("5b8f1d4e-7c1a-4f5e-9a57-2f0c6d3b9e10")
# Nodes carry no indexes of their own here; a node is as old as the agent's view of it.
NODE_INDEX = 1
# Consul's server RPC port: the port of the addresses /v1/status/* report (see above).
CONSUL_SERVER_PORT = 8300
# The Consul release whose API shapes waypost follows (Consul 1.17 CE).  Clients compare
# Config.Version as a semantic version to turn features on; waypost's own version (0.x)
# would read as a Consul too old for them.  Config.Revision says it is waypost.
CONSUL_API_VERSION = "1.17.0"
REVISION = "waypost"
# serf's member status "alive" (github.com/hashicorp/serf/serf.MemberStatus).
MEMBER_ALIVE = 1


def api_error(status: int, field: str, message: str) -> ApiError:
    """An ApiError whose text starts with the field it names ("Port: ...")."""
    return ApiError(status, f"{field}: {message}", field)


# -- where: datacenter, node, selection ---------------------------------------------


def local_datacenter(req: ApiRequest) -> str:
    """The agent's datacenter (lower case), as the adapter set it on the request."""
    return req.datacenter


def chosen_datacenter(req: ApiRequest, snap: Snapshot) -> str:
    """`?dc=` or the local datacenter; an unknown one is Consul's 500 "No path to datacenter"."""
    local = local_datacenter(req)
    wanted = (req.arg("dc") or local).lower()
    if wanted != local and not known_datacenter(snap, wanted):
        raise api_error(500, "dc", f"No path to datacenter {wanted!r}")
    return wanted


def known_datacenter(snap: Snapshot, dc: str) -> bool:
    return any(n.datacenter.lower() == dc for n in snap.nodes.values()) or any(
        i.datacenter.lower() == dc for i in snap.instances.values()
    )


def in_datacenter(inst: Instance, dc: str, local: str) -> bool:
    return (inst.datacenter.lower() or local) == dc


def node_of(snap: Snapshot, inst: Instance) -> Node:
    """The node `inst` runs on (one made from the instance when the registry has none)."""
    found = snap.nodes.get(inst.node.lower())
    return found if found is not None else Node(inst.node, inst.address, inst.datacenter)


def nodes_in(snap: Snapshot, dc: str, local: str) -> list[Node]:
    """Every node of datacenter `dc`, by name: the registry's and those only instances name."""
    found: dict[str, Node] = {}
    for node in snap.nodes.values():
        if (node.datacenter.lower() or local) == dc:
            found[node.name.lower()] = node
    for inst in snap.instances.values():
        if inst.node.lower() not in found and in_datacenter(inst, dc, local):
            found[inst.node.lower()] = node_of(snap, inst)
    return [found[name] for name in sorted(found)]


def parse_node_meta(req: ApiRequest) -> list[tuple[str, str]]:
    """`?node-meta=key:value` (repeatable) as pairs; a value without ':' is a 400."""
    pairs = []
    for value in req.query.get("node-meta", ()):
        key, sep, wanted = value.partition(":")
        if not sep or not key:
            raise api_error(400, "node-meta", f'{value!r} is not "key:value"')
        pairs.append((key, wanted))
    return pairs


def has_meta(node: Node, pairs: Iterable[tuple[str, str]]) -> bool:
    return all(node.meta.get(key) == value for key, value in pairs)


def filtered(req: ApiRequest, items: Iterable[Json]) -> list[Json]:
    """`items` that pass `?filter=`; a bad filter is a 400 naming its position."""
    try:
        expr = parse_filter_arg(req.arg("filter"))
        return [item for item in items if expr is None or expr.matches(item)]
    except ValidationError as err:
        raise ApiError.invalid(err) from None


# -- Consul's JSON shapes ---------------------------------------------------------------


def node_id(name: str) -> str:
    """A stable UUID for a node (Consul's node IDs are UUIDs)."""
    return str(uuid.uuid5(NODE_ID_NAMESPACE, name.lower()))


def address_family(address: str) -> str:
    return "ipv6" if ":" in address else "ipv4"


def render_node(node: Node, dc: str) -> Json:
    """Consul's Node (catalog/nodes, and the `Node` of a health ServiceEntry)."""
    family = address_family(node.address)
    addr = node.address
    return {
        "ID": node_id(node.name),
        "Node": node.name,
        "Address": addr,
        "Datacenter": dc,
        "TaggedAddresses": {"lan": addr, f"lan_{family}": addr, "wan": addr, f"wan_{family}": addr},
        "Meta": dict(node.meta),
        "CreateIndex": NODE_INDEX,
        "ModifyIndex": NODE_INDEX,
    }


def server_address(node: Node) -> str:
    """This agent as Consul names a server: "ip:8300" ("[ip6]:8300"); see the module doc."""
    host = f"[{node.address}]" if ":" in node.address else node.address
    return f"{host}:{CONSUL_SERVER_PORT}"


def local_node(snap: Snapshot) -> Node:
    found = snap.nodes.get(snap.local_node.lower())
    return found if found is not None else Node(snap.local_node, "")


def render_self(node: Node, dc: str) -> Json:
    """GET /v1/agent/self's body: the fields clients read (Config, Member, Meta)."""
    config = {
        "Datacenter": dc,
        "PrimaryDatacenter": dc,
        "NodeName": node.name,
        "NodeID": node_id(node.name),
        "Revision": REVISION,
        "Server": True,  # its own (only) server: /v1/status/leader names it
        "Version": CONSUL_API_VERSION,
    }
    member = {
        "Name": node.name,
        "Addr": node.address,
        "Port": 0,  # serf's LAN port in Consul; waypost has no gossip
        "Tags": {"dc": dc, "id": node_id(node.name), "role": "node"},
        "Status": MEMBER_ALIVE,
    }
    return {"Config": config, "Member": member, "Meta": dict(node.meta)}


# -- reads --------------------------------------------------------------------------------


def agent_self(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/agent/self: the agent's datacenter, node name and ID, version; its node meta."""
    return ApiResponse(render_self(local_node(snap), local_datacenter(req)))


def status_leader(_req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/status/leader: this agent, "ip:8300" (never "": a leader is always known)."""
    return ApiResponse(server_address(local_node(snap)))


def status_peers(_req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/status/peers: the servers of the datacenter: this agent alone."""
    return ApiResponse([server_address(local_node(snap))])


def catalog_datacenters(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/catalog/datacenters: the local one first, then those mirrored from Consul."""
    local = local_datacenter(req)
    others = {n.datacenter.lower() for n in snap.nodes.values()}
    others |= {i.datacenter.lower() for i in snap.instances.values()}
    return ApiResponse([local, *sorted(others - {"", local})])


def catalog_nodes(req: ApiRequest, snap: Snapshot) -> ApiResponse:
    """GET /v1/catalog/nodes: every node of the datacenter, by name (`?node-meta=`, `?filter=`)."""
    dc = chosen_datacenter(req, snap)
    pairs = parse_node_meta(req)
    nodes = [n for n in nodes_in(snap, dc, local_datacenter(req)) if has_meta(n, pairs)]
    return ApiResponse(filtered(req, (render_node(n, dc) for n in nodes)))


def _everything(_req: ApiRequest) -> tuple[str, ...]:
    return (WATCH_ALL,)


def _get(path: str, read: Read, access: Access = Access.READ) -> Route:
    return Route("GET", path, access, read=read)


ROUTES: tuple[Route, ...] = (
    _get("/v1/agent/self", agent_self),
    _get("/v1/status/leader", status_leader, Access.NONE),
    _get("/v1/status/peers", status_peers, Access.NONE),
    _get("/v1/catalog/datacenters", catalog_datacenters, Access.NONE),
    Route("GET", "/v1/catalog/nodes", Access.READ, read=catalog_nodes, watch=_everything),
)
