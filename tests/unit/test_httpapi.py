"""The fast path's pure parts: request heads, tokens (discovery.httpwire), whole responses."""

from __future__ import annotations

import pytest
from aiohttp.http import SERVER_SOFTWARE

from discovery.acl import Access
from discovery.httpapi import _Encoded, render_wire
from discovery.httpwire import (
    MAX_FIELDS,
    MAX_FRAMED_BODY,
    RequestHead,
    parse_head,
    parse_token,
)

LOOKUP = b"GET /v1/health/service/web?passing HTTP/1.1"


def head(*fields: bytes, line: bytes = LOOKUP) -> bytes:
    return b"\r\n".join([line, *fields])


@pytest.mark.parametrize(
    ("raw", "method", "target", "minor", "fields", "body"),
    [
        (head(b"Host: x"), b"GET", b"/v1/health/service/web?passing", 1, {b"host": b"x"}, 0),
        (head(line=b"GET / HTTP/1.0"), b"GET", b"/", 0, {}, 0),
        (
            head(b"HOST:  a b \t", b"X-Consul-Token:\tt", line=b"PUT /v1/x HTTP/1.1"),
            b"PUT",
            b"/v1/x",
            1,
            {b"host": b"a b", b"x-consul-token": b"t"},
            0,
        ),
        (head(b"Content-Length: 12"), b"GET", LOOKUP.split()[1], 1, {b"content-length": b"12"}, 12),
        (head(b"Connection: close"), b"GET", LOOKUP.split()[1], 1, {b"connection": b"close"}, 0),
        (head(b"Content-Length: 0"), b"GET", LOOKUP.split()[1], 1, {b"content-length": b"0"}, 0),
    ],
)
def test_plain_heads(
    raw: bytes, method: bytes, target: bytes, minor: int, fields: dict[bytes, bytes], body: int
) -> None:
    assert parse_head(raw) == RequestHead(method, target, minor, fields, body)


@pytest.mark.parametrize(
    "raw",
    [
        head(b"Transfer-Encoding: chunked"),
        head(b"Expect: 100-continue"),
        head(b"Upgrade: websocket"),
        head(b"Sec-WebSocket-Key1: x"),
        head(b"Content-Length: 1", b"Content-Length: 1"),
        head(b"Host: a", b"host: b"),  # aiohttp refuses some fields twice
        head(b"Content-Length: -1"),
        head(b"Content-Length: +1"),
        head(b"Content-Length: 0x10"),
        head(b"Content-Length: 01"),  # leading zero: aiohttp's to judge
        head(b"Content-Length: 1, 1"),  # a list
        head(b"Content-Length: " + b"0" * 5000 + b"1"),  # int() refuses over 4300 digits
        head(b"Content-Length: 1" + b"0" * 10),
        head(f"Content-Length: {MAX_FRAMED_BODY + 1}".encode()),
        head(*[f"X-{n}: v".encode() for n in range(MAX_FIELDS + 1)]),
        head(b"Host : x"),  # space before the colon
        head(b"Host: x", b" folded"),  # obsolete line folding
        head(b"Bad\x00: x"),
        head(b"Host: a\x00b"),
        head(b"Host: x\nX: y"),  # a bare LF inside
        head(line=b"GET http://h/v1 HTTP/1.1"),  # absolute-form
        head(line=b"CONNECT h:80 HTTP/1.1"),
        head(line=b"GET /a b HTTP/1.1"),
        head(line=b"GET /\xc3\xa9 HTTP/1.1"),  # not ASCII: aiohttp decodes it
        head(line=b"GET / HTTP/2.0"),
        head(line=b"GET / HTTP/1.1 "),
        head(line=b"get  / HTTP/1.1"),
        b"",
    ],
)
def test_heads_left_to_aiohttp(raw: bytes) -> None:
    assert parse_head(raw) is None


@pytest.mark.parametrize(
    ("fields", "target", "token"),
    [
        ((), b"/v1/x", None),
        ((b"X-Consul-Token: abc",), b"/v1/x", "abc"),
        ((b"X-Nomad-Token: n",), b"/v1/x", "n"),
        ((b"X-Consul-Token: c", b"X-Nomad-Token: n"), b"/v1/x", "c"),  # Consul's first
        ((b"X-Consul-Token:  ", b"X-Nomad-Token: n"), b"/v1/x", "n"),  # blank: the next
        ((b"Authorization: Bearer  b1 ",), b"/v1/x", "b1"),
        ((b"Authorization: bearer b1",), b"/v1/x", "b1"),
        ((b"Authorization: Basic b1",), b"/v1/x", None),
        ((b"Authorization: Bearer",), b"/v1/x", None),
        ((b"X-Consul-Token: h",), b"/v1/x?token=q", "h"),  # a header wins, as request_token
        ((), b"/v1/x?token=q", None),  # the query is the caller's to look at
    ],
)
def test_tokens_from_fields(fields: tuple[bytes, ...], target: bytes, token: str | None) -> None:
    parsed = parse_head(head(*fields, line=b"GET " + target + b" HTTP/1.1"))
    assert parsed is not None
    assert parse_token(parsed) == token


LABEL = ("GET", "/v1/health/service/{name}", 200)


def test_a_whole_response_as_aiohttp_writes_it() -> None:
    encoded = _Encoded(200, b"[1]", {"X-Consul-Index": "7", "Content-Type": "application/json"})
    wire = render_wire(7, Access.READ, "/v1/health/service/web", LABEL, encoded)
    assert wire is not None
    assert (wire.index, wire.access, wire.path, wire.label) == (
        7,
        Access.READ,
        "/v1/health/service/web",
        LABEL,
    )
    assert wire.before_date + b"<date>" + wire.after_date == (
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3\r\nDate: <date>\r\nServer: " + SERVER_SOFTWARE.encode() + b"\r\n\r\n[1]"
    )


def test_a_status_has_its_reason_phrase() -> None:
    wire = render_wire(1, Access.READ, "/", LABEL, _Encoded(404, b"", {}))
    assert wire is not None
    assert wire.before_date.startswith(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n")


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "1"},
        {"date": "x"},
        {"Server": "x"},
        {"Connection": "close"},
        {"Transfer-Encoding": "chunked"},
        {"X-A": "a\r\nX-B: b"},
        {"X-A": "a\nb"},
    ],
)
def test_responses_not_cached_whole(headers: dict[str, str]) -> None:
    assert render_wire(1, Access.READ, "/", LABEL, _Encoded(200, b"{}", headers)) is None
