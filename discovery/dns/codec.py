"""The full DNS message decoder, for queries the hot path does not handle.  Pure: no I/O.

The only module that imports dnslib, used strictly as a codec: it decodes
messages whose shape is legal but unusual (answer or authority records in a
query, several additional records, trailing bytes after the OPT record).
Nothing of dnslib's reply building is used (it sets RA=1 and its truncate()
drops the question).
"""

from __future__ import annotations

import struct

import dnslib

from discovery.dns.wire import (
    EDNS_DO,
    FORMERR,
    HEADER_SIZE,
    TYPE_OPT,
    Edns,
    Query,
    QueryError,
    opts_fit,
)


def parse_unusual_query(data: bytes, name_end: int) -> Query:
    """Decode the whole message and extract what the responder needs.

    Error handling: a message dnslib cannot decode, or one with more than one
    OPT record, an OPT not owned by the root (RFC 6891 section 6.1.1) or an
    option running past its OPT's RDATA (section 6.1.2), raises
    QueryError(FORMERR) carrying the question, which parse_query already checked.
    """
    question = data[HEADER_SIZE : name_end + 4]
    try:
        message = dnslib.DNSRecord.parse(data)
    except Exception:  # dnslib raises DNSError, but also struct/Index errors on junk
        raise QueryError(FORMERR, question) from None
    opts = [rr for rr in message.ar if rr.rtype == TYPE_OPT]
    if len(opts) > 1 or any(str(rr.rname) != "." for rr in opts):
        raise QueryError(FORMERR, question)
    records = len(message.rr) + len(message.auth) + len(message.ar)
    if opts and not opts_fit(data, name_end, records):
        raise QueryError(FORMERR, question)  # an option overruns the OPT (RFC 6891 6.1.2)
    edns = None
    if opts:
        ttl = int(opts[0].ttl)
        edns = Edns(int(opts[0].rclass), (ttl >> 16) & 0xFF, bool(ttl & EDNS_DO))
    qtype, qclass = struct.unpack_from(">HH", data, name_end)
    flags = (data[2] << 8) | data[3]
    return Query(name_end, qtype, qclass, flags, edns)
