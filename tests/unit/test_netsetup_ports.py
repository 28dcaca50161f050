"""Tests of netsetup.ports and the port parts of netsetup.spec.

Table-driven cases for the reserved-ports syntax, config and spec validation,
the policy (global and per-address reserved ports, host networks) and the
allocator (range bounds, `to`, static ports, probes, exhaustion); property
tests (hypothesis state machine) for the allocator over a ledger; and the
real OS probe on 127.0.0.1 (bind only: nothing is sent).
"""

from __future__ import annotations

import random
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netsetup.errors import InvalidName, PortError, PortsExhausted, SpecError
from netsetup.firewall import check_owner, check_table
from netsetup.ports import (
    RANDOM_PROBES,
    PortPolicy,
    alloc_port,
    parse_port_ranges,
    plan_policy,
    plan_ports,
    probe_port_free,
    probe_static_port,
)
from netsetup.spec import (
    HostNetwork,
    NetConfig,
    NetworkSpec,
    PortMapping,
    PortSpec,
    check_ifname,
)

# See tests/unit/test_dns_props.py: no `.hypothesis` directory in the rootdir.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "waypost-hypothesis")

HOST = "10.0.0.5"


def policy(low: int = 20000, high: int = 32000, reserved: str = "") -> PortPolicy:
    config = NetConfig(min_dynamic_port=low, max_dynamic_port=high, reserved_ports=reserved)
    return plan_policy(config, HOST)


def dyn(label: str, to: int = 0, host_network: str = "") -> PortSpec:
    return PortSpec(label, to=to, host_network=host_network)


# --- the reserved-ports syntax ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("", set()),
        ("   ", set()),
        ("22", {22}),
        ("22,80,8500-8503", {22, 80, 8500, 8501, 8502, 8503}),
        (" 22 , 80 ", {22, 80}),
        ("1", {1}),
        ("65535", {65535}),
        ("100-100", {100}),
        ("5-7,6-8", {5, 6, 7, 8}),
        ("65530 - 65535", set(range(65530, 65536))),
    ],
)
def test_parse_port_ranges(spec: str, ports: set[int]) -> None:
    assert parse_port_ranges(spec) == ports


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("0", "out of"),
        ("65536", "out of"),
        ("1-65536", "out of"),
        ("80-22", "reversed"),
        (",80", "invalid"),
        ("80,", "invalid"),
        ("1-2-3", "invalid"),
        ("http", "invalid"),
        ("-5", "invalid"),
        ("5-", "invalid"),
        ("+5", "invalid"),
        ("٣", "invalid"),  # a non-ASCII digit: int() would take it
        ("1e3", "invalid"),
    ],
)
def test_parse_port_ranges_rejects(spec: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_port_ranges(spec, "client.reserved_ports")
    assert err.value.field == "client.reserved_ports"
    assert words in str(err.value)


# --- config and spec validation --------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"min_dynamic_port": 0}, "min_dynamic_port"),
        ({"max_dynamic_port": 65536}, "max_dynamic_port"),
        ({"min_dynamic_port": 30000, "max_dynamic_port": 29999}, "min_dynamic_port"),
        ({"min_dynamic_port": True}, "min_dynamic_port"),
        ({"reserved_ports": "22,x"}, "reserved_ports"),
        ({"subnet": "172.26.64.1/20"}, "subnet"),  # host bits set
        ({"subnet": "fd00::/64"}, "subnet"),
        ({"subnet": "10.0.0.0/31"}, "subnet"),
        ({"gateway": "10.9.9.9"}, "gateway"),
        ({"gateway": "172.26.79.255"}, "gateway"),  # broadcast
        ({"subnet6": "10.0.0.0/24"}, "subnet6"),
        ({"gateway6": "fd00::1"}, "gateway6"),
        ({"bridge": "a-name-longer-than-15"}, "bridge"),
        ({"bridge": "has/slash"}, "bridge"),
        ({"veth_prefix": "toolong"}, "veth_prefix"),
        ({"advertise": "not-an-ip"}, "advertise"),
        ({"host_networks": (HostNetwork("a"), HostNetwork("a"))}, "host_networks"),
        ({"data_dir": ""}, "data_dir"),
    ],
)
def test_net_config_rejects(kw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        NetConfig(**kw)  # type: ignore[arg-type]
    assert err.value.field == field


def test_net_config_defaults_and_normalisation() -> None:
    config = NetConfig()
    assert (config.bridge, config.subnet, config.gateway) == (
        "nomad",
        "172.26.64.0/20",
        "172.26.64.1",
    )
    assert (config.min_dynamic_port, config.max_dynamic_port) == (20000, 32000)
    six = NetConfig(subnet6="fd00:0:0:1::/64", advertise="2001:db8::0:1")
    assert (six.gateway6, six.advertise) == ("fd00:0:0:1::1", "2001:db8::1")
    assert NetConfig(min_dynamic_port=1, max_dynamic_port=1).max_dynamic_port == 1


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"label": ""}, "port.label"),
        ({"label": "has space"}, "port.label"),
        ({"label": "a=b"}, "port.label"),
        ({"label": "-lead"}, "port.label"),
        ({"label": "http\n"}, "port.label"),  # `$` would match before the newline
        ({"label": "http", "static": 0}, "port[http].static"),
        ({"label": "http", "static": 65536}, "port[http].static"),
        ({"label": "http", "static": "80"}, "port[http].static"),
        ({"label": "http", "to": -2}, "port[http].to"),
        ({"label": "http", "to": 65536}, "port[http].to"),
        ({"label": "http", "to": 1.5}, "port[http].to"),
    ],
)
def test_port_spec_rejects(kw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        PortSpec(**kw)  # type: ignore[arg-type]
    assert err.value.field == field


def test_network_spec_rejects_duplicate_labels_and_unknown_modes() -> None:
    with pytest.raises(SpecError, match="duplicate"):
        NetworkSpec("bridge", (dyn("http"), PortSpec("http", static=80)))
    with pytest.raises(SpecError) as err:
        NetworkSpec("cni/mynet", ())  # type: ignore[arg-type]
    assert err.value.field == "network.mode"


# --- policy ------------------------------------------------------------------------------


def test_policy_merges_reserved_ports_down_per_address() -> None:
    config = NetConfig(
        reserved_ports="22",
        host_networks=(
            HostNetwork("public", "192.0.2.10", reserved_ports="80,443"),
            HostNetwork("private", "10.1.0.1", reserved_ports="1-1000"),
            HostNetwork("default", reserved_ports="9000"),
        ),
    )
    pol = plan_policy(config, HOST)
    assert pol.reserved_for("192.0.2.10") == {22, 80, 443}  # the global 22 too (Nomad)
    assert pol.reserved_for("10.1.0.1") == set(range(1, 1001))
    assert pol.reserved_for(HOST) == {22, 9000}
    assert pol.reserved_for("198.51.100.1") == {22}
    assert pol.host_ip_for("") == HOST
    assert pol.host_ip_for("default") == HOST
    assert pol.host_ip_for("public") == "192.0.2.10"
    with pytest.raises(SpecError, match="unknown host network 'nope'"):
        pol.host_ip_for("nope")


def test_policy_needs_an_address_for_named_host_networks() -> None:
    with pytest.raises(SpecError) as err:
        plan_policy(NetConfig(host_networks=(HostNetwork("public"),)), HOST)
    assert err.value.field == "host_network[public].address"


# --- the allocator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "host", "inside"), [(0, 20001, 20001), (-1, 20001, 20001), (8080, 20001, 8080)]
)
def test_to_is_the_port_inside_or_the_host_port(to: int, host: int, inside: int) -> None:
    assert alloc_port(PortSpec("http", to=to), host) == inside
    [mapping] = plan_ports([dyn("http", to)], policy(host, host), {})
    assert mapping == PortMapping("http", HOST, host, inside)


def test_range_bounds_are_inclusive() -> None:
    pol = policy(40000, 40001)
    seen = {
        plan_ports([dyn("p")], pol, {}, rng=random.Random(seed))[0].host_port for seed in range(64)
    }
    assert seen == {40000, 40001}
    # Exhaustive scan reaches both ends too.
    assert plan_ports([dyn("p")], pol, {HOST: {40000: "x"}})[0].host_port == 40001
    assert plan_ports([dyn("p")], pol, {HOST: {40001: "x"}})[0].host_port == 40000


def test_ports_of_one_allocation_are_distinct_and_in_range() -> None:
    pol = policy(30000, 30009)
    mappings = plan_ports([dyn(f"p{i}") for i in range(10)], pol, {}, rng=random.Random(7))
    assert sorted(m.host_port for m in mappings) == list(range(30000, 30010))
    assert [m.label for m in mappings] == [f"p{i}" for i in range(10)]  # the spec's order
    with pytest.raises(PortsExhausted, match="dynamic port selection failed"):
        plan_ports([dyn(f"p{i}") for i in range(11)], pol, {})


def test_reserved_and_held_ports_are_never_handed_out() -> None:
    pol = policy(100, 110, reserved="100-104,106")
    held = {HOST: {105: "other", 107: "other", 108: "other"}}
    got = {m.host_port for m in plan_ports([dyn("a"), dyn("b")], pol, held)}
    assert got == {109, 110}
    with pytest.raises(PortsExhausted) as err:
        plan_ports([dyn("a"), dyn("b"), dyn("c")], pol, held)
    assert (err.value.host_ip, err.value.low, err.value.high) == (HOST, 100, 110)
    assert "100-110 on 10.0.0.5" in str(err.value)


def test_ledger_is_per_host_ip() -> None:
    config = NetConfig(
        min_dynamic_port=5000,
        max_dynamic_port=5000,
        host_networks=(HostNetwork("private", "10.1.0.1"),),
    )
    pol = plan_policy(config, HOST)
    held = {HOST: {5000: "other"}}
    [mapping] = plan_ports([dyn("a", host_network="private")], pol, held)
    assert (mapping.host_ip, mapping.host_port) == ("10.1.0.1", 5000)
    with pytest.raises(PortsExhausted):
        plan_ports([dyn("a")], pol, held)


@pytest.mark.parametrize(
    ("specs", "held", "message"),
    [
        ([PortSpec("ssh", static=22)], {}, "static port 22 (ssh) on 10.0.0.5 is a reserved port"),
        ([PortSpec("web", static=8080)], {HOST: {8080: "alloc-1"}}, "held by allocation alloc-1"),
        ([PortSpec("a", static=9000), PortSpec("b", static=9000)], {}, "asked for twice"),
    ],
)
def test_static_port_conflicts_name_the_port(
    specs: list[PortSpec], held: dict[str, dict[int, str]], message: str
) -> None:
    with pytest.raises(PortError) as err:
        plan_ports(specs, policy(reserved="22"), held)
    assert message in str(err.value)
    assert err.value.port == specs[-1].static
    assert err.value.host_ip == HOST


def test_static_ports_outside_and_inside_the_range() -> None:
    pol = policy(20000, 20001)
    mappings = plan_ports(
        [PortSpec("lb", static=80, to=8080), PortSpec("in", static=20000), dyn("d")], pol, {}
    )
    assert mappings == (
        PortMapping("lb", HOST, 80, 8080),
        PortMapping("in", HOST, 20000, 20000),
        PortMapping("d", HOST, 20001, 20001),  # the static 20000 is not handed out
    )
    with pytest.raises(PortsExhausted):
        plan_ports([dyn("d"), PortSpec("in", static=20000), PortSpec("in2", static=20001)], pol, {})


def test_same_static_port_on_two_host_networks() -> None:
    config = NetConfig(host_networks=(HostNetwork("private", "10.1.0.1"),))
    pol = plan_policy(config, HOST)
    mappings = plan_ports(
        [PortSpec("pub", static=443), PortSpec("priv", static=443, host_network="private")], pol, {}
    )
    assert {(m.host_ip, m.host_port) for m in mappings} == {(HOST, 443), ("10.1.0.1", 443)}


def test_ports_bound_on_the_host_are_skipped() -> None:
    busy = set(range(20000, 20010)) - {20007}
    asked: list[tuple[str, int]] = []

    def is_free(ip: str, port: int) -> bool:
        asked.append((ip, port))
        return port not in busy

    [mapping] = plan_ports(
        [dyn("a")], policy(20000, 20009), {}, is_free=is_free, rng=random.Random(1)
    )
    assert mapping.host_port == 20007
    assert all(ip == HOST for ip, _ in asked)
    # Random probes first, then at most one look at each candidate.
    assert len(asked) <= RANDOM_PROBES + 10
    asked.clear()
    with pytest.raises(PortsExhausted):
        plan_ports([dyn("a")], policy(20000, 20009), {}, is_free=lambda ip, p: False)


def test_random_probes_come_first_then_an_exhaustive_scan() -> None:
    asked: list[int] = []

    def is_free(ip: str, port: int) -> bool:
        asked.append(port)
        return len(asked) > RANDOM_PROBES  # every random probe fails

    plan_ports([dyn("a")], policy(1000, 60000), {}, is_free=is_free, rng=random.Random(3))
    assert len(asked) == RANDOM_PROBES + 1
    first_scanned = asked[RANDOM_PROBES]
    # The scan starts anywhere (not always at min) and walks up by one.
    asked.clear()
    calls = iter(range(10**6))
    plan_ports(
        [dyn("a")],
        policy(1000, 60000),
        {},
        is_free=lambda ip, p: asked.append(p) or next(calls) > RANDOM_PROBES + 2,  # type: ignore[func-returns-value]
        rng=random.Random(3),
    )
    scan = asked[RANDOM_PROBES:]
    assert scan[0] == first_scanned
    assert scan == [first_scanned + i for i in range(len(scan))]


def test_held_ports_are_not_probed() -> None:
    asked: list[int] = []
    plan_ports(
        [dyn("a")],
        policy(10, 12),
        {HOST: {10: "x", 11: "y"}},
        is_free=lambda ip, p: asked.append(p) is None,  # type: ignore[func-returns-value]
    )
    assert set(asked) == {12}


def test_static_port_bound_by_another_process_is_refused_when_probed() -> None:
    specs = [PortSpec("web", static=8080)]
    assert plan_ports(specs, policy(), {}, static_free=lambda ip, p: True)[0].host_port == 8080
    assert plan_ports(specs, policy(), {})[0].host_port == 8080  # not probed by default
    with pytest.raises(PortError, match=r"static port 8080 .* in use by another process"):
        plan_ports(specs, policy(), {}, static_free=lambda ip, p: p != 8080)


def test_unknown_host_network_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="unknown host network"):
        plan_ports([dyn("a", host_network="dmz")], policy(), {})


# --- property tests: the allocator over a ledger ------------------------------------------

LOW, HIGH = 30000, 30015  # a small range, so exhaustion happens often
RESERVED = frozenset({30003, 30004, 30010})
ADDRESSES = (HOST, "10.1.0.1")


class PortLedgerMachine(RuleBasedStateMachine):
    """Allocate and release allocations against a model; the plan is applied only whole."""

    def __init__(self) -> None:
        super().__init__()
        config = NetConfig(
            min_dynamic_port=LOW,
            max_dynamic_port=HIGH,
            reserved_ports=",".join(map(str, sorted(RESERVED))),
            host_networks=(HostNetwork("other", "10.1.0.1"),),
        )
        self.policy = plan_policy(config, HOST)
        self.ledger: dict[str, dict[int, str]] = {ip: {} for ip in ADDRESSES}
        self.allocs: dict[str, tuple[PortMapping, ...]] = {}
        self.busy: set[tuple[str, int]] = set()  # bound by "other processes"
        self.counter = 0

    @rule(
        dynamic=st.integers(0, 4),
        statics=st.lists(st.integers(LOW - 2, HIGH + 2), max_size=2),
        other=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def allocate(self, dynamic: int, statics: list[int], other: bool, seed: int) -> None:
        network = "other" if other else ""
        ip = ADDRESSES[1] if other else ADDRESSES[0]
        specs = [dyn(f"d{i}", host_network=network) for i in range(dynamic)]
        specs += [PortSpec(f"s{i}", static=p, host_network=network) for i, p in enumerate(statics)]
        self.counter += 1
        alloc_id = f"alloc-{self.counter}"
        before = {k: dict(v) for k, v in self.ledger.items()}
        held = self.ledger[ip]
        static_ok = len(set(statics)) == len(statics) and not any(
            p in RESERVED or p in held for p in statics
        )
        free = [
            p
            for p in range(LOW, HIGH + 1)
            if p not in RESERVED and p not in held and p not in statics and (ip, p) not in self.busy
        ]
        try:
            mappings = plan_ports(
                specs,
                self.policy,
                self.ledger,
                is_free=lambda i, p: (i, p) not in self.busy,
                rng=random.Random(seed),
            )
        except PortsExhausted:
            assert static_ok and len(free) < dynamic  # exhausted exactly when full
            assert self.ledger == before
            return
        except PortError:
            assert not static_ok
            assert self.ledger == before
            return
        assert static_ok and len(free) >= dynamic
        assert len(mappings) == len(specs)
        for spec, mapping in zip(specs, mappings, strict=True):
            assert mapping.host_ip == ip
            assert mapping.host_port not in held
            if spec.static is None:
                assert LOW <= mapping.host_port <= HIGH
                assert mapping.host_port not in RESERVED
                assert (ip, mapping.host_port) not in self.busy
                assert mapping.host_port not in statics
            else:
                assert mapping.host_port == spec.static
        for mapping in mappings:
            self.ledger[ip][mapping.host_port] = alloc_id
        self.allocs[alloc_id] = mappings

    @precondition(lambda self: bool(self.allocs))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        alloc_id = data.draw(st.sampled_from(sorted(self.allocs)))
        for mapping in self.allocs.pop(alloc_id):
            assert self.ledger[mapping.host_ip].pop(mapping.host_port) == alloc_id

    @rule(port=st.integers(LOW, HIGH), other=st.booleans(), bound=st.booleans())
    def other_process(self, port: int, other: bool, bound: bool) -> None:
        key = (ADDRESSES[int(other)], port)
        if bound:
            self.busy.add(key)
        else:
            self.busy.discard(key)

    @invariant()
    def no_port_is_held_twice(self) -> None:
        pairs = [(m.host_ip, m.host_port) for ms in self.allocs.values() for m in ms]
        assert len(pairs) == len(set(pairs))
        assert sum(len(v) for v in self.ledger.values()) == len(pairs)


TestPortLedger = PortLedgerMachine.TestCase
TestPortLedger.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- the OS probe (real sockets on 127.0.0.1, bind only) -------------------------------------


@contextmanager
def bound(kind: socket.SocketKind, *, listen: bool = False) -> Iterator[int]:
    with closing(socket.socket(socket.AF_INET, kind)) as sock:
        sock.bind(("127.0.0.1", 0))
        if listen:
            sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("kind", "listen"),
    [(socket.SOCK_STREAM, True), (socket.SOCK_STREAM, False), (socket.SOCK_DGRAM, False)],
)
def test_probe_sees_ports_bound_by_others(kind: socket.SocketKind, listen: bool) -> None:
    with bound(kind, listen=listen) as port:
        assert probe_port_free("127.0.0.1", port) is False
        assert probe_static_port("127.0.0.1", port) is False


def test_probe_sees_wildcard_binds() -> None:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.bind(("0.0.0.0", 0))
        assert probe_port_free("127.0.0.1", sock.getsockname()[1]) is False


def test_probe_of_a_free_port_leaves_it_free() -> None:
    with bound(socket.SOCK_STREAM) as port:
        pass  # now closed, never listened: nothing lingers
    assert probe_port_free("127.0.0.1", port) is True
    assert probe_port_free("127.0.0.1", port) is True  # the probe closed its sockets
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", port))  # and the port is really free


def test_time_wait_blocks_dynamic_picks_but_not_static_ports() -> None:
    # The accepting side closes first, so its socket on `port` goes to TIME_WAIT.  The
    # server sets SO_REUSEADDR, as servers do (Go's net.Listen, nginx, asyncio): Linux
    # lets a new bind with SO_REUSEADDR through only when the old socket had it too.
    with closing(socket.socket()) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as client:
            conn, _ = server.accept()
            conn.close()
            assert client.recv(1) == b""
    assert probe_port_free("127.0.0.1", port) is False
    assert probe_static_port("127.0.0.1", port) is True


def test_probe_of_an_address_not_on_this_host() -> None:
    with pytest.raises(PortError, match=r"192\.0\.2\.1 is not configured on this host"):
        probe_port_free("192.0.2.1", 40000)  # TEST-NET-1: bind only, nothing sent


@pytest.mark.parametrize("name", ["nomad\n", "", "a" * 16, "has space", "a/b"])
def test_interface_names_are_checked_whole(name: str) -> None:
    with pytest.raises(SpecError):
        check_ifname("bridge", name)


@pytest.mark.parametrize(
    ("check", "name"),
    [
        (check_owner, "alloc-1\n"),
        (check_owner, ""),
        (check_table, "waypost\n"),
        (check_table, "9x"),
    ],
)
def test_firewall_names_are_checked_whole(check: Callable[[str], str], name: str) -> None:
    with pytest.raises(InvalidName):
        check(name)
