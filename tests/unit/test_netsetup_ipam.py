"""Tests of netsetup.ipam: pools, round-robin leases, exhaustion.  Pure.

Table-driven cases for pool sizes and the addresses never leased (network,
gateway, IPv4 broadcast); the round-robin order (from the last lease,
wrapping, a released address comes back last); IPv6; and a hypothesis state
machine that leases and releases against a model.
"""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netsetup.errors import SpecError, SubnetExhausted
from netsetup.ipam import Pool, plan_addresses, plan_lease, plan_pool, plan_pools
from netsetup.spec import NetConfig

# See tests/unit/test_dns_props.py: no `.hypothesis` directory in the rootdir.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "waypost-hypothesis")


@pytest.mark.parametrize(
    ("subnet", "gateway", "size"),
    [
        ("172.26.64.0/20", "172.26.64.1", 4093),  # 4096 - network - broadcast - gateway
        ("10.0.0.0/24", "10.0.0.1", 253),
        ("10.0.0.0/24", "10.0.0.254", 253),
        ("10.0.0.0/29", "10.0.0.1", 5),
        ("10.0.0.0/30", "10.0.0.1", 1),
        ("fd00::/126", "fd00::1", 2),  # no broadcast in IPv6
        ("fd00::/64", "fd00::1", 2**64 - 2),
    ],
)
def test_pool_size(subnet: str, gateway: str, size: int) -> None:
    assert plan_pool(subnet, gateway).size == size


@pytest.mark.parametrize(
    ("subnet", "gateway"),
    [
        ("10.0.0.0/24", "10.0.1.1"),
        ("10.0.0.0/24", "fd00::1"),
        ("10.0.0.1/24", "10.0.0.1"),  # host bits set
        ("nonsense", "10.0.0.1"),
        ("10.0.0.0/31", "10.0.0.0"),  # nothing left to lease
    ],
)
def test_plan_pool_rejects(subnet: str, gateway: str) -> None:
    with pytest.raises(SpecError):
        plan_pool(subnet, gateway)


def lease_all(pool: Pool, count: int, last: str = "") -> list[str]:
    leased: list[str] = []
    for _ in range(count):
        last = plan_lease(pool, leased, last)
        leased.append(last)
    return leased


def test_never_network_gateway_or_broadcast() -> None:
    pool = plan_pool("10.0.0.0/29", "10.0.0.4")
    assert lease_all(pool, 5) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(SubnetExhausted) as err:
        plan_lease(pool, lease_all(pool, 5))
    assert err.value.subnet == "10.0.0.0/29"
    assert "10.0.0.0/29 exhausted" in str(err.value)


def test_round_robin_from_the_last_lease() -> None:
    pool = plan_pool("10.0.0.0/29", "10.0.0.1")
    leased = lease_all(pool, 3)  # .2 .3 .4
    leased.remove("10.0.0.2")  # released: comes back last
    assert plan_lease(pool, leased, "10.0.0.4") == "10.0.0.5"
    assert plan_lease(pool, [*leased, "10.0.0.5"], "10.0.0.5") == "10.0.0.6"
    # At the end, wrap to the start, skipping the gateway and what is leased.
    assert plan_lease(pool, [*leased, "10.0.0.5", "10.0.0.6"], "10.0.0.6") == "10.0.0.2"


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        ("", "10.0.0.2"),
        ("10.0.0.1", "10.0.0.2"),  # the gateway: next one
        ("10.0.0.6", "10.0.0.2"),  # the end: wrap
        ("10.0.0.7", "10.0.0.2"),  # broadcast: out of the pool, start over
        ("192.168.1.1", "10.0.0.2"),  # another subnet (config changed)
        ("fd00::9", "10.0.0.2"),  # another family
        ("garbage", "10.0.0.2"),
        ("10.0.0.3", "10.0.0.4"),
    ],
)
def test_where_the_walk_starts(last: str, expected: str) -> None:
    assert plan_lease(plan_pool("10.0.0.0/29", "10.0.0.1"), [], last) == expected


def test_leases_outside_the_pool_are_ignored() -> None:
    pool = plan_pool("10.0.0.0/30", "10.0.0.1")
    assert plan_lease(pool, ["10.0.0.1", "10.0.0.0", "10.0.0.3", "fd00::2", "x"]) == "10.0.0.2"
    with pytest.raises(SubnetExhausted):
        plan_lease(pool, ["10.0.0.2"])


def test_ipv6_pool() -> None:
    pool = plan_pool("fd00:0:0:1::/64", "fd00:0:0:1::1")
    assert plan_lease(pool, []) == "fd00:0:0:1::2"
    assert plan_lease(pool, ["fd00:0:0:1::2"], "fd00:0:0:1::2") == "fd00:0:0:1::3"
    last = "fd00:0:0:1:ffff:ffff:ffff:ffff"  # the very end of the pool: wrap
    assert plan_lease(pool, [last], last) == "fd00:0:0:1::2"
    top = plan_pool(
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd"
    )
    end = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"  # the last address of the whole space
    assert (
        plan_lease(
            top,
            ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"],
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
        )
        == end
    )
    with pytest.raises(SubnetExhausted):
        plan_lease(top, ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", end], end)


def test_plan_addresses_from_config() -> None:
    v4, v6 = plan_pools(NetConfig())
    assert v6 is None
    assert plan_addresses(v4, v6, []) == ("172.26.64.2",)
    v4, v6 = plan_pools(NetConfig(subnet6="fd00:1::/64"))
    leased = ["172.26.64.2", "fd00:1::2"]
    assert plan_addresses(v4, v6, leased, "172.26.64.2", "fd00:1::2") == (
        "172.26.64.3",
        "fd00:1::3",
    )
    full = [str(ip) for ip in ipaddress.ip_network("172.26.64.0/20").hosts()]
    with pytest.raises(SubnetExhausted):
        plan_addresses(v4, v6, full)


def test_a_thousand_leases_in_a_20_stay_cheap() -> None:
    pool = plan_pool("172.26.64.0/20", "172.26.64.1")
    leased = lease_all(pool, 1000)
    assert len(set(leased)) == 1000
    assert leased[0] == "172.26.64.2" and leased[-1] == "172.26.67.233"


# --- property test: lease and release against a model ----------------------------------------

SUBNET, GATEWAY = "10.9.0.0/28", "10.9.0.7"  # 13 leasable: exhaustion happens often


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = plan_pool(SUBNET, GATEWAY)
        self.leased: list[str] = []
        self.last = ""

    @rule()
    def lease(self) -> None:
        try:
            ip = plan_lease(self.pool, self.leased, self.last)
        except SubnetExhausted:
            assert len(self.leased) == self.pool.size  # exhausted exactly when full
            return
        assert len(self.leased) < self.pool.size
        address = ipaddress.ip_address(ip)
        assert address in ipaddress.ip_network(SUBNET)
        assert ip not in {"10.9.0.0", GATEWAY, "10.9.0.15"}
        assert ip not in self.leased
        assert ip == self.expected_next()  # round-robin from the last lease
        self.leased.append(ip)
        self.last = ip

    def expected_next(self) -> str:
        """The model: the first free address after the last lease, wrapping at .14."""
        hosts = [str(ip) for ip in ipaddress.ip_network(SUBNET).hosts() if str(ip) != GATEWAY]
        start = hosts.index(self.last) + 1 if self.last in hosts else 0
        for ip in hosts[start:] + hosts[:start]:
            if ip not in self.leased:
                return ip
        raise AssertionError("the model has nothing free")

    @precondition(lambda self: bool(self.leased))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ip = data.draw(st.sampled_from(self.leased))
        self.leased.remove(ip)

    @invariant()
    def unique(self) -> None:
        assert len(self.leased) == len(set(self.leased))


TestLeases = LeaseMachine.TestCase
TestLeases.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
