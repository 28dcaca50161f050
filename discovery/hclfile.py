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

Jobspecs (:func:`parse_jobspec`) are HCL2 with expressions, so they are read
differently: the parse tree becomes :mod:`discovery.jobspec`'s own small tree
(attributes, blocks, literals, templates, references, and the expressions it
refuses kept as "unsupported" with their source), which that pure module
evaluates and maps to Nomad's JSON.

Error handling: anything unreadable or unparsable raises ConfigError with the
file and, when the parser knows it, the line.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hcl2
from hcl2.rules.base import AttributeRule, BlockRule, BodyRule
from hcl2.utils import process_escape_sequences
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from discovery import jobspec as js
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


# -- jobspecs ------------------------------------------------------------------------

_JOBSPEC_OPTIONS = hcl2.SerializationOptions(
    with_comments=False,
    explicit_blocks=False,
    strip_string_quotes=True,
    preserve_heredocs=False,  # the value of a heredoc (<<- dedented), not its source
    preserve_scientific_notation=False,
)
# Expressions a jobspec on one host does without, by parser rule, as errors name them.
_UNSUPPORTED = {
    "function_call": "a function call",
    "conditional": "a conditional",
    "binary_op": "an operator",
    "unary_op": "an operator",
    "for_tuple_expr": "a for expression",
    "for_object_expr": "a for expression",
    "attr_splat_expr_term": "a splat",
    "full_splat_expr_term": "a splat",
}


def parse_jobspec(
    text: str,
    path: str = "<jobspec>",
    variables: Mapping[str, Any] | None = None,
    variables_text: str = "",
) -> js.Jobspec:
    """An HCL jobspec as Nomad's API JSON (discovery.jobspec); `variables_text` is a
    variables file's content (Nomad's -var-file), `variables` more values over it (-var)."""
    given: dict[str, Any] = {}
    if variables_text.strip():
        where = f"{path} (variables)"
        given.update(js.parse_variables(parse_hcl_body(variables_text, where), where))
    given.update(variables or {})
    return js.render_jobspec(parse_hcl_body(text, path), path, given)


def hcl_to_json(
    text: str, path: str = "<jobspec>", variables: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `{"Job": {...}}` of an HCL jobspec (:func:`parse_jobspec` without the lines)."""
    return parse_jobspec(text, path, variables).body


def parse_hcl_body(text: str, path: str, first_line: int = 1) -> js.Body:
    """HCL text as discovery.jobspec's tree; `first_line` numbers its first line."""
    try:
        tree = hcl2.parses(text, discard_comments=True)
    except UnexpectedInput as exc:
        line = _line(exc)
        line = line + first_line - 1 if line else None
        raise ConfigError(path, _syntax_message(exc), line=line) from None
    except Exception as exc:  # python-hcl2 raises assorted errors on odd input
        raise ConfigError(path, f"cannot parse HCL: {exc}") from None
    return _JobspecTree(path, first_line - 1).body(tree.body)


class _JobspecTree:
    """python-hcl2's rule tree -> discovery.jobspec's Body and Expr."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.offset = offset  # lines before the text (an expression inside a heredoc)

    def line(self, rule: Any, default: int = 0) -> int:
        line = getattr(getattr(rule, "_meta", None), "line", None)
        return line + self.offset if isinstance(line, int) and line > 0 else default

    def body(self, body: BodyRule) -> js.Body:
        items: list[js.Attr | js.Block] = []
        for child in body.children:
            if isinstance(child, AttributeRule):
                line = self.line(child)
                name = str(child.identifier.serialize(_JOBSPEC_OPTIONS))
                items.append(js.Attr(name, self.expr(child.expression, line), line))
            elif isinstance(child, BlockRule):
                labels = [str(label.serialize(_JOBSPEC_OPTIONS)) for label in child.labels]
                line = self.line(child)
                block = js.Block(labels[0], tuple(labels[1:]), self.body(child.body), line)
                items.append(block)
        return js.Body(tuple(items))

    def expr(self, rule: Any, line: int) -> js.Expr:
        line = self.line(rule, line)
        kind = str(rule.lark_name())
        if kind == "expr_term":
            return self.expr(rule.expression, line)
        if kind in ("int_lit", "float_lit", "literal_value"):
            return js.Literal(rule.serialize(_JOBSPEC_OPTIONS), line)
        if kind == "identifier":
            return js.Ref((str(rule.serialize(_JOBSPEC_OPTIONS)),), line)
        if kind == "string":
            return self.string(rule, line)
        if kind in ("heredoc_template", "heredoc_template_trim"):
            return self.heredoc(_heredoc_value(str(rule.heredoc.value)), line + 1)
        if kind == "tuple":
            return js.TupleExpr(tuple(self.expr(e, line) for e in rule.elements), line)
        if kind == "object":
            items = []
            for elem in rule.elements:
                key = elem.key
                key_rule = key.expression if hasattr(key, "expression") else key.value
                items.append((self.expr(key_rule, line), self.expr(elem.expression, line)))
            return js.ObjectExpr(tuple(items), line)
        if kind in ("get_attr_expr_term", "index_expr_term"):
            return self.traversal(rule, kind, line)
        if kind == "unary_op" and rule.operator.strip() == "-":
            operand = self.expr(rule.expr_term, line)
            value = operand.value if isinstance(operand, js.Literal) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return js.Literal(-value, line)
        what = _UNSUPPORTED.get(kind, "this expression")
        return js.Unsupported(what, self.source(rule), line)

    def source(self, rule: Any) -> str:
        text = str(rule.serialize(_JOBSPEC_OPTIONS))
        return text[2:-1] if text.startswith("${") and text.endswith("}") else text

    def traversal(self, rule: Any, kind: str, line: int) -> js.Expr:
        base = self.expr(rule.children[0], line)
        step: str | int | None = None
        if kind == "get_attr_expr_term":
            step = str(rule.get_attr.identifier.serialize(_JOBSPEC_OPTIONS))
        else:
            index = self.expr(rule.children[1].index_expression, line)
            if isinstance(index, js.Template) and all(isinstance(p, str) for p in index.parts):
                step = "".join(str(p) for p in index.parts)
            elif isinstance(index, js.Literal) and isinstance(index.value, int):
                step = index.value
        if not isinstance(base, js.Ref) or step is None:
            return js.Unsupported("this reference", self.source(rule), line)
        return js.Ref((*base.names, step), line)

    def string(self, rule: Any, line: int) -> js.Template:
        parts: list[str | js.Expr] = []
        for part in rule.string_parts:
            content = part.content
            kind = str(content.lark_name())
            if kind == "STRING_CHARS":
                parts.append(process_escape_sequences(str(content.serialize(_JOBSPEC_OPTIONS))))
            elif kind in ("ESCAPED_INTERPOLATION", "ESCAPED_DIRECTIVE"):
                parts.append(str(content.serialize(_JOBSPEC_OPTIONS))[1:])  # $${ is ${
            elif kind == "interpolation":
                parts.append(self.expr(content.expression, line))
            else:
                source = str(part.serialize(_JOBSPEC_OPTIONS))
                parts.append(js.Unsupported("a template directive", source, self.line(part, line)))
        return js.Template(_joined(parts), line)

    def heredoc(self, text: str, line: int) -> js.Template:
        """A heredoc's value (python-hcl2 keeps it as text): its ${...} parsed here."""
        parts: list[str | js.Expr] = []
        pos = 0
        while pos < len(text):
            start = _next_template(text, pos)
            if start < 0:
                parts.append(text[pos:])
                break
            parts.append(text[pos:start])
            if text.startswith(("$${", "%%{"), start):
                parts.append(text[start + 1 : start + 3])
                pos = start + 3
                continue
            here = line + text.count("\n", 0, start)
            end = _closing_brace(text, start + 2)
            if end < 0:
                raise ConfigError(self.path, "unterminated ${ in a heredoc", line=here)
            inner = text[start + 2 : end]
            if text.startswith("%{", start):
                parts.append(js.Unsupported("a template directive", "%{" + inner + "}", here))
            else:
                parts.append(self.inner(inner, here))
            pos = end + 1
        return js.Template(_joined(parts), line)

    def inner(self, source: str, line: int) -> js.Expr:
        """The expression of a `${...}` in a heredoc, parsed on its own."""
        body = parse_hcl_body(f"x = {source.strip()}\n", self.path, line)
        (attr,) = body.attrs
        return attr.value


def _heredoc_value(token: str) -> str:
    """The value of a heredoc token as HCL gives it (python-hcl2 drops the last
    newline and escapes quotes in `<<-` ones): the lines between the markers, each
    with its newline; `<<-` removes the indentation all non-blank lines share."""
    lines = token.rstrip("\r\n").split("\n")[1:-1]  # without the <<EOF and EOF lines
    lines = [line.removesuffix("\r") for line in lines]
    if token.startswith("<<-"):
        indents = [len(line) - len(line.lstrip(" \t")) for line in lines if line.strip()]
        cut = min(indents, default=0)
        lines = [line[cut:] for line in lines]
    return "".join(line + "\n" for line in lines)


def _next_template(text: str, pos: int) -> int:
    found = [i for i in (text.find("${", pos), text.find("%{", pos)) if i >= 0]
    if not found:
        return -1
    start = min(found)
    return (
        start - 1
        if start > pos and text[start - 1] in "$%" and text[start - 1] == text[start]
        else start
    )


def _closing_brace(text: str, pos: int) -> int:
    """The index of the `}` that closes a `${` whose expression starts at `pos`."""
    depth, quoted = 0, False
    while pos < len(text):
        char = text[pos]
        if quoted:
            if char == "\\":
                pos += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return pos
            depth -= 1
        pos += 1
    return -1


def _joined(parts: list[str | js.Expr]) -> tuple[str | js.Expr, ...]:
    out: list[str | js.Expr] = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        elif part != "":
            out.append(part)
    return tuple(out)


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
