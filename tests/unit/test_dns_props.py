"""Property tests of the DNS responder (hypothesis).  Pure: no I/O.

- respond() never raises; it returns None (only for messages shorter than a
  header or with QR=1) or a parseable reply with the query's id, over UDP no
  larger than the EDNS cap;
- every question for a name in the zone gets an authoritative NOERROR or
  NXDOMAIN, with the zone SOA in Authority when the answer is empty (RFC 2308).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from dnslib import QTYPE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

try:  # tests/unit is a rootdir-relative directory today; a package if it gains __init__.py
    from tests.unit import dnscase as dc
except ImportError:  # pragma: no cover - depends on how pytest imported this file
    import dnscase as dc  # type: ignore[no-redef]

from discovery.dns.responder import Responder

# A `.hypothesis` directory in the rootdir makes the hypothesis plugin warn at
# every collection (pyproject's norecursedirs replaces pytest's defaults), and
# filterwarnings=error turns that into an error for every later pytest run.
# The plugin scans for constants at the end of collection, so this must happen
# at import; it holds for the whole session (a process-wide hypothesis setting).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "waypost-hypothesis")

RESPONDER = Responder(dc.world_registry(), dc.SETTINGS)
SERIAL = RESPONDER.registry.snapshot.index

KEYWORDS = ["service", "node", "addr", "alloc", "dc1", "dc2", "dc9", "web", "api", "db-main"]
KEYWORDS += ["primary", "v1", "_web", "_tcp", "_udp", "_http", "node1", "0a000001", "3f2a"]
LABEL = st.one_of(
    st.sampled_from(KEYWORDS),
    st.from_regex(r"\A[a-zA-Z0-9_][a-zA-Z0-9_-]{0,20}\Z"),
)
QTYPES = ["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "MX", "CNAME", "PTR", "CAA", "HTTPS"]


def check_reply(data: bytes, raw: object, *, tcp: bool) -> None:
    if len(data) < 12 or data[2] & 0x80:
        assert raw is None
        return
    assert isinstance(raw, bytes)
    if not tcp:  # no UDP reply is ever larger than the EDNS cap
        assert len(raw) <= max(512, dc.SETTINGS.edns_max_payload)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == struct.unpack("!H", data[:2])[0]
    assert reply.header.qr == 1


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), tcp=st.booleans())
def test_arbitrary_bytes(data: bytes, tcp: bool) -> None:
    check_reply(data, RESPONDER.respond(data, client="127.0.0.1", tcp=tcp), tcp=tcp)


@settings(max_examples=500, deadline=None)
@given(
    ident=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0x7FFF),  # QR clear: must be answered
    counts=st.tuples(*[st.integers(0, 3)] * 4),
    body=st.binary(max_size=300),
    tcp=st.booleans(),
)
def test_header_then_garbage(
    ident: int, flags: int, counts: tuple[int, int, int, int], body: bytes, tcp: bool
) -> None:
    data = struct.pack("!6H", ident, flags, *counts) + body
    check_reply(data, RESPONDER.respond(data, client="127.0.0.1", tcp=tcp), tcp=tcp)


@settings(max_examples=500, deadline=None)
@given(
    labels=st.lists(LABEL, max_size=5),
    zone=st.sampled_from(["nomad.", "NOMAD.", "consul."]),
    qtype=st.sampled_from(QTYPES),
    edns=st.booleans(),
    tcp=st.booleans(),
)
def test_in_zone_names_are_authoritative(
    labels: list[str], zone: str, qtype: str, edns: bool, tcp: bool
) -> None:
    qname = ".".join([*labels, zone])
    data = dc.query(qname, qtype, edns=dc.Edns() if edns else None)
    reply = dc.ask(RESPONDER, data, tcp=tcp)
    assert reply.header.id == dc.QUERY_ID
    assert reply.header.aa == 1
    assert reply.header.ra == 0
    assert dc.rcode_name(reply) in {"NOERROR", "NXDOMAIN"}
    assert [(str(q.qname), q.qtype) for q in reply.questions] == [(qname, getattr(QTYPE, qtype))]
    assert all(str(rr.rname) == qname for rr in reply.rr)
    if not reply.rr:
        assert dc.texts(reply.auth) == [dc.soa(dc.zone_of(qname), serial=SERIAL)]
    if dc.rcode_name(reply) == "NXDOMAIN":
        assert reply.rr == []
    assert len(dc.opts(reply)) == int(edns)
