"""Filter expressions (`?filter=`): the commonly used subset of HashiCorp's go-bexpr.  Pure.

Consul (`/v1/health/service/:name?filter=`) and Nomad (`/v1/service/:name?filter=`)
filter results with go-bexpr expressions; :func:`compile_filter` parses the
same language and :meth:`Filter.matches` evaluates it on JSON-shaped data
(dicts, lists, str, int, float, bool, None), i.e. on the response objects
exactly as they are encoded::

    expression = or
    or         = and { "or" and }
    and        = not { "and" not }
    not        = "not" not | "(" or ")" | match
    match      = selector ("==" | "!=") value
               | selector ["not"] ("contains" | "matches") value
               | selector "is" ["not"] "empty"
               | value ["not"] "in" selector
    selector   = name { "." name | "." digits | "[" string "]" }   e.g. Service.Meta["env"]
    value      = string | number | bare word (a selector-shaped word, taken as text)
    string     = '"' Go escapes '"' | '`' raw text '`'

Keywords are lower case and stand between spaces, as in bexpr; names are
`[A-Za-z][A-Za-z0-9_/-]*` (bexpr's plus '-', so `my-svc` needs no quotes).

Semantics follow go-bexpr as Consul uses it (v0.1 "evaluateMatchExpressionRecurse"):

- selecting through a list maps over its elements, and the match is true if
  it is true for ANY element: `Checks.Status == "critical"` is true when one
  check is critical, `Checks.Status != "passing"` when one is not passing;
  through an empty list it is false.  A digit segment indexes a list (`Checks.0.Status`).
- a key missing from an object (or null) is "absent": `==`, `in`/`contains`,
  `matches` and `is not empty` are false for it; `!=`, `not in`/`not contains`,
  `not matches` and `is empty` are true (`Service.Meta.env != "prod"` holds
  for an instance without that meta key).
- `==`/`!=` compare strings exactly; a bool or number field compares with the
  value read as a bool (Go's ParseBool: true/True/TRUE/t/1...) or a number; a
  list or object never equals anything (use `contains`).
- `x in Sel` / `Sel contains x`: an element of a list, a key of an object, or a
  substring of a string.  `is empty`: length zero (list, object, string) or absent.
- `matches` is an unanchored regular-expression search (Go's regexp.Match) on
  a string (or the text of a bool/number).  Patterns are Go RE2 syntax, run
  with the `regex` module under a time budget: RE2 never backtracks, Python's
  engines can, so a pattern that exceeds the budget raises ValidationError.

Error handling: :func:`compile_filter` raises ValidationError("filter",
"<what> at position N"), N the 1-based column; so does :meth:`Filter.matches`,
only for a regular expression over its time budget.  With `fields` (dotted
paths, `*` for any key: "Service.Meta.*"), an unknown selector is an error at
compile time; without, it is simply absent.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import regex  # type: ignore[import-untyped]  # no stubs; used for its match timeout

from discovery.errors import ValidationError

FIELD = "filter"
MAX_LENGTH = 4096  # characters; a URL query line is at most 8 KiB anyway
MAX_DEPTH = 32  # nested parentheses and `not`s; deeper is a typo or an attack
REGEX_TIMEOUT = 0.005  # seconds per regular-expression search (RE2 is linear; ours is not)

_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "matches", "is", "empty"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_/-]*")
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_SPACE = " \t\r\n"
# Go's strconv.ParseBool.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPES |= {"\\": "\\", '"': '"', "'": "'"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _error(what: str, pos: int) -> ValidationError:
    return ValidationError(FIELD, f"{what} at position {pos}")


# -- tokens --------------------------------------------------------------------


class Kind(Enum):
    LPAREN = "("
    RPAREN = ")"
    EQ = "=="
    NE = "!="
    STRING = "string"
    NUMBER = "number"
    WORD = "word"  # a selector, a keyword, or a bare value
    END = "end of filter"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    pos: int  # 1-based column
    text: str = ""  # the string's value; the raw text of numbers and words
    path: tuple[str, ...] = ()  # words: the selector's segments

    def is_keyword(self, word: str) -> bool:
        return self.kind is Kind.WORD and self.text == word

    def describe(self) -> str:
        if self.kind is Kind.END:
            return "end of filter"
        if self.kind is Kind.STRING:
            return "a string"
        return repr(self.text) if self.text else repr(self.kind.value)


def tokenize(text: str) -> list[Token]:
    """The tokens of `text`, ending with an END token."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            tokens.append(Token(Kind.END, n + 1))
            return tokens
        ch = text[i]
        if ch in "()":
            tokens.append(Token(Kind.LPAREN if ch == "(" else Kind.RPAREN, i + 1, ch))
            i += 1
        elif ch in "=!":
            if text.startswith("=", i + 1):
                tokens.append(Token(Kind.EQ if ch == "=" else Kind.NE, i + 1, ch + "="))
                i += 2
            else:
                raise _error(f"expected '{ch}=' after '{ch}'", i + 1)
        elif ch in '"`':
            value, end = _string(text, i)
            tokens.append(Token(Kind.STRING, i + 1, value))
            i = end
        elif ch == "-" or (ch.isascii() and ch.isdigit()):
            tokens.append(_number(text, i))
            i += len(tokens[-1].text)
        elif ch.isascii() and ch.isalpha():
            token, i = _word(text, i)
            tokens.append(token)
        else:
            raise _error(f"unexpected character {ch!r}", i + 1)


def _string(text: str, start: int) -> tuple[str, int]:
    """The value of the string literal at `start` and the index after it."""
    quote = text[start]
    if quote == "`":
        end = text.find("`", start + 1)
        if end < 0:
            raise _error("unterminated string", start + 1)
        return text[start + 1 : end], end + 1
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        decoded, i = _escape(text, i)
        out.append(decoded)
    raise _error("unterminated string", start + 1)


def _escape(text: str, i: int) -> tuple[str, int]:
    """Go's escapes (strconv.Unquote): the character for the escape at `i` and the index after."""
    code = text[i + 1 : i + 2]
    if code in _ESCAPES:
        return _ESCAPES[code], i + 2
    width = _HEX_ESCAPES.get(code)
    digits = text[i + 2 : i + 2 + width] if width else text[i + 1 : i + 4]
    base = 16 if width else 8
    if (width or code.isdigit()) and len(digits) == (width or 3):
        try:
            value = int(digits, base)
        except ValueError:
            value = -1
        surrogate = 0xD800 <= value <= 0xDFFF
        if 0 <= value <= (0xFF if code == "x" or not width else 0x10FFFF) and not surrogate:
            return chr(value), i + 2 + (width or 2)
    raise _error("invalid escape in string", i + 1)


def _number(text: str, i: int) -> Token:
    found = _NUMBER.match(text, i)
    end = found.end() if found else i
    if found is None or (end < len(text) and text[end] not in _SPACE + ")"):
        raise _error("invalid number", i + 1)
    return Token(Kind.NUMBER, i + 1, found[0])


def _word(text: str, start: int) -> tuple[Token, int]:
    """A selector-shaped word: `Name`, `A.B.0`, `Meta["key"]`, `Meta[`k`]`."""
    name = _NAME.match(text, start)
    assert name is not None  # called on a letter
    path = [name[0]]
    i = name.end()
    while i < len(text) and text[i] in ".[":
        if text[i] == ".":
            part = _NAME.match(text, i + 1) or _DIGITS.match(text, i + 1)
            if part is None:
                raise _error("expected a field name after '.'", i + 2)
            path.append(part[0])
            i = part.end()
            continue
        j = i + 1
        while j < len(text) and text[j] in _SPACE:
            j += 1
        if j >= len(text) or text[j] not in '"`':
            raise _error("expected a quoted key after '['", j + 1)
        key, j = _string(text, j)
        while j < len(text) and text[j] in _SPACE:
            j += 1
        if j >= len(text) or text[j] != "]":
            raise _error("expected ']'", j + 1)
        path.append(key)
        i = j + 1
    return Token(Kind.WORD, start + 1, text[start:i], tuple(path)), i


# -- syntax tree -----------------------------------------------------------------


class Op(Enum):
    EQ = "=="
    NE = "!="
    IN = "contains"  # `x in Sel` and `Sel contains x`
    NOT_IN = "not contains"
    EMPTY = "is empty"
    NOT_EMPTY = "is not empty"
    MATCHES = "matches"
    NOT_MATCHES = "not matches"


# What an operator says about an absent value (go-bexpr: a missing map key).
_ABSENT = {
    Op.EQ: False,
    Op.NE: True,
    Op.IN: False,
    Op.NOT_IN: True,
    Op.EMPTY: True,
    Op.NOT_EMPTY: False,
    Op.MATCHES: False,
    Op.NOT_MATCHES: True,
}
_NEGATED = {"contains": Op.NOT_IN, "in": Op.NOT_IN, "matches": Op.NOT_MATCHES}
_POSITIVE = {"contains": Op.IN, "in": Op.IN, "matches": Op.MATCHES}


@dataclass(frozen=True, slots=True)
class Match:
    selector: tuple[str, ...]
    op: Op
    value: str  # the literal's text ("" for is [not] empty)
    pos: int  # of the selector
    value_pos: int = 0


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Node = Match | Not | And | Or


class _Parser:
    """Recursive descent over the tokens; depth-limited, so it never overflows the stack."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> Token:
        return self.tokens[self.at]

    def take(self) -> Token:
        token = self.tokens[self.at]
        if token.kind is not Kind.END:
            self.at += 1
        return token

    def fail(self, expected: str, token: Token | None = None) -> ValidationError:
        token = token or self.peek()
        return _error(f"expected {expected}, found {token.describe()}", token.pos)

    def expression(self) -> Node:
        node = self.or_(0)
        if self.peek().kind is not Kind.END:
            raise self.fail("'and', 'or' or the end of the filter")
        return node

    def or_(self, depth: int) -> Node:
        parts = [self.and_(depth)]
        while self.peek().is_keyword("or"):
            self.take()
            parts.append(self.and_(depth))
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_(self, depth: int) -> Node:
        parts = [self.not_(depth)]
        while self.peek().is_keyword("and"):
            self.take()
            parts.append(self.not_(depth))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_(self, depth: int) -> Node:
        token = self.peek()
        if depth >= MAX_DEPTH:
            raise _error(f"expression nested deeper than {MAX_DEPTH} levels", token.pos)
        if token.is_keyword("not"):
            self.take()
            return Not(self.not_(depth + 1))
        if token.kind is Kind.LPAREN:
            self.take()
            node = self.or_(depth + 1)
            if self.peek().kind is not Kind.RPAREN:
                raise self.fail(f"')' to close the '(' at position {token.pos}")
            self.take()
            return node
        return self.match()

    def match(self) -> Match:
        first = self.take()
        if not _is_value(first):
            raise self.fail("a selector, a value or '('", first)
        op = self.take()
        if op.kind in (Kind.EQ, Kind.NE):
            value = self.value()
            return Match(self.selector(first), Op(op.kind.value), value.text, first.pos, value.pos)
        negated = op.is_keyword("not")
        if negated:
            op = self.take()
        if op.is_keyword("is") and not negated:
            empty = Op.EMPTY
            if self.peek().is_keyword("not"):
                self.take()
                empty = Op.NOT_EMPTY
            last = self.take()
            if not last.is_keyword("empty"):
                raise self.fail("'empty'", last)
            return Match(self.selector(first), empty, "", first.pos)
        if op.kind is Kind.WORD and op.text in ("contains", "matches"):
            value = self.value()
            kind = (_NEGATED if negated else _POSITIVE)[op.text]
            return Match(self.selector(first), kind, value.text, first.pos, value.pos)
        if op.is_keyword("in"):
            target = self.take()
            kind = Op.NOT_IN if negated else Op.IN
            return Match(self.selector(target), kind, first.text, target.pos, first.pos)
        wanted = "'in', 'contains' or 'matches'" if negated else "an operator"
        if not negated:
            wanted += " (==, !=, in, contains, matches, is empty)"
        raise self.fail(wanted, op)

    def value(self) -> Token:
        token = self.take()
        if not _is_value(token):
            raise self.fail("a value", token)
        return token

    def selector(self, token: Token) -> tuple[str, ...]:
        if token.kind is not Kind.WORD or token.text in _KEYWORDS:
            raise self.fail("a selector", token)
        return token.path


def _is_value(token: Token) -> bool:
    """A string, a number, or a word that is not a keyword."""
    if token.kind is Kind.WORD:
        return token.text not in _KEYWORDS
    return token.kind in (Kind.STRING, Kind.NUMBER)


# -- evaluation ------------------------------------------------------------------

Predicate = Callable[[object], bool]


@dataclass(frozen=True, slots=True)
class _Literal:
    """A value as each kind of field reads it (go-bexpr coerces the literal to the field's type)."""

    text: str
    boolean: bool | None
    integer: int | None
    number: float | None

    @classmethod
    def of(cls, text: str) -> _Literal:
        boolean = True if text in _TRUE else False if text in _FALSE else None
        integer: int | None = None
        number: float | None = None
        if text and text == text.strip() and len(text) < 64:
            with contextlib.suppress(ValueError):
                integer = int(text, 0)  # Go's strconv.ParseInt(s, 0, 64): 0x1f, 0o17, 0b101
            with contextlib.suppress(ValueError):
                number = float(text)
        return cls(text, boolean, integer, number)

    def equals(self, value: object) -> bool | None:
        """Whether `value` equals this literal; None when `value` cannot equal anything."""
        if isinstance(value, str):
            return value == self.text
        if isinstance(value, bool):  # before int: bool is an int
            return None if self.boolean is None else value is self.boolean
        if isinstance(value, int):
            return None if self.integer is None else value == self.integer
        if isinstance(value, float):
            return None if self.number is None else value == self.number
        return None


def _text(value: object) -> str | None:
    """What `matches` searches: a string, or the JSON text of a bool or number."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _contains(value: object, lit: _Literal) -> bool | None:
    if isinstance(value, str):
        return lit.text in value
    if isinstance(value, list | tuple):
        return any(lit.equals(item) for item in value)
    if isinstance(value, Mapping):
        return lit.text in value
    return None


def _size(value: object) -> int | None:
    return len(value) if isinstance(value, str | list | tuple | Mapping) else None


def _leaf(match: Match) -> Predicate:
    """The test applied to the selected value (never None: absent values do not get here)."""
    lit = _Literal.of(match.value)
    op = match.op
    if op is Op.EQ:
        return lambda v: lit.equals(v) is True
    if op is Op.NE:
        return lambda v: lit.equals(v) is False
    if op is Op.IN:
        return lambda v: _contains(v, lit) is True
    if op is Op.NOT_IN:
        return lambda v: _contains(v, lit) is False
    if op is Op.EMPTY:
        return lambda v: _size(v) == 0
    if op is Op.NOT_EMPTY:
        return lambda v: bool(_size(v))
    search = _regex(match)
    want = op is Op.MATCHES
    return lambda v: (text := _text(v)) is not None and search(text) is want


def _regex(match: Match) -> Callable[[str], bool]:
    try:
        pattern = regex.compile(match.value)
    except (regex.error, ValueError, OverflowError, RecursionError) as err:
        raise _error(f"invalid regular expression ({err})", match.value_pos) from None

    def search(text: str) -> bool:
        try:
            return pattern.search(text, timeout=REGEX_TIMEOUT) is not None
        except TimeoutError:
            raise _error(
                "regular expression takes too long to match (it backtracks; simplify it)",
                match.value_pos,
            ) from None

    return search


def _select(path: tuple[str, ...], leaf: Predicate, absent: bool) -> Predicate:
    """Walk `path` into the object (mapping over lists), then apply `leaf`."""

    def walk(value: object, start: int) -> bool:
        for i in range(start, len(path)):
            if value is None:
                return absent
            segment = path[i]
            if isinstance(value, Mapping):
                if segment not in value:
                    return absent
                value = value[segment]
            elif isinstance(value, list | tuple):
                if not (segment.isascii() and segment.isdigit()):
                    return any(walk(item, i) for item in value)  # ANY element, as bexpr
                index = int(segment)
                if index >= len(value):
                    return absent
                value = value[index]
            else:
                return False  # a string or number has no fields
        return absent if value is None else leaf(value)

    return lambda obj: walk(obj, 0)


def _compile(node: Node) -> Predicate:
    if isinstance(node, Match):
        return _select(node.selector, _leaf(node), _ABSENT[node.op])
    if isinstance(node, Not):
        operand = _compile(node.operand)
        return lambda obj: not operand(obj)
    parts = tuple(_compile(part) for part in node.operands)
    if isinstance(node, And):
        return lambda obj: all(part(obj) for part in parts)
    return lambda obj: any(part(obj) for part in parts)


# -- selectors known in advance --------------------------------------------------


def _matches_field(selector: Sequence[str], field: Sequence[str]) -> bool:
    """Whether `selector` names `field` or a part of it; digit segments may index lists."""
    if not selector:
        return True
    head, rest = selector[0], selector[1:]
    if field and field[0] in ("*", head) and _matches_field(rest, field[1:]):
        return True
    return head.isascii() and head.isdigit() and _matches_field(rest, field)


def _check_selectors(node: Node, fields: Sequence[tuple[str, ...]]) -> None:
    if isinstance(node, Match):
        if not any(_matches_field(node.selector, field) for field in fields):
            shown = ".".join(node.selector)
            raise _error(f"unknown selector {shown!r}", node.pos)
    elif isinstance(node, Not):
        _check_selectors(node.operand, fields)
    else:
        for part in node.operands:
            _check_selectors(part, fields)


# -- API -------------------------------------------------------------------------


class Filter:
    """A compiled filter; :meth:`matches` tests one JSON-shaped object."""

    __slots__ = ("_predicate", "text")

    def __init__(self, text: str, predicate: Predicate) -> None:
        self.text = text
        self._predicate = predicate

    def matches(self, obj: object) -> bool:
        """Whether `obj` passes; raises ValidationError only for a regex over its time budget."""
        return self._predicate(obj)

    def __repr__(self) -> str:
        return f"Filter({self.text!r})"


def compile_filter(text: str, fields: Iterable[str] | None = None) -> Filter:
    """Parse `text`; with `fields` ("Service.Tags", "Service.Meta.*"), reject unknown selectors.

    Error handling: raises ValidationError("filter", "<what> at position N") and nothing else.
    """
    if len(text) > MAX_LENGTH:
        raise _error(f"filter longer than {MAX_LENGTH} characters", MAX_LENGTH + 1)
    tree = _Parser(tokenize(text)).expression()
    if fields is not None:
        _check_selectors(tree, [tuple(field.split(".")) for field in fields])
    return Filter(text, _compile(tree))


def parse_filter_arg(value: str | None, fields: Iterable[str] | None = None) -> Filter | None:
    """The `?filter=` query parameter: None when absent or blank (Consul: no filter)."""
    if value is None or not value.strip():
        return None
    return compile_filter(value, fields)
