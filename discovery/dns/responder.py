"""The DNS responder: query bytes in, reply bytes out.  Pure core (no I/O).

:class:`Responder` is the protocol logic as a function of the query, the
registry's current snapshot and the settings.  It memoizes the expensive
half, :func:`discovery.dns.records.prepare`, per lower-cased question until
the registry changes what that question depends on; per query it parses the
header and question, does one dict lookup, and :func:`discovery.dns.render.render`
joins pre-encoded records in a random order.  The server adapters in
:mod:`discovery.dns.server` only frame bytes.

Replies to UDP queries of the common shape (a lower-case question, no EDNS
or an OPT without options, no recursion configured) are also kept whole, one
per answer order, keyed by :func:`reply_key`: the query's bytes after its ID
with what does not change the reply taken out (header bits other than QR,
opcode and RD; OPT flags other than DO; an EDNS size becomes the size limit
it gives).  A later query with the same key was validated when its twin was
answered, so it is answered with its ID and one of those replies: a dict
lookup and a join, no parsing.  Entries are dropped when what they depend on
changes in the registry.

Both caches share one budget, `settings.cache_max_bytes`, counted from the
octets each entry holds plus a per-object overhead; past it the least
recently used entries go (whole replies first, they are the cheaper to
rebuild), so no query mix can grow the agent's memory beyond it.

Error handling: respond() never raises; an internal error is logged and
answered with SERVFAIL.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from discovery.dns import wire
from discovery.dns.codec import parse_unusual_query
from discovery.dns.records import DEP_ALWAYS, Prepared, ZoneInfo, prepare
from discovery.dns.render import render, render_error, render_variants
from discovery.dns.settings import CLASSIC_UDP_SIZE, DnsSettings
from discovery.registry import Registry, Snapshot

log = logging.getLogger(__name__)

# CPython overheads counted with each cache entry (key, dict slot, tuple, bytes
# objects), so that cache_max_bytes tracks memory and not only payload octets.
ENTRY_OVERHEAD = 200
REPLY_OVERHEAD = 40  # per reply kept in an entry (a bytes object's header)
PREPARED_OVERHEAD = 400  # a Prepared, its tuples and its Memo
FORWARDED = -1  # pseudo-rcode counting queries handed to the recursors
LOG_INTERVAL = 60.0  # seconds between two logs of the same internal error type
MAX_CLIENTS_REMEMBERED = 4096  # recursion allow-list verdicts kept per settings
_RANDOM = random.random


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
        # Prepared answers by lower-cased question: [prepared, octets counted, memo octets counted].
        self._cache: OrderedDict[bytes, list[Any]] = OrderedDict()
        # Whole replies by reply_key(): ((tally index, reply[2:], ...), octets, dep).
        self._replies: OrderedDict[bytes, tuple[tuple[int | bytes, ...], int, str | None]] = (
            OrderedDict()
        )
        # Keys of each cache by dependency (a service key, DEP_ALWAYS or DEP_NODES).
        self._deps: dict[str | None, set[bytes]] = {}
        self._reply_deps: dict[str | None, set[bytes]] = {}
        self._bytes = 0  # octets counted for both caches (cache_bytes)
        self._nodes = registry.snapshot.nodes
        self._allocs = registry.snapshot.allocs
        self._recurse: dict[str, bool] = {}
        self._logged: dict[str, float] = {}
        # Queries answered, by (qtype, rcode or FORWARDED) (see `counts`): the ones
        # answered from _replies count in _hits, at the index their entry names.
        self._counts: dict[tuple[int, int], int] = {}
        self._tallies: dict[tuple[int, int], int] = {}  # tally -> its index in _hits
        self._hits: list[int] = []
        registry.subscribe(self._changed)

    @property
    def counts(self) -> dict[tuple[int, int], int]:
        """Queries answered by (qtype, rcode or FORWARDED), for the metrics endpoint.

        Malformed messages count under qtype 0 (FORMERR, NOTIMP).
        """
        out = dict(self._counts)
        for tally, hits in zip(self._tallies, self._hits, strict=True):  # insertion order
            if hits:
                out[tally] = out.get(tally, 0) + hits
        return out

    @property
    def cache_bytes(self) -> int:
        """Octets the two caches are counted at; at most settings.cache_max_bytes."""
        return self._bytes

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
        if not tcp and len(data) >= wire.HEADER_SIZE:
            key = reply_key(data, self.settings.edns_max_payload)
            replies = self._replies
            hit = replies.get(key)
            if hit is not None:
                replies.move_to_end(key)
                return self._pick(data, hit[0])
        try:
            query = wire.parse_query(data)
            if query is None:
                return None
        except wire.QueryError as err:
            return self._error(data, err)
        except wire.Unusual as unusual:
            try:
                query = parse_unusual_query(data, unusual.name_end)
            except wire.QueryError as err:
                return self._error(data, err)
        try:
            return self._answer(data, query, client, tcp)
        except Exception as err:
            self._log_internal(err)
            return self.servfail(data)

    def _pick(self, data: bytes, entry: tuple[int | bytes, ...]) -> bytes:
        """`data`'s ID and a uniformly picked reply of `entry`, counted."""
        self._hits[entry[0]] += 1  # type: ignore[index]
        size = len(entry)
        reply = entry[1 if size == 2 else 1 + int(_RANDOM() * (size - 1))]
        return data[:2] + reply  # type: ignore[operator]

    def _error(self, data: bytes, err: wire.QueryError) -> bytes | None:
        tally = (0, err.rcode)
        self._counts[tally] = self._counts.get(tally, 0) + 1
        return render_error(data, err.rcode, err.question)

    def servfail(self, data: bytes) -> bytes | None:
        """A SERVFAIL reply echoing `data`'s id and question, or None if it has no header."""
        if len(data) < wire.HEADER_SIZE:
            return None
        try:
            query = wire.parse_query(data)
        except (wire.QueryError, wire.Unusual):
            query = None
        if query is None:
            return render_error(data, wire.SERVFAIL, b"")
        question = data[wire.HEADER_SIZE : query.name_end + 4]
        payload = self.settings.edns_max_payload
        return render_error(data, wire.SERVFAIL, question, query.edns, payload)

    # -- internals -------------------------------------------------------------

    def _answer(
        self, data: bytes, query: wire.Query, client: str, tcp: bool
    ) -> bytes | ForwardQuery:
        name_end = query.name_end
        key = data[wire.HEADER_SIZE : name_end].lower() + data[name_end : name_end + 4]
        held = self._cache.get(key)
        if held is None:
            prepared = self._prepare(data, query, key)
        else:
            self._cache.move_to_end(key)
            prepared = held[0]
        settings = self.settings
        recursion = bool(settings.recursors) and self._may_recurse(client)
        if prepared.outside and recursion:
            self._count(query.qtype, FORWARDED)
            return ForwardQuery(data)
        if not tcp and not settings.recursors and _plain(data, query, key):
            entry = self._keep_replies(data, query, prepared)
            if entry is not None:
                return self._pick(data, entry)
        self._count(query.qtype, prepared.rcode)
        reply = render(data, query, prepared, settings, tcp=tcp, recursion=recursion)
        self._account_memo(key)
        return reply

    def _account_memo(self, key: bytes) -> None:
        """Count what render() memoized on the Prepared kept at `key` (if still kept)."""
        held = self._cache.get(key)
        if held is None:
            return
        memo = held[0].memo.size
        grown = memo - held[2]
        if grown:
            held[1] += grown
            held[2] = memo
            self._bytes += grown
            self._evict()

    def _count(self, qtype: int, rcode: int) -> None:
        counts, tally = self._counts, (qtype, rcode)
        counts[tally] = counts.get(tally, 0) + 1

    def _keep_replies(
        self, data: bytes, query: wire.Query, prepared: Prepared
    ) -> tuple[int | bytes, ...] | None:
        """Render and keep every reply to `data` (a query of the plain shape), or None."""
        variants = render_variants(data, query, prepared, self.settings)
        if variants is None:
            return None
        replies = tuple(v[2:] for v in variants)
        entry: tuple[int | bytes, ...] = (self._tally_index(query.qtype, prepared.rcode), *replies)
        key = reply_key(data, self.settings.edns_max_payload)
        size = ENTRY_OVERHEAD + len(key) + sum(len(r) + REPLY_OVERHEAD for r in replies)
        old = self._replies.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._replies[key] = (entry, size, prepared.dep)
        self._reply_deps.setdefault(prepared.dep, set()).add(key)
        self._bytes += size
        self._evict()
        return entry

    def _tally_index(self, qtype: int, rcode: int) -> int:
        index = self._tallies.setdefault((qtype, rcode), len(self._hits))
        if index == len(self._hits):
            self._hits.append(0)
        return index

    def _prepare(self, data: bytes, query: wire.Query, key: bytes) -> Prepared:
        labels = [
            label.lower().decode("latin-1") for label in wire.question_labels(data, query.name_end)
        ]
        prepared = prepare(labels, query.qtype, query.qclass, self.registry.snapshot, self._info)
        memo = prepared.memo.size  # shared Prepared singletons (REFUSED) may have one
        size = PREPARED_OVERHEAD + ENTRY_OVERHEAD + len(key) + prepared.size + memo
        self._cache[key] = [prepared, size, memo]
        self._deps.setdefault(prepared.dep, set()).add(key)
        self._bytes += size
        self._evict()
        return prepared

    def _evict(self) -> None:
        """Drop least recently used entries until the caches fit cache_max_bytes.

        Whole replies go first: rebuilding one costs a render, a Prepared a lookup.
        """
        budget = self.settings.cache_max_bytes
        replies, cache = self._replies, self._cache
        while self._bytes > budget and replies:
            key, (_, size, dep) = replies.popitem(last=False)
            self._bytes -= size
            self._reply_deps.get(dep, set()).discard(key)
        while self._bytes > budget and cache:
            key, (prepared, size, _) = cache.popitem(last=False)
            self._bytes -= size
            self._deps.get(prepared.dep, set()).discard(key)

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
        cache, replies = self._cache, self._replies
        for dep in (DEP_ALWAYS, *keys):
            for key in self._deps.pop(dep, ()):
                held = cache.pop(key, None)
                if held is not None:
                    self._bytes -= held[1]
            for key in self._reply_deps.pop(dep, ()):
                hit = replies.pop(key, None)
                if hit is not None:
                    self._bytes -= hit[1]

    def _clear(self) -> None:
        self._cache = OrderedDict()
        self._replies = OrderedDict()
        self._deps = {}
        self._reply_deps = {}
        self._bytes = 0


def reply_key(data: bytes, max_payload: int) -> bytes:
    """The whole-reply cache key of `data` (at least a header): its bytes after the ID
    with what cannot change the reply taken out.  Pure.

    Kept: QR, opcode and RD (RD is copied into the reply), the counts, the
    question, and of a final OPT its owner, type, extended rcode, version,
    DO bit (echoed, RFC 3225) and RDLENGTH.  Cleared: AA, TC and the fourth
    header octet (RA, Z, AD, CD, RCODE), the other OPT flag bits; the EDNS
    size is replaced by the limit it gives (RFC 6891 section 6.2.5: at least
    512, capped at `max_payload`).  Two messages with one key are both of the
    cached shape or both not: every byte that shape checks is in the key.
    The common query (sizes and flags already normal) costs one concatenation.
    """
    head = _FLAG_KEYS[data[2]]
    size = len(data)
    if data[11] != 1 or data[10] or size < wire.HEADER_SIZE + wire.OPT_SIZE:
        return head + data[4:]
    payload = data[size - 8] << 8 | data[size - 7]
    # min(max(payload, 512), max(max_payload, 512)), spelled out: builtins cost more here
    limit = payload if payload > CLASSIC_UDP_SIZE else CLASSIC_UDP_SIZE
    if limit > max_payload:
        limit = max_payload if max_payload > CLASSIC_UDP_SIZE else CLASSIC_UDP_SIZE
    do, z = data[size - 4], data[size - 3]
    if limit == payload and not (do & 0x7F or z):
        return head + data[4:]
    return b"".join(
        (
            head,
            data[4 : size - 8],
            limit.to_bytes(2, "big"),
            data[size - 6 : size - 4],
            bytes((do & 0x80, 0)),
            data[size - 2 :],
        )
    )


# reply_key's first octet for each value of the third header octet: QR, opcode, RD
# (AA and TC mean nothing in a query).  The fourth octet is left out of the key.
_FLAG_KEYS = tuple(bytes((octet & 0xF9,)) for octet in range(256))


def _plain(data: bytes, query: wire.Query, key: bytes) -> bool:
    """True for a query whose whole reply can be kept: question in lower case,
    nothing after it but an OPT without options (parse_query checked the rest).
    """
    end = query.name_end + 4
    size = end if query.edns is None else end + wire.OPT_SIZE
    return len(data) == size and data[wire.HEADER_SIZE : end] == key
