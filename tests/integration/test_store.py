"""Tests of discovery.store on real SQLite files in tmp_path, with its real writer thread.

Covers: round trips through close and reopen; which sources persist; removals;
the registry index (persisted in every transaction, never backwards); group
commit (a burst costs few transactions; 1,000 changes commit in one, quickly);
durable() (in order, and only once a separate connection can read the row);
failed commits (the waiter gets StateError, the store is unhealthy, the change
is written by a later retry); and files that must be refused and left
untouched: garbage, truncated, empty, newer schema, someone else's database,
an old WAL without its database, a data dir that cannot be created, a data
dir in use.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from discovery.errors import StateError
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Alloc, Registry
from discovery.store import DB_NAME, PERSISTED_SOURCES, Restored, Store, open_store

LOCAL = Node("agent", "127.0.0.1")
DEADLINE = 10.0  # seconds for anything here; each takes milliseconds


def inst(
    ident: str, service: str = "web", *, source: str = "api", port: int = 80, checks: int = 0
) -> Instance:
    return make_instance(
        service=service,
        id=ident,
        node="agent",
        address="10.0.0.1",
        port=port,
        tags=["primary"],
        meta={"version": "1"},
        source=source,
        checks=[
            make_check(id=f"service:{ident}:{n + 1}", name=f"ttl {n}", kind=CheckKind.TTL, ttl=30)
            for n in range(checks)
        ],
    )


OpenStore = Callable[..., Store]


@pytest.fixture
async def opened() -> AsyncIterator[OpenStore]:
    """`opened(data_dir, **kw)`: open_store, closed at the end of the test."""
    stores: list[Store] = []

    def opener(data_dir: Path, **kwargs: float) -> Store:
        store = open_store(data_dir, **kwargs)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        await store.close()


async def restart(opened: OpenStore, store: Store, data_dir: Path) -> tuple[Store, Restored]:
    await store.close()
    again = opened(data_dir)
    return again, again.load()


def attached(store: Store) -> Registry:
    """A registry built from what `store` holds, as the agent does at start."""
    restored = store.load()
    registry = Registry(LOCAL, index=restored.index + 1)
    registry.upsert(*restored.instances)
    store.attach(registry)
    return registry


def rows(path: Path) -> int:
    """Instance rows, read through a separate connection (what is committed)."""
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    conn.close()
    return count


# -- round trips ------------------------------------------------------------------------


async def test_fresh_store_is_empty_and_private(tmp_path: Path, opened: OpenStore) -> None:
    data_dir = tmp_path / "a" / "data"
    store = opened(data_dir)
    assert store.load() == Restored(index=0)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert store.path == data_dir / DB_NAME
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store.healthy


async def test_round_trip_with_checks_statuses_and_allocs(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    registry.upsert(inst("web-1", checks=2), inst("web-2"), inst("job-1", "api", source="job"))
    registry.update_check("service:web-1:2", Health.PASSING, output="HTTP 200 OK")
    snap = registry.put_alloc(Alloc("0b6f2e1c", ("172.26.64.2",), "web.api[0]"))
    await store.durable(snap.index)
    expected = dict(snap.instances)

    store, restored = await restart(opened, store, tmp_path)
    assert {i.id: i for i in restored.instances} == expected
    web1 = next(i for i in restored.instances if i.id == "web-1")
    assert [(c.status, c.output) for c in web1.checks] == [
        (Health.CRITICAL, ""),
        (Health.PASSING, "HTTP 200 OK"),
    ]
    assert web1.health is Health.CRITICAL
    assert restored.allocs == (Alloc("0b6f2e1c", ("172.26.64.2",), "web.api[0]"),)
    assert restored.index >= snap.index


async def test_only_api_and_job_sources_persist(tmp_path: Path, opened: OpenStore) -> None:
    assert {"api", "job"} == PERSISTED_SOURCES
    store = opened(tmp_path)
    registry = attached(store)
    registry.upsert(
        inst("a", source="api"),
        inst("j", source="job"),
        inst("c", source="config"),
        inst("m", source="consul"),
    )
    await store.durable(registry.snapshot.index)
    _, restored = await restart(opened, store, tmp_path)
    assert sorted(i.id for i in restored.instances) == ["a", "j"]


async def test_removal_and_source_change_delete_the_row(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    registry.upsert(inst("gone"), inst("kept"), inst("to-config"), inst("renamed", "old"))
    await store.durable(registry.snapshot.index)
    assert rows(store.path) == 4
    registry.remove("gone")
    registry.upsert(inst("to-config", source="config"), inst("renamed", "new"))
    await store.durable(registry.snapshot.index)
    assert rows(store.path) == 2
    _, restored = await restart(opened, store, tmp_path)
    assert {i.id: i.service for i in restored.instances} == {"kept": "web", "renamed": "new"}


async def test_dropped_alloc_is_deleted(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    registry.put_alloc(Alloc("a1", ("172.26.64.2",)))
    registry.put_alloc(Alloc("a2", ("172.26.64.3",)))
    await store.durable(registry.drop_alloc("a1").index)
    _, restored = await restart(opened, store, tmp_path)
    assert restored.allocs == (Alloc("a2", ("172.26.64.3",)),)


async def test_pending_changes_are_written_by_close(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    for n in range(50):
        registry.upsert(inst(f"web-{n}"))
    await store.close()
    await store.close()  # idempotent
    assert rows(store.path) == 50
    with pytest.raises(StateError, match="closed"):
        await store.durable(registry.upsert(inst("late")).index)
    _, restored = await restart(opened, store, tmp_path)
    assert len(restored.instances) == 50


async def test_any_string_id_is_stored(tmp_path: Path, opened: OpenStore) -> None:
    """A JSON body can carry a lone surrogate; it must not break the writer."""
    store = opened(tmp_path)
    registry = attached(store)
    odd = replace(inst("x"), id="caf\u00e9-\ud800", meta={"k": "\udfff"})
    await store.durable(registry.upsert(odd).index)
    _, restored = await restart(opened, store, tmp_path)
    assert restored.instances == (odd,)


# -- the index ---------------------------------------------------------------------------


async def test_index_is_written_even_for_unpersisted_changes(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    for n in range(5):
        registry.upsert(inst(f"c{n}", source="config"))
    await store.durable(registry.snapshot.index)
    last = registry.snapshot.index
    _, restored = await restart(opened, store, tmp_path)
    assert restored.instances == ()
    assert restored.index == last


async def test_index_is_monotonic_across_reopens(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    seen = [0]
    for round_ in range(3):
        registry = attached(store)
        assert registry.snapshot.index > seen[-1]
        await store.durable(registry.upsert(inst(f"web-{round_}")).index)
        seen.append(registry.snapshot.index)
        store, restored = await restart(opened, store, tmp_path)
        assert restored.index == seen[-1]
        assert len(restored.instances) == round_ + 1
    assert seen == sorted(seen)


async def test_attaching_a_registry_behind_the_stored_index_is_refused(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    await store.durable(registry.upsert(inst("a"), inst("b")).index)
    store, restored = await restart(opened, store, tmp_path)
    with pytest.raises(StateError, match=f"index={restored.index + 1}"):
        store.attach(Registry(LOCAL, index=restored.index - 1))


# -- durable() and group commit -------------------------------------------------------------


async def test_durable_returns_once_a_separate_connection_sees_the_row(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    for n in range(1, 21):
        snap = registry.upsert(inst(f"web-{n}"))
        await store.durable(snap.index)
        assert rows(store.path) == n
    await store.durable(1)  # long committed: at once
    with pytest.raises(ValueError, match="ahead"):
        await store.durable(registry.snapshot.index + 1)


async def test_waiters_finish_in_index_order(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    done: list[int] = []

    async def register(n: int) -> None:
        snap = registry.upsert(inst(f"web-{n}", f"svc{n % 7}"))
        await asyncio.sleep(0)  # let others register in between
        await store.durable(snap.index)
        done.append(snap.index)

    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(register(n) for n in range(300)))
    assert done == sorted(done)
    assert len(done) == 300


async def test_group_commit_of_concurrent_registrations(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    await store.durable(registry.snapshot.index)
    before = store.stats.transactions

    async def register(n: int) -> int:
        snap = registry.upsert(inst(f"web-{n}", f"svc{n % 50}", port=n % 65536))
        await store.durable(snap.index)
        return snap.index

    async with asyncio.timeout(DEADLINE):
        indexes = await asyncio.gather(*(register(n) for n in range(2000)))
        await store.durable(max(indexes))
    transactions = store.stats.transactions - before
    assert 1 <= transactions < 2000 / 10
    assert rows(store.path) == 2000


async def test_a_thousand_pending_changes_commit_in_one_transaction(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    await store.durable(registry.snapshot.index)
    before = store.stats.transactions
    for n in range(1000):  # no await: all pending when the writer runs
        registry.upsert(inst(f"web-{n}", port=n, checks=1))
    await store.durable(registry.snapshot.index)
    stats = store.stats
    assert stats.transactions == before + 1
    assert stats.last_batch_size == 1000
    assert stats.last_commit_seconds > 0, stats  # timed (how fast: tests/bench)
    assert rows(store.path) == 1000


async def test_changes_to_one_id_coalesce(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    await store.durable(registry.snapshot.index)
    for port in range(1, 101):
        registry.upsert(inst("web-1", port=port))
    await store.durable(registry.snapshot.index)
    assert store.stats.last_batch_size == 1
    _, restored = await restart(opened, store, tmp_path)
    assert [i.port for i in restored.instances] == [100]


# -- failed commits -------------------------------------------------------------------------


async def test_failed_commit_fails_the_waiter_then_a_retry_writes_it(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path, busy_timeout=0.05)
    registry = attached(store)
    await store.durable(registry.snapshot.index)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: our commits fail
        snap = registry.upsert(inst("web-1"))
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(StateError, match=r"waypost\.db.*locked"):
                await store.durable(snap.index)
        assert not store.healthy
        assert store.stats.failures >= 1
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    snap = registry.upsert(inst("web-2"))
    async with asyncio.timeout(DEADLINE):
        await store.durable(snap.index)
    assert store.healthy
    _, restored = await restart(opened, store, tmp_path)
    assert sorted(i.id for i in restored.instances) == ["web-1", "web-2"]


# -- files that must be refused, untouched ------------------------------------------------


def refused(data_dir: Path, *patterns: str, names_db: bool = True) -> str:
    db = data_dir / DB_NAME
    with pytest.raises(StateError) as caught:
        open_store(data_dir)
    message = str(caught.value)
    assert str(data_dir) in message
    for pattern in patterns:
        assert pattern in message, message
    if names_db:
        assert str(db) in message
    return message


async def test_garbage_file_is_refused_and_untouched(tmp_path: Path) -> None:
    garbage = os.urandom(64 * 1024)
    (tmp_path / DB_NAME).write_bytes(garbage)
    refused(tmp_path, "move it away to start fresh")
    assert (tmp_path / DB_NAME).read_bytes() == garbage
    assert not (tmp_path / f"{DB_NAME}-wal").exists()


async def test_truncated_database_is_refused_and_untouched(
    tmp_path: Path, opened: OpenStore
) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    for n in range(2000):
        registry.upsert(inst(f"web-{n}", checks=1))
    await store.close()
    db = tmp_path / DB_NAME
    whole = db.read_bytes()
    assert len(whole) > 100_000  # checkpointed into the main file at close
    db.write_bytes(whole[: len(whole) // 2])
    refused(tmp_path, "move it away to start fresh")
    assert db.read_bytes() == whole[: len(whole) // 2]


async def test_empty_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"")
    refused(tmp_path, "empty")
    assert (tmp_path / DB_NAME).read_bytes() == b""


async def test_directory_in_place_of_the_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).mkdir()
    refused(tmp_path, "not a regular file")


async def test_wal_without_its_database_is_refused(tmp_path: Path) -> None:
    """A new database next to an old WAL would replay it: moving only waypost.db away."""
    wal = tmp_path / f"{DB_NAME}-wal"
    wal.write_bytes(b"old frames")
    message = refused(tmp_path, "move it away", names_db=False)
    assert str(wal) in message
    assert not (tmp_path / DB_NAME).exists()


async def test_newer_schema_is_refused(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    await store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = store.path.read_bytes()
    refused(tmp_path, "newer waypost", "schema version 99")
    assert store.path.read_bytes() == before


async def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    refused(tmp_path, "not waypost's")


async def test_unreadable_row_names_it(tmp_path: Path, opened: OpenStore) -> None:
    store = opened(tmp_path)
    registry = attached(store)
    await store.durable(registry.upsert(inst("web-1")).index)
    await store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE instances SET data = '{\"id\": 5}'")
    conn.close()
    again = opened(tmp_path)
    with pytest.raises(StateError, match=r"instance 'web-1' cannot be read \(service: missing\)"):
        again.load()


async def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    data_dir = tmp_path / "file" / "sub"
    message = refused(data_dir, "cannot create", names_db=False)
    assert message.startswith(f"data dir {data_dir}")


async def test_data_dir_in_use_by_another_store(tmp_path: Path, opened: OpenStore) -> None:
    first = opened(tmp_path)
    refused(tmp_path, "in use", names_db=False)
    await first.close()
    second = opened(tmp_path)  # the lock goes with the store
    assert second.load().index == 0
