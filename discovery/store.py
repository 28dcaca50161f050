"""Durable state in SQLite: the persisted instances, allocations and registry index.  Adapter.

The only module that imports sqlite3.  One database, ``<data_dir>/waypost.db``,
in WAL mode with ``synchronous=FULL``::

    store = open_store(data_dir)       # sync; checks the file, never replaces it
    restored = store.load()            # sync, before the loop serves
    registry = Registry(node, index=restored.index + 1)
    registry.upsert(*restored.instances)
    store.attach(registry)             # from now on every change is queued
    await store.durable(snap.index)    # returns once the change is on disk
    await store.close()

What persists: instances whose source is in :data:`PERSISTED_SOURCES` ("api",
"job"), with their checks, statuses and outputs; allocation addresses (`allocs`);
the registry index (in every transaction, so it never goes backwards across
restarts); and the jobs and allocations of the snapshot (``jobs`` and
``allocations`` tables, as discovery.workload renders them; read back as text by
:meth:`Store.load_workload`, parsed by their owner; added to existing databases on
open, so the schema version stays 1).  A run or stop writes its records first,
in a transaction of its own (:meth:`Store.write_ahead`), and publishes them after.
"config" instances are re-read from the config files, "consul" ones re-pulled.

Writing: the connection is created, used and closed by one thread only (a
``ThreadPoolExecutor`` of one worker).  Registry changes are coalesced per id
on the event loop; group commit: while one transaction commits, later changes
gather and go in the next one, so a burst of N registrations costs a few
fsyncs, not N.

Error handling: a database that cannot be opened, read, or that fails
``PRAGMA quick_check``, or was written by a newer schema, raises
:class:`~discovery.errors.StateError` naming the file and what to do; the
file is opened read-only for those checks, so it is never modified.  A failed
commit fails the :meth:`Store.durable` waiters it covered, marks the store
unhealthy, and puts its changes back in the queue; the writer retries with
backoff (a later success writes them, and the store is healthy again).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from discovery.errors import StateError
from discovery.model import Check, CheckKind, Health, Instance, Weights
from discovery.registry import Alloc, Registry, Snapshot, work_keys_allocs, work_keys_jobs
from discovery.workload import Allocation, Job, render_alloc_record, render_job_record

log = logging.getLogger(__name__)

PERSISTED_SOURCES = frozenset({"api", "job"})
DB_NAME = "waypost.db"
LOCK_NAME = "waypost.lock"  # flock'ed while a store is open: one agent per data dir
SCHEMA_VERSION = 1  # PRAGMA user_version of the tables below
DIR_MODE = 0o700  # registrations may carry secrets in meta
BUSY_TIMEOUT = 5.0  # seconds to wait for a lock held by another connection (sqlite3 CLI...)
RETRY_FIRST = 0.1  # seconds before retrying a failed commit; doubles up to RETRY_MAX
RETRY_MAX = 5.0
# With its -wal and -shm files: a new database next to an old WAL would replay it.
_FRESH_START = (
    "move it away to start fresh, with its -wal and -shm files (its registrations are then lost)"
)

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # id: the UTF-8 of the id (surrogates passed through: any Python str is a valid id here)
    "CREATE TABLE instances (id BLOB PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE allocs (id BLOB PRIMARY KEY, data TEXT NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('index', 0)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
# max(): the stored index never goes backwards, whatever registry is attached.
_SET_INDEX = (
    "INSERT INTO meta (key, value) VALUES ('index', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_UPSERT = (
    "INSERT INTO {table} (id, data) VALUES (?, ?)"
    " ON CONFLICT (id) DO UPDATE SET data = excluded.data"
)
_DELETE = "DELETE FROM {table} WHERE id = ?"
# Added after schema version 1 shipped: created on open when missing (older waypost
# versions ignore the table, so the version does not change).
_JOBS_TABLE = "CREATE TABLE IF NOT EXISTS jobs (id BLOB PRIMARY KEY, data TEXT NOT NULL)"
_ALLOCATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS allocations (id BLOB PRIMARY KEY, data TEXT NOT NULL)"
)

_T = TypeVar("_T")


# -- serialization (pure) ------------------------------------------------------------


def render_instance(inst: Instance) -> str:
    """An instance (with its checks and their state) as compact JSON."""
    return _dumps(
        {
            "service": inst.service,
            "id": inst.id,
            "node": inst.node,
            "address": inst.address,
            "port": inst.port,
            "tags": list(inst.tags),
            "meta": dict(inst.meta),
            "ports": dict(inst.ports),
            "weights": [inst.weights.passing, inst.weights.warning],
            "priority": inst.priority,
            "health": inst.health.value,
            "datacenter": inst.datacenter,
            "alloc_id": inst.alloc_id,
            # Only when set: rows of other instances stay as they were, and rows
            # written before the field existed read back with "".
            **({"job_id": inst.job_id} if inst.job_id else {}),
            "source": inst.source,
            "checks": [_check_fields(c) for c in inst.checks],
            "create_index": inst.create_index,
            "modify_index": inst.modify_index,
        }
    )


def _check_fields(check: Check) -> dict[str, object]:
    return {
        "id": check.id,
        "name": check.name,
        "kind": check.kind.value,
        "target": check.target,
        "ttl": check.ttl,
        "interval": check.interval,
        "timeout": check.timeout,
        "deregister_after": check.deregister_after,
        "status": check.status.value,
        "output": check.output,
        "notes": check.notes,
    }


def parse_instance(text: str) -> Instance:
    """The inverse of :func:`render_instance`.

    Error handling: raises ValueError naming the field when `text` is not a
    rendered instance.
    """
    f = _Fields(_loads(text), "")
    return Instance(
        service=f.text("service"),
        id=f.text("id"),
        node=f.text("node"),
        address=f.text("address"),
        port=f.integer("port"),
        tags=tuple(f.texts("tags")),
        meta=MappingProxyType(f.mapping("meta", str)),
        ports=MappingProxyType(f.mapping("ports", int)),
        weights=Weights(*f.integers("weights", 2)),
        priority=f.integer("priority"),
        health=Health(f.text("health")),
        datacenter=f.text("datacenter"),
        alloc_id=f.text("alloc_id"),
        job_id=f.text("job_id", ""),
        source=f.text("source"),
        checks=tuple(_parse_check(c) for c in f.objects("checks")),
        create_index=f.integer("create_index", 0),
        modify_index=f.integer("modify_index", 0),
    )


def _parse_check(f: _Fields) -> Check:
    return Check(
        id=f.text("id"),
        name=f.text("name"),
        kind=CheckKind(f.text("kind")),
        target=f.text("target"),
        ttl=f.number("ttl"),
        interval=f.number("interval"),
        timeout=f.number("timeout"),
        deregister_after=f.optional_number("deregister_after"),
        status=Health(f.text("status")),
        output=f.text("output"),
        notes=f.text("notes"),
    )


def render_alloc(alloc: Alloc) -> str:
    return _dumps({"id": alloc.id, "addresses": list(alloc.addresses), "name": alloc.name})


def parse_alloc(text: str) -> Alloc:
    """The inverse of :func:`render_alloc`; ValueError naming the field if it is not one."""
    f = _Fields(_loads(text), "")
    return Alloc(id=f.text("id"), addresses=tuple(f.texts("addresses")), name=f.text("name"))


def _dumps(value: object) -> str:
    # ASCII only: a lone surrogate in a string (valid JSON input) is escaped, not an error.
    return json.dumps(value, separators=(",", ":"))


def _key(ident: str) -> bytes:
    return ident.encode("utf-8", "surrogatepass")


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class _Fields:
    """Typed reads from a decoded JSON object; a wrong type raises ValueError naming the key."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix

    def _get(self, key: str, kind: type[_T] | tuple[type, ...], default: _T | None = None) -> _T:
        if key not in self._data:
            if default is not None:  # a field added after the row was written
                return default
            raise ValueError(f"{self._prefix}{key}: missing")
        value = self._data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{self._prefix}{key}: {value!r} has the wrong type")
        return value  # type: ignore[return-value]

    def text(self, key: str, default: str | None = None) -> str:
        return self._get(key, str, default)

    def integer(self, key: str, default: int | None = None) -> int:
        return self._get(key, int, default)

    def number(self, key: str) -> float:
        return float(self._get(key, (int, float)))

    def optional_number(self, key: str) -> float | None:
        return None if self._data.get(key, 0) is None else self.number(key)

    def texts(self, key: str) -> list[str]:
        items: list[Any] = self._get(key, list)
        if not all(isinstance(i, str) for i in items):
            raise ValueError(f"{self._prefix}{key}: must hold strings")
        return items

    def integers(self, key: str, length: int) -> list[int]:
        items: list[Any] = self._get(key, list)
        if len(items) != length or not all(type(i) is int for i in items):
            raise ValueError(f"{self._prefix}{key}: must hold {length} integers")
        return items

    def mapping(self, key: str, kind: type[_T]) -> dict[str, _T]:
        items: dict[str, Any] = self._get(key, dict)
        if not all(type(v) is kind for v in items.values()):
            raise ValueError(f"{self._prefix}{key}: values must be {kind.__name__}")
        return items

    def objects(self, key: str) -> list[_Fields]:
        items: list[Any] = self._get(key, list)
        if not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{self._prefix}{key}: must hold objects")
        return [_Fields(item, f"{self._prefix}{key}[{n}].") for n, item in enumerate(items)]


# -- opening (runs in the writer thread) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Restored:
    """What a store held: build ``Registry(node, index=index + 1)`` and upsert the instances."""

    index: int
    instances: tuple[Instance, ...] = ()
    allocs: tuple[Alloc, ...] = ()


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"data dir {directory}: cannot create it: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StateError(f"data dir {directory} is not writable")


def _lock_dir(directory: Path) -> int:
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"data dir {directory} is not writable: {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StateError(
            f"data dir {directory} is in use by another waypost (it holds {path})"
        ) from exc
    return fd


def _check_existing(path: Path) -> None:
    """Read-only checks of a database file that is already there; StateError if unusable."""
    if not path.is_file():
        raise StateError(f"{path} is not a regular file; {_FRESH_START}")
    if path.stat().st_size == 0:
        raise StateError(f"{path} is empty (truncated?); {_FRESH_START}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"{path} cannot be opened: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{path} was written by a newer waypost (schema version {version}, this one"
                f" knows up to {SCHEMA_VERSION}); run that version, or {_FRESH_START}"
            )
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StateError(f"{path} is corrupt ({'; '.join(problems)}); {_FRESH_START}")
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if version == 0 and tables:
            raise StateError(f"{path} is an SQLite database but not waypost's; {_FRESH_START}")
    except sqlite3.Error as exc:
        raise StateError(
            f"{path} cannot be read as a waypost database ({exc}); {_FRESH_START}"
        ) from exc
    finally:
        conn.close()


def _open_db(path: Path, busy_timeout: float) -> tuple[sqlite3.Connection, int]:
    """Open (creating it if absent) and return the connection and the stored index."""
    if path.exists() or path.is_symlink():
        _check_existing(path)
    else:
        for suffix in ("-wal", "-shm"):
            orphan = path.with_name(path.name + suffix)
            if orphan.exists():
                raise StateError(f"{orphan} is there without {path}; move it away to start fresh")
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise StateError(f"{path} cannot be opened: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
        conn.execute(_JOBS_TABLE)
        conn.execute(_ALLOCATIONS_TABLE)
        conn.execute("COMMIT")
        index = conn.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
    except (sqlite3.Error, StateError) as exc:
        conn.close()
        if isinstance(exc, StateError):
            raise
        raise StateError(f"{path} cannot be used: {exc}; is the data dir writable?") from exc
    return conn, int(index[0]) if index else 0


def _load_db(conn: sqlite3.Connection, path: Path) -> Restored:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
        instance_rows = conn.execute("SELECT id, data FROM instances ORDER BY id").fetchall()
        alloc_rows = conn.execute("SELECT id, data FROM allocs ORDER BY id").fetchall()
    except sqlite3.Error as exc:
        raise StateError(f"{path} cannot be read: {exc}; {_FRESH_START}") from exc
    return Restored(
        index=int(row[0]) if row else 0,
        instances=tuple(_parse_row(path, "instance", r, parse_instance) for r in instance_rows),
        allocs=tuple(_parse_row(path, "allocation", r, parse_alloc) for r in alloc_rows),
    )


def _parse_row(path: Path, what: str, row: tuple[object, object], parse: Callable[[str], _T]) -> _T:
    key, data = row
    name = key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else key
    try:
        if not isinstance(data, str):
            raise TypeError(f"data is {type(data).__name__}, not text")
        return parse(data)
    except (ValueError, TypeError) as exc:
        raise StateError(f"{path}: {what} {name!r} cannot be read ({exc}); {_FRESH_START}") from exc


# -- writing (runs in the writer thread) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Batch:
    """Changes coalesced per id (None: delete) and the registry index they bring the disk to."""

    index: int
    instances: Mapping[str, Instance | None]
    allocs: Mapping[str, Alloc | None]
    jobs: Mapping[str, Job | None] = field(default_factory=dict)
    allocations: Mapping[str, Allocation | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.instances) + len(self.allocs) + len(self.jobs) + len(self.allocations)


def _write_rows(
    conn: sqlite3.Connection,
    table: str,
    changes: Mapping[str, _T | None],
    render: Callable[[_T], str],
) -> None:
    deletes = [(_key(ident),) for ident, value in changes.items() if value is None]
    upserts = [
        (_key(ident), render(value)) for ident, value in changes.items() if value is not None
    ]
    if deletes:
        conn.executemany(_DELETE.format(table=table), deletes)
    if upserts:
        conn.executemany(_UPSERT.format(table=table), upserts)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT around the block; rolled back if the block or COMMIT fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _write_batch(conn: sqlite3.Connection, path: Path, batch: _Batch) -> float:
    """Commit one batch in one transaction; returns the seconds it took.  StateError if not."""
    start = time.perf_counter()
    try:
        with _transaction(conn):
            _write_rows(conn, "instances", batch.instances, render_instance)
            _write_rows(conn, "allocs", batch.allocs, render_alloc)
            _write_rows(conn, "jobs", batch.jobs, render_job_record)
            _write_rows(conn, "allocations", batch.allocations, render_alloc_record)
            if batch.index:
                conn.execute(_SET_INDEX, (batch.index,))
    except Exception as exc:  # sqlite3.Error; anything else is a bug, logged with its trace
        if not isinstance(exc, sqlite3.Error):
            log.exception("%s: writing index %d failed", path, batch.index)
        raise StateError(
            f"{path}: cannot commit {batch.size} changes up to index {batch.index}: {exc}"
        ) from exc
    return time.perf_counter() - start


def _load_texts(conn: sqlite3.Connection, path: Path, table: str) -> dict[str, str]:
    try:
        rows = conn.execute(f"SELECT id, data FROM {table} ORDER BY id").fetchall()
    except sqlite3.Error as exc:
        raise StateError(f"{path} cannot be read: {exc}; {_FRESH_START}") from exc
    out: dict[str, str] = {}
    for key, data in rows:
        name = key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else str(key)
        out[name] = _parse_row(path, table[:-1], (key, data), _text)
    return out


def _load_workload(conn: sqlite3.Connection, path: Path) -> tuple[dict[str, str], dict[str, str]]:
    return _load_texts(conn, path, "jobs"), _load_texts(conn, path, "allocations")


def _text(value: str) -> str:
    return value


# -- the store (event loop side) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters for health and metrics."""

    committed_index: int
    transactions: int
    failures: int
    last_commit_seconds: float
    last_batch_size: int


@dataclass(slots=True)
class _Counters:
    transactions: int = 0
    failures: int = 0
    last_commit_seconds: float = 0.0
    last_batch_size: int = 0


def open_store(data_dir: str | Path, *, busy_timeout: float = BUSY_TIMEOUT) -> Store:
    """Open (or create) the store in `data_dir` (created with mode 0700 if missing).

    Error handling: StateError naming the data dir or the database file when
    it cannot be created, written, read, or is corrupt; nothing is replaced.
    """
    directory = Path(data_dir)
    _ensure_dir(directory)
    lock = _lock_dir(directory)
    path = directory / DB_NAME
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waypost-store")
    try:
        conn, index = executor.submit(_open_db, path, busy_timeout).result()
    except BaseException:
        executor.shutdown()
        os.close(lock)
        raise
    return Store(path, conn, index, executor, lock)


class Store:
    """The open database and its writer.  Build it with :func:`open_store`."""

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        index: int,
        executor: ThreadPoolExecutor,
        lock: int,
    ) -> None:
        self.path = path
        self._conn = conn  # used in the executor's thread only
        self._executor = executor
        self._lock = lock
        self._committed = index  # highest registry index on disk
        self._seen = index  # highest registry index queued
        self._last: Snapshot | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._instances: dict[str, Instance | None] = {}
        self._allocs: dict[str, Alloc | None] = {}
        self._jobs: dict[str, Job | None] = {}
        self._allocations: dict[str, Allocation | None] = {}
        self._dirty = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by index
        self._order = itertools.count()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._closer: asyncio.Future[None] | None = None
        self._finished = False  # closing, and the last write is over: nothing more is written
        self._healthy = True
        self._counters = _Counters()

    @property
    def healthy(self) -> bool:
        """False from a failed commit until the next successful one."""
        return self._healthy

    @property
    def stats(self) -> StoreStats:
        c = self._counters
        return StoreStats(
            self._committed, c.transactions, c.failures, c.last_commit_seconds, c.last_batch_size
        )

    def load(self) -> Restored:
        """The persisted index, instances and allocations.  Sync: call before serving.

        Error handling: StateError naming the file (and the row) when it cannot be read.
        """
        if self._closing.is_set():
            raise StateError(f"{self.path}: the store is closed")
        return self._executor.submit(_load_db, self._conn, self.path).result()

    def load_workload(self) -> tuple[dict[str, str], dict[str, str]]:
        """The stored job and allocation records (text, by id).  Sync: call before serving.

        Error handling: StateError naming the file when it cannot be read.
        """
        if self._closing.is_set():
            raise StateError(f"{self.path}: the store is closed")
        return self._executor.submit(_load_workload, self._conn, self.path).result()

    async def write_ahead(
        self, jobs: Mapping[str, Job | None], allocations: Mapping[str, Allocation | None]
    ) -> None:
        """Write these records (None deletes) in one transaction now, before they are published.

        Rows of the same ids queued for the next group commit are older than these:
        they are dropped (and put back if this write fails), so a queued row can
        never land after this one.  Error handling: StateError when the write fails
        or the store is closed; nothing of it is on disk then.
        """
        if self._closing.is_set():
            raise StateError(f"{self.path}: the store is closed")
        superseded_jobs = {k: self._jobs.pop(k) for k in list(jobs) if k in self._jobs}
        superseded = {
            k: self._allocations.pop(k) for k in list(allocations) if k in self._allocations
        }
        batch = _Batch(0, {}, {}, dict(jobs), dict(allocations))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, _write_batch, self._conn, self.path, batch)
        except BaseException:
            for ident, job in superseded_jobs.items():
                self._jobs.setdefault(ident, job)
            for ident, alloc in superseded.items():
                self._allocations.setdefault(ident, alloc)
            raise

    def attach(self, registry: Registry) -> None:
        """Persist every later change of `registry` (call from the event loop).

        Error handling: StateError if the registry's index is behind the stored
        one (build it with ``index=restored.index + 1``), since durable() could
        then return before a change is written.
        """
        if self._unsubscribe is not None:
            raise RuntimeError("the store is already attached to a registry")
        if self._closing.is_set():
            raise StateError(f"{self.path}: the store is closed")
        snap = registry.snapshot
        if snap.index < self._committed:
            raise StateError(
                f"{self.path}: registry index {snap.index} is behind the stored index"
                f" {self._committed}; build the registry with index={self._committed + 1}"
            )
        self._last = snap
        self._note(snap.index)  # the index the registry starts at is written too
        self._unsubscribe = registry.subscribe(self._on_change)

    async def durable(self, index: int) -> None:
        """Return once every registry change up to `index` is committed.

        Error handling: StateError when the commit that carried it failed, or
        the store closed before it; ValueError for an index the registry has
        not reached.
        """
        if index <= self._committed:
            return
        if self._finished or (self._closing.is_set() and index > self._seen):
            raise StateError(f"{self.path}: closed before index {index} was written")
        if index > self._seen:
            raise ValueError(f"index {index} is ahead of the registry (at {self._seen})")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (index, next(self._order), future))
        self._kick()
        await future

    async def close(self) -> None:
        """Unsubscribe, write what is queued (one last attempt), close.  Idempotent."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    # -- internals ---------------------------------------------------------------------

    def _on_change(self, snap: Snapshot, changed: frozenset[str]) -> None:
        """Registry subscriber: queue the persisted instances that changed, by id."""
        last = self._last if self._last is not None else snap
        self._last = snap
        queued = self._instances
        for ident in snap.changed_ids:
            inst = snap.instances.get(ident)
            if inst is not None and inst.source in PERSISTED_SOURCES:
                queued[ident] = inst
            else:  # removed, or no longer of a persisted source: drop its row if it had one
                was = last.instances.get(ident)
                if was is not None and was.source in PERSISTED_SOURCES:
                    queued[ident] = None
        if snap.allocs is not last.allocs:
            for ident, alloc in snap.allocs.items():
                if last.allocs.get(ident) is not alloc:
                    self._allocs[ident] = alloc
            for ident in last.allocs.keys() - snap.allocs.keys():
                self._allocs[ident] = None
        if snap.jobs is not last.jobs or snap.allocations is not last.allocations:
            self._queue_workload(snap, last, changed)
        self._note(snap.index)

    def _queue_workload(self, snap: Snapshot, last: Snapshot, changed: frozenset[str]) -> None:
        """Queue the job and allocation records that changed (their keys are in `changed`)."""
        for ident in work_keys_jobs(changed):
            job = snap.jobs.get(ident)
            if job is not last.jobs.get(ident):
                self._jobs[ident] = job
        for ident in work_keys_allocs(changed):
            alloc = snap.allocations.get(ident)
            if alloc is not last.allocations.get(ident):
                self._allocations[ident] = alloc

    def _note(self, index: int) -> None:
        self._seen = max(self._seen, index)
        self._dirty = True
        self._kick()

    def _kick(self) -> None:
        """Start the writer task if there is something to write and it is not running."""
        if self._finished or not self._dirty:
            return
        if self._flusher is not None and not self._flusher.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a change made outside the loop: written with the next one
            return
        self._flusher = loop.create_task(self._flush())

    async def _flush(self) -> None:
        """Group commit: take everything queued, commit it, repeat while more came in.

        Error handling: a failed commit fails its waiters, requeues its changes
        and retries after a backoff; once closing, a failure ends the loop.
        """
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        while self._dirty:
            batch = _Batch(self._seen, self._instances, self._allocs, self._jobs, self._allocations)
            self._instances, self._allocs, self._dirty = {}, {}, False
            self._jobs, self._allocations = {}, {}
            try:
                seconds = await loop.run_in_executor(
                    self._executor, _write_batch, self._conn, self.path, batch
                )
            except StateError as err:
                self._failed(batch, err)
                if self._closing.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if not self._healthy:
                log.info("%s: writing again (index %d)", self.path, batch.index)
            self._healthy, delay = True, RETRY_FIRST
            self._committed = max(self._committed, batch.index)
            c = self._counters
            c.transactions += 1
            c.last_commit_seconds, c.last_batch_size = seconds, batch.size
            self._settle(self._committed, None)

    def _failed(self, batch: _Batch, err: StateError) -> None:
        """Requeue a failed batch under anything newer; fail the waiters it covered."""
        if self._healthy:
            log.error("%s; registrations are failing until a write succeeds", err)
        self._healthy = False
        self._counters.failures += 1
        self._instances = {**batch.instances, **self._instances}
        self._allocs = {**batch.allocs, **self._allocs}
        self._jobs = {**batch.jobs, **self._jobs}
        self._allocations = {**batch.allocations, **self._allocations}
        self._dirty = True
        self._settle(batch.index, err)

    def _settle(self, index: int, err: StateError | None) -> None:
        """Resolve the waiters up to `index`: done, or failed with `err`."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= index:
            _, _, future = heapq.heappop(waiters)
            if future.done():  # its caller was cancelled
                continue
            if err is None:
                future.set_result(None)
            else:
                future.set_exception(StateError(str(err)))

    async def _close(self) -> None:
        self._closing.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._kick()
        if self._flusher is not None:
            await self._flusher
        if self._dirty:
            log.error("%s: closed with changes up to index %d not written", self.path, self._seen)
        self._finished = True
        self._settle(self._seen, StateError(f"{self.path}: closed before the change was written"))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown()
            os.close(self._lock)
