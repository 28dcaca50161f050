"""The DNS responder: query bytes in, reply bytes out.  Pure core (no I/O).

:func:`answer` is the whole protocol logic as a function of the query, a
registry snapshot and the settings.  :class:`Responder` memoizes its
expensive half (:func:`discovery.dns.records.prepare`) per question and
snapshot, so the per-query work is: parse the header and question, one dict
lookup, shuffle, and join pre-encoded records (the server adapters in
:mod:`discovery.dns.server` only frame bytes).

Error handling: respond() never raises; an internal error is logged and
answered with SERVFAIL.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from dataclasses import dataclass

from discovery.dns import wire
from discovery.dns.codec import parse_unusual_query
from discovery.dns.records import DEP_ALWAYS, Answer, Prepared, ZoneInfo, prepare
from discovery.dns.settings import (
    CLASSIC_UDP_SIZE,
    DEFAULT_EDNS_PAYLOAD,
    MAX_TCP_SIZE,
    DnsSettings,
)
from discovery.registry import Registry, Snapshot

log = logging.getLogger(__name__)

# Bound on memoized questions; random-name floods clear it instead of growing it.
MAX_CACHED = 100_000
LOG_INTERVAL = 60.0  # seconds between two logs of the same internal error type
MAX_CLIENTS_REMEMBERED = 4096  # recursion allow-list verdicts kept per settings
_U16 = struct.Struct(">H")
_RANDOM = random.random
_SHUFFLE = random.shuffle


@dataclass(frozen=True, slots=True)
class ForwardQuery:
    """Returned by :meth:`Responder.respond` when the query must go to the recursors.

    The server adapter forwards `query` (the client's bytes, unchanged) and
    relays the upstream reply, or sends :meth:`Responder.servfail` on failure.
    """

    query: bytes


class Responder:
    """Answers queries for the zone from the registry's current snapshot."""

    def __init__(self, registry: Registry, settings: DnsSettings) -> None:
        self.registry = registry
        self.settings = settings
        self._info = ZoneInfo.from_settings(settings)
        self._cache: dict[bytes, Prepared] = {}
        self._deps: dict[str | None, list[bytes]] = {}
        self._nodes = registry.snapshot.nodes
        self._allocs = registry.snapshot.allocs
        self._recurse: dict[str, bool] = {}
        self._logged: dict[str, float] = {}
        registry.subscribe(self._changed)

    def update_settings(self, settings: DnsSettings) -> None:
        """Swap settings (SIGHUP); queries in flight finish with the old ones."""
        self.settings = settings
        self._info = ZoneInfo.from_settings(settings)
        self._recurse = {}
        self._clear()

    def respond(self, data: bytes, *, client: str, tcp: bool) -> bytes | ForwardQuery | None:
        """The reply to one DNS message, a ForwardQuery, or None to send nothing.

        `client` is the peer IP (for the recursion allow-list); `tcp` selects
        the TCP size limit instead of UDP/EDNS trimming.  Never raises: an
        internal error gives SERVFAIL.  None means drop (QR=1, shorter than a header).
        """
        if type(data) is not bytes:  # memoryview/bytearray from a caller: keys must hash
            data = bytes(data)
        try:
            query = wire.parse_query(data)
            if query is None:
                return None
        except wire.QueryError as err:
            return render_error(data, err.rcode, err.question)
        except wire.Unusual as unusual:
            try:
                query = parse_unusual_query(data, unusual.name_end)
            except wire.QueryError as err:
                return render_error(data, err.rcode, err.question)
        try:
            return self._answer(data, query, client, tcp)
        except Exception as err:
            self._log_internal(err)
            return self.servfail(data)

    def servfail(self, data: bytes) -> bytes | None:
        """A SERVFAIL reply echoing `data`'s id and question, or None if it has no header."""
        if len(data) < wire.HEADER_SIZE:
            return None
        try:
            query = wire.parse_query(data)
        except (wire.QueryError, wire.Unusual):
            query = None
        question = data[wire.HEADER_SIZE : query.name_end + 4] if query else b""
        return render_error(data, wire.SERVFAIL, question)

    # -- internals -------------------------------------------------------------

    def _answer(
        self, data: bytes, query: wire.Query, client: str, tcp: bool
    ) -> bytes | ForwardQuery:
        name_end = query.name_end
        key = data[wire.HEADER_SIZE : name_end].lower() + data[name_end : name_end + 4]
        prepared = self._cache.get(key)
        if prepared is None:
            prepared = self._prepare(data, query, key)
        settings = self.settings
        recursion = bool(settings.recursors) and self._may_recurse(client)
        if prepared.outside and recursion:
            return ForwardQuery(data)
        return render(data, query, prepared, settings, tcp=tcp, recursion=recursion)

    def _prepare(self, data: bytes, query: wire.Query, key: bytes) -> Prepared:
        labels = [
            label.lower().decode("latin-1") for label in wire.question_labels(data, query.name_end)
        ]
        prepared = prepare(labels, query.qtype, query.qclass, self.registry.snapshot, self._info)
        if len(self._cache) >= MAX_CACHED:
            self._clear()
        self._cache[key] = prepared
        self._deps.setdefault(prepared.dep, []).append(key)
        return prepared

    def _may_recurse(self, client: str) -> bool:
        verdict = self._recurse.get(client)
        if verdict is None:
            if len(self._recurse) >= MAX_CLIENTS_REMEMBERED:
                self._recurse.clear()
            verdict = self._recurse[client] = self.settings.may_recurse(client)
        return verdict

    def _log_internal(self, err: Exception) -> None:
        """Log an internal error with its traceback, at most once a minute per error type."""
        now = time.monotonic()
        kind = type(err).__name__
        if now - self._logged.get(kind, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[kind] = now
            log.error("internal error answering a DNS query (SERVFAIL)", exc_info=err)

    def _changed(self, snap: Snapshot, keys: frozenset[str]) -> None:
        """Registry subscriber: drop the memoized answers the change can affect."""
        if snap.nodes is not self._nodes or snap.allocs is not self._allocs:
            self._nodes, self._allocs = snap.nodes, snap.allocs
            self._clear()
            return
        cache, deps = self._cache, self._deps
        for dep in (DEP_ALWAYS, *keys):
            for key in deps.pop(dep, ()):
                cache.pop(key, None)

    def _clear(self) -> None:
        self._cache = {}
        self._deps = {}


# -- rendering -------------------------------------------------------------------


def size_limits(query: wire.Query, settings: DnsSettings, tcp: bool) -> tuple[int, int]:
    """(message size limit, answer count limit) for this query's transport."""
    if tcp:
        return MAX_TCP_SIZE, MAX_TCP_SIZE
    edns = query.edns
    if edns is None:
        limit = settings.udp_answer_limit
        return CLASSIC_UDP_SIZE, limit if limit > 0 else MAX_TCP_SIZE
    # RFC 6891 section 6.2.5: values below 512 are treated as 512.
    payload = max(edns.payload, CLASSIC_UDP_SIZE)
    return min(payload, max(settings.edns_max_payload, CLASSIC_UDP_SIZE)), MAX_TCP_SIZE


def render(
    data: bytes,
    query: wire.Query,
    prepared: Prepared,
    settings: DnsSettings,
    *,
    tcp: bool,
    recursion: bool,
) -> bytes:
    """Assemble the reply: header, the question as asked, ordered and trimmed records."""
    name_end = query.name_end
    question = data[wire.HEADER_SIZE : name_end + 4]
    edns = query.edns
    opt = b""
    if edns is not None:
        if edns.version > 0:  # RFC 6891 section 6.1.3
            return _error_reply(data, wire.BADVERS, question)
        opt = wire.encode_opt(settings.edns_max_payload, 0, edns.dnssec_ok)
    limit, max_answers = size_limits(query, settings, tcp)
    answers = ordered(prepared)
    budget = limit - len(opt) - len(prepared.authority) - len(prepared.extra)
    pos = wire.HEADER_SIZE + len(question)
    parts = [b"", question]
    glue: list[bytes] = []
    seen: dict[bytes, int] = {}
    glue_size = 0
    truncated = False
    count = 0
    for record, target, tail in answers:
        size = len(record)
        new_glue = target is not None and target not in seen
        extra = 2 + len(tail) if new_glue else 0
        if count == max_answers or pos + size + glue_size + extra > budget:
            truncated = True
            break
        if new_glue:
            assert target is not None
            offset = pos + wire.SRV_TARGET_OFFSET
            # Point at the target inside the SRV RDATA; past 14 bits, spell it out.
            owner = wire.pointer(offset) if offset <= wire.MAX_POINTER_OFFSET else target
            seen[target] = offset
            glue.append(owner + tail)
            glue_size += len(owner) + len(tail)
        parts.append(record)
        pos += size
        count += 1
    flags = wire.FLAG_QR | (query.flags & wire.FLAG_RD) | prepared.rcode
    if prepared.authoritative:
        flags |= wire.FLAG_AA
    if recursion:
        flags |= wire.FLAG_RA
    if truncated and settings.enable_truncate:
        flags |= wire.FLAG_TC
    parts.append(prepared.authority)
    parts.extend(glue)
    parts.append(prepared.extra)
    parts.append(opt)
    ar = len(glue) + prepared.extra_count + (1 if opt else 0)
    parts[0] = wire.encode_header(data[:2], flags, 1, count, prepared.authority_count, ar)
    return b"".join(parts)


def ordered(prepared: Prepared) -> tuple[Answer, ...] | list[Answer]:
    """Answers in per-query order: priority levels ascending, weighted-random within one.

    RFC 2782: within a priority, a target's chance to come first is its weight
    over the sum; Efraimidis-Spirakis keys (u ** (1/w), largest first) give
    that distribution for the whole order in one sort.
    """
    groups = prepared.groups
    if groups is None:
        return prepared.answers
    if len(groups) == 1 and groups[0][1] is None:
        out = list(groups[0][0])
        _SHUFFLE(out)
        return out
    result: list[Answer] = []
    for members, weights in groups:
        if weights is None:
            level = list(members)
            _SHUFFLE(level)
        else:
            keys = [_RANDOM() ** (1.0 / w) if w > 0 else 0.0 for w in weights]
            level = [
                a for _, a in sorted(zip(keys, members, strict=True), key=_first, reverse=True)
            ]
        result.extend(level)
    return result


def _first(pair: tuple[float, Answer]) -> float:
    return pair[0]


def render_error(data: bytes, rcode: int, question: bytes) -> bytes | None:
    """A reply with `rcode`, no records, `question` echoed; None if `data` has no header."""
    if len(data) < wire.HEADER_SIZE:
        return None
    return _error_reply(data, rcode, question)


def _error_reply(data: bytes, rcode: int, question: bytes) -> bytes:
    """render_error() for a message known to have a header; extended rcodes go in an OPT."""
    flags = (data[2] << 8) | data[3]
    reply_flags = wire.FLAG_QR | (flags & (wire.OPCODE_MASK | wire.FLAG_RD)) | (rcode & 0xF)
    opt = b""
    if rcode > 0xF:  # only BADVERS here; it needs an OPT to carry the upper bits
        opt = wire.encode_opt(DEFAULT_EDNS_PAYLOAD, rcode >> 4, False)
    header = wire.encode_header(data[:2], reply_flags, 1 if question else 0, 0, 0, 1 if opt else 0)
    return header + question + opt
