"""Tests of discovery.events: registry changes as Nomad-style events.  State, no sockets.

The diff of one service's instances (table), the log's index arithmetic
(since, floor, capacity), topics, and subscriptions on a real Registry:
debounce coalescing, heartbeats, resuming from an index, resynchronising
with a snapshot when history is gone or a consumer falls behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from discovery import events
from discovery.events import (
    DEREGISTRATION,
    HEALTH_CHANGED,
    REGISTRATION,
    EventLog,
    Subscription,
    Topics,
    diff_service,
    parse_topics,
)
from discovery.model import Check, CheckKind, Health, Instance, Node, make_instance
from discovery.registry import Registry

NODE = Node("node1", "127.0.0.1")
STEP = 0.05  # seconds; the timing tests wait a few of these at most


def inst(ident: str = "web-1", service: str = "web", **changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": service,
        "id": ident,
        "node": "node1",
        "address": "10.0.0.1",
        "port": 8080,
        "tags": ["v1"],
        "meta": {"env": "prod"},
    }
    return make_instance(**{**fields, **changes})


def kinds(found: list[events.Event]) -> list[tuple[str, str]]:
    return [(e.type, e.instance_id) for e in found]


CHECK = Check("service:web-1", "web", CheckKind.TTL, ttl=10.0, status=Health.PASSING)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ([], [inst()], [(REGISTRATION, "web-1")]),
        ([inst()], [], [(DEREGISTRATION, "web-1")]),
        ([inst()], [inst()], []),
        ([inst()], [inst(port=9090)], [(REGISTRATION, "web-1")]),
        ([inst()], [inst(tags=["v2"])], [(REGISTRATION, "web-1")]),
        ([inst()], [inst(meta={"env": "dev"})], [(REGISTRATION, "web-1")]),
        ([inst()], [inst(health=Health.CRITICAL)], [(HEALTH_CHANGED, "web-1")]),
        ([inst(checks=[CHECK])], [inst(checks=[dataclasses.replace(CHECK, output="ok")])], []),
        (
            [inst(checks=[CHECK])],
            [inst(checks=[dataclasses.replace(CHECK, status=Health.WARNING)])],
            [(HEALTH_CHANGED, "web-1")],
        ),
        ([inst()], [inst(health=Health.WARNING, port=1)], [(REGISTRATION, "web-1")]),
        (
            [inst("web-2"), inst("web-1")],
            [inst("web-3"), inst("web-1", port=1)],
            [(REGISTRATION, "web-1"), (DEREGISTRATION, "web-2"), (REGISTRATION, "web-3")],
        ),
    ],
)
def test_diff_of_one_service(
    old: list[Instance], new: list[Instance], expected: list[tuple[str, str]]
) -> None:
    assert kinds(diff_service(old, new, 7, "dc1")) == expected


def test_event_is_in_nomads_shape() -> None:
    [event] = diff_service([], [inst(alloc_id="a1b2")], 42, "dc9")
    assert event.index == 42
    body = event.json
    assert body["Topic"] == "Service"
    assert body["Type"] == "ServiceRegistration"
    assert body["Key"] == "web-1"
    assert body["Namespace"] == "default"
    assert body["FilterKeys"] == ["", "web"]
    assert body["Index"] == 42
    service = body["Payload"]["Service"]
    assert service["ID"] == "web-1"
    assert service["ServiceName"] == "web"
    assert service["Address"] == "10.0.0.1"
    assert service["Port"] == 8080
    assert service["Tags"] == ["v1"]
    assert service["AllocID"] == "a1b2"
    assert service["Datacenter"] == "dc9"
    assert service["Health"] == "passing"
    assert service["Meta"] == {"env": "prod"}
    assert service["ModifyIndex"] == 42


def test_deregistration_carries_what_was_removed() -> None:
    [event] = diff_service([inst(port=1234)], [], 3, "dc1")
    assert event.json["Type"] == "ServiceDeregistration"
    assert event.json["Payload"]["Service"]["Port"] == 1234


@pytest.mark.parametrize(
    ("values", "allowed", "denied"),
    [
        ([], ["web-1", "api-1"], []),
        (["*"], ["web-1", "api-1"], []),
        (["Service"], ["web-1", "api-1"], []),
        (["Service:*"], ["web-1", "api-1"], []),
        (["*:*"], ["web-1", "api-1"], []),
        (["Service:web"], ["web-1", "web-2"], ["api-1"]),
        (["Service:WEB"], ["web-1"], ["api-1"]),
        (["Service:api-1"], ["api-1"], ["web-1"]),  # by instance ID (Nomad's Key)
        (["Service:web", "Service:api"], ["web-1", "api-1"], []),
        (["Job:*"], [], ["web-1", "api-1"]),  # topics we have no events for
        (["Job:*", "Service:api"], ["api-1"], ["web-1"]),
    ],
)
def test_topics(values: list[str], allowed: list[str], denied: list[str]) -> None:
    topics = parse_topics(values)

    def event(ident: str) -> events.Event:
        return diff_service([], [inst(ident, ident.partition("-")[0])], 1, "dc1")[0]

    assert all(topics.allows(event(i)) for i in allowed)
    assert not any(topics.allows(event(i)) for i in denied)


# -- the log ----------------------------------------------------------------------------


def test_log_follows_the_registry_and_resumes_from_an_index() -> None:
    registry = Registry(NODE, index=10)
    log = EventLog(registry)
    assert log.floor == 10
    a = registry.upsert(inst("web-1"))  # 11
    b = registry.upsert(inst("web-2"), inst("api-1", "api"))  # 12
    registry.set_health("web-1", Health.CRITICAL)  # 13
    registry.remove("web-2")  # 14
    assert (a.index, b.index) == (11, 12)
    everything = log.since(10)
    assert everything is not None
    assert [(e.index, e.type, e.instance_id) for e in everything] == [
        (11, REGISTRATION, "web-1"),
        (12, REGISTRATION, "api-1"),
        (12, REGISTRATION, "web-2"),
        (13, HEALTH_CHANGED, "web-1"),
        (14, DEREGISTRATION, "web-2"),
    ]
    later = log.since(12)
    assert later is not None and [e.index for e in later] == [13, 14]
    assert log.since(14) == []
    assert log.since(9) is None  # before the log started: resynchronise
    assert log.since(15) is None  # ahead of the registry (a reset): resynchronise
    log.close()


def test_changes_without_instance_events_are_not_logged() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    registry.apply(nodes=[Node("node2", "10.0.0.2")])
    assert log.since(0) == []
    log.close()


def test_log_capacity_drops_the_oldest_and_raises_the_floor() -> None:
    registry = Registry(NODE)
    log = EventLog(registry, capacity=3)
    for port in range(1, 6):  # indexes 1..5, one event each
        registry.upsert(inst(port=port))
    assert log.floor == 2
    assert log.since(1) is None
    kept = log.since(2)
    assert kept is not None and [e.index for e in kept] == [3, 4, 5]
    log.close()


def test_snapshot_line_lists_every_instance() -> None:
    registry = Registry(NODE)
    log = EventLog(registry, datacenter="dc2")
    registry.upsert(inst("web-1"), inst("web-2"), inst("api-1", "api"))
    registry.remove("web-2")
    line = log.snapshot_line()
    assert line["Index"] == 2
    assert line["Snapshot"] is True
    assert [(e["Type"], e["Key"]) for e in line["Events"]] == [
        (REGISTRATION, "api-1"),
        (REGISTRATION, "web-1"),
    ]
    assert line["Events"][0]["Payload"]["Service"]["Datacenter"] == "dc2"
    only_api = log.snapshot_line(parse_topics(["Service:api"]))
    assert [e["Key"] for e in only_api["Events"]] == ["api-1"]
    log.close()


# -- subscriptions -------------------------------------------------------------------------


async def next_line(sub: Subscription, **kwargs: float) -> dict[str, Any] | None:
    return await asyncio.wait_for(sub.next(**kwargs), 5.0)


async def test_changes_within_the_debounce_become_one_line() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    task = asyncio.ensure_future(next_line(sub, debounce=4 * STEP))
    registry.upsert(inst("web-1"))
    await asyncio.sleep(STEP)
    registry.upsert(inst("web-2"))
    line = await task
    assert line is not None
    assert line["Index"] == 2
    assert [e["Key"] for e in line["Events"]] == ["web-1", "web-2"]
    sub.close()
    log.close()


async def test_without_debounce_each_change_is_a_line() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    task = asyncio.ensure_future(next_line(sub, debounce=0))
    await asyncio.sleep(0)
    registry.upsert(inst("web-1"))
    first = await task
    registry.upsert(inst("web-2"))
    second = await next_line(sub, debounce=0)
    assert first is not None and second is not None
    assert [e["Key"] for e in first["Events"]] == ["web-1"]
    assert [e["Key"] for e in second["Events"]] == ["web-2"]
    sub.close()
    log.close()


async def test_a_storm_is_rate_limited_by_the_debounce() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    lines: list[dict[str, Any]] = []

    async def consume() -> None:
        while len(lines) < 100:
            line = await sub.next(debounce=3 * STEP, heartbeat=60)
            assert line is not None
            lines.append(line)

    consumer = asyncio.ensure_future(consume())
    started = time.monotonic()
    port = 0
    while time.monotonic() - started < 12 * STEP:  # a change every millisecond or so
        port += 1
        registry.upsert(inst(port=port))
        await asyncio.sleep(0.001)
    await asyncio.sleep(4 * STEP)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    assert port > 20
    # ~12 steps of storm / 3 steps of debounce: a handful of lines, not one per change
    assert 1 <= len(lines) <= 6, len(lines)
    assert sum(len(line["Events"]) for line in lines) == port  # nothing lost
    sub.close()
    log.close()


async def test_heartbeat_when_nothing_happens() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    started = time.monotonic()
    assert await next_line(sub, heartbeat=STEP) == {}
    assert time.monotonic() - started >= STEP * 0.9
    sub.close()
    log.close()


async def test_subscribe_from_an_index_replays_then_follows() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    registry.upsert(inst("web-1"))  # 1
    registry.upsert(inst("web-2"))  # 2
    sub = log.subscribe(1)
    replay = await next_line(sub, debounce=0)
    assert replay is not None
    assert replay["Index"] == 2 and [e["Key"] for e in replay["Events"]] == ["web-2"]
    registry.remove("web-1")
    live = await next_line(sub, debounce=0)
    assert live is not None and live["Events"][0]["Type"] == DEREGISTRATION
    sub.close()
    log.close()


async def test_subscribe_from_a_lost_index_starts_with_a_snapshot() -> None:
    registry = Registry(NODE, index=100)  # as after a restart
    registry.upsert(inst("web-1"))
    log = EventLog(registry)
    registry.upsert(inst("web-2"))
    for stale in (5, 500):  # before the log; ahead of the registry
        sub = log.subscribe(stale)
        line = await next_line(sub, debounce=0)
        assert line is not None
        assert line["Snapshot"] is True
        assert line["Index"] == 102
        assert [e["Key"] for e in line["Events"]] == ["web-1", "web-2"]
        sub.close()
    log.close()


async def test_topics_filter_the_subscription() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe(topics=Topics(frozenset({"api"})))
    registry.upsert(inst("web-1"))
    registry.upsert(inst("api-1", "api"))
    line = await next_line(sub, debounce=0)
    assert line is not None
    assert [e["Key"] for e in line["Events"]] == ["api-1"]
    assert line["Index"] == 2
    sub.close()
    log.close()


async def test_a_consumer_that_falls_behind_is_resynchronised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "MAX_PENDING", 5)
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    for port in range(1, 8):
        registry.upsert(inst(port=port))
    line = await next_line(sub, debounce=0)
    assert line is not None and line["Snapshot"] is True
    assert [e["Payload"]["Service"]["Port"] for e in line["Events"]] == [7]
    sub.close()
    log.close()


async def test_closing_the_log_ends_every_subscription() -> None:
    registry = Registry(NODE)
    log = EventLog(registry)
    sub = log.subscribe()
    waiting = asyncio.ensure_future(next_line(sub, heartbeat=60))
    await asyncio.sleep(0)
    assert log.subscribers == 1
    log.close()
    assert await waiting is None
    assert log.subscribers == 0
    assert sub.closed
    registry.upsert(inst())  # no longer followed: nothing breaks
    assert await next_line(sub) is None
