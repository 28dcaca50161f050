"""HTTP/1.1 request heads as the fast path frames them, and their ACL tokens.  Pure.

:func:`parse_head` accepts only "plain" heads, a strict subset of what
aiohttp's parser (llhttp) accepts and frames the same way: origin-form
target, HTTP/1.0 or 1.1, CRLF line ends, valid field lines (RFC 9112 sections
3 and 5), no field twice, a canonical Content-Length and no field that changes
framing.  Anything else is None: the connection is then aiohttp's to frame
and judge (discovery.httpapi), so the two can never disagree on where a
request ends.  :func:`parse_token` mirrors :func:`discovery.httpapi.request_token`
for the header forms of a token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

TOKEN_HEADERS = ("X-Consul-Token", "X-Nomad-Token")
# Framed here up to these sizes; beyond them aiohttp frames and judges the connection.
MAX_HEAD = 8190  # bytes of a request head (aiohttp's limit for one line)
MAX_FIELDS = 32  # header fields (aiohttp refuses over 128)
MAX_FRAMED_BODY = 64 << 10  # bytes; larger bodies (writes) stream to aiohttp
HEAD_END = b"\r\n\r\n"
# RFC 9112 section 3 (request-line) and section 5 (field-line), origin-form targets only;
# anything else is not "plain" and aiohttp frames it (and answers 400 if it must).
_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb") (/[!-~]*) HTTP/1\.([01])")
_FIELD_LINE = re.compile(rb"(" + _TCHAR + rb"):[ \t]*([\t -~\x80-\xff]*?)[ \t]*")
# Fields that change how a message is framed or answered before its body is read, or
# that aiohttp refuses (Sec-WebSocket-Key1: the old WebSocket draft).
_UNFRAMED_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"sec-websocket-key1"})
_TOKEN_FIELDS = tuple(name.lower().encode() for name in TOKEN_HEADERS)
# A Content-Length framed here: plain decimal, no sign, no leading zero, no list (RFC 9110
# section 8.6 allows "1*DIGIT"; anything else is aiohttp's to judge).  Short, too: int()
# refuses strings of over 4300 digits, and that ValueError would escape data_received.
_CONTENT_LENGTH = re.compile(rb"0|[1-9][0-9]{0,9}")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The request line and fields of one plain HTTP/1.x request."""

    method: bytes
    target: bytes  # origin-form, raw (percent-encoded, query included)
    minor: int  # HTTP/1.<minor>
    fields: Mapping[bytes, bytes]  # lowercased name -> value
    body: int  # Content-Length (0 without one)


def parse_head(head: bytes) -> RequestHead | None:
    """A request head (without its blank line); None unless it is plain and framed by length.

    Plain: origin-form target, at most MAX_FIELDS valid field lines, no name
    twice, a Content-Length of at most MAX_FRAMED_BODY if any, none of
    _UNFRAMED_FIELDS.  Pure.
    """
    line, _, rest = head.partition(b"\r\n")
    request = _REQUEST_LINE.fullmatch(line)
    if request is None or request[1] == b"CONNECT":
        return None
    fields: dict[bytes, bytes] = {}
    lines = rest.split(b"\r\n") if rest else ()
    if len(lines) > MAX_FIELDS:
        return None
    for field in lines:
        match = _FIELD_LINE.fullmatch(field)
        if match is None:
            return None
        name = match[1].lower()
        if name in _UNFRAMED_FIELDS or name in fields:
            return None
        fields[name] = match[2]
    body = 0
    length = fields.get(b"content-length")
    if length is not None:
        if _CONTENT_LENGTH.fullmatch(length) is None or int(length) > MAX_FRAMED_BODY:
            return None
        body = int(length)
    return RequestHead(request[1], request[2], int(request[3]), fields, body)


def parse_token(head: RequestHead) -> str | None:
    """:func:`request_token` from a head's fields (a query's `token` is not looked for)."""
    for name in _TOKEN_FIELDS:
        value = head.fields.get(name, b"").strip()
        if value:
            return value.decode("utf-8", "surrogateescape")  # as aiohttp
    scheme, _, credentials = head.fields.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip():
        return credentials.strip().decode("utf-8", "surrogateescape")
    return None
