"""Answer order, from docs/dns_rules.md and RFC 2782.  Pure: no I/O.

SRV answers are ordered by ascending priority, and within a priority by a
weighted random draw, new for every query; A/AAAA answers are shuffled.  The
statistical bounds are many standard deviations wide: with the stated
probabilities a correct responder fails them far less than once in a million
runs, while a uniform or a fixed order fails them every time.
"""

from __future__ import annotations

import dataclasses

import pytest
from dnslib import DNSRecord

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns.responder import Responder
from discovery.dns.settings import DnsSettings
from discovery.model import Health, Instance, make_instance
from discovery.registry import Registry


def inst(service: str, n: int, *, priority: int = 1, weight: int = 1) -> Instance:
    return make_instance(
        service=service,
        id=f"{service}-{n}",
        node=f"n{n}",
        address=f"10.3.0.{n}",
        port=2000 + n,
        meta={"srv-priority": str(priority)},
        weights={"passing": weight, "warning": 0},
    )


def warning(instance: Instance) -> Instance:
    return dataclasses.replace(instance, health=Health.WARNING)


@pytest.fixture(scope="module")
def responder() -> Responder:
    reg = Registry(dc.LOCAL)
    reg.apply(
        upserts=[
            # priorities 0, 5 and 10, registered out of order
            inst("prio", 1, priority=10),
            inst("prio", 2, priority=5),
            inst("prio", 3, priority=0),
            inst("prio", 4, priority=10),
            inst("prio", 5, priority=0),
            inst("prio", 6, priority=5),
            inst("prio", 7, priority=5),
            # weight 9 against weight 1
            inst("weighted", 1, weight=1),
            inst("weighted", 2, weight=9),
            # five equal instances
            *(inst("flat", n) for n in range(1, 6)),
            # warning instances with warning weight 0
            *(warning(inst("zero", n)) for n in range(1, 4)),
        ]
    )
    return Responder(reg, DnsSettings())


def ask(responder: Responder, qname: str, qtype: str) -> DNSRecord:
    return dc.ask(responder, dc.query(qname, qtype), tcp=True)


def test_srv_ascending_priority(responder: Responder) -> None:
    orders = set()
    for _ in range(50):
        reply = ask(responder, "prio.service.nomad.", "SRV")
        priorities = [rr.rdata.priority for rr in reply.rr]
        assert priorities == [0, 0, 5, 5, 5, 10, 10]
        assert sorted(rr.rdata.port for rr in reply.rr) == [2001 + i for i in range(7)]
        orders.add(tuple(rr.rdata.port for rr in reply.rr))
    # within a priority the order still changes (3 priorities, 2!*3!*2! = 24 orders)
    assert len(orders) >= 3


def test_srv_weighted_shuffle(responder: Responder) -> None:
    runs = 300
    heavy_first = 0
    for _ in range(runs):
        reply = ask(responder, "weighted.service.nomad.", "SRV")
        assert sorted(rr.rdata.weight for rr in reply.rr) == [1, 9]
        heavy_first += reply.rr[0].rdata.weight == 9
    # RFC 2782: P(weight-9 first) = 9/10; mean 270, sd 5.2; uniform would give 150
    assert 230 <= heavy_first <= 295, heavy_first


def test_srv_equal_weights_shuffled(responder: Responder) -> None:
    firsts = set()
    for _ in range(50):
        reply = ask(responder, "flat.service.nomad.", "SRV")
        firsts.add(reply.rr[0].rdata.port)
    assert len(firsts) >= 3  # P(fewer than 3 of 5 ever first in 50) < 1e-15


@pytest.mark.parametrize("qname", ["flat.service.nomad.", "prio.service.nomad."])
def test_a_answers_shuffled(responder: Responder, qname: str) -> None:
    orders = set()
    addresses = None
    for _ in range(50):
        reply = ask(responder, qname, "A")
        got = tuple(str(rr.rdata) for rr in reply.rr)
        if addresses is None:
            addresses = sorted(got)
        assert sorted(got) == addresses  # the same set every time, in a new order
        orders.add(got)
    assert addresses is not None and len(addresses) >= 5
    assert len(orders) >= 5  # 120+ possible orders, 50 draws


def test_udp_limited_answers_vary(responder: Responder) -> None:
    # with udp_answer_limit 3 (Consul's default, set explicitly) only 3 of the 5
    # go out without EDNS; which 3 changes from query to query
    limited = Responder(responder.registry, DnsSettings(udp_answer_limit=3))
    seen: set[str] = set()
    for _ in range(50):
        reply = dc.ask(limited, dc.query("flat.service.nomad.", "A"))
        assert len(reply.rr) == 3
        seen.update(str(rr.rdata) for rr in reply.rr)
    assert len(seen) == 5


def test_srv_zero_weights_served_and_shuffled(responder: Responder) -> None:
    # RFC 2782: weight 0 is a valid weight; such targets are still answered
    firsts = set()
    for _ in range(50):
        reply = ask(responder, "zero.service.nomad.", "SRV")
        assert sorted((rr.rdata.weight, rr.rdata.port) for rr in reply.rr) == [
            (0, 2001),
            (0, 2002),
            (0, 2003),
        ]
        firsts.add(reply.rr[0].rdata.port)
    assert len(firsts) >= 2
