"""Tests of discovery.registry: the single owner and its immutable snapshots.  State, no I/O.

Each change publishes one snapshot with a higher index; a write that changes
nothing publishes nothing; old snapshots never change; subscribers learn the
service keys that changed.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from discovery.errors import NotFoundError
from discovery.model import Health, Instance, Node, make_instance
from discovery.registry import Alloc, Registry, Snapshot

LOCAL = Node("agent", "127.0.0.1")


def inst(ident: str, service: str = "web", *, source: str = "api", port: int = 80) -> Instance:
    return make_instance(
        service=service, id=ident, node="node1", address="10.0.0.1", port=port, source=source
    )


class Recorder:
    """A subscriber that keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, frozenset[str]]] = []

    def __call__(self, snapshot: Snapshot, changed: frozenset[str]) -> None:
        self.calls.append((snapshot.index, changed))


@pytest.fixture
def registry() -> Registry:
    return Registry(LOCAL)


def test_initial_snapshot(registry: Registry) -> None:
    snap = registry.snapshot
    assert snap.index == 0
    assert dict(snap.instances) == {}
    assert dict(snap.services) == {}
    assert dict(snap.nodes) == {"agent": LOCAL}
    assert snap.local_node == "agent"
    assert registry.local_node is LOCAL
    assert Registry(LOCAL, index=41).snapshot.index == 41


def test_index_increases_with_every_change(registry: Registry) -> None:
    indexes = [registry.snapshot.index]
    steps = [
        lambda: registry.upsert(inst("a")),
        lambda: registry.upsert(inst("b", "api")),
        lambda: registry.upsert(inst("a", port=81)),
        lambda: registry.set_health("a", Health.WARNING),
        lambda: registry.remove("b"),
        lambda: registry.apply(nodes=[Node("node1", "10.0.0.1")]),
        lambda: registry.put_alloc(Alloc("x1", ("10.0.0.9",))),
        lambda: registry.drop_alloc("x1"),
        lambda: registry.replace_source("config", [inst("c", source="config")]),
    ]
    for step in steps:
        snap = step()
        assert snap is registry.snapshot
        indexes.append(snap.index)
    assert indexes == sorted(set(indexes))  # strictly increasing
    assert indexes == list(range(len(steps) + 1))  # one per change


def test_snapshot_contents(registry: Registry) -> None:
    b = inst("b", "Web")
    a = inst("a", "web")
    c = inst("c", "api")
    snap = registry.upsert(b, a, c)
    assert snap.instances["a"] == a
    assert (snap.instances["a"].create_index, snap.instances["a"].modify_index) == (1, 1)
    assert set(snap.instances) == {"a", "b", "c"}
    assert snap.services["web"] == (a, b)  # by lower-case name, ordered by id
    assert snap.service("WEB") == (a, b)
    assert snap.service("api") == (c,)
    assert snap.service("none") == ()
    assert snap.service_index["web"] == snap.service_index["api"] == snap.index


def test_snapshots_are_immutable(registry: Registry) -> None:
    snap = registry.upsert(inst("a"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.index = 9  # type: ignore[misc]
    for mapping in (snap.instances, snap.services, snap.nodes, snap.allocs, snap.service_index):
        with pytest.raises(TypeError):
            mapping["x"] = None  # type: ignore[index]


def test_old_snapshots_unchanged_by_later_writes(registry: Registry) -> None:
    a = inst("a")
    registry.put_alloc(Alloc("x1", ("10.0.0.9",)))
    old = registry.upsert(a, inst("b", "api"))
    frozen = (
        old.index,
        dict(old.instances),
        dict(old.services),
        dict(old.nodes),
        dict(old.allocs),
        dict(old.service_index),
    )
    registry.upsert(inst("a", port=99), inst("c"))
    registry.remove("b")
    registry.set_health("a", Health.CRITICAL)
    registry.apply(nodes=[Node("agent", "127.0.0.2"), Node("node9", "10.0.0.9")])
    registry.drop_alloc("x1")
    registry.put_alloc(Alloc("x2", ()))
    assert frozen == (
        old.index,
        dict(old.instances),
        dict(old.services),
        dict(old.nodes),
        dict(old.allocs),
        dict(old.service_index),
    )
    assert old.instances["a"] == a
    assert old.instances["a"].modify_index == old.index  # not the later writes' index
    assert registry.snapshot.index > old.index


def test_upsert_replaces_by_id_and_moves_between_services(registry: Registry) -> None:
    registry.upsert(inst("a", "web"))
    snap = registry.upsert(inst("a", "api", port=81))
    assert snap.instances["a"].service == "api"
    assert "web" not in snap.services  # a service with no instance left disappears
    assert snap.service("api")[0].port == 81


def test_remove(registry: Registry) -> None:
    registry.upsert(inst("a"), inst("b"))
    snap = registry.remove("a")
    assert set(snap.instances) == {"b"}
    assert [i.id for i in snap.service("web")] == ["b"]
    snap = registry.remove("b")
    assert dict(snap.instances) == {}
    assert "web" not in snap.services


def test_remove_unknown_raises_and_changes_nothing(registry: Registry) -> None:
    registry.upsert(inst("a"), inst("b"))
    before = registry.snapshot
    seen = Recorder()
    registry.subscribe(seen)
    with pytest.raises(NotFoundError, match="nope"):
        registry.remove("nope")
    with pytest.raises(NotFoundError):
        registry.remove("a", "nope")  # all or nothing: "a" stays
    assert registry.snapshot is before
    assert set(registry.snapshot.instances) == {"a", "b"}
    assert seen.calls == []


def test_apply_ignores_unknown_removals(registry: Registry) -> None:
    before = registry.upsert(inst("a"))
    assert registry.apply(removals=["nope"]) is before


def test_set_health(registry: Registry) -> None:
    registry.upsert(inst("a"))
    snap = registry.set_health("a", Health.WARNING)
    assert snap.instances["a"].health is Health.WARNING
    assert snap.instances["a"].port == 80
    assert snap.service("web")[0].health is Health.WARNING
    with pytest.raises(NotFoundError, match="nope"):
        registry.set_health("nope", Health.PASSING)
    assert registry.snapshot is snap


def test_replace_source(registry: Registry) -> None:
    registry.upsert(inst("api-1", source="api"))
    registry.replace_source("config", [inst("c1", source="config"), inst("c2", source="config")])
    assert set(registry.snapshot.instances) == {"api-1", "c1", "c2"}
    node = Node("node7", "10.0.0.7")
    snap = registry.replace_source(
        "config", [inst("c2", source="config", port=8), inst("c3", source="config")], [node]
    )
    # c1 gone, c2 replaced, c3 added, other sources untouched, nodes added
    assert set(snap.instances) == {"api-1", "c2", "c3"}
    assert snap.instances["c2"].port == 8
    assert snap.nodes["node7"] == node
    snap = registry.replace_source("config", [])
    assert set(snap.instances) == {"api-1"}
    # the same set again is not a change
    assert registry.replace_source("config", []) is snap


def test_replace_source_is_one_change(registry: Registry) -> None:
    registry.replace_source("config", [inst("c1", "a", source="config")])
    seen = Recorder()
    registry.subscribe(seen)
    before = registry.snapshot.index
    registry.replace_source("config", [inst("c2", "b", source="config")])
    assert seen.calls == [(before + 1, frozenset({"a", "b"}))]


def test_nodes_by_lower_case_name(registry: Registry) -> None:
    snap = registry.apply(nodes=[Node("Node1", "10.0.0.1")])
    assert snap.nodes["node1"].name == "Node1"
    snap = registry.apply(nodes=[Node("node1", "10.0.0.2")])
    assert snap.nodes["node1"].address == "10.0.0.2"


def test_allocs(registry: Registry) -> None:
    alloc = Alloc("a1", ("172.26.64.2",), name="web.web[0]")
    snap = registry.put_alloc(alloc)
    assert snap.allocs["a1"] == alloc
    snap = registry.drop_alloc("a1")
    assert "a1" not in snap.allocs


# -- no-op writes ----------------------------------------------------------------------


def test_noop_writes_do_not_bump_the_index(registry: Registry) -> None:
    a = inst("a")
    registry.upsert(a)
    registry.apply(nodes=[Node("node1", "10.0.0.1")])
    registry.put_alloc(Alloc("x1", ("10.0.0.9",)))
    seen = Recorder()
    registry.subscribe(seen)
    snap = registry.snapshot
    assert registry.upsert(a) is snap
    assert registry.upsert(inst("a")) is snap  # an equal value
    assert registry.apply() is snap
    assert registry.set_health("a", Health.PASSING) is snap
    assert registry.apply(nodes=[Node("node1", "10.0.0.1")]) is snap
    assert registry.apply(nodes=[LOCAL]) is snap
    assert registry.put_alloc(Alloc("x1", ("10.0.0.9",))) is snap
    assert registry.drop_alloc("nope") is snap
    assert registry.replace_source("config", []) is snap
    assert registry.snapshot is snap
    assert seen.calls == []


# -- subscribers ----------------------------------------------------------------------------


def test_subscribers_get_the_changed_keys(registry: Registry) -> None:
    seen = Recorder()
    registry.subscribe(seen)
    registry.upsert(inst("a", "Web"), inst("b", "api"))
    registry.upsert(inst("a", "Web", port=81))
    registry.upsert(inst("a", "db"))  # moved: both services changed
    registry.set_health("b", Health.CRITICAL)
    registry.remove("b")
    registry.apply(nodes=[Node("node1", "10.0.0.1")])  # no service changed
    registry.put_alloc(Alloc("x1", ()))
    assert seen.calls == [
        (1, frozenset({"web", "api"})),
        (2, frozenset({"web"})),
        (3, frozenset({"web", "db"})),
        (4, frozenset({"api"})),
        (5, frozenset({"api"})),
        (6, frozenset()),
        (7, frozenset()),
    ]


def test_subscriber_sees_the_published_snapshot(registry: Registry) -> None:
    got: list[tuple[Snapshot, Snapshot]] = []
    registry.subscribe(lambda snap, _keys: got.append((snap, registry.snapshot)))
    published = registry.upsert(inst("a"))
    assert got == [(published, published)]


def test_unsubscribe(registry: Registry) -> None:
    seen = Recorder()
    stop = registry.subscribe(seen)
    registry.upsert(inst("a"))
    stop()
    registry.upsert(inst("b"))
    assert [index for index, _ in seen.calls] == [1]


def test_failing_subscriber_does_not_break_the_writer(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_snap: Snapshot, _keys: frozenset[str]) -> None:
        raise RuntimeError("subscriber bug")

    seen = Recorder()
    registry.subscribe(broken)
    registry.subscribe(seen)
    with caplog.at_level(logging.ERROR, logger="discovery.registry"):
        snap = registry.upsert(inst("a"))
    assert registry.snapshot is snap
    assert seen.calls == [(1, frozenset({"web"}))]
    assert "subscriber bug" in caplog.text


def test_subscriber_may_unsubscribe_while_called(registry: Registry) -> None:
    calls: list[int] = []

    def once(snap: Snapshot, _keys: frozenset[str]) -> None:
        calls.append(snap.index)
        stop()

    stop = registry.subscribe(once)
    registry.upsert(inst("a"))
    registry.upsert(inst("b"))
    assert calls == [1]


def test_service_index_moves_only_for_changed_services(registry: Registry) -> None:
    registry.upsert(inst("a", "web"), inst("b", "api"))
    snap = registry.upsert(inst("a", "web", port=81))
    assert snap.service_index["web"] == snap.index
    assert snap.service_index["api"] == snap.index - 1
    snap = registry.remove("b")
    assert snap.service_index["api"] == snap.index  # removal is a change of the service
    assert snap.service_index["web"] == snap.index - 1


def checked(ident: str, *checks: tuple[str, Health]) -> Instance:
    from discovery.model import CheckKind, make_check

    return make_instance(
        service="web",
        id=ident,
        node="node1",
        address="10.0.0.1",
        port=80,
        checks=[
            make_check(id=cid, name=cid, kind=CheckKind.TTL, ttl=10.0, status=status)
            for cid, status in checks
        ],
    )


def test_health_is_the_worst_check(registry: Registry) -> None:
    registry.upsert(checked("a", ("c1", Health.PASSING), ("c2", Health.WARNING)))
    assert registry.snapshot.instances["a"].health is Health.WARNING
    registry.update_check("c2", Health.CRITICAL, output="down")
    current = registry.snapshot.instances["a"]
    assert current.health is Health.CRITICAL
    assert [(c.id, c.status, c.output) for c in current.checks] == [
        ("c1", Health.PASSING, ""),
        ("c2", Health.CRITICAL, "down"),
    ]
    registry.update_check("c2", Health.PASSING)
    assert registry.snapshot.instances["a"].health is Health.PASSING
    assert registry.snapshot.instances["a"].checks[1].output == "down"  # kept when not given


def test_update_check_without_change_publishes_nothing(registry: Registry) -> None:
    registry.upsert(checked("a", ("c1", Health.PASSING)))
    before = registry.snapshot
    assert registry.update_check("c1", Health.PASSING) is before
    assert registry.update_check("c1", Health.PASSING, output="") is before
    assert registry.update_check("c1", Health.PASSING, output="ok").index == before.index + 1


def test_check_owner_follows_upserts_and_removals(registry: Registry) -> None:
    registry.upsert(checked("a", ("c1", Health.PASSING)))
    owner = registry.check_owner("c1")
    assert owner is not None and owner.id == "a"
    registry.upsert(checked("a", ("c2", Health.PASSING)))  # re-registered with another check
    assert registry.check_owner("c1") is None
    with pytest.raises(NotFoundError):
        registry.update_check("c1", Health.CRITICAL)
    registry.remove("a")
    assert registry.check_owner("c2") is None
    with pytest.raises(NotFoundError, match="c2"):
        registry.update_check("c2", Health.CRITICAL)


def test_create_and_modify_indexes(registry: Registry) -> None:
    registry.upsert(inst("a"))
    registry.upsert(inst("b"))
    snap = registry.upsert(inst("a", port=81))
    a = snap.instances["a"]
    assert (a.create_index, a.modify_index) == (1, 3)
    assert registry.upsert(inst("a", port=81)) is snap  # equal: indexes are not compared
    moved = registry.upsert(inst("a", "api", port=81)).instances["a"]
    assert (moved.create_index, moved.modify_index) == (4, 4)  # a new service: created anew


def test_update_checks_is_one_change_and_skips_unknown_ids(registry: Registry) -> None:
    registry.upsert(checked("a", ("a1", Health.PASSING)), checked("b", ("b1", Health.PASSING)))
    before = registry.snapshot.index
    snap = registry.update_checks(
        {
            "a1": (Health.CRITICAL, "down"),
            "b1": (Health.WARNING, None),
            "gone": (Health.PASSING, ""),
        }
    )
    assert snap.index == before + 1
    assert snap.instances["a"].health is Health.CRITICAL
    assert snap.instances["a"].checks[0].output == "down"
    assert snap.instances["b"].health is Health.WARNING
    assert registry.update_checks({"gone": (Health.PASSING, "")}) is snap  # nothing to do
