"""Tests of netsetup.state on real SQLite files in tmp_path.

Covers: reserve / complete / get / allocations / release round trips; the
reservation is all-or-nothing (a failing plan, a port or address collision
caught by the primary keys: nothing of the allocation stays); persistence
across close and reopen, including the simulated reboot (namespaces gone,
state kept: new allocations never get a held port or address); concurrent
writers on one file (two connections, threads) never hand out a port twice;
files that must be refused by name and left byte-for-byte untouched
(garbage, empty, someone else's database, a newer schema, a WAL without its
database); and a hypothesis run of the real planners over the real file.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from netsetup.errors import (
    AllocExists,
    InvalidName,
    PortError,
    PortsExhausted,
    SpecError,
    StateError,
    SubnetExhausted,
)
from netsetup.ipam import plan_addresses, plan_pools
from netsetup.ports import plan_policy, plan_ports
from netsetup.spec import (
    AllocNetwork,
    NetConfig,
    NetworkSpec,
    PortMapping,
    PortSpec,
    parse_result,
    parse_spec,
)
from netsetup.state import DB_NAME, Ledger, NetState, Reservation, open_state

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "waypost-hypothesis")

HOST = "10.0.0.5"
SPEC = NetworkSpec("bridge", (PortSpec("http"), PortSpec("dns", static=5353, to=53)))


def planner(
    config: NetConfig, spec: NetworkSpec, *, seed: int | None = None
) -> Callable[[Ledger], Reservation]:
    """The composition netsetup.network uses: ports, then addresses in bridge mode."""
    policy = plan_policy(config, HOST)
    v4, v6 = plan_pools(config)
    rng = random.Random(seed)

    def plan(ledger: Ledger) -> Reservation:
        ports = plan_ports(spec.ports, policy, ledger.ports, rng=rng)
        ips = (
            plan_addresses(v4, v6, ledger.leases, ledger.last_ip4, ledger.last_ip6)
            if spec.mode == "bridge"
            else ()
        )
        return Reservation(ports, ips)

    return plan


@pytest.fixture
def state(tmp_path: Path) -> Iterator[NetState]:
    st_ = open_state(tmp_path)
    yield st_
    st_.close()


def result_for(alloc_id: str, reservation: Reservation) -> AllocNetwork:
    return AllocNetwork(
        alloc_id=alloc_id,
        mode="bridge",
        host_ip=HOST,
        ports=reservation.ports,
        netns=f"/var/run/netns/{alloc_id}",
        alloc_ip=reservation.ips[0],
        interface="eth0",
        host_veth="wp" + "0" * 13,
        bridge="nomad",
    )


def fixed(reservation: Reservation) -> Callable[[Ledger], Reservation]:
    return lambda ledger: reservation


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- round trips --------------------------------------------------------------------------


def test_reserve_complete_release(state: NetState, tmp_path: Path) -> None:
    assert state.path == tmp_path / DB_NAME
    reservation = state.reserve("a1", SPEC, planner(NetConfig(), SPEC))
    assert [m.label for m in reservation.ports] == ["http", "dns"]
    assert reservation.ports[1] == PortMapping("dns", HOST, 5353, 53)
    assert reservation.ips == ("172.26.64.2",)

    record = state.get("a1")
    assert record is not None
    assert (record.alloc_id, record.spec, record.reservation, record.result) == (
        "a1",
        SPEC,
        reservation,
        None,
    )
    ledger = state.ledger()
    assert ledger.ports == {HOST: {m.host_port: "a1" for m in reservation.ports}}
    assert ledger.leases == {"172.26.64.2"}
    assert ledger.last_ip4 == "172.26.64.2"

    result = result_for("a1", reservation)
    state.complete("a1", result)
    stored = state.get("a1")
    assert stored is not None and stored.result == result

    assert state.release("a1") is True
    assert state.get("a1") is None
    assert state.ledger() == Ledger(ports={}, leases=frozenset(), last_ip4="172.26.64.2")
    assert state.release("a1") is False


def test_host_mode_holds_ports_only(state: NetState) -> None:
    spec = NetworkSpec("host", (PortSpec("web"),))
    reservation = state.reserve("h1", spec, planner(NetConfig(), spec))
    assert reservation.ips == ()
    assert state.ledger().leases == frozenset()


def test_allocations_are_listed_oldest_first(state: NetState) -> None:
    for name in ("c", "a", "b"):
        state.reserve(name, SPEC.__class__("host", ()), lambda ledger: Reservation())
    assert [r.alloc_id for r in state.allocations()] == ["c", "a", "b"]


def test_errors_of_the_api(state: NetState) -> None:
    state.reserve("a1", SPEC, planner(NetConfig(), SPEC))
    with pytest.raises(AllocExists, match="a1 already holds"):
        state.reserve("a1", SPEC, planner(NetConfig(), SPEC))
    with pytest.raises(KeyError):
        state.complete("nope", result_for("nope", Reservation(ips=("172.26.64.9",))))
    with pytest.raises(InvalidName):
        state.reserve("", SPEC, planner(NetConfig(), SPEC))
    state.close()
    state.close()  # idempotent
    with pytest.raises(StateError, match="closed"):
        state.ledger()


# --- all or nothing ------------------------------------------------------------------------


def test_a_failing_plan_leaves_nothing(state: NetState) -> None:
    before = state.ledger()

    def plan(ledger: Ledger) -> Reservation:
        raise PortsExhausted(HOST, 1, 2)

    with pytest.raises(PortsExhausted):
        state.reserve("a1", SPEC, plan)
    assert state.get("a1") is None
    assert state.ledger() == before


def test_a_colliding_port_rolls_back_the_whole_reservation(state: NetState) -> None:
    state.reserve("a1", SPEC, lambda ledger: Reservation((PortMapping("x", HOST, 7000, 7000),)))
    before = state.ledger()
    clash = Reservation(
        ports=(PortMapping("ok", HOST, 7001, 7001), PortMapping("bad", HOST, 7000, 7000)),
        ips=("172.26.64.9",),
    )
    with pytest.raises(PortError, match=r"port 7000 on 10\.0\.0\.5 .* already held"):
        state.reserve("a2", SPEC, lambda ledger: clash)
    assert state.get("a2") is None
    assert state.ledger() == before  # 7001 and the address were not kept


def test_a_colliding_address_rolls_back_the_ports(state: NetState) -> None:
    state.reserve("a1", SPEC, lambda ledger: Reservation(ips=("172.26.64.2",)))
    before = state.ledger()
    clash = Reservation(ports=(PortMapping("ok", HOST, 7001, 7001),), ips=("172.26.64.2",))
    with pytest.raises(SubnetExhausted):
        state.reserve("a2", SPEC, lambda ledger: clash)
    assert state.ledger() == before


def test_the_same_port_on_two_host_ips_is_two_reservations(state: NetState) -> None:
    state.reserve("a1", SPEC, lambda ledger: Reservation((PortMapping("x", HOST, 443, 443),)))
    state.reserve("a2", SPEC, lambda ledger: Reservation((PortMapping("x", "10.1.0.1", 443, 443),)))
    assert state.ledger().ports == {HOST: {443: "a1"}, "10.1.0.1": {443: "a2"}}


# --- persistence -----------------------------------------------------------------------------


def test_reopen_restores_everything(tmp_path: Path) -> None:
    first = open_state(tmp_path)
    reservation = first.reserve("a1", SPEC, planner(NetConfig(), SPEC))
    first.complete("a1", result_for("a1", reservation))
    records, ledger = first.allocations(), first.ledger()
    first.close()
    second = open_state(tmp_path)
    try:
        assert second.allocations() == records
        assert second.ledger() == ledger
    finally:
        second.close()


def test_simulated_reboot_never_hands_out_a_held_port_or_address(tmp_path: Path) -> None:
    """Namespaces are gone after a reboot, the file is not: reservations stay held."""
    config = NetConfig(min_dynamic_port=30000, max_dynamic_port=30059, subnet="10.8.0.0/26")
    spec = NetworkSpec("bridge", (PortSpec("a"), PortSpec("b")))
    before = open_state(tmp_path)
    held = [before.reserve(f"old{i}", spec, planner(config, spec, seed=i)) for i in range(20)]
    before.close()  # "reboot": nothing else survives

    after = open_state(tmp_path)
    try:
        fresh = [after.reserve(f"new{i}", spec, planner(config, spec, seed=i)) for i in range(10)]
        ports = [m.host_port for r in held + fresh for m in r.ports]
        ips = [ip for r in held + fresh for ip in r.ips]
        assert len(ports) == len(set(ports)) == 60  # the whole range, no port twice
        assert len(ips) == len(set(ips)) == 30
        assert ips[20] == "10.8.0.22"  # round-robin continues after the last lease (.21)
        with pytest.raises(PortsExhausted, match="dynamic port selection failed"):
            after.reserve("one-more", spec, planner(config, spec))
        assert after.get("one-more") is None
    finally:
        after.close()


def test_changes_by_another_connection_are_seen(tmp_path: Path) -> None:
    first, second = open_state(tmp_path), open_state(tmp_path)
    try:
        first.reserve("a1", SPEC, fixed(Reservation((PortMapping("x", HOST, 7000, 7000),))))
        assert first.ledger().ports == {HOST: {7000: "a1"}}  # cached from here on
        second.reserve("a2", SPEC, fixed(Reservation((PortMapping("y", HOST, 7001, 7001),))))
        assert first.ledger().ports == {HOST: {7000: "a1", 7001: "a2"}}
        assert second.release("a1")
        assert first.ledger().ports == {HOST: {7001: "a2"}}
        with pytest.raises(PortError):  # planned from a fresh ledger, and the key backs it up
            first.reserve("a3", SPEC, fixed(Reservation((PortMapping("z", HOST, 7001, 7001),))))
    finally:
        first.close()
        second.close()


def test_two_writers_on_one_file_never_collide(tmp_path: Path) -> None:
    config = NetConfig(min_dynamic_port=40000, max_dynamic_port=40199)
    spec = NetworkSpec("bridge", (PortSpec("a"), PortSpec("b")))
    writers = [open_state(tmp_path) for _ in range(2)]  # two connections, as two processes
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for i in range(40):
                writers[index].reserve(f"w{index}-{i}", spec, planner(config, spec, seed=i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        records = writers[0].allocations()
        assert len(records) == 80
        ports = [m.host_port for r in records for m in r.reservation.ports]
        ips = [ip for r in records for ip in r.reservation.ips]
        assert len(ports) == len(set(ports)) == 160
        assert len(ips) == len(set(ips)) == 80
    finally:
        for w in writers:
            w.close()


# --- files that must be refused and left alone -------------------------------------------------


def make_foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()


def make_newer(path: Path) -> None:
    open_state(path.parent).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()


def make_corrupt_pages(path: Path) -> None:
    state = open_state(path.parent)
    for i in range(50):
        state.reserve(f"a{i}", SPEC, fixed(Reservation((PortMapping("p", HOST, 1000 + i, 1),))))
    state.close()
    data = bytearray(path.read_bytes())
    data[4096 : 3 * 4096] = b"\xff" * (2 * 4096)  # scribble over pages 2 and 3
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_bytes(b"this is not a database at all" * 200), "cannot be read"),
        (lambda p: p.write_bytes(b""), "empty"),
        (make_foreign, "not netsetup's"),
        (make_newer, "newer waypost"),
        (make_corrupt_pages, "malformed"),
        (lambda p: p.mkdir(), "not a regular file"),
    ],
    ids=["garbage", "empty", "foreign", "newer", "corrupt-pages", "directory"],
)
def test_unusable_files_are_refused_by_name_and_untouched(
    tmp_path: Path, make: Callable[[Path], None], words: str
) -> None:
    path = tmp_path / DB_NAME
    make(path)
    before = digest(path) if path.is_file() else None
    with pytest.raises(StateError) as err:
        open_state(tmp_path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    assert words in str(err.value)
    if before is not None:
        assert digest(path) == before
    # Nothing replaced or added (a read-only look at a WAL database may create its -shm).
    allowed = {DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"}
    assert {p.name for p in tmp_path.iterdir()} <= allowed


def test_a_wal_without_its_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / (DB_NAME + "-wal")).write_bytes(b"x" * 100)
    with pytest.raises(StateError, match="-wal"):
        open_state(tmp_path)
    assert not (tmp_path / DB_NAME).exists()


def test_a_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StateError) as err:
        open_state(tmp_path / "file" / "data")
    assert err.value.path == str(tmp_path / "file" / "data")


def test_a_row_that_cannot_be_read_names_the_allocation(state: NetState) -> None:
    state.reserve("a1", SPEC, lambda ledger: Reservation())
    with sqlite3.connect(state.path) as conn:
        conn.execute('UPDATE allocations SET spec = \'{"mode": "cni/x"}\'')
    conn.close()
    with pytest.raises(StateError, match="allocation 'a1' cannot be read"):
        state.allocations()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"mode": "bridge", "ports": [{"label": "a", "extra": 1}]}, "network.ports[0].extra"),
        ({"mode": "bridge", "shape": 1}, "network.shape"),
        ({"ports": "x"}, "network.ports"),
        ({"ports": [{"label": "a", "static": 0}]}, "port[a].static"),
    ],
)
def test_parse_spec_rejects(raw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert err.value.field == field


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"alloc_id": "a", "mode": "weird", "host_ip": HOST, "ports": []},
        {"alloc_id": "a", "mode": "host", "host_ip": HOST, "ports": [{"label": "x"}]},
        {"alloc_id": "a", "mode": "host", "host_ip": HOST, "ports": 5},
    ],
)
def test_parse_result_rejects(raw: dict[str, object]) -> None:
    with pytest.raises(SpecError) as err:
        parse_result(raw)
    assert err.value.field.startswith("result")


def test_synchronous_normal_and_bad_values(tmp_path: Path) -> None:
    state = open_state(tmp_path, synchronous="NORMAL")
    try:
        state.reserve("a1", SPEC, fixed(Reservation()))
        assert state.get("a1") is not None
    finally:
        state.close()
    with pytest.raises(StateError, match="synchronous"):
        open_state(tmp_path, synchronous="OFF")  # type: ignore[arg-type]


# --- property: the real planners over the real file -----------------------------------------

OP: st.SearchStrategy[tuple[str, int, list[int]]] = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 3), st.lists(st.integers(9990, 9995), max_size=1)),
    st.tuples(st.just("release"), st.integers(0, 50), st.just([])),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OP, max_size=40), seed=st.integers(0, 2**16))
def test_property_all_or_nothing_and_no_double_holding(
    ops: list[tuple[str, int, list[int]]], seed: int
) -> None:
    config = NetConfig(
        min_dynamic_port=9990, max_dynamic_port=9999, subnet="10.7.0.0/29"
    )  # 10 ports, 5 IPs
    with tempfile.TemporaryDirectory() as directory:
        state = open_state(directory)
        try:
            live: list[str] = []
            for n, (op, amount, statics) in enumerate(ops):
                before = state.ledger()
                if op == "release":
                    if live:
                        alloc_id = live.pop(amount % len(live))
                        assert state.release(alloc_id)
                    continue
                spec = NetworkSpec(
                    "bridge",
                    tuple(PortSpec(f"d{i}") for i in range(amount))
                    + tuple(PortSpec(f"s{i}", static=p) for i, p in enumerate(statics)),
                )
                used = {p for ports in before.ports.values() for p in ports}
                fits = (
                    not set(statics) & used
                    and 10 - len(used | set(statics)) >= amount
                    and len(before.leases) < 5
                )
                try:
                    state.reserve(f"a{n}", spec, planner(config, spec, seed=seed + n))
                except (PortError, SubnetExhausted):
                    assert not fits  # refused exactly when it cannot fit
                    assert state.ledger() == before  # and nothing of it kept
                    assert state.get(f"a{n}") is None
                    continue
                assert fits
                live.append(f"a{n}")
            records = state.allocations()
            assert sorted(r.alloc_id for r in records) == sorted(live)
            pairs = [(m.host_ip, m.host_port) for r in records for m in r.reservation.ports]
            ips = [ip for r in records for ip in r.reservation.ips]
            assert len(pairs) == len(set(pairs))
            assert len(ips) == len(set(ips))
        finally:
            state.close()
