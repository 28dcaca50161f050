"""Forwarding queries to upstream recursors (Consul's `recursors`).  Adapter: client sockets.

:func:`parse_recursor` is pure and validates the configured addresses (the
config uses it too); :func:`host_recursors` (pure) picks the host's resolvers a
forwarder for bridge allocations may use when none are configured.
:func:`forward_query` asks the recursors one after the other (Consul's
"sequential" strategy) and returns the first usable reply.

Each exchange uses a fresh socket on a random port and a random message ID
(RFC 5452 section 9.2), and accepts only a reply whose ID and question match
(section 9.1); the client's ID is put back before the reply is returned.

Error handling: a recursor that times out, refuses the connection or answers
with an rcode other than NOERROR/NXDOMAIN is skipped (as Consul does); when
none is left :func:`forward_query` returns None and the server answers
SERVFAIL.  Failures are logged at debug level only: they follow the traffic.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import Any

from discovery.dns.settings import DEFAULT_EDNS_PAYLOAD

log = logging.getLogger(__name__)

DNS_PORT = 53
HEADER_SIZE = 12  # RFC 1035 section 4.1.1
LENGTH_PREFIX = 2  # RFC 1035 section 4.2.2: TCP messages carry a 16-bit length
CLASSIC_UDP_SIZE = 512  # RFC 1035 section 4.2.1: UDP size without EDNS
TYPE_OPT = 41  # RFC 6891 section 6.1.1
# Header octet 2 holds QR|Opcode|AA|TC|RD, octet 3 RA|Z|AD|CD|RCODE (RFC 1035 4.1.1).
QR_BIT = 0x80
TC_BIT = 0x02
RCODE_MASK = 0x0F
# Consul's sequential strategy: these rcodes are answers; any other tries the next recursor.
ANSWER_RCODES = (0, 3)  # NOERROR, NXDOMAIN
MAX_LABEL = 63
MAX_TCP_REPLIES = 16  # replies read on one TCP exchange before giving up on a match


def parse_recursor(text: str) -> tuple[str, int]:
    """The (ip, port) of a recursor given as "ip", "ip:port", "[ipv6]:port" or a bare IPv6.

    Error handling: raises ValueError naming the recursor and what is wrong
    with it.  Names are refused: a recursor is how names get resolved.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("recursor: empty address")
    host, port_text, bracketed = raw, "", raw.startswith("[")
    if bracketed:
        close = raw.find("]")
        if close < 0:
            raise ValueError(f"recursor {text!r}: missing ']' after the IPv6 address")
        host, rest = raw[1:close], raw[close + 1 :]
        if rest:
            if not rest.startswith(":") or len(rest) == 1:
                raise ValueError(f"recursor {text!r}: expected ':port' after ']', not {rest!r}")
            port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        if not port_text:
            raise ValueError(f"recursor {text!r}: port '' is not a number 1-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"recursor {text!r}: {host!r} is not an IPv4 or IPv6 address "
            "(recursors are not looked up by name)"
        ) from None
    if bracketed and ip.version == 4:
        raise ValueError(f"recursor {text!r}: brackets are for IPv6 addresses only")
    port = DNS_PORT
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"recursor {text!r}: port {port_text!r} is not a number 1-65535")
        port = int(port_text)
    return str(ip), port


def host_recursors(servers: Iterable[str]) -> tuple[str, ...]:
    """The host's nameservers (its resolv.conf) that may serve as recursors, in order.

    Loopback servers are left out, as Moby and Nomad leave them out of a
    namespace's resolv.conf: a stub on the host's loopback (systemd-resolved's
    127.0.0.53, a dnsmasq sending `.nomad` back to waypost) is the host's own
    arrangement, not an upstream for the allocations' queries.  Pure.
    """
    out = []
    for text in servers:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if not ip.is_loopback and str(ip) not in out:
            out.append(str(ip))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _address(text: str) -> tuple[str, int] | None:
    """parse_recursor, memoized; an invalid recursor is logged once and skipped."""
    try:
        return parse_recursor(text)
    except ValueError as exc:
        log.warning("skipping recursor: %s", exc)
        return None


async def forward_query(
    query: bytes,
    recursors: Sequence[str],
    timeout: float,  # noqa: ASYNC109 - per recursor, so a caller's asyncio.timeout cannot do it
    *,
    tcp: bool,
    max_payload: int = DEFAULT_EDNS_PAYLOAD,
) -> bytes | None:
    """The first usable reply to `query` from `recursors`, asked in order, or None.

    Each recursor gets `timeout` seconds (and the same again for a TCP retry).
    `tcp` is the client's transport: over UDP, a truncated reply (TC=1) is
    asked again over TCP, and the full reply is used when it fits the size
    the client can take (512, or its EDNS payload capped at `max_payload`);
    else the truncated one is, and the client retries over TCP itself.  A UDP
    reply larger than that size, whatever the upstream sent, is cut to it
    (:func:`truncate`): RFC 1035 section 4.2.1 and RFC 6891 section 6.2.3 let
    a sender exceed neither.
    """
    question = _question(query)
    if question is None:
        return None  # nothing to match a reply against (the responder never sends these)
    size = 0 if tcp else udp_size(query, max_payload)
    for text in recursors:
        address = _address(text)
        if address is None:
            continue
        reply = await _ask(query, question, address, timeout, size)
        if reply is not None and reply[3] & RCODE_MASK in ANSWER_RCODES:
            if size and len(reply) > size:
                reply = truncate(reply, size)
            return query[:2] + reply[2:]
        log.debug("recursor %s gave no usable answer", text)
    return None


async def _ask(
    query: bytes, question: bytes, address: tuple[str, int], seconds: float, size: int
) -> bytes | None:
    """One recursor's reply (with our random ID) or None on timeout or socket error.

    `size` is the client's UDP size, or 0 when the client came over TCP.
    """
    upstream_query = secrets.token_bytes(2) + query[2:]
    try:
        if not size:
            return await _exchange_tcp(upstream_query, question, address, seconds)
        reply = await _exchange_udp(upstream_query, question, address, seconds)
        if reply is None or not reply[2] & TC_BIT:
            return reply
        try:
            full = await _exchange_tcp(upstream_query, question, address, seconds)
        except (OSError, EOFError) as exc:
            log.debug("TCP retry to recursor %s failed: %r", address, exc)
            return reply
        if full is not None and len(full) <= size:
            return full
        return reply
    except (OSError, EOFError) as exc:  # TimeoutError is an OSError; EOF: closed mid-reply
        log.debug("recursor %s failed: %r", address, exc)
        return None


class _UdpExchange(asyncio.DatagramProtocol):
    """Waits for the reply matching one query on a connected UDP socket."""

    def __init__(self, ident: bytes, question: bytes, reply: asyncio.Future[bytes]) -> None:
        self._ident = ident
        self._question = question
        self._reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if not self._reply.done() and _matches(data, self._ident, self._question):
            self._reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._reply.done():  # ICMP port unreachable: nobody listens there
            self._reply.set_exception(exc)


async def _exchange_udp(
    query: bytes, question: bytes, address: tuple[str, int], seconds: float
) -> bytes | None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    async with asyncio.timeout(seconds):
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(query[:2], question, reply), remote_addr=address
        )
        try:
            transport.sendto(query)
            return await reply  # mismatched datagrams are ignored until the timeout
        finally:
            transport.close()


async def _exchange_tcp(
    query: bytes, question: bytes, address: tuple[str, int], seconds: float
) -> bytes | None:
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(len(query).to_bytes(LENGTH_PREFIX, "big") + query)
            for _ in range(MAX_TCP_REPLIES):
                size = int.from_bytes(await reader.readexactly(LENGTH_PREFIX), "big")
                reply = await reader.readexactly(size)
                if _matches(reply, query[:2], question):
                    return reply
            return None
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


def _matches(reply: bytes, ident: bytes, question: bytes) -> bool:
    """True for a response with our ID and question (RFC 5452 section 9.1).

    A truncated reply may come without its question; its ID is enough, since
    its only use is to make us ask again over TCP, where the question is checked.
    """
    if len(reply) < HEADER_SIZE or reply[:2] != ident or not reply[2] & QR_BIT:
        return False
    if reply[2] & TC_BIT and reply[4:6] == b"\x00\x00":
        return True
    return _question(reply) == question


def _question(message: bytes) -> bytes | None:
    """The only question of `message` (name lower-cased, type, class), else None.

    A compression pointer cannot appear in the first name of a message: there
    is nothing before it to point to.
    """
    if len(message) < HEADER_SIZE or message[4:6] != b"\x00\x01":
        return None
    end = _skip_name(message, HEADER_SIZE, pointers=False)
    if end < 0 or end + 4 > len(message):
        return None
    return message[HEADER_SIZE:end].lower() + message[end : end + 4]


def _skip_name(message: bytes, pos: int, *, pointers: bool) -> int:
    """The offset just past the name at `pos`, or -1 when it is malformed."""
    while pos < len(message):
        length = message[pos]
        if length == 0:
            return pos + 1
        if length > MAX_LABEL:
            return pos + 2 if pointers and length & 0xC0 == 0xC0 else -1
        pos += 1 + length
    return -1


def truncate(reply: bytes, size: int) -> bytes:
    """`reply` cut to at most `size` octets, with TC=1.  Pure.

    Whole answer records are kept from the start while they fit (RFC 2181
    section 9: never a partial RRset on the wire); authority and additional
    records are dropped, except the OPT (RFC 6891 section 7: a reply to an
    EDNS query carries one).  The records kept all precede the cut, so the
    compression pointers in them still point at bytes that are there.
    """
    if len(reply) < HEADER_SIZE:
        return reply
    qdcount, ancount, nscount, arcount = (
        int.from_bytes(reply[i : i + 2], "big") for i in range(4, 12, 2)
    )
    pos = HEADER_SIZE
    for _ in range(qdcount):
        pos = _skip_name(reply, pos, pointers=True)
        if pos < 0 or pos + 4 > len(reply):
            return _header(reply, 0, 0, b"")[:size]
        pos += 4
    question_end = pos
    records: list[tuple[int, int]] = []  # (start, end) of each record, in order
    opt = b""
    for index in range(ancount + nscount + arcount):
        start = pos
        pos = _skip_name(reply, pos, pointers=True)
        if pos < 0 or pos + 10 > len(reply):
            break
        pos += 10 + int.from_bytes(reply[pos + 8 : pos + 10], "big")
        if pos > len(reply):
            break
        records.append((start, pos))
        if index >= ancount + nscount and _rtype(reply, start) == TYPE_OPT:
            opt = reply[start:pos]
    budget = size - len(opt)
    if question_end > budget:
        return _header(reply, 0, 0, opt) + opt  # not even the question fits
    end, kept = question_end, 0
    for start, stop in records[:ancount]:
        if stop - start + end > budget:
            break
        end, kept = stop, kept + 1
    return _header(reply, qdcount, kept, opt) + reply[HEADER_SIZE:end] + opt


def _rtype(message: bytes, start: int) -> int:
    """The type of the record starting at `start` (its name already known to be well formed)."""
    pos = _skip_name(message, start, pointers=True)
    return int.from_bytes(message[pos : pos + 2], "big")


def _header(reply: bytes, qdcount: int, ancount: int, opt: bytes) -> bytes:
    """`reply`'s header with TC=1 and the counts of a truncated copy."""
    counts = (qdcount, ancount, 0, 1 if opt else 0)
    return (
        reply[:2]
        + bytes((reply[2] | TC_BIT, reply[3]))
        + b"".join(c.to_bytes(2, "big") for c in counts)
    )


def udp_size(query: bytes, max_payload: int = DEFAULT_EDNS_PAYLOAD) -> int:
    """The largest UDP reply the client takes: 512, or its EDNS payload capped at `max_payload`.

    RFC 6891 section 6.2.5: a payload below 512 means 512.
    """
    return min(_udp_size(query), max(max_payload, CLASSIC_UDP_SIZE))


def _udp_size(query: bytes) -> int:
    """The largest UDP reply the client takes: its EDNS payload, at least 512 (RFC 6891 6.2.5)."""
    counts = query[6:12]
    if len(counts) < 6 or counts[:4] != b"\x00\x00\x00\x00":
        return CLASSIC_UDP_SIZE  # answer or authority records in a query: play safe
    pos = _skip_name(query, HEADER_SIZE, pointers=False)
    if pos < 0:
        return CLASSIC_UDP_SIZE
    pos += 4  # qtype, qclass
    for _ in range(int.from_bytes(counts[4:6], "big")):
        pos = _skip_name(query, pos, pointers=True)
        if pos < 0 or pos + 10 > len(query):
            break
        rtype = int.from_bytes(query[pos : pos + 2], "big")
        if rtype == TYPE_OPT:
            return max(CLASSIC_UDP_SIZE, int.from_bytes(query[pos + 2 : pos + 4], "big"))
        pos += 10 + int.from_bytes(query[pos + 8 : pos + 10], "big")
    return CLASSIC_UDP_SIZE
