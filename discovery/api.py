"""The HTTP API's seam: requests, responses, routes.  Pure: no I/O, no aiohttp.

Endpoint modules (:mod:`discovery.api_consul`, :mod:`discovery.api_nomad`,
:mod:`discovery.api_waypost`) export ``ROUTES``: a tuple of :class:`Route`.
The aiohttp adapter (:mod:`discovery.httpapi`) turns each HTTP request into an
:class:`ApiRequest`, enforces tokens, runs blocking queries, and turns the
:class:`ApiResponse` (or :class:`ApiError`) back into HTTP.

Reads are synchronous functions of a registry snapshot, so a blocking query
is: wait until the index of what the route watches passes the client's,
then call the read once (the adapter caches the encoded body per index, so
10,000 watchers woken by one change cost one encoding).
Writes are coroutines that change state through :class:`ApiContext` and
return once the change is durable.

Request bodies are JSON read by :func:`decode_json`, the one decoder of the
API: a body nested deeper than MAX_JSON_DEPTH, a number of more than
MAX_JSON_DIGITS digits, NaN or Infinity (not JSON: RFC 8259 section 6), or a
body that is not UTF-8 is a ValidationError on field "body" (a 400), never a
RecursionError or the ValueError of Python's int-string conversion limit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from discovery.acl import Access
from discovery.errors import ValidationError
from discovery.model import Health, Instance
from discovery.registry import Registry, Snapshot

# Watch everything (catalog-wide endpoints): woken by any registry change.
WATCH_ALL = "*"
__all__ = ["Access"]  # re-exported: routes name the access they need
# Nomad's deepest job JSON (Job.TaskGroups[].Tasks[].Services[].Checks[].Header{}[]) is
# about 12 levels; the validators recurse (is_empty), so a body is refused well before
# Python's recursion limit (1000 frames) could be reached.
MAX_JSON_DEPTH = 64
# uint64 has 20 digits; int() refuses over 4300 (sys.get_int_max_str_digits) with a
# ValueError, and str() of an int that long fails again in an error message.
MAX_JSON_DIGITS = 32


class _TooLarge(Exception):
    """A number literal of more than MAX_JSON_DIGITS digits, or NaN/Infinity."""


def _parse_int(text: str) -> int:
    if len(text) > MAX_JSON_DIGITS + 1 and len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise _TooLarge(f"a number of {len(text.lstrip('-'))} digits (at most {MAX_JSON_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 2 * MAX_JSON_DIGITS:
        raise _TooLarge(f"a number of {len(text)} characters (at most {2 * MAX_JSON_DIGITS})")
    return float(text)


def _parse_constant(text: str) -> float:
    raise _TooLarge(f"{text} (not JSON)")


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in `value` (0 for a scalar).  Iterative."""
    deepest = 0
    todo: list[tuple[object, int]] = [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            children: Sequence[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > MAX_JSON_DEPTH:
            break
        todo.extend((child, level + 1) for child in children)
    return deepest


def _limited(body: bytes) -> object:
    """json.loads within the limits: ValidationError over them, json's ValueErrors otherwise."""
    try:
        value = json.loads(
            body, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except RecursionError:
        raise ValidationError("body", f"is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except _TooLarge as err:
        raise ValidationError("body", f"has {err}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValidationError("body", f"is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def decode_json(body: bytes) -> object:
    """The JSON value of a request body.  ValidationError("body", ...) when it is not one
    or when it is over the limits (depth, digits); never anything else.  Pure."""
    try:
        return _limited(body)
    except UnicodeDecodeError:
        raise ValidationError("body", "is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValidationError(
            "body", f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except ValueError as err:  # json.loads's own (a byte order mark, say)
        raise ValidationError("body", f"is not valid JSON: {err}") from None


def check_json_limits(body: bytes) -> None:
    """Raise decode_json's ValidationError if `body` is JSON over the limits (too deep, a
    number too long, NaN); a body that is not JSON passes: its handler judges it."""
    if body.lstrip()[:1] not in (b"{", b"["):
        return
    with contextlib.suppress(ValueError):  # not JSON (JSONDecodeError...): not ours to say
        _limited(body)


@dataclass(frozen=True, slots=True)
class ApiRequest:
    method: str
    path: str
    params: Mapping[str, str]  # path parameters ({name}, {id})
    query: Mapping[str, Sequence[str]]  # query string, every value of each key
    body: bytes = b""
    datacenter: str = "dc1"  # the agent's (lower case), set by the adapter from ApiContext

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter `name` ('' for a bare `?passing`)."""
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        """A boolean query parameter: present and not "false"/"0" (Consul's `?passing`)."""
        value = self.arg(name)
        return value is not None and value.lower() not in ("false", "0")


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """A JSON (or text) response; `index` becomes X-Consul-Index and X-Nomad-Index."""

    body: object = None  # JSON-able; or str for text bodies
    status: int = 200
    index: int | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """A 4xx/5xx answer: `{"error": message, "field": field}`."""

    def __init__(self, status: int, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    @classmethod
    def invalid(cls, err: ValidationError, prefix: str = "") -> ApiError:
        """A 400 from a ValidationError, its field prefixed (`Check.TTL`)."""
        named = err.within(prefix) if prefix else err
        return cls(400, f"{named.field}: {named.message}", named.field)


class ChecksControl(Protocol):
    """What the API needs from the check runner (discovery.checks)."""

    def ttl_update(self, check_id: str, status: Health, note: str) -> None:
        """A TTL check's new status; raises NotFoundError for an unknown check."""
        ...


class Durability(Protocol):
    """What the API needs from the store (discovery.store)."""

    async def durable(self, index: int) -> None:
        """Return once every registry change up to `index` is on disk (raises StateError)."""
        ...


@dataclass(frozen=True, slots=True)
class ApiContext:
    """The agent's state, as endpoint modules see it."""

    registry: Registry
    store: Durability
    checks: ChecksControl
    datacenter: str
    node_name: str

    async def register(self, *instances: Instance) -> Snapshot:
        """Upsert and wait until durable."""
        snap = self.registry.upsert(*instances)
        await self.store.durable(snap.index)
        return snap


Read = Callable[[ApiRequest, Snapshot], ApiResponse]
Write = Callable[[ApiRequest, ApiContext], Awaitable[ApiResponse]]
# The registry keys (lower-case service names, or WATCH_ALL) a read's result depends on.
Watch = Callable[[ApiRequest], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint.  Exactly one of `read` and `write` is set."""

    method: str
    path: str  # aiohttp pattern: "/v1/health/service/{name}"
    access: Access
    read: Read | None = None
    write: Write | None = None
    watch: Watch | None = None  # blocking reads only: what to wait on
