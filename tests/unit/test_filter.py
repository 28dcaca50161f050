"""Tests of discovery.filter: go-bexpr's filter language on JSON-shaped data.  Pure.

Tables: (filter, expected result) on one Consul health entry, Nomad-style
registrations, syntax errors with their 1-based positions, selectors checked
against known fields; properties (hypothesis): compiling never raises
anything but ValidationError, evaluating never raises at all, `not` negates.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.errors import ValidationError
from discovery.filter import MAX_DEPTH, MAX_LENGTH, compile_filter, parse_filter_arg

# One entry of Consul's /v1/health/service/:name, as encoded.
ENTRY: dict[str, Any] = {
    "Node": {"Node": "node1", "Address": "10.0.0.1", "Datacenter": "dc1", "Meta": {}},
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["primary", "v1"],
        "Address": "10.0.0.5",
        "Port": 8080,
        "Meta": {"version": "1.2", "env": "prod", "srv-priority": "3"},
        "EnableTagOverride": False,
        "Weights": {"Passing": 10, "Warning": 1},
    },
    "Checks": [
        {"CheckID": "serfHealth", "Status": "passing", "Output": "Agent alive"},
        {"CheckID": "service:web-1", "Status": "critical", "Output": "connection refused"},
    ],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # == and != on strings
        ("Service.Service == web", True),
        ('Service.Service == "web"', True),
        ("Service.Service == `web`", True),
        ("Service.Service == Web", False),  # exact, as bexpr
        ("Service.Service != web", False),
        ("Service.Service != api", True),
        ("Node.Node == node1", True),
        ('Node.Address == "10.0.0.1"', True),
        # numbers and booleans: the literal read as the field's type
        ("Service.Port == 8080", True),
        ('Service.Port == "8080"', True),
        ('Service.Port == "0x1f90"', True),
        ("Service.Port != 80", True),
        ("Service.Port == eighty", False),
        ("Service.Port != eighty", False),  # no number: neither equal nor unequal
        ("Service.EnableTagOverride == false", True),
        ("Service.EnableTagOverride == False", True),
        ("Service.EnableTagOverride == 0", True),
        ("Service.EnableTagOverride == true", False),
        ("Service.EnableTagOverride != true", True),
        ("Service.Weights.Passing == 10", True),
        # lists: contains / in / not ...
        ("Service.Tags contains primary", True),
        ('"v1" in Service.Tags', True),
        ("v2 in Service.Tags", False),
        ("v2 not in Service.Tags", True),
        ("Service.Tags not contains v1", False),
        ("Service.Tags == primary", False),  # a list equals nothing: use contains
        ("Service.Tags != primary", False),
        ("Service.Tags is not empty", True),
        ("Service.Tags is empty", False),
        ("Service.Tags.0 == primary", True),
        ("Service.Tags.1 == primary", False),
        ("Service.Tags.7 == primary", False),  # out of range: absent
        ("Service.Tags.7 is empty", True),
        # strings: contains is a substring test
        ("Service.Service contains we", True),
        ("Service.Address contains `0.0`", True),
        ('"10.0" in Service.Address', True),
        # maps: dotted, bracketed, keys for contains / in
        ("Service.Meta.version == `1.2`", True),
        ('Service.Meta["version"] == "1.2"', True),
        ("Service.Meta[`srv-priority`] == 3", True),
        ("Service.Meta.srv-priority == 3", True),  # '-' in names is ours, not bexpr's
        ("Service.Meta contains env", True),
        ("env in Service.Meta", True),
        ("missing in Service.Meta", False),
        ("Service.Meta is empty", False),
        ("Node.Meta is empty", True),
        # missing keys are absent: ==, in, matches, is not empty false; the negations true
        ("Service.Meta.missing == x", False),
        ("Service.Meta.missing != x", True),
        ("Service.Meta.missing is empty", True),
        ("Service.Meta.missing is not empty", False),
        ("Service.Meta.missing contains x", False),
        ("Service.Meta.missing not contains x", True),
        ("Service.Meta.missing matches x", False),
        ("Service.Meta.missing not matches x", True),
        ("Nothing.At.All == x", False),
        ("Nothing.At.All != x", True),
        # a scalar has no fields
        ("Service.Port.Number == 1", False),
        ("Service.Port.Number != 1", False),
        # through a list: ANY element (bexpr's implicit any)
        ("Checks.Status == critical", True),
        ("Checks.Status == warning", False),
        ("Checks.Status != passing", True),  # one check is not passing
        ("Checks.CheckID == serfHealth", True),
        ("Checks.Output contains refused", True),
        ("Checks.0.Status == passing", True),
        ("Checks.1.Status == passing", False),
        ("not Checks.Status == critical", False),
        # matches: unanchored search, RE2 syntax
        ('Service.Service matches "^w"', True),
        ('Service.Service matches "eb$"', True),
        ("Service.Service matches e", True),
        ('Service.Service matches "^e"', False),
        ('Service.Service not matches "^api"', True),
        ('Service.Meta.version matches "^1\\\\.[0-9]+$"', True),
        ("Service.Meta.version matches `^1\\.[0-9]+$`", True),
        ('Service.Port matches "^80"', True),  # the number's text
        ("Service.EnableTagOverride matches `^fal`", True),
        ("Service.Tags matches primary", False),  # not a string
        ("Service.Tags not matches primary", False),
        ('Node.Node matches "(?i)NODE"', True),
        # and, or, not, parentheses, precedence (not > and > or)
        ("Service.Service == web and Node.Node == node1", True),
        ("Service.Service == web and Node.Node == node2", False),
        ("Service.Service == api or Node.Node == node1", True),
        ("Service.Service == api or Node.Node == node2", False),
        ("not Service.Service == api", True),
        ("not not Service.Service == web", True),
        ("not (Service.Service == web and Node.Node == node1)", False),
        ("not(Service.Service == api)", True),
        ("Service.Service == api and Node.Node == x or Service.Port == 8080", True),
        ("Service.Service == api and (Node.Node == x or Service.Port == 8080)", False),
        ("Service.Service == web or Service.Service == api and Node.Node == x", True),
        ("(Service.Service == web or Service.Service == api) and Node.Node == x", False),
        ("((Service.Service == web))", True),
        ("  Service.Service   ==   web  ", True),
        ("Service.Service==web", True),
        ("\tService.Tags\ncontains\rv1", True),
        # string escapes (Go's strconv.Unquote)
        ('Checks.Output == "Agent\\x20alive"', True),
        ('Checks.Output == "Agent\\u0020alive"', True),
        ('Checks.Output == "Agent\\040alive"', True),
        ('"a\\"b" in Service.Tags', False),
        # keywords are words of their own
        ("Service.Service == notes", False),
        ("Service.Meta.env == prod and Service.Meta.version == `1.2`", True),
        # keyword-looking values work when quoted
        ('"and" in Service.Tags', False),
    ],
)
def test_filter_on_a_health_entry(text: str, expected: bool) -> None:
    assert compile_filter(text).matches(ENTRY) is expected


def test_the_and_or_chains_are_any_length() -> None:
    many = " or ".join(f"Service.Port == {port}" for port in range(1000, 1150))
    assert compile_filter(many + " or Service.Port == 8080").matches(ENTRY)
    assert not compile_filter(many).matches(ENTRY)


REGISTRATIONS: list[dict[str, Any]] = [
    {"ServiceName": "web", "Tags": ["a"], "Port": 1, "Health": "passing", "Meta": {"v": "1"}},
    {"ServiceName": "web", "Tags": [], "Port": 2, "Health": "critical", "Meta": {}},
    {"ServiceName": "web", "Tags": ["a", "b"], "Port": 3, "Health": "warning"},
]


@pytest.mark.parametrize(
    ("text", "ports"),
    [
        ("Tags contains a", [1, 3]),
        ("Tags is empty", [2]),
        ("Health == passing", [1]),
        ("Health != critical", [1, 3]),
        ("Meta.v == 1", [1]),
        ("Meta.v != 1", [2, 3]),
        ("Meta is empty", [2, 3]),  # null / missing is empty
        ("Port == 2 or Port == 3", [2, 3]),
        ('Health matches "ing$"', [1, 3]),
    ],
)
def test_filter_on_nomad_registrations(text: str, ports: list[int]) -> None:
    compiled = compile_filter(text)
    assert [r["Port"] for r in REGISTRATIONS if compiled.matches(r)] == ports


def test_filter_reads_json_decoded_data_and_tuples_alike() -> None:
    compiled = compile_filter("Service.Tags contains v1 and Checks.Status == critical")
    assert compiled.matches(json.loads(json.dumps(ENTRY)))
    as_tuples = {**ENTRY, "Checks": tuple(ENTRY["Checks"])}
    assert compiled.matches({**as_tuples, "Service": {**ENTRY["Service"], "Tags": ("v1",)}})


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("", "expected a selector, a value or '('", 1),
        ("   ", "expected a selector, a value or '('", 4),
        ("Service.Service", "expected an operator", 16),
        ("Service.Service ==", "expected a value", 19),
        ("Service.Service = web", "expected '==' after '='", 17),
        ("Service.Service ! web", "expected '!=' after '!'", 17),
        ("Service.Service == web extra", "expected 'and', 'or' or the end", 24),
        ("Service.Service == web and", "expected a selector, a value or '('", 27),
        ("Service.Service == web or or", "expected a selector, a value or '('", 27),
        ("(Service.Service == web", "expected ')' to close the '(' at position 1", 24),
        ("Service.Service == web)", "expected 'and', 'or' or the end", 23),
        ("()", "expected a selector, a value or '('", 2),
        ('Service.Service == "web', "unterminated string", 20),
        ("Service.Service == `web", "unterminated string", 20),
        ('Service.Service == "a\\qb"', "invalid escape in string", 22),
        ('Service.Service == "\\ud800"', "invalid escape in string", 21),
        ('Service.Service == "\\x4"', "invalid escape in string", 21),
        ("Service.Service == 1.2.3", "invalid number", 20),
        ("Service.Service == 01", "invalid number", 20),
        ("Service.Service == -", "invalid number", 20),
        ("Service. == web", "expected a field name after '.'", 9),
        ("Service.Meta[env] == x", "expected a quoted key after '['", 14),
        ('Service.Meta["env" == x', "expected ']'", 20),
        ("Service.Service == web & x", "unexpected character '&'", 24),
        ("Service.Service @ web", "unexpected character '@'", 17),
        ('"web" == Service.Service', "expected a selector, found a string", 1),
        ("3 == Service.Port", "expected a selector, found '3'", 1),
        ("Service.Tags contains", "expected a value", 22),
        ("web in", "expected a selector", 7),
        ('web in "Service.Tags"', "expected a selector, found a string", 8),
        ("Service.Tags not", "expected 'in', 'contains' or 'matches'", 17),
        ("Service.Tags not empty", "expected 'in', 'contains' or 'matches'", 18),
        ("Service.Tags is", "expected 'empty'", 16),
        ("Service.Tags is not full", "expected 'empty'", 21),
        ("Service.Tags is empty is empty", "expected 'and', 'or' or the end", 23),
        ("Service.Tags == and", "expected a value, found 'and'", 17),
        ("and == x", "expected a selector, a value or '('", 1),
        ("not", "expected a selector, a value or '('", 4),
        ('Service.Service matches "("', "invalid regular expression", 25),
        ("Service.Service matches `[a-`", "invalid regular expression", 25),
    ],
)
def test_syntax_errors_name_the_position(text: str, message: str, position: int) -> None:
    with pytest.raises(ValidationError) as caught:
        compile_filter(text)
    assert caught.value.field == "filter"
    assert message in caught.value.message
    assert caught.value.message.endswith(f" at position {position}"), caught.value.message


def test_nesting_is_bounded_and_an_error_not_a_crash() -> None:
    fine = "(" * (MAX_DEPTH - 1) + "a == b" + ")" * (MAX_DEPTH - 1)
    assert not compile_filter(fine).matches({})
    for deep in ("(" * 1500 + "a == b" + ")" * 1500, "not " * 1000 + "a == b"):
        with pytest.raises(ValidationError, match="nested deeper"):
            compile_filter(deep)


def test_length_is_bounded() -> None:
    compile_filter("a == " + "x" * (MAX_LENGTH - 5))
    with pytest.raises(ValidationError, match=f"longer than {MAX_LENGTH}"):
        compile_filter("a == " + "x" * MAX_LENGTH)


HEALTH_FIELDS = (
    "Node.Node",
    "Node.Address",
    "Node.Meta.*",
    "Service.Service",
    "Service.Tags",
    "Service.Meta.*",
    "Service.Port",
    "Checks.Status",
    "Checks.CheckID",
)


@pytest.mark.parametrize(
    "text",
    [
        "Node.Node == x",
        "Service.Meta.anything == x",
        'Service.Meta["any key"] == x',
        "Service.Meta is empty",  # a prefix: the map itself
        "Service is not empty",
        "Checks.Status == passing",
        "Checks.0.Status == passing",  # a list index
        "x in Service.Tags and not Checks.CheckID == y or Node.Meta.rack == r1",
    ],
)
def test_known_selectors_pass(text: str) -> None:
    compile_filter(text, HEALTH_FIELDS)


@pytest.mark.parametrize(
    ("text", "selector", "position"),
    [
        ("Node.Name == x", "Node.Name", 1),
        ("Service.Service == web and Service.Bogus == x", "Service.Bogus", 28),
        ("x in Service.Tag", "Service.Tag", 6),
        ("Service.Meta.a.b == x", "Service.Meta.a.b", 1),
        ("not (Status == passing)", "Status", 6),
        ("service.service == web", "service.service", 1),  # case matters, as in bexpr
    ],
)
def test_unknown_selectors_are_rejected_when_fields_are_known(
    text: str, selector: str, position: int
) -> None:
    with pytest.raises(ValidationError) as caught:
        compile_filter(text, HEALTH_FIELDS)
    assert caught.value.message == f"unknown selector {selector!r} at position {position}"


def test_filter_query_argument() -> None:
    assert parse_filter_arg(None) is None
    assert parse_filter_arg("") is None
    assert parse_filter_arg("  ") is None
    compiled = parse_filter_arg("Service.Port == 8080")
    assert compiled is not None and compiled.matches(ENTRY)
    with pytest.raises(ValidationError):
        parse_filter_arg("Service.Bogus == 1", HEALTH_FIELDS)


def test_a_backtracking_regex_is_an_error_not_a_hang() -> None:
    compiled = compile_filter('Service.Meta.x matches "(a|aa)+$"')
    assert compiled.matches({"Service": {"Meta": {"x": "aaaa"}}})
    with pytest.raises(ValidationError, match=r"too long to match.* at position 24$"):
        compiled.matches({"Service": {"Meta": {"x": "a" * 200 + "!"}}})


# -- properties ----------------------------------------------------------------------

FILTER_ALPHABET = string.ascii_letters[:6] + string.digits[:3] + ' .[]()"`\\=!-_/ \t\n&@é'
WORDS = st.sampled_from(
    [
        "and", "or", "not", "in", "contains", "matches", "is", "empty", "==", "!=", "(", ")",
        "Service.Tags", "Checks.Status", "Meta[", '"x"', "`y`", "]", "1", "-2.5", "a.b.0",
        '"\\u00e9"', '"\\', " ",
    ]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(FILTER_ALPHABET, max_size=60), st.lists(WORDS, max_size=14).map(" ".join)))
def test_compile_raises_only_validation_errors(text: str) -> None:
    try:
        compiled = compile_filter(text, None)
    except ValidationError as err:
        assert err.field == "filter"
        assert " at position " in err.message
        position = int(err.message.rsplit(" ", 1)[1])
        assert 1 <= position <= len(text) + 1
        return
    assert compiled.matches(ENTRY) in (True, False)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)
SIMPLE_FILTERS = st.sampled_from(
    [
        "a == x", "a != 1", "a.b contains x", "x in a", "a.0 is empty", "a is not empty",
        'a.b matches "x"', 'a not matches "^$"', "a.b.c != true", "a not in b",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(SIMPLE_FILTERS, JSON)
def test_evaluation_never_raises_and_not_negates(text: str, data: object) -> None:
    result = compile_filter(text).matches(data)
    assert result in (True, False)
    assert compile_filter(f"not ({text})").matches(data) is not result
