"""Tests of the store's JSON rows: render_* / parse_* round trips and parse errors.  Pure.

Every field of Instance, Check and Alloc survives a round trip (the sample
sets each one away from its default, so a field added to the model without
the codec fails here); any string survives (lone surrogates included, as a
JSON body can carry them); a malformed row raises ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.model import Check, CheckKind, Health, Instance, Weights
from discovery.registry import Alloc
from discovery.store import parse_alloc, parse_instance, render_alloc, render_instance

TTL_CHECK = Check(
    id="service:web-1:1",
    name="ttl",
    kind=CheckKind.TTL,
    target="",
    ttl=15.5,
    status=Health.PASSING,
    output="fine",
    notes="pushed by the app",
)
HTTP_CHECK = Check(
    id="service:web-1:2",
    name="http",
    kind=CheckKind.HTTP,
    target="http://127.0.0.1:8080/health",
    ttl=0.25,
    interval=10.0,
    timeout=0.5,
    deregister_after=90.0,
    status=Health.WARNING,
    output="HTTP GET: 429 Too Many Requests",
    notes="n",
)
SAMPLE = Instance(
    service="Web",
    id="web-1",
    node="node1",
    address="2001:db8::1",
    port=8080,
    tags=("primary", "v2", "ünïcode"),
    meta=MappingProxyType({"version": "1.2", "empty": ""}),
    ports=MappingProxyType({"http": 8080, "grpc": 9090}),
    weights=Weights(passing=10, warning=3),
    priority=5,
    health=Health.WARNING,
    datacenter="dc2",
    alloc_id="0b6f2e1c-5d1e-4a3b-9c1e-2f4a5b6c7d8e",
    job_id="web",
    source="job",
    checks=(TTL_CHECK, HTTP_CHECK),
    create_index=7,
    modify_index=42,
)


def _non_default(obj: object) -> list[str]:
    """Names of the dataclass fields of `obj` still at their default value."""
    same = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(obj, f.name) == default:
            same.append(f.name)
    return same


def test_the_sample_sets_every_field() -> None:
    assert _non_default(SAMPLE) == []
    assert _non_default(HTTP_CHECK) == []


def test_instance_round_trip_keeps_every_field() -> None:
    back = parse_instance(render_instance(SAMPLE))
    assert back == SAMPLE
    for f in dataclasses.fields(Instance):
        assert getattr(back, f.name) == getattr(SAMPLE, f.name), f.name
    assert [dataclasses.astuple(c) for c in back.checks] == [
        dataclasses.astuple(c) for c in SAMPLE.checks
    ]
    assert isinstance(back.meta, MappingProxyType)
    assert isinstance(back.ports, MappingProxyType)
    assert back.health is Health.WARNING
    assert back.checks[1].kind is CheckKind.HTTP


def test_minimal_instance_round_trip() -> None:
    minimal = Instance(service="db", id="db", node="n", address="10.0.0.1", port=0)
    assert parse_instance(render_instance(minimal)) == minimal


def test_rows_are_compact_ascii_json() -> None:
    text = render_instance(SAMPLE)
    assert text.isascii()
    assert ", " not in text
    assert json.loads(text)["id"] == "web-1"


def test_alloc_round_trip() -> None:
    alloc = Alloc(id="0b6f2e1c", addresses=("172.26.64.2", "fd00::2"), name="web.api[0]")
    assert parse_alloc(render_alloc(alloc)) == alloc
    assert _non_default(alloc) == []


def test_non_finite_durations_survive() -> None:
    check = dataclasses.replace(HTTP_CHECK, timeout=math.inf)
    back = parse_instance(render_instance(dataclasses.replace(SAMPLE, checks=(check,))))
    assert back.checks[0].timeout == math.inf


# Any str a JSON body can carry, lone surrogates included.
_text = st.text(max_size=20)


@given(
    ident=_text,
    tags=st.lists(_text, max_size=4).map(tuple),
    meta=st.dictionaries(_text, _text, max_size=4),
    output=_text,
    port=st.integers(0, 65535),
    ttl=st.floats(min_value=0, allow_nan=False),
)
def test_any_strings_round_trip(
    ident: str, tags: tuple[str, ...], meta: dict[str, str], output: str, port: int, ttl: float
) -> None:
    check = dataclasses.replace(TTL_CHECK, id=ident, output=output, ttl=ttl)
    inst = dataclasses.replace(
        SAMPLE, id=ident, tags=tags, meta=MappingProxyType(meta), port=port, checks=(check,)
    )
    assert parse_instance(render_instance(inst)) == inst


def _mangled(path: list[str | int], value: Any) -> str:
    data = json.loads(render_instance(SAMPLE))
    target = data
    for step in path[:-1]:
        target = target[step]
    last = path[-1]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (["service"], KeyError, "service: missing"),
        (["port"], "80", "port"),
        (["port"], True, "port"),
        (["tags"], "primary", "tags"),
        (["tags"], [1], "tags"),
        (["meta"], {"a": 1}, "meta"),
        (["ports"], {"http": "80"}, "ports"),
        (["weights"], [1], "weights"),
        (["health"], 3, "health"),
        (["checks"], ["x"], "checks"),
        (["checks", 1, "ttl"], "10s", "checks[1].ttl"),
        (["checks", 0, "deregister_after"], "1m", "checks[0].deregister_after"),
        (["checks", 0, "status"], KeyError, "checks[0].status: missing"),
        (["modify_index"], "42", "modify_index"),
    ],
)
def test_malformed_rows_name_the_field(path: list[str | int], value: Any, named: str) -> None:
    with pytest.raises(ValueError, match=r"^" + named.replace("[", r"\[").replace("]", r"\]")):
        parse_instance(_mangled(path, value))


def test_indexes_default_to_0_in_older_rows() -> None:
    back = parse_instance(_mangled(["create_index"], KeyError))
    assert (back.create_index, back.modify_index) == (0, 42)


def test_job_id_is_written_only_when_set_and_older_rows_read_it_as_empty() -> None:
    assert json.loads(render_instance(SAMPLE))["job_id"] == "web"
    assert parse_instance(_mangled(["job_id"], KeyError)).job_id == ""
    minimal = Instance(service="db", id="db", node="n", address="10.0.0.1", port=0)
    assert "job_id" not in json.loads(render_instance(minimal))


@pytest.mark.parametrize("text", ["", "[]", "null", "{", '"web"'])
def test_non_objects_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_instance(text)


def test_unknown_enum_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        parse_instance(_mangled(["health"], "sick"))
    with pytest.raises(ValueError):
        parse_instance(_mangled(["checks", 0, "kind"], "grpc"))
