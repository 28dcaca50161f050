"""Integration fixtures: a real waypost HTTP API on 127.0.0.1 port 0.

:func:`running_api` builds what the agent builds for the API (a Registry, a
CheckRunner, an in-memory Durability) and :func:`discovery.httpapi.start_http`,
and yields a :class:`RunningApi` (`.url`, `.registry`, `.ctx`, `.server`...).
Everything it started is closed when the block ends.  Use it directly, or
through the `http_api` fixture::

    async with running_api(instances=[...], acl=AclSettings(...)) as api:
        async with aiohttp.ClientSession() as http:
            await http.get(f"{api.url}/v1/health/service/web")

The durability is in memory (every index is durable at once; the indexes
waited on are recorded), because the store has its own tests
(test_store.py, test_restart.py); everything else is the real thing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import consul
import pytest

from discovery import api_consul
from discovery.acl import AclSettings
from discovery.api import ApiContext, ChecksControl, Route
from discovery.checks import CheckRunner
from discovery.httpapi import HttpServer, StreamRoute, start_http
from discovery.model import Instance, Node
from discovery.registry import Registry

LOCAL_NODE = Node("agent", "127.0.0.1")
DATACENTER = "dc1"
# Consul's indexes start at 1; a registry at 0 would give a first registration the
# index an empty read already reported (1), and watchers would not see it change.
START_INDEX = 1


class MemoryDurability:
    """The store's `durable(index)`, for tests that do not test persistence: always durable."""

    def __init__(self) -> None:
        self.waited: list[int] = []  # every index an endpoint waited on

    async def durable(self, index: int) -> None:
        self.waited.append(index)


@dataclass
class RunningApi:
    """A running HTTP API and the state behind it."""

    server: HttpServer
    registry: Registry
    ctx: ApiContext
    store: MemoryDurability
    checks: ChecksControl

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"


@asynccontextmanager
async def running_api(
    *,
    instances: Iterable[Instance] = (),
    nodes: Iterable[Node] = (),
    acl: AclSettings | None = None,
    routes: Sequence[Route] = api_consul.ROUTES,
    streams: Sequence[StreamRoute] = (),
    node: Node = LOCAL_NODE,
    datacenter: str = DATACENTER,
) -> AsyncIterator[RunningApi]:
    """Start an API with `instances` and `nodes` in its registry; close it all at the end."""
    registry = Registry(node, index=START_INDEX)
    registry.apply(upserts=instances, nodes=nodes)
    store = MemoryDurability()
    runner = CheckRunner(registry)
    runner.start()
    ctx = ApiContext(registry, store, runner, datacenter, node.name)
    try:
        server = await start_http(
            ctx, routes, acl or AclSettings(), "127.0.0.1", 0, streams=streams
        )
        try:
            yield RunningApi(server, registry, ctx, store, runner)
        finally:
            await server.close()
    finally:
        await runner.close()


@pytest.fixture
async def http_api() -> AsyncIterator[RunningApi]:
    """An API with the Consul routes, an empty registry and ACLs off."""
    async with running_api() as api:
        yield api


@contextmanager
def sync_client(api: RunningApi, token: str | None = None) -> Iterator[consul.Consul]:
    """py-consul's sync client of `api` (call it from a thread: it blocks)."""
    client = consul.Consul(host=api.server.host, port=api.server.port, token=token)
    try:
        yield client
    finally:
        client.http.session.close()  # py-consul's close() leaves its requests session open
