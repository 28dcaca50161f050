"""Coverage-guided fuzzing (atheris) of the DNS wire handler: bytes in, a reply or nothing out.

    .venv/bin/python -m tests.bench.fuzz_dns [-runs=200000] [-max_total_time=60] [corpus dir]

The target is :meth:`discovery.dns.responder.Responder.respond` over UDP and TCP
on the tests' world registry (tests/unit/dnscase.py: services with tags, meta,
named ports, IPv6, allocations).  Every input must give None (a message to drop)
or a reply that dnspython can parse, whose ID is the query's and whose QR bit is
set; anything else (an exception escaping respond, a reply that does not
parse) is a crash that atheris reports with its input.  Seeds: well-formed
queries of every type the zone answers.  Bounded: `-runs` and
`-max_total_time` (defaults 200,000 and 60 s).  Needs atheris (`make fuzz`
installs it).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import dns.message

    from discovery.dns.responder import ForwardQuery, Responder
    from tests.unit import dnscase as dc

RESPONDER = Responder(dc.world_registry(), dc.SETTINGS)
SEEDS = [
    dc.query(name, qtype)
    for name in ("web.service.nomad.", "v1.web.service.nomad.", "_http._tcp.web.service.nomad.")
    for qtype in ("A", "AAAA", "SRV", "TXT", "ANY")
]


def check(data: bytes) -> None:
    for tcp in (False, True):
        reply = RESPONDER.respond(data, client="127.0.0.1", tcp=tcp)
        if reply is None or isinstance(reply, ForwardQuery):
            continue
        if len(data) >= 2 and reply[:2] != data[:2]:
            raise AssertionError(f"reply id {reply[:2]!r} for query id {data[:2]!r}")
        if not reply[2] & 0x80:
            raise AssertionError("reply without QR")
        if (reply[2] >> 3) & 0xF == 0:  # QUERY (dnspython reads UPDATE's sections its way)
            # raises on a reply that is not a DNS message (dnspython: any octets in labels)
            dns.message.from_wire(reply, ignore_trailing=False)


def main() -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-runs=") for a in argv):
        argv.append("-runs=200000")
    if not any(a.startswith("-max_total_time=") for a in argv):
        argv.append("-max_total_time=60")
    for seed in SEEDS:  # the seeds themselves must pass
        check(seed)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
