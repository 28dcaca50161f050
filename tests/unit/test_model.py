"""Tests of discovery.model: make_instance validation and the Instance value.  Pure: no I/O.

Every bad field raises ValidationError whose `field` names it (a dotted path
for nested values, `meta.version`, `weights.passing`, `tags[1]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from discovery.errors import ValidationError, WaypostError
from discovery.model import (
    Health,
    Instance,
    Weights,
    check_address,
    check_label,
    is_label,
    make_instance,
)

GOOD: dict[str, Any] = {"service": "web", "node": "node1", "address": "10.0.0.1", "port": 80}


def build(**changes: Any) -> Instance:
    return make_instance(**{**GOOD, **changes})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        # service: an RFC 1123 label
        ({"service": ""}, "service"),
        ({"service": None}, "service"),
        ({"service": 7}, "service"),
        ({"service": "-web"}, "service"),
        ({"service": "web-"}, "service"),
        ({"service": "we b"}, "service"),
        ({"service": "web_api"}, "service"),
        ({"service": "web.api"}, "service"),
        ({"service": "a" * 64}, "service"),
        # id: any printable string up to 255
        ({"id": 5}, "id"),
        ({"id": "x" * 256}, "id"),
        ({"id": "a\nb"}, "id"),
        ({"id": "a\x00b"}, "id"),
        # node: a label
        ({"node": "bad node"}, "node"),
        ({"node": ""}, "node"),
        ({"node": "n" * 64}, "node"),
        # address: IPv4 or IPv6
        ({"address": ""}, "address"),
        ({"address": None}, "address"),
        ({"address": "10.0.0.256"}, "address"),
        ({"address": "host.example"}, "address"),
        ({"address": "10.0.0.0/8"}, "address"),
        ({"address": 167772161}, "address"),
        # port: an integer 0-65535
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "80"}, "port"),
        ({"port": True}, "port"),
        ({"port": 80.0}, "port"),
        ({"port": None}, "port"),
        # tags: a list of strings
        ({"tags": "primary"}, "tags"),
        ({"tags": 3}, "tags"),
        ({"tags": [1]}, "tags[0]"),
        ({"tags": ["ok", ""]}, "tags[1]"),
        ({"tags": ["ok", "ok2", "x" * 256]}, "tags[2]"),
        ({"tags": ["a\tb"]}, "tags[0]"),
        # meta: string keys of letters, digits, _ and -; string values
        ({"meta": ["a"]}, "meta"),
        ({"meta": "a=b"}, "meta"),
        ({"meta": {"k": 1}}, "meta.k"),
        ({"meta": {"k": None}}, "meta.k"),
        ({"meta": {"k": "x" * 513}}, "meta.k"),
        ({"meta": {"k": "a\nb"}}, "meta.k"),
        ({"meta": {"bad key": "v"}}, "meta.bad key"),
        ({"meta": {"a.b": "v"}}, "meta.a.b"),
        ({"meta": {f"k{i}": "v" for i in range(65)}}, "meta"),
        # SRV priority from meta
        ({"meta": {"srv-priority": "high"}}, "meta.srv-priority"),
        ({"meta": {"srv-priority": "-1"}}, "meta.srv-priority"),
        ({"meta": {"srv-priority": "65536"}}, "meta.srv-priority"),
        ({"meta": {"srv-priority": ""}}, "meta.srv-priority"),
        # ports: label -> port
        ({"ports": [8080]}, "ports"),
        ({"ports": {"http": 70000}}, "ports.http"),
        ({"ports": {"http": "80"}}, "ports.http"),
        ({"ports": {"http": -1}}, "ports.http"),
        # weights: passing 1-65535, warning 0-65535, nothing else
        ({"weights": "heavy"}, "weights"),
        ({"weights": [1, 1]}, "weights"),
        ({"weights": {"passing": 0}}, "weights.passing"),
        ({"weights": {"passing": 65536}}, "weights.passing"),
        ({"weights": {"passing": "2"}}, "weights.passing"),
        ({"weights": {"warning": -1}}, "weights.warning"),
        ({"weights": {"warning": True}}, "weights.warning"),
        ({"weights": {"bogus": 1}}, "weights.bogus"),
        # health
        ({"health": "sick"}, "health"),
        ({"health": ""}, "health"),
    ],
)
def test_bad_field_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        build(**changes)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert isinstance(caught.value, WaypostError)


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"meta": {"k" * 129: "v"}}, "meta"),
        ({"meta": {"": "v"}}, "meta"),
        ({"meta": {3: "v"}}, "meta"),
        ({"ports": {"bad_label": 1}}, "ports"),
        ({"ports": {"-x": 1}}, "ports"),
        ({"ports": {"": 1}}, "ports"),
    ],
)
def test_bad_keys_named_under_their_mapping(changes: dict[str, Any], prefix: str) -> None:
    with pytest.raises(ValidationError) as caught:
        build(**changes)
    assert caught.value.field.startswith(prefix)


def test_first_bad_field_wins_and_nothing_is_built() -> None:
    with pytest.raises(ValidationError) as caught:
        make_instance(service="-", node="-", address="x", port=-1)
    assert caught.value.field == "service"


@pytest.mark.parametrize(
    ("changes", "attr", "value"),
    [
        ({"service": "a" * 63}, "service", "a" * 63),
        ({"service": "Web"}, "service", "Web"),  # as registered; matched through key
        ({"port": 0}, "port", 0),
        ({"port": 65535}, "port", 65535),
        ({"address": "FD00:0:0::1"}, "address", "fd00::1"),  # canonical text
        ({"address": "2001:DB8::"}, "address", "2001:db8::"),
        ({"tags": None}, "tags", ()),
        ({"tags": ["b", "a", "b"]}, "tags", ("b", "a")),  # deduplicated, order kept
        ({"tags": ("x y", "UPPER")}, "tags", ("x y", "UPPER")),  # any printable string
        ({"id": None}, "id", "web"),  # defaults to the service name, as in Consul
        ({"id": ""}, "id", "web"),
        ({"id": "web/1 a"}, "id", "web/1 a"),
        ({"id": "x" * 255}, "id", "x" * 255),
        ({"health": "warning"}, "health", Health.WARNING),
        ({"health": Health.CRITICAL}, "health", Health.CRITICAL),
        ({"weights": None}, "weights", Weights(1, 1)),
        ({"weights": {"Passing": 3}}, "weights", Weights(3, 1)),
        ({"weights": {"passing": 65535, "warning": 0}}, "weights", Weights(65535, 0)),
        ({"weights": Weights(7, 2)}, "weights", Weights(7, 2)),
        ({"meta": {"srv-priority": "0"}}, "priority", 0),
        ({"meta": {"srv-priority": "65535"}}, "priority", 65535),
        ({"meta": {"srv-priority": "10"}}, "priority", 10),
        ({"meta": None}, "priority", 1),
    ],
)
def test_valid_values(changes: dict[str, Any], attr: str, value: object) -> None:
    assert getattr(build(**changes), attr) == value


def test_meta_and_ports_kept() -> None:
    inst = build(meta={"k": "", "a-b_C": "x" * 512}, ports={"http": 8080, "Admin": 0})
    assert dict(inst.meta) == {"k": "", "a-b_C": "x" * 512}
    assert dict(inst.ports) == {"http": 8080, "Admin": 0}
    assert build(meta={f"k{i}": "v" for i in range(64)}).meta["k63"] == "v"


def test_inputs_are_copied() -> None:
    meta = {"version": "1"}
    ports = {"http": 1}
    tags = ["a"]
    inst = build(meta=meta, ports=ports, tags=tags)
    meta["version"] = "2"
    ports["http"] = 2
    tags.append("b")
    assert dict(inst.meta) == {"version": "1"}
    assert dict(inst.ports) == {"http": 1}
    assert inst.tags == ("a",)


def test_instance_is_immutable() -> None:
    inst = build(meta={"k": "v"}, ports={"http": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.port = 81  # type: ignore[misc]
    with pytest.raises(TypeError):
        inst.meta["k"] = "w"  # type: ignore[index]
    with pytest.raises(TypeError):
        inst.ports["http"] = 2  # type: ignore[index]


def test_equal_values_are_equal() -> None:
    assert build(meta={"k": "v"}) == build(meta={"k": "v"})
    assert build(meta={"k": "v"}) != build(meta={"k": "w"})
    assert hash(build(tags=["a"])) == hash(build(tags=["a"]))


def test_defaults() -> None:
    inst = build()
    assert (inst.id, inst.tags, dict(inst.meta), dict(inst.ports)) == ("web", (), {}, {})
    assert (inst.priority, inst.weights, inst.health) == (1, Weights(1, 1), Health.PASSING)
    assert (inst.datacenter, inst.alloc_id, inst.source) == ("", "", "api")


def test_key_is_lower_case() -> None:
    assert build(service="Web-API").key == "web-api"


@pytest.mark.parametrize(
    ("health", "weight"),
    [(Health.PASSING, 5), (Health.WARNING, 2), (Health.CRITICAL, 5)],
)
def test_weight_follows_health(health: Health, weight: int) -> None:
    assert build(weights={"passing": 5, "warning": 2}, health=health).weight == weight


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("a1-b2", True),
        ("1abc", True),
        ("A" * 63, True),
        ("A" * 64, False),
        ("", False),
        ("-a", False),
        ("a-", False),
        ("a_b", False),
        ("a.b", False),
        ("é", False),
        ("web\n", False),
    ],
)
def test_is_label(name: str, ok: bool) -> None:
    assert is_label(name) is ok
    if ok:
        assert check_label(name, "f") == name
    else:
        with pytest.raises(ValidationError) as caught:
            check_label(name, "f")
        assert caught.value.field == "f"


def test_check_address_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        check_address("nope", "service[2].address")
    assert caught.value.field == "service[2].address"
    assert check_address("10.0.0.1", "x") == "10.0.0.1"


def test_validation_error_within() -> None:
    err = ValidationError("port", "is out of range")
    nested = err.within("service[2]")
    assert (nested.field, nested.message) == ("service[2].port", "is out of range")
    assert str(nested) == "service[2].port: is out of range"
    assert err.within("").field == "port"


@pytest.mark.parametrize("field", ["tags", "meta", "id"])
def test_lone_surrogates_are_rejected(field: str) -> None:
    bad = "caf\udce9"
    values: dict[str, object] = {"tags": [bad], "meta": {"k": bad}, "id": bad}
    kwargs = {field: values[field]}
    with pytest.raises(ValidationError, match="not valid Unicode"):
        make_instance(service="web", node="n1", address="10.0.0.1", **kwargs)  # type: ignore[arg-type]
