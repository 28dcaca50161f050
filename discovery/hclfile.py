"""Reading config files: HCL (python-hcl2) and JSON into :class:`RawFile` trees.  Adapter.

The only module that imports ``hcl2``.  A file becomes plain dicts, lists and
scalars plus the line of each path (``service[1].port``), so that
:mod:`discovery.config` (pure) can name the line of whatever it rejects.
HCL blocks become lists of objects (``service { }`` twice gives two items);
attributes become values.  The blocks Nomad writes with a label
(:data:`LABELLED_BLOCKS`: ``host_network "public" { }``) become one object
under that label, ``{"public": {...}}``: the shape the JSON form has (they
may also be written without one, `name = "public"` inside); any other block
with a label is rejected.  Consul's HCL has no expressions, so interpolation
(``"${...}"``), templates and arithmetic are rejected rather than kept as text.

Error handling: anything unreadable or unparsable raises ConfigError with the
file and, when the parser knows it, the line.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hcl2
from hcl2.rules.base import AttributeRule, BlockRule, BodyRule
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from discovery.config import AgentConfig, Overrides, RawFile, key_of, parse_config
from discovery.errors import ConfigError

CONFIG_SUFFIXES = (".hcl", ".json")  # what a config directory contributes, as in Consul
_OPTIONS = hcl2.SerializationOptions(
    with_comments=False,
    explicit_blocks=False,
    strip_string_quotes=True,  # also decodes escapes ("\n", "\u00e9")
    preserve_heredocs=False,
)
_TEMPLATE = ("${", "%{")  # HCL interpolation and directives
# Blocks that take one label (their key, indexes dropped), as in Nomad's client block.
LABELLED_BLOCKS = frozenset({"client.host_network"})
_INDEX = re.compile(r"\[\d+\]")


def load_config(
    paths: Sequence[str], overrides: Overrides | None = None, *, hostname: str = "localhost"
) -> AgentConfig:
    """Read every file named by `paths` (directories expanded) and parse the result."""
    files = [read_file(p) for p in expand_paths(paths)]
    return parse_config(files, overrides or Overrides(), hostname=hostname)


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files in order: each file as given, each directory's *.hcl and *.json in lexical order."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(
                entry.name
                for entry in os.scandir(path)
                if entry.name.endswith(CONFIG_SUFFIXES) and entry.is_file()
            )
            out.extend(os.path.join(path, name) for name in names)
        elif os.path.exists(path):
            out.append(path)
        else:
            raise ConfigError(path, "no such file or directory")
    return out


def read_file(path: str) -> RawFile:
    """Read and parse one file: JSON when it ends in .json, else HCL."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_json(text, path) if path.endswith(".json") else parse_hcl(text, path)


# -- HCL -----------------------------------------------------------------------------


def parse_hcl(text: str, path: str = "<hcl>") -> RawFile:
    """Parse HCL text into a RawFile.  Pure."""
    try:
        tree = hcl2.parses(text, discard_comments=True)
    except UnexpectedInput as exc:
        raise ConfigError(path, _syntax_message(exc), line=_line(exc)) from None
    except Exception as exc:  # python-hcl2 raises assorted errors on odd input
        raise ConfigError(path, f"cannot parse HCL: {exc}") from None
    lines: dict[str, int] = {}
    data = _body(tree.body, "", path, lines)
    return RawFile(path, data, lines)


def _line(exc: UnexpectedInput) -> int | None:
    line = getattr(exc, "line", None)
    return line if isinstance(line, int) and line > 0 else None


def _syntax_message(exc: UnexpectedInput) -> str:
    column = getattr(exc, "column", None)
    at = f" at column {column}" if isinstance(column, int) and column > 0 else ""
    if isinstance(exc, UnexpectedEOF):
        return "syntax error: unexpected end of file"
    if isinstance(exc, UnexpectedToken):
        text = str(exc.token)
        if exc.token.type == "$END" or not text:
            return "syntax error: unexpected end of file"
        what = repr(text.strip()) if text.strip() else "end of line"
        return f"syntax error{at}: unexpected {what}"
    if isinstance(exc, UnexpectedCharacters):
        return f"syntax error{at}: unexpected character {exc.char!r}"
    return f"syntax error{at}"


def _body(body: BodyRule, where: str, path: str, lines: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in body.children:
        if not isinstance(child, AttributeRule | BlockRule):
            continue  # newlines and comments
        line = int(getattr(child._meta, "line", 0) or 0) or None
        if isinstance(child, AttributeRule):
            name = str(child.identifier.serialize(_OPTIONS))
            key = f"{where}.{name}" if where else name
            if name in out:
                raise ConfigError(path, "is defined twice", line=line, key=key_of(key))
            out[name] = _literal(child.expression.serialize(_OPTIONS), path, line, key)
            if line:
                lines[key] = line
            continue
        labels = [str(label.serialize(_OPTIONS)) for label in child.labels]
        name = labels[0]
        key = f"{where}.{name}" if where else name
        _check_labels(labels[1:], key, path, line)
        blocks = out.setdefault(name, [])
        if not isinstance(blocks, list) or (blocks and not isinstance(blocks[0], dict)):
            raise ConfigError(path, "is both an attribute and a block", line=line, key=key_of(key))
        indexed = f"{key}[{len(blocks)}]"
        if line:
            lines[indexed] = line
            lines.setdefault(key, line)  # errors about the merged block point at its first one
        if len(labels) == 1:
            blocks.append(_body(child.body, indexed, path, lines))
            continue
        labelled = f"{indexed}.{labels[1]}"
        if line:
            lines[labelled] = line
        blocks.append({labels[1]: _body(child.body, labelled, path, lines)})
    return out


def _check_labels(labels: Sequence[str], key: str, path: str, line: int | None) -> None:
    """A block of LABELLED_BLOCKS takes one label (a literal) or none (its older
    `name = "..."` form); any other block takes none."""
    name = key.rpartition(".")[2]
    if _INDEX.sub("", key) not in LABELLED_BLOCKS:
        if labels:
            raise ConfigError(path, f"a {name} block takes no labels", line=line, key=key_of(key))
        return
    if not labels:
        return
    if len(labels) > 1 or not labels[0]:
        message = f'a {name} block takes one label: {name} "<name>" {{ ... }}'
        raise ConfigError(path, message, line=line, key=key_of(key))
    _literal(labels[0], path, line, key)


def _literal(value: Any, path: str, line: int | None, key: str) -> Any:
    """`value` unchanged if it holds no expression or template, else ConfigError."""
    if isinstance(value, str) and any(t in value for t in _TEMPLATE):
        raise ConfigError(
            path,
            f"{value!r}: expressions and interpolation are not supported; write a literal value",
            line=line,
            key=key_of(key),
        )
    if isinstance(value, list):
        for i, item in enumerate(value):
            _literal(item, path, line, f"{key}[{i}]")
    if isinstance(value, dict):
        for name, item in value.items():
            _literal(name, path, line, key)
            _literal(item, path, line, f"{key}.{name}")
    return value


# -- JSON ----------------------------------------------------------------------------

# Tokens of text that json.loads has already accepted: strings, punctuation, scalars.
_JSON_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([{}\[\],:])|([^\s{}\[\],:"]+))', re.S)


def parse_json(text: str, path: str = "<json>") -> RawFile:
    """Parse JSON text into a RawFile, with the line of every key.  Pure."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} (column {exc.colno})"
        raise ConfigError(path, message, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise ConfigError(path, "must hold a JSON object")
    lines: dict[str, int] = {}
    _JsonLines(text, path, lines).value(0, "")
    return RawFile(path, data, lines)


class _JsonLines:
    """Records the line of each key and array item; rejects duplicate keys (Consul's HCL does)."""

    def __init__(self, text: str, path: str, lines: dict[str, int]) -> None:
        self.text = text
        self.path = path
        self.lines = lines
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def token(self, pos: int) -> tuple[re.Match[str], int]:
        match = _JSON_TOKEN.match(self.text, pos)
        assert match is not None, "json.loads accepted it"
        start = match.start(1) if match[1] is not None else match.start(match.lastindex or 0)
        return match, bisect.bisect_left(self.newlines, start) + 1

    def value(self, pos: int, where: str) -> int:
        """Walk the value at `pos`; returns the position after it."""
        match, _ = self.token(pos)
        if match[2] == "{":
            return self.obj(match.end(), where)
        if match[2] == "[":
            return self.array(match.end(), where)
        return match.end()

    def obj(self, pos: int, where: str) -> int:
        seen: set[str] = set()
        while True:
            match, line = self.token(pos)
            if match[2] == "}":
                return match.end()
            if match[2] == ",":
                match, line = self.token(match.end())
            name = str(json.loads(f'"{match[1]}"'))
            key = f"{where}.{name}" if where else name
            if name in seen:
                raise ConfigError(self.path, "is defined twice", line=line, key=key_of(key))
            seen.add(name)
            self.lines[key] = line
            colon, _ = self.token(match.end())
            pos = self.value(colon.end(), key)

    def array(self, pos: int, where: str) -> int:
        index = 0
        while True:
            match, line = self.token(pos)
            if match[2] == "]":
                return match.end()
            if match[2] == ",":
                pos = match.end()
                match, line = self.token(pos)
            self.lines[f"{where}[{index}]"] = line
            pos = self.value(pos, f"{where}[{index}]")
            index += 1
