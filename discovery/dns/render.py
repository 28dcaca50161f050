"""Per-query assembly of a reply from a Prepared answer.  Pure: no I/O.

A reply is: header, the question exactly as asked (0x20 case kept), then a
*body* (answers, authority, glue, fixed additional records) and the OPT.
The body depends only on the answer order and the size limits, so for the
common small answer sets every order is rendered once and memoized on the
Prepared; a query then picks one at random (a uniform shuffle) and adds a
header.  Weighted SRV sets and large sets are ordered and rendered per query.

Trimming (UDP): whole answers are dropped from the end of the order until the
reply fits, and glue is only emitted for targets still answered, so the
Additional section always matches the Answer section (Consul's syncExtra).
"""

from __future__ import annotations

import math
import random

from discovery.dns import wire
from discovery.dns.records import Answer, Body, Prepared
from discovery.dns.settings import (
    CLASSIC_UDP_SIZE,
    DEFAULT_EDNS_PAYLOAD,
    MAX_TCP_SIZE,
    DnsSettings,
)

# Answer sets with at most this many orders are pre-rendered in every order
# (4 answers = 24 orders); beyond it, shuffling per query costs less memory.
MAX_VARIANTS = 24
# Memo keys (size limits) per Prepared; one more limit renders per query instead.
MAX_MEMO_SHAPES = 4
FITS = (-1, -1)  # the memo key of every limit under which nothing is trimmed
# CPython object overheads counted with each memoized body (a Body, its bytes)
# and each slot of a memo list, so the cache budget tracks memory, not payload.
BODY_OVERHEAD = 160
SLOT_OVERHEAD = 8
_RANDOM = random.random
_SHUFFLE = random.shuffle


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
    """The reply to `data`: header, question as asked, a body in random order, OPT."""
    question, opt = _question_and_opt(data, query, settings)
    edns = query.edns
    if edns is not None and edns.version > 0:  # RFC 6891 section 6.1.3
        return error_reply(data, wire.BADVERS, question, edns, settings.edns_max_payload)
    limit, max_answers = size_limits(query, settings, tcp)
    body = pick_body(prepared, wire.HEADER_SIZE + len(question), limit - len(opt), max_answers)
    return _assemble(data, query, prepared, settings, recursion, question, body, opt)


def render_variants(
    data: bytes, query: wire.Query, prepared: Prepared, settings: DnsSettings
) -> list[bytes] | None:
    """Every UDP reply without recursion `data` can get: one per answer order.

    A uniform pick among them is what render() gives.  None when the answers
    are weighted or have more than MAX_VARIANTS orders, or the EDNS version is
    not 0: those are rendered per query.  Nothing is memoized on `prepared`:
    the caller keeps the replies.
    """
    orders = all_orders(prepared)
    edns = query.edns
    if orders is None or (edns is not None and edns.version > 0):
        return None
    question, opt = _question_and_opt(data, query, settings)
    limit, max_answers = size_limits(query, settings, False)
    start, budget = wire.HEADER_SIZE + len(question), limit - len(opt)
    return [
        _assemble(
            data,
            query,
            prepared,
            settings,
            False,
            question,
            render_body(prepared, nth_order(prepared, number), start, budget, max_answers),
            opt,
        )
        for number in orders
    ]


def _question_and_opt(data: bytes, query: wire.Query, settings: DnsSettings) -> tuple[bytes, bytes]:
    """The question as asked, and the OPT of the reply (empty without EDNS in the query)."""
    question = data[wire.HEADER_SIZE : query.name_end + 4]
    edns = query.edns
    if edns is None:
        return question, b""
    return question, wire.encode_opt(settings.edns_max_payload, 0, edns.dnssec_ok)


def _assemble(
    data: bytes,
    query: wire.Query,
    prepared: Prepared,
    settings: DnsSettings,
    recursion: bool,
    question: bytes,
    body: Body,
    opt: bytes,
) -> bytes:
    """Header (flags and counts for `body`), question, body and OPT joined into a reply."""
    flags = wire.FLAG_QR | (query.flags & wire.FLAG_RD) | prepared.rcode
    if prepared.authoritative:
        flags |= wire.FLAG_AA
    if recursion:
        flags |= wire.FLAG_RA
    if body.truncated and settings.enable_truncate:
        flags |= wire.FLAG_TC
    additional = body.additional + (1 if opt else 0)
    header = wire.encode_header(
        data[:2], flags, 1, body.answers, prepared.authority_count, additional
    )
    return header + question + body.data + opt


def pick_body(prepared: Prepared, start: int, budget: int, max_answers: int) -> Body:
    """A body in a random order: memoized per order when the set is small.

    Each order is rendered the first time it is drawn, so a cache miss costs
    one rendering, not one per possible order.  Limits that trim nothing give
    the same bodies, so they share one memo key (FITS); other limits get their
    own up to MAX_MEMO_SHAPES keys per answer, then render per query: a client
    cycling through EDNS sizes cannot make the memo grow without bound.
    """
    memo = prepared.memo
    bodies = memo.bodies
    full = memo.full
    if full < 0:
        full = memo.full = prepared.full_size
    if max_answers >= len(prepared.answers) and start + full <= budget:
        key = FITS
    else:
        key = (budget, max_answers)
    slots = bodies.get(key)
    if slots is None:
        orders = all_orders(prepared)
        if orders is None or len(bodies) >= MAX_MEMO_SHAPES:
            return render_body(prepared, ordered(prepared), start, budget, max_answers)
        slots = bodies[key] = [None] * len(orders)
        memo.size += SLOT_OVERHEAD * len(orders)
    pick = 0 if len(slots) == 1 else int(_RANDOM() * len(slots))
    body = slots[pick]
    if body is None:
        order = nth_order(prepared, pick)
        body = slots[pick] = render_body(prepared, order, start, budget, max_answers)
        memo.size += len(body.data) + BODY_OVERHEAD
    return body


def all_orders(prepared: Prepared) -> range | None:
    """Numbers for every answer order the shuffle can produce; None if weighted or too many."""
    groups = prepared.groups
    if groups is None:
        return range(1)
    total = 1
    for members, weights in groups:
        if weights is not None:
            return None
        total *= math.factorial(len(members))
        if total > MAX_VARIANTS:
            return None
    return range(total)


def nth_order(prepared: Prepared, number: int) -> tuple[Answer, ...]:
    """Order number `number` of all_orders(): a permutation per priority level (mixed radix)."""
    groups = prepared.groups
    if groups is None:
        return prepared.answers
    out: list[Answer] = []
    for members, _ in groups:
        number, digit = divmod(number, math.factorial(len(members)))
        out.extend(_permutation(members, digit))
    return tuple(out)


def _permutation(members: tuple[Answer, ...], number: int) -> list[Answer]:
    """The `number`-th permutation of `members` in the factorial number system."""
    pool = list(members)
    out = []
    for size in range(len(pool), 0, -1):
        index, number = divmod(number, math.factorial(size - 1))
        out.append(pool.pop(index))
    return out


def ordered(prepared: Prepared) -> tuple[Answer, ...] | list[Answer]:
    """Answers in a fresh random order: priority levels ascending, weighted within one.

    RFC 2782: within a priority, a target's chance to come first is its weight
    over the level's sum; Efraimidis-Spirakis keys (u ** (1/w), largest first)
    give that distribution for the whole order in one sort.  Weight 0 sorts last.
    """
    groups = prepared.groups
    if groups is None:
        return prepared.answers
    result: list[Answer] = []
    for members, weights in groups:
        if weights is None:
            level = list(members)
            _SHUFFLE(level)
            result.extend(level)
        else:
            keys = [_RANDOM() ** (1.0 / w) if w > 0 else -1.0 for w in weights]
            ranked = sorted(range(len(members)), key=keys.__getitem__, reverse=True)
            result.extend(members[i] for i in ranked)
    return result


def render_body(
    prepared: Prepared,
    answers: tuple[Answer, ...] | list[Answer],
    start: int,
    budget: int,
    max_answers: int,
) -> Body:
    """Answers in the given order, trimmed to `budget` bytes and `max_answers`, with glue.

    `start` is the offset where the answer section begins (after the question).
    """
    budget -= len(prepared.authority) + len(prepared.extra)
    pos = start
    records: list[bytes] = []
    glue: list[bytes] = []
    seen: set[bytes] = set()
    glue_size = 0
    truncated = False
    for record, target, tail in answers:
        owner = b""
        if target is not None and target not in seen:
            offset = pos + wire.SRV_TARGET_OFFSET
            # Point at the target inside the SRV RDATA; past 14 bits, spell it out.
            owner = wire.pointer(offset) if offset <= wire.MAX_POINTER_OFFSET else target
        added = len(record) + (len(owner) + len(tail) if owner else 0)
        if len(records) == max_answers or pos + glue_size + added > budget:
            truncated = True
            break
        if owner:
            assert target is not None
            seen.add(target)
            glue.append(owner + tail)
            glue_size += len(owner) + len(tail)
        records.append(record)
        pos += len(record)
    data = b"".join(records) + prepared.authority + b"".join(glue) + prepared.extra
    return Body(data, len(records), len(glue) + prepared.extra_count, truncated)


def render_error(
    data: bytes,
    rcode: int,
    question: bytes,
    edns: wire.Edns | None = None,
    payload: int = DEFAULT_EDNS_PAYLOAD,
) -> bytes | None:
    """A reply with `rcode`, no records, `question` echoed; None if `data` has no header."""
    if len(data) < wire.HEADER_SIZE:
        return None
    return error_reply(data, rcode, question, edns, payload)


def error_reply(
    data: bytes,
    rcode: int,
    question: bytes,
    edns: wire.Edns | None = None,
    payload: int = DEFAULT_EDNS_PAYLOAD,
) -> bytes:
    """render_error() for a message known to have a header.

    An OPT is added when the query had one (RFC 6891 section 7) and always for
    extended rcodes (BADVERS), whose upper bits only an OPT can carry.
    """
    flags = (data[2] << 8) | data[3]
    reply_flags = wire.FLAG_QR | (flags & (wire.OPCODE_MASK | wire.FLAG_RD)) | (rcode & 0xF)
    opt = b""
    if edns is not None or rcode > 0xF:
        opt = wire.encode_opt(payload, rcode >> 4, edns is not None and edns.dnssec_ok)
    header = wire.encode_header(data[:2], reply_flags, 1 if question else 0, 0, 0, 1 if opt else 0)
    return header + question + opt
