"""Answer checks with dnspython: same record sets everywhere, waypost shuffles.  Adapter.

A few sample queries go to each server over UDP (no EDNS, as dnsperf sends
them).  Answers are reduced to comparable :class:`Answer` values (rcode and
the set of answer / additional records, ignoring order and TTL, owner names
lower-cased), then compared with Knot's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.bench import dns_data

QUERY_TIMEOUT = 2.0
SHUFFLE_TRIES = 20  # P(20 identical orders of 3 records | uniform shuffle) = 6**-19


@dataclass(frozen=True, slots=True)
class Answer:
    """The order-free content of one reply."""

    rcode: str
    answer: frozenset[str]
    additional: frozenset[str]


Query = tuple[str, str]  # (name, type)


def plan_samples(services: int) -> list[Query]:
    """A handful of queries covering the mix: SRV, A, and a name that does not exist."""
    picks = sorted({1, max(1, services // 2), services})
    out: list[Query] = []
    for i in picks:
        name = f"{dns_data.service_name(i)}.service.{dns_data.DOMAIN}"
        out += [(name, "SRV"), (name, "A")]
    out.append((f"nx1.service.{dns_data.DOMAIN}", "A"))
    out.append((f"{dns_data.service_name(services + 1)}.service.{dns_data.DOMAIN}", "SRV"))
    return out


def _records(section: Sequence[dns.rrset.RRset]) -> frozenset[str]:
    out: set[str] = set()
    for rrset in section:
        owner = rrset.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(rrset.rdtype)
        out.update(f"{owner} {rdtype} {rdata.to_text().lower()}" for rdata in rrset)
    return frozenset(out)


def ask(port: int, name: str, qtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, qtype, use_edns=False)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=QUERY_TIMEOUT)


def collect(port: int, queries: Sequence[Query]) -> dict[Query, Answer]:
    """The answers of the server on 127.0.0.1:port to `queries`."""
    out: dict[Query, Answer] = {}
    for name, qtype in queries:
        reply = ask(port, name, qtype)
        out[(name, qtype)] = Answer(
            rcode=dns.rcode.to_text(reply.rcode()),
            answer=_records(reply.answer),
            additional=_records(reply.additional),
        )
    return out


def compare(reference: Mapping[Query, Answer], other: Mapping[Query, Answer]) -> list[str]:
    """Differences in rcode or answer records; additional-section differences are noted too."""
    problems: list[str] = []
    for query, want in reference.items():
        got = other.get(query)
        label = f"{query[0]} {query[1]}"
        if got is None:
            problems.append(f"{label}: no answer")
            continue
        if got.rcode != want.rcode:
            problems.append(f"{label}: rcode {got.rcode}, expected {want.rcode}")
        if got.answer != want.answer:
            problems.append(
                f"{label}: answer differs: missing {sorted(want.answer - got.answer)}, "
                f"extra {sorted(got.answer - want.answer)}"
            )
        if want.answer and got.additional != want.additional:
            problems.append(
                f"{label}: additional differs: missing {sorted(want.additional - got.additional)}, "
                f"extra {sorted(got.additional - want.additional)}"
            )
    return problems


def distinct_orders(port: int, name: str, qtype: str, tries: int = SHUFFLE_TRIES) -> int:
    """How many different answer orders `tries` identical queries got."""
    orders: set[tuple[str, ...]] = set()
    for _ in range(tries):
        reply = ask(port, name, qtype)
        orders.add(tuple(rdata.to_text() for rrset in reply.answer for rdata in rrset))
    return len(orders)
