"""Persisted reservations: ports, IP leases and allocations.  Adapter (SQLite).

The only netsetup module that imports sqlite3.  One database,
``<data_dir>/netsetup.db``, WAL mode, ``synchronous=FULL`` (or NORMAL, by choice)::

    state = open_state(data_dir)                  # checks the file, never replaces it
    reservation = state.reserve(alloc_id, spec, plan)   # ports + IPs, all or nothing
    state.complete(alloc_id, result)              # the AllocNetwork, once set up
    state.release(alloc_id)                       # ports, leases and row, together
    state.allocations(); state.get(alloc_id); state.ledger()
    state.close()

The state is the source of truth for reservations: after a reboot
(namespaces gone, this file kept) every port and address stays held by its
allocation until that allocation is released, so nothing is handed out twice.

Transactions: :meth:`NetState.reserve` runs ``plan`` (pure: netsetup.ports and
netsetup.ipam) on the ledger read inside a ``BEGIN IMMEDIATE`` transaction, so
two writers (the agent and `waypost net up`) cannot plan from the same
snapshot; primary keys on (host_ip, port) and ip back it up.  Any error rolls
the whole reservation back.  One connection per :class:`NetState`, guarded by a
lock: the methods are synchronous, safe to call from `asyncio.to_thread`.  A
plan is typically::

    def plan(ledger: Ledger) -> Reservation:
        ports = plan_ports(spec.ports, policy, ledger.ports, is_free=probe_port_free,
                           static_free=probe_static_port)
        if spec.mode != "bridge":  # host mode leases nothing (and never fails on a full subnet)
            return Reservation(ports)
        return Reservation(
            ports, plan_addresses(v4, v6, ledger.leases, ledger.last_ip4, ledger.last_ip6)
        )

The ledger lives in memory and is read again only when ``PRAGMA data_version``
says another connection committed, so a reservation costs the same with 10 or
1,000 allocations held (its commit's fsync dominates).

Error handling: a database that cannot be opened, fails ``PRAGMA quick_check``,
is not netsetup's or is from a newer schema raises :class:`StateError` naming
the file; the checks open it read-only and it is never modified or replaced.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from netsetup.errors import (
    AllocExists,
    InvalidName,
    NetsetupError,
    PortError,
    StateError,
    SubnetExhausted,
)
from netsetup.spec import (
    AllocNetwork,
    NetworkSpec,
    PortMapping,
    parse_result,
    parse_spec,
    render_result,
    render_spec,
)

DB_NAME = "netsetup.db"
SCHEMA_VERSION = 1  # PRAGMA user_version of the tables below
APPLICATION_ID = 0x57504E53  # "WPNS": PRAGMA application_id, tells our file from others
DIR_MODE = 0o700
BUSY_TIMEOUT = 5.0  # seconds to wait while another process holds the write lock
MAX_ALLOC_ID = 255
_FRESH_START = "move it away (with its -wal and -shm files) to start with no reservations"

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE allocations (alloc_id TEXT PRIMARY KEY, spec TEXT NOT NULL,"
    " result TEXT, created REAL NOT NULL)",
    # One row per held port; the port is held for TCP and UDP alike.
    "CREATE TABLE ports (host_ip TEXT NOT NULL, port INTEGER NOT NULL,"
    " alloc_id TEXT NOT NULL REFERENCES allocations (alloc_id) ON DELETE CASCADE,"
    " label TEXT NOT NULL, alloc_port INTEGER NOT NULL, position INTEGER NOT NULL,"
    " PRIMARY KEY (host_ip, port))",
    "CREATE INDEX ports_by_alloc ON ports (alloc_id)",
    "CREATE TABLE leases (ip TEXT PRIMARY KEY,"
    " alloc_id TEXT NOT NULL REFERENCES allocations (alloc_id) ON DELETE CASCADE,"
    " position INTEGER NOT NULL)",
    "CREATE INDEX leases_by_alloc ON leases (alloc_id)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_LAST_IP = "last_ip{version}"  # meta key: the previous lease per family (round-robin)


@dataclass(frozen=True, slots=True)
class Ledger:
    """Everything held, as the allocators want it."""

    ports: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # ip -> port -> alloc
    leases: AbstractSet[str] = frozenset()
    last_ip4: str = ""
    last_ip6: str = ""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an allocation holds: its ports and its addresses (IPv4 first)."""

    ports: tuple[PortMapping, ...] = ()
    ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AllocRecord:
    """One allocation as stored; `result` is None until :meth:`NetState.complete`."""

    alloc_id: str
    spec: NetworkSpec
    reservation: Reservation
    result: AllocNetwork | None
    created: float


Planner = Callable[[Ledger], Reservation]
Synchronous = Literal["FULL", "NORMAL"]


def open_state(data_dir: str | Path, *, synchronous: Synchronous = "FULL") -> NetState:
    """The state under `data_dir` (created with the directory when absent); close() it.

    `synchronous`: "FULL" (default) fsyncs every commit; "NORMAL" (WAL) skips
    the fsync: a crash of the process loses nothing, a power loss may lose the
    last commits (never the file's consistency).
    """
    directory = Path(data_dir)
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(str(directory), f"cannot create the data dir: {exc.strerror}") from exc
    path = directory / DB_NAME
    return NetState(path, _open_db(path, synchronous))


class NetState:
    """The reservations of one host.  Build it with :func:`open_state`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._cache: _LedgerCache | None = None

    # -- writes -----------------------------------------------------------------------

    def reserve(self, alloc_id: str, spec: NetworkSpec, plan: Planner) -> Reservation:
        """Hold what `plan(ledger)` chooses for `alloc_id`, all of it or nothing.

        Raises AllocExists when `alloc_id` already holds a reservation, and
        whatever `plan` raises (PortError, PortsExhausted, SubnetExhausted);
        a plan that collides with the ledger raises PortError/SubnetExhausted.
        """
        _check_alloc_id(alloc_id)
        with self._transaction("reserve", alloc_id) as conn:
            if conn.execute("SELECT 1 FROM allocations WHERE alloc_id = ?", (alloc_id,)).fetchone():
                raise AllocExists(alloc_id)
            cache = self._current_cache(conn)
            reservation = plan(cache.view())
            conn.execute(
                "INSERT INTO allocations (alloc_id, spec, result, created) VALUES (?, ?, NULL, ?)",
                (alloc_id, _dumps(render_spec(spec)), time.time()),
            )
            _insert_ports(conn, alloc_id, reservation.ports)
            _insert_leases(conn, alloc_id, reservation.ips)
        cache.add(alloc_id, reservation)  # committed: the cache follows
        return reservation

    def complete(self, alloc_id: str, result: AllocNetwork) -> None:
        """Record the set-up network of a reserved allocation (KeyError if unknown)."""
        with self._transaction("complete", alloc_id) as conn:
            cursor = conn.execute(
                "UPDATE allocations SET result = ? WHERE alloc_id = ?",
                (_dumps(render_result(result)), alloc_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(alloc_id)

    def release(self, alloc_id: str) -> bool:
        """Drop the allocation with its ports and leases; False if it held nothing."""
        with self._transaction("release", alloc_id) as conn:
            cache = self._current_cache(conn)
            held = _held_by(conn, alloc_id)
            cursor = conn.execute("DELETE FROM allocations WHERE alloc_id = ?", (alloc_id,))
        cache.remove(held)  # committed: the cache follows
        return cursor.rowcount > 0

    # -- reads ------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """Every held port and lease, and the round-robin positions."""
        with self._reading("read ledger") as conn:
            return self._current_cache(conn).copy()

    def get(self, alloc_id: str) -> AllocRecord | None:
        """The stored allocation `alloc_id`, or None."""
        with self._reading(f"read allocation {alloc_id}") as conn:
            row = conn.execute(
                "SELECT alloc_id, spec, result, created FROM allocations WHERE alloc_id = ?",
                (alloc_id,),
            ).fetchone()
            return None if row is None else self._record(conn, row)

    def allocations(self) -> tuple[AllocRecord, ...]:
        """Every stored allocation, oldest first."""
        with self._reading("read allocations") as conn:
            rows = conn.execute(
                "SELECT alloc_id, spec, result, created FROM allocations ORDER BY created, alloc_id"
            ).fetchall()
            ports: dict[str, list[PortMapping]] = {}
            for alloc_id, label, ip, port, inside in conn.execute(
                "SELECT alloc_id, label, host_ip, port, alloc_port FROM ports"
                " ORDER BY alloc_id, position"
            ):
                ports.setdefault(alloc_id, []).append(PortMapping(label, ip, port, inside))
            ips: dict[str, list[str]] = {}
            for alloc_id, ip in conn.execute(
                "SELECT alloc_id, ip FROM leases ORDER BY alloc_id, position"
            ):
                ips.setdefault(alloc_id, []).append(ip)
            return tuple(
                self._parse_record(
                    row, Reservation(tuple(ports.get(row[0], ())), tuple(ips.get(row[0], ())))
                )
                for row in rows
            )

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self, op: str, alloc_id: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(str(self.path), f"{op} {alloc_id}: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                self._cache = None  # whatever happened, read it again next time
                raise StateError(str(self.path), f"{op} {alloc_id}: {exc}") from exc
            except BaseException:
                _rollback(conn)
                raise

    @contextmanager
    def _reading(self, op: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StateError(str(self.path), f"{op}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(str(self.path), "the state is closed")
        return self._conn

    def _current_cache(self, conn: sqlite3.Connection) -> _LedgerCache:
        """The ledger cache, read again when another connection has committed since.

        `PRAGMA data_version` changes on every commit by another connection
        (another process), never on this one's, whose commits the cache follows.
        """
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if self._cache is None or self._cache.version != version:
            self._cache = _LedgerCache.load(conn, version)
        return self._cache

    def _record(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> AllocRecord:
        alloc_id = row[0]
        ports = tuple(
            PortMapping(label=label, host_ip=ip, host_port=port, alloc_port=inside)
            for label, ip, port, inside in conn.execute(
                "SELECT label, host_ip, port, alloc_port FROM ports"
                " WHERE alloc_id = ? ORDER BY position",
                (alloc_id,),
            )
        )
        ips = tuple(
            ip
            for (ip,) in conn.execute(
                "SELECT ip FROM leases WHERE alloc_id = ? ORDER BY position", (alloc_id,)
            )
        )
        return self._parse_record(row, Reservation(ports, ips))

    def _parse_record(self, row: tuple[Any, ...], reservation: Reservation) -> AllocRecord:
        alloc_id, spec_text, result_text, created = row
        try:
            spec = parse_spec(json.loads(spec_text))
            result = None if result_text is None else parse_result(json.loads(result_text))
        except (NetsetupError, ValueError, TypeError) as exc:
            raise StateError(
                str(self.path), f"allocation {alloc_id!r} cannot be read ({exc}); {_FRESH_START}"
            ) from exc
        return AllocRecord(alloc_id, spec, reservation, result, float(created))


class _LedgerCache:
    """The ledger in memory, valid for one `PRAGMA data_version` of the connection."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.ports: dict[str, dict[int, str]] = {}
        self.leases: set[str] = set()
        self.last: dict[str, str] = {}  # meta key -> address

    @classmethod
    def load(cls, conn: sqlite3.Connection, version: int) -> _LedgerCache:
        cache = cls(version)
        for host_ip, port, alloc_id in conn.execute("SELECT host_ip, port, alloc_id FROM ports"):
            cache.ports.setdefault(host_ip, {})[port] = alloc_id
        cache.leases = {ip for (ip,) in conn.execute("SELECT ip FROM leases")}
        cache.last = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return cache

    def view(self) -> Ledger:
        """The live cache as a Ledger: for a planner that runs before the next change."""
        return Ledger(self.ports, self.leases, self._last(4), self._last(6))

    def copy(self) -> Ledger:
        """A snapshot that later changes do not touch."""
        ports = {ip: dict(held) for ip, held in self.ports.items() if held}
        return Ledger(ports, frozenset(self.leases), self._last(4), self._last(6))

    def add(self, alloc_id: str, reservation: Reservation) -> None:
        for mapping in reservation.ports:
            self.ports.setdefault(mapping.host_ip, {})[mapping.host_port] = alloc_id
        for ip in reservation.ips:
            self.leases.add(ip)
            self.last[_last_key(ip)] = ip

    def remove(self, held: tuple[list[tuple[str, int]], list[str]]) -> None:
        ports, ips = held
        for host_ip, port in ports:
            self.ports.get(host_ip, {}).pop(port, None)
        self.leases.difference_update(ips)

    def _last(self, version: int) -> str:
        return self.last.get(_LAST_IP.format(version=version), "")


# -- rows -----------------------------------------------------------------------------


def _held_by(conn: sqlite3.Connection, alloc_id: str) -> tuple[list[tuple[str, int]], list[str]]:
    ports = conn.execute("SELECT host_ip, port FROM ports WHERE alloc_id = ?", (alloc_id,))
    ips = conn.execute("SELECT ip FROM leases WHERE alloc_id = ?", (alloc_id,))
    return [(ip, port) for ip, port in ports], [ip for (ip,) in ips]


def _last_key(ip: str) -> str:
    return _LAST_IP.format(version=6 if ":" in ip else 4)


def _insert_ports(conn: sqlite3.Connection, alloc_id: str, ports: tuple[PortMapping, ...]) -> None:
    for position, mapping in enumerate(ports):
        try:
            conn.execute(
                "INSERT INTO ports (host_ip, port, alloc_id, label, alloc_port, position)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    mapping.host_ip,
                    mapping.host_port,
                    alloc_id,
                    mapping.label,
                    mapping.alloc_port,
                    position,
                ),
            )
        except sqlite3.IntegrityError:
            raise PortError(
                f"port {mapping.host_port} on {mapping.host_ip} ({mapping.label}) is already held",
                host_ip=mapping.host_ip,
                port=mapping.host_port,
            ) from None


def _insert_leases(conn: sqlite3.Connection, alloc_id: str, ips: tuple[str, ...]) -> None:
    for position, ip in enumerate(ips):
        try:
            conn.execute(
                "INSERT INTO leases (ip, alloc_id, position) VALUES (?, ?, ?)",
                (ip, alloc_id, position),
            )
        except sqlite3.IntegrityError:
            raise SubnetExhausted(f"{ip} (already leased)") from None
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_last_key(ip), ip),
        )


def _rollback(conn: sqlite3.Connection) -> None:
    # The transaction is gone either way; the original error is what matters.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _check_alloc_id(alloc_id: str) -> None:
    if not isinstance(alloc_id, str) or not 0 < len(alloc_id) <= MAX_ALLOC_ID:
        raise InvalidName("allocation", str(alloc_id), f"must be 1 to {MAX_ALLOC_ID} characters")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# -- opening --------------------------------------------------------------------------


def _check_existing(path: Path) -> None:
    """Read-only checks of a database already there; StateError naming it if unusable."""
    where = str(path)
    if not path.is_file():
        raise StateError(where, f"not a regular file; {_FRESH_START}")
    if path.stat().st_size == 0:
        raise StateError(where, f"empty (truncated?); {_FRESH_START}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(where, f"cannot be opened: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StateError(where, f"corrupt ({'; '.join(problems)}); {_FRESH_START}")
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id, version, tables) != (0, 0, 0):
            # (0, 0, 0): created by us, stopped before the schema went in: fill it in.
            raise StateError(where, f"an SQLite database but not netsetup's; {_FRESH_START}")
        if version > SCHEMA_VERSION:
            raise StateError(
                where,
                f"written by a newer waypost (schema {version}, this one knows up to"
                f" {SCHEMA_VERSION}); run that version, or {_FRESH_START}",
            )
    except sqlite3.Error as exc:
        raise StateError(where, f"cannot be read as a netsetup database ({exc})") from exc
    finally:
        conn.close()


def _open_db(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    where = str(path)
    if path.exists() or path.is_symlink():
        _check_existing(path)
    else:
        for suffix in ("-wal", "-shm"):
            orphan = path.with_name(path.name + suffix)
            if orphan.exists():
                raise StateError(str(orphan), f"there without {path.name}; move it away")
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StateError(where, f"cannot be opened: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(where, f"cannot switch to WAL mode (got {mode!r})")
        if synchronous not in ("FULL", "NORMAL"):
            raise StateError(where, f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
        conn.execute("COMMIT")
    except (sqlite3.Error, StateError) as exc:
        conn.close()
        if isinstance(exc, StateError):
            raise
        raise StateError(where, f"cannot be used: {exc}; is the data dir writable?") from exc
    return conn
