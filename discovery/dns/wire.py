"""DNS wire format: the query parser of the hot path and record encoders.  Pure: no I/O.

Only what an authoritative responder needs (RFC 1035 section 4).  The common
query shape (one question, no answer/authority records, at most one
additional record) is parsed here without allocation beyond a tuple; any
other shape goes to :mod:`discovery.dns.codec`, which decodes it with dnslib.

Records are encoded by hand because the responder needs exact control over
name compression: every answer's owner is a pointer to the question name at
offset 12 (RFC 1035 section 4.1.4), so an answer encoded once can be reused
for any query with the same question length, whatever its letter case.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

# RFC 1035 section 3.2.2 / RFC 3596 / RFC 2782 / RFC 6891: types we use.
TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1

# Response codes (RFC 1035 section 4.1.1, RFC 6891 section 9 for BADVERS).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

# Header flag bits (RFC 1035 section 4.1.1).
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000  # RFC 3225: the DO bit in the OPT TTL's flags

HEADER_SIZE = 12
MAX_NAME = 255  # RFC 1035 section 2.3.4
QUESTION_POINTER = b"\xc0\x0c"  # the question name always starts at offset 12
MAX_POINTER_OFFSET = 0x3FFF  # 14 bits of offset in a compression pointer
SRV_TARGET_OFFSET = 18  # owner pointer 2 + type/class/ttl/rdlength 10 + prio/weight/port 6

_HEADER = struct.Struct(">2sHHHHH")
_TYPE_CLASS = struct.Struct(">HH")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_OPT = struct.Struct(">BHHIH")  # root name, type, payload size, ttl, rdlength
OPT_SIZE = _OPT.size  # an OPT record without options
_U16 = struct.Struct(">H")
_OPTION = struct.Struct(">HH")  # EDNS option code and length (RFC 6891 section 6.1.2)


class QueryError(Exception):
    """A message that must be answered with `rcode` (FORMERR or NOTIMP).

    `question` is the raw question (name, type, class) when exactly one could be
    parsed, else b"", so the error reply can echo it.
    """

    def __init__(self, rcode: int, question: bytes = b"") -> None:
        super().__init__(rcode)
        self.rcode = rcode
        self.question = question


class Edns(NamedTuple):
    """What the client's OPT record says (RFC 6891 section 6.1.3)."""

    payload: int
    version: int
    dnssec_ok: bool


class Query(NamedTuple):
    """A parsed query: offsets into the original bytes plus the fields we use."""

    name_end: int  # offset just past the question name
    qtype: int
    qclass: int
    flags: int
    edns: Edns | None


def parse_query(data: bytes) -> Query | None:
    """Parse a query of the common shape; None means "drop it" (QR=1 or no header).

    Error handling: raises QueryError(NOTIMP) for opcodes other than QUERY,
    QueryError(FORMERR) for QDCOUNT != 1 or a malformed question, and
    :class:`Unusual` when the shape is legal but needs the full decoder.
    """
    if len(data) < HEADER_SIZE:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & FLAG_QR:
        return None  # a response: answering it could start a loop (RFC 1035 section 7.3)
    if qdcount != 1:
        if flags & OPCODE_MASK:
            raise QueryError(NOTIMP)
        raise QueryError(FORMERR)
    name_end = _skip_question_name(data)
    if name_end < 0 or name_end + 4 > len(data):
        raise QueryError(NOTIMP if flags & OPCODE_MASK else FORMERR)
    qtype, qclass = _TYPE_CLASS.unpack_from(data, name_end)
    if flags & OPCODE_MASK:
        raise QueryError(NOTIMP, data[HEADER_SIZE : name_end + 4])
    edns = None
    if ancount or nscount or arcount > 1:
        raise Unusual(name_end)
    if arcount:
        edns = _parse_opt(data, name_end + 4)
        if edns is None:
            raise Unusual(name_end)
        if not options_fit(data, name_end + 4 + _OPT.size, len(data)):
            raise QueryError(FORMERR, data[HEADER_SIZE : name_end + 4])
    return Query(name_end, qtype, qclass, flags, edns)


class Unusual(Exception):
    """A well-formed header whose records need the full decoder (codec.py)."""

    def __init__(self, name_end: int) -> None:
        super().__init__(name_end)
        self.name_end = name_end


def _skip_question_name(data: bytes) -> int:
    """Offset just past the question name at 12, or -1 if it is malformed.

    A compression pointer cannot appear in the first name of a message: there
    is nothing before it to point to.
    """
    i = HEADER_SIZE
    end = len(data)
    while i < end:
        length = data[i]
        if length == 0:
            return i + 1 if i + 1 - HEADER_SIZE <= MAX_NAME else -1
        if length & 0xC0:
            return -1
        i += length + 1
    return -1


def _parse_opt(data: bytes, offset: int) -> Edns | None:
    """The OPT record at `offset` if it is one with a root owner, else None."""
    if offset + _OPT.size > len(data):
        return None
    root, rtype, payload, ttl, rdlength = _OPT.unpack_from(data, offset)
    if root != 0 or rtype != TYPE_OPT or offset + _OPT.size + rdlength != len(data):
        return None
    return Edns(payload, (ttl >> 16) & 0xFF, bool(ttl & EDNS_DO))


def options_fit(data: bytes, start: int, end: int) -> bool:
    """True when the OPT RDATA in data[start:end] is a whole number of options.

    RFC 6891 section 6.1.2: each option is a code, a length and that many
    octets; an option whose length runs past the RDATA makes the OPT
    malformed, and the message gets FORMERR (section 7).
    """
    pos = start
    while pos < end:
        if pos + _OPTION.size > end:
            return False
        pos += _OPTION.size + _U16.unpack_from(data, pos + 2)[0]
    return pos == end


def skip_name(data: bytes, pos: int) -> int:
    """The offset just past the (possibly compressed) name at `pos`, or -1 if malformed."""
    end = len(data)
    while pos < end:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= end else -1
        if length & 0xC0:
            return -1
        pos += length + 1
    return -1


def opts_fit(data: bytes, name_end: int, records: int) -> bool:
    """True when every OPT among the `records` after the question has well-formed options.

    For messages the full decoder accepted (codec.py): dnslib drops an option
    that overruns its OPT instead of rejecting the message.
    """
    pos = name_end + 4
    for _ in range(records):
        pos = skip_name(data, pos)
        if pos < 0 or pos + _RR_FIXED.size > len(data):
            return False
        rtype, _, _, rdlength = _RR_FIXED.unpack_from(data, pos)
        start = pos + _RR_FIXED.size
        pos = start + rdlength
        if pos > len(data) or (rtype == TYPE_OPT and not options_fit(data, start, pos)):
            return False
    return True


def question_labels(data: bytes, name_end: int) -> list[bytes]:
    """The labels of the question name (as sent) of a message parsed by parse_query."""
    labels: list[bytes] = []
    i = HEADER_SIZE
    while i < name_end - 1:
        length = data[i]
        labels.append(data[i + 1 : i + 1 + length])
        i += length + 1
    return labels


# -- encoders ------------------------------------------------------------------


def encode_name(labels: tuple[bytes, ...] | list[bytes], tail: bytes = b"\x00") -> bytes:
    """Labels in wire form followed by `tail` (the root, or a compression pointer)."""
    return b"".join(bytes((len(label),)) + label for label in labels) + tail


def pointer(offset: int) -> bytes:
    """A compression pointer to `offset` (RFC 1035 section 4.1.4)."""
    return _U16.pack(0xC000 | offset)


def encode_rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One IN-class resource record with an already-encoded owner name."""
    return owner + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def rr_tail(rtype: int, ttl: int, rdata: bytes) -> bytes:
    """A record without its owner name, to be prefixed by a pointer when sent."""
    return _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def address_rdata(address: str) -> tuple[int, bytes]:
    """(TYPE_A or TYPE_AAAA, packed address) for a textual IP address."""
    ip = ipaddress.ip_address(address)
    return (TYPE_A if ip.version == 4 else TYPE_AAAA), ip.packed


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    """SRV RDATA (RFC 2782); `target` is an uncompressed wire name, as the RFC requires."""
    return struct.pack(">HHH", priority, weight, port) + target


def txt_rdata(strings: list[bytes]) -> bytes:
    """TXT RDATA: character-strings of at most 255 octets each (RFC 1035 section 3.3.14)."""
    return b"".join(bytes((len(s[:255]),)) + s[:255] for s in strings)


def soa_rdata(
    mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int, minimum: int
) -> bytes:
    """SOA RDATA (RFC 1035 section 3.3.13); names may be compressed (a well-known type)."""
    return (
        mname + rname + struct.pack(">IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)
    )


def encode_header(ident: bytes, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    return _HEADER.pack(ident, flags, qd, an, ns, ar)


def encode_opt(payload: int, ext_rcode: int, dnssec_ok: bool) -> bytes:
    """Our OPT record: root owner, our payload size, version 0, no options (RFC 6891)."""
    ttl = (ext_rcode << 24) | (EDNS_DO if dnssec_ok else 0)
    return _OPT.pack(0, TYPE_OPT, payload, ttl, 0)
