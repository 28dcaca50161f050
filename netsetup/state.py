"""Persisted reservations: ports, IP leases and allocations.  Adapter (SQLite).

The only netsetup module that imports sqlite3.  One database,
``<data_dir>/netsetup.db``, WAL mode, ``synchronous=FULL``::

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
lock: the methods are synchronous, safe to call from `asyncio.to_thread`.

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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    leases: frozenset[str] = frozenset()
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


def open_state(data_dir: str | Path) -> NetState:
    """The state under `data_dir` (created with the directory when absent); close() it."""
    directory = Path(data_dir)
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(str(directory), f"cannot create the data dir: {exc.strerror}") from exc
    path = directory / DB_NAME
    return NetState(path, _open_db(path))


class NetState:
    """The reservations of one host.  Build it with :func:`open_state`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

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
            ledger = _read_ledger(conn)
            reservation = plan(ledger)
            conn.execute(
                "INSERT INTO allocations (alloc_id, spec, result, created) VALUES (?, ?, NULL, ?)",
                (alloc_id, _dumps(render_spec(spec)), time.time()),
            )
            _insert_ports(conn, alloc_id, reservation.ports)
            _insert_leases(conn, alloc_id, reservation.ips)
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
            cursor = conn.execute("DELETE FROM allocations WHERE alloc_id = ?", (alloc_id,))
            return cursor.rowcount > 0

    # -- reads ------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """Every held port and lease, and the round-robin positions."""
        with self._reading("read ledger") as conn:
            return _read_ledger(conn)

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
            return tuple(self._record(conn, row) for row in rows)

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

    def _record(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> AllocRecord:
        alloc_id, spec_text, result_text, created = row
        try:
            spec = parse_spec(json.loads(spec_text))
            result = None if result_text is None else parse_result(json.loads(result_text))
        except (NetsetupError, ValueError, TypeError) as exc:
            raise StateError(
                str(self.path), f"allocation {alloc_id!r} cannot be read ({exc}); {_FRESH_START}"
            ) from exc
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
        return AllocRecord(alloc_id, spec, Reservation(ports, ips), result, float(created))


# -- rows -----------------------------------------------------------------------------


def _read_ledger(conn: sqlite3.Connection) -> Ledger:
    ports: dict[str, dict[int, str]] = {}
    for host_ip, port, alloc_id in conn.execute("SELECT host_ip, port, alloc_id FROM ports"):
        ports.setdefault(host_ip, {})[port] = alloc_id
    leases = frozenset(ip for (ip,) in conn.execute("SELECT ip FROM leases"))
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    return Ledger(
        ports=ports,
        leases=leases,
        last_ip4=meta.get(_LAST_IP.format(version=4), ""),
        last_ip6=meta.get(_LAST_IP.format(version=6), ""),
    )


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
        key = _LAST_IP.format(version=6 if ":" in ip else 4)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, ip),
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


def _open_db(path: Path) -> sqlite3.Connection:
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
        conn.execute("PRAGMA synchronous = FULL")
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
