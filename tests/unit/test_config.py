"""Agent configuration: HCL and JSON files, layering, defaults and errors naming file:line: key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.config import (
    AgentConfig,
    Endpoint,
    Overrides,
    RawFile,
    key_of,
    node_name_from_hostname,
    parse_config,
    parse_endpoint,
    service_instances,
)
from discovery.dns.settings import DnsSettings, SoaSettings
from discovery.durations import parse_duration
from discovery.errors import ConfigError, ValidationError
from discovery.hclfile import expand_paths, load_config, parse_hcl, parse_json
from discovery.model import CheckKind, Health, Node, Weights

ROOT = Path(__file__).resolve().parents[2]
MARK = "# <-"  # marks the line an error must name


def hcl(text: str, path: str = "test.hcl", **kw: object) -> AgentConfig:
    return parse_config([parse_hcl(text, path)], **kw)  # type: ignore[arg-type]


def js(data: object, path: str = "test.json") -> AgentConfig:
    return parse_config([parse_json(json.dumps(data, indent=2), path)])


def marked_line(text: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if MARK in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


# -- defaults ----------------------------------------------------------------------


def test_defaults_without_files() -> None:
    config = parse_config([], hostname="Build-Host.example.com")
    assert config.node_name == "build-host"
    assert config.node_address == "127.0.0.1"
    assert config.dns_addr == Endpoint("127.0.0.1", 8600)
    assert config.http_addr == Endpoint("127.0.0.1", 4646)
    assert config.data_dir == "/var/lib/waypost"
    assert config.datacenter == "dc1"
    assert config.domain == "nomad."
    assert config.services == ()
    assert config.dns == DnsSettings(node_name="build-host", node_address="127.0.0.1")


def test_dev_changes_only_the_default_data_dir() -> None:
    assert parse_config([], Overrides(dev=True)).data_dir == "./data"
    configured = [parse_hcl('data_dir = "/srv/wp"')]
    assert parse_config(configured, Overrides(dev=True)).data_dir == "/srv/wp"


@pytest.mark.parametrize(
    ("hostname", "node"),
    [
        ("web01", "web01"),
        ("My_Host.example.com", "my-host"),
        ("-edge-", "edge"),
        ("a" * 80, "a" * 63),
        ("", "localhost"),
        ("___", "localhost"),
        ("höst", "h-st"),
    ],
)
def test_node_name_from_hostname(hostname: str, node: str) -> None:
    assert node_name_from_hostname(hostname) == node


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("", "127.0.0.1"),
        ('bind_addr = "10.1.2.3"', "10.1.2.3"),
        ('bind_addr = "0.0.0.0"', "127.0.0.1"),
        ('bind_addr = "::"', "127.0.0.1"),
        ('bind_addr = "0.0.0.0"\nadvertise_addr = "192.0.2.7"', "192.0.2.7"),
        ('advertise_addr = "2001:DB8::1"', "2001:db8::1"),
    ],
)
def test_node_address(text: str, address: str) -> None:
    config = hcl(text)
    assert config.node_address == address
    assert config.node == Node(config.node_name, address)
    assert config.dns.node_address == address


def test_listeners_follow_bind_addr_then_addresses_then_flags() -> None:
    text = 'bind_addr = "0.0.0.0"\naddresses {\n  http = "127.0.0.2"\n}\nports {\n  dns = 53\n}'
    config = hcl(text)
    assert config.dns_addr == Endpoint("0.0.0.0", 53)
    assert config.http_addr == Endpoint("127.0.0.2", 4646)
    flags = Overrides(dns_addr=Endpoint("127.0.0.1", 0), http_addr=Endpoint("::1", 9), data_dir="d")
    config = parse_config([parse_hcl(text)], flags)
    assert (config.dns_addr, config.http_addr, config.data_dir) == (
        Endpoint("127.0.0.1", 0),
        Endpoint("::1", 9),
        "d",
    )


# -- values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0s", 0.0),
        ("0", 0.0),
        ("5s", 5.0),
        ("1m", 60.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2us", 2e-6),
        ("3µs", 3e-6),
        ("10ns", 1e-8),
        (10, 10.0),
        (0.5, 0.5),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "d") == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "", "5x", "-5s", "1s ", "s", "1m-1s", True, None, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        parse_duration(value, "dns.node_ttl")
    assert info.value.field == "dns.node_ttl"


@pytest.mark.parametrize(
    ("value", "ttls"),
    [
        ('"5s"', {"*": 5}),
        ("30", {"*": 30}),
        ('{ "*" = "5s", "web" = "30s", "db*" = "10s" }', {"*": 5, "web": 30, "db*": 10}),
        ('{ "Web" = "1m" }', {"web": 60}),
        ('{ "db-*" = 7 }', {"db-*": 7}),
    ],
)
def test_service_ttl_forms(value: str, ttls: dict[str, int]) -> None:
    dns = hcl(f"dns {{\n  service_ttl = {value}\n}}").dns
    assert dict(dns.service_ttl) == ttls
    assert isinstance(dns.service_ttl, MappingProxyType)


def test_service_ttl_lookup_through_settings() -> None:
    dns = hcl('dns {\n  service_ttl = { "*" = 1, "web" = 2, "db*" = 3 }\n}').dns
    assert [dns.ttl_for(s) for s in ("web", "WEB", "db-main", "api")] == [2, 2, 3, 1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('domain = "Consul"', {"domain": "consul."}),
        ('domain = "example.internal."', {"domain": "example.internal."}),
        ('alt_domains = ["Waypost", "x.test."]', {"alt_domains": ("waypost.", "x.test.")}),
        ('datacenter = "EU-West"', {"datacenter": "eu-west"}),
        ('node_name = "edge-1"', {"node_name": "edge-1"}),
        ('dns {\n  node_ttl = "30s"\n}', {"node_ttl": 30}),
        ("dns {\n  only_passing = true\n}", {"only_passing": True}),
        ("dns {\n  udp_answer_limit = 10\n}", {"udp_answer_limit": 10}),
        ("dns {\n  enable_truncate = false\n}", {"enable_truncate": False}),
        ("dns {\n  edns_max_payload = 4096\n}", {"edns_max_payload": 4096}),
        ('dns {\n  recursor_timeout = "250ms"\n}', {"recursor_timeout": 0.25}),
        ("dns {\n  tcp_idle_timeout = 3\n}", {"tcp_idle_timeout": 3.0}),
        (
            'dns {\n  recursors = ["127.0.0.53", "127.0.0.1:5353", "[::1]:53", "::1"]\n}',
            {"recursors": ("127.0.0.53", "127.0.0.1:5353", "::1", "::1")},
        ),
        (
            'dns {\n  soa {\n    refresh = "1m"\n    min_ttl = 5\n  }\n}',
            {"soa": SoaSettings(refresh=60, min_ttl=5)},
        ),
    ],
)
def test_dns_settings(text: str, expected: dict[str, object]) -> None:
    dns = hcl(text).dns
    for name, value in expected.items():
        assert getattr(dns, name) == value, name


def test_allow_recursion_from() -> None:
    dns = hcl('dns {\n  allow_recursion_from = ["10.0.0.0/8", "::1", "192.0.2.9/24"]\n}').dns
    assert [str(n) for n in dns.recursion_allowed] == ["10.0.0.0/8", "::1/128", "192.0.2.0/24"]


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:53", Endpoint("127.0.0.1", 53)),
        ("0.0.0.0:0", Endpoint("0.0.0.0", 0)),
        ("[::1]:8600", Endpoint("::1", 8600)),
    ],
)
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert str(endpoint) == text


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:53", "localhost:53", "1.2.3.4:70000", ":53"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_endpoint(text)


# -- services ----------------------------------------------------------------------

SERVICES_HCL = """
service {
  name = "web"
  id   = "web-1"
  port = 8081
  tags = ["primary", "v1", "v1"]
  meta = {
    version      = "1.4"
    srv-priority = "5"
  }
  weights {
    passing = 3
  }
  ports = { admin = 9000 }
}
service {
  name    = "db"
  address = "10.0.0.5"
  port    = 5432
  check {
    tcp      = "10.0.0.5:5432"
    interval = "5s"
  }
}
"""

SERVICES_JSON = {
    "service": [
        {
            "name": "web",
            "id": "web-1",
            "port": 8081,
            "tags": ["primary", "v1", "v1"],
            "meta": {"version": "1.4", "srv-priority": "5"},
            "weights": {"passing": 3},
            "ports": {"admin": 9000},
        },
        {
            "name": "db",
            "address": "10.0.0.5",
            "port": 5432,
            "check": {"tcp": "10.0.0.5:5432", "interval": "5s"},
        },
    ]
}


def test_hcl_and_json_give_the_same_services() -> None:
    from_hcl, from_json = hcl(SERVICES_HCL), js(SERVICES_JSON)
    strip = [
        (s.name, s.id, s.address, s.port, s.tags, dict(s.meta), dict(s.ports), s.weights, s.checks)
        for s in from_hcl.services
    ]
    assert strip == [
        (s.name, s.id, s.address, s.port, s.tags, dict(s.meta), dict(s.ports), s.weights, s.checks)
        for s in from_json.services
    ]
    web, db = from_hcl.services
    assert (web.id, web.tags, web.weights) == ("web-1", ("primary", "v1"), Weights(3, 1))
    assert (db.id, db.address, db.checks[0].kind) == ("db", "10.0.0.5", CheckKind.TCP)
    assert web.origin == "test.hcl:2"


def test_json_accepts_services_plural_and_a_single_service_object() -> None:
    config = js({"services": [{"name": "a", "port": 1}], "service": {"name": "b", "port": 2}})
    assert sorted(s.name for s in config.services) == ["a", "b"]


def test_service_instances_on_a_node() -> None:
    config = hcl(SERVICES_HCL, hostname="edge")
    node = Node("edge", "192.0.2.1")
    web, db = service_instances(config.services, node)
    assert (web.node, web.address, web.port, web.source) == ("edge", "192.0.2.1", 8081, "config")
    assert (web.priority, web.weight, dict(web.ports)) == (5, 3, {"admin": 9000})
    assert web.health is Health.PASSING  # no checks
    assert (db.address, db.health) == ("10.0.0.5", Health.CRITICAL)  # a check without status


@pytest.mark.parametrize(
    ("checks", "health"),
    [
        ([], Health.PASSING),
        (['ttl = "30s"'], Health.CRITICAL),
        (['ttl = "30s"\n    status = "passing"'], Health.PASSING),
        (['ttl = "30s"\n    status = "warning"'], Health.WARNING),
        (
            ['ttl = "1s"\n    status = "passing"', 'ttl = "1s"\n    status = "warning"'],
            Health.WARNING,
        ),
        (['ttl = "1s"\n    status = "passing"', 'ttl = "1s"'], Health.CRITICAL),
    ],
)
def test_initial_health_from_checks(checks: list[str], health: Health) -> None:
    blocks = "".join(f"  check {{\n    {c}\n  }}\n" for c in checks)
    config = hcl(f'service {{\n  name = "web"\n{blocks}}}\n')
    assert config.services[0].initial_health is health
    (inst,) = service_instances(config.services, config.node)
    assert inst.health is health


def test_check_fields_and_defaults() -> None:
    text = """
service {
  name = "web"
  id   = "web-1"
  check {
    http     = "http://127.0.0.1:8081/health"
    interval = "10s"
  }
  check {
    id       = "web-tcp"
    name     = "port open"
    tcp      = "127.0.0.1:8081"
    interval = "5s"
    timeout  = "1s"
    deregister_critical_service_after = "1m"
    status   = "warning"
  }
  check {
    ttl = "30s"
  }
}
"""
    http, tcp, ttl = hcl(text).services[0].checks
    assert (http.id, http.name, http.kind, http.target) == (
        "service:web-1:1",
        "Service 'web' check",
        CheckKind.HTTP,
        "http://127.0.0.1:8081/health",
    )
    assert (http.interval, http.timeout, http.status) == (10.0, 10.0, Health.CRITICAL)
    assert (tcp.id, tcp.name, tcp.kind, tcp.target, tcp.timeout) == (
        "web-tcp",
        "port open",
        CheckKind.TCP,
        "127.0.0.1:8081",
        1.0,
    )
    assert (tcp.deregister_after, tcp.status) == (60.0, Health.WARNING)
    assert (ttl.id, ttl.kind, ttl.ttl, ttl.interval) == (
        "service:web-1:3",
        CheckKind.TTL,
        30.0,
        0.0,
    )
    single = hcl('service {\n  name = "a"\n  check {\n    ttl = "1s"\n  }\n}').services[0]
    assert single.checks[0].id == "service:a"


def test_service_address_empty_means_node_address() -> None:
    config = hcl('advertise_addr = "192.0.2.9"\nservice {\n  name = "a"\n  address = ""\n}')
    assert config.services[0].address == ""
    assert service_instances(config.services, config.node)[0].address == "192.0.2.9"


# -- several files -------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_later_files_override_settings_merge_blocks_and_add_services(tmp_path: Path) -> None:
    first = write(
        tmp_path / "a.hcl",
        'datacenter = "dc1"\ndomain = "nomad"\n'
        "dns {\n  only_passing = true\n  soa {\n    refresh = 60\n    retry = 30\n  }\n}\n"
        'service {\n  name = "a"\n}\n',
    )
    second = write(
        tmp_path / "b.json",
        json.dumps(
            {
                "datacenter": "dc2",
                "dns": {"soa": {"retry": 5}, "node_ttl": "3s"},
                "service": [{"name": "b"}],
            }
        ),
    )
    config = load_config([first, second])
    assert (config.datacenter, config.domain) == ("dc2", "nomad.")
    assert config.dns.soa == SoaSettings(refresh=60, retry=5)
    assert (config.dns.only_passing, config.dns.node_ttl) == (True, 3)
    assert [s.name for s in config.services] == ["a", "b"]
    assert config.files == (first, second)


def test_a_directory_gives_its_hcl_and_json_files_in_lexical_order(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    write(conf / "20-dc.hcl", 'datacenter = "second"\nservice {\n  name = "b"\n}')
    write(conf / "10-dc.json", '{"datacenter": "first", "service": {"name": "a"}}')
    write(conf / "README.md", "not config")
    write(conf / "30-bad.hcl.orig", "this = is not { hcl")
    (conf / "40-dir.hcl").mkdir()
    last = write(tmp_path / "last.hcl", 'datacenter = "third"')
    assert expand_paths([str(conf), last]) == [
        str(conf / "10-dc.json"),
        str(conf / "20-dc.hcl"),
        last,
    ]
    config = load_config([str(conf)])
    assert config.datacenter == "second"
    assert [s.name for s in config.services] == ["a", "b"]
    assert load_config([str(conf), last]).datacenter == "third"


def test_an_empty_directory_is_no_config(tmp_path: Path) -> None:
    assert load_config([str(tmp_path)], hostname="h").services == ()


def test_examples_parse() -> None:
    config = load_config([str(ROOT / "examples/agent.hcl"), str(ROOT / "examples/services.hcl")])
    ids = [s.id for s in config.services]
    assert ids == ["billing-1", "api-1", "api-2", "api-3", "db-1"]
    api = [s for s in config.services if s.name == "api"]
    assert [s.port for s in api] == [8081, 8082, 8083]
    assert {t for s in api for t in s.tags} == {"primary", "v1", "v2"}
    assert any(s.meta for s in api)
    assert dict(config.services[-1].ports) == {"metrics": 9187}
    assert config.dns.recursors and config.dns.alt_domains == ("waypost.",)
    services_only = load_config([str(ROOT / "examples/services.hcl")])
    assert all(s.initial_health is Health.PASSING for s in services_only.services)


# -- errors name file:line: key ---------------------------------------------------------

HCL_ERRORS = [
    # (text with the offending line marked, key, message)
    ("bogus = 1 # <-", "bogus", "unknown key"),
    ("dns {\n  only_pasing = true # <-\n}", "dns.only_pasing", "unknown key"),
    ("dns {\n  soa {\n    minimum = 1 # <-\n  }\n}", "dns.soa.minimum", "unknown key"),
    ('service {\n  name = "a"\n  kind = "x" # <-\n}', "service[0].kind", "unknown key"),
    (
        'service {\n  name = "a"\n  check {\n    ttl = "1s"\n    notes = "" # <-\n  }\n}',
        "service[0].check[0].notes",
        "unknown key",
    ),
    (
        'service {\n  name = "a"\n  port = 1\n}\nservice {\n  name = "b"\n  port = 70000 # <-\n}',
        "service[1].port",
        "70000 is out of range 0-65535",
    ),
    ("service { # <-\n  port = 1\n}", "service[0].name", "must be a non-empty string"),
    ('service {\n  name = "web_1" # <-\n}', "service[0].name", "is not a valid DNS label"),
    ('service {\n  name = "a"\n  address = "localhost" # <-\n}', "service[0].address", "is not"),
    ('service {\n  name = "a"\n  tags = "v1" # <-\n}', "service[0].tags", "must be a list"),
    (
        'service {\n  name = "a"\n  meta = { "bad key" = "x" } # <-\n}',
        "service[0].meta.bad key",
        "key may hold only",
    ),
    (
        'service {\n  name = "a"\n  meta = { srv-priority = "high" } # <-\n}',
        "service[0].meta.srv-priority",
        "is not an integer",
    ),
    (
        'service {\n  name = "a"\n  weights { # <-\n    passing = 0\n  }\n}',
        "service[0].weights.passing",
        "0 is out of range 1-65535",
    ),
    (
        'service {\n  name = "a"\n  ports = { http = 99999 } # <-\n}',
        "service[0].ports.http",
        "out of range",
    ),
    ('service {\n  name = "a"\n  ports = 80 # <-\n}', "service[0].ports", "must be a block"),
    (
        'service {\n  name = "a"\n  check { # <-\n    interval = "1s"\n  }\n}',
        "service[0].check[0]",
        "exactly one of ttl, http or tcp",
    ),
    (
        'service {\n  name = "a"\n  check { # <-\n    ttl = "1s"\n    tcp = "h:1"\n  }\n}',
        "service[0].check[0]",
        "exactly one of ttl, http or tcp",
    ),
    (
        'service {\n  name = "a"\n  check {\n    http = "ftp://x/" # <-\n'
        '    interval = "1s"\n  }\n}',
        "service[0].check[0].http",
        "is not an http:// or https:// URL",
    ),
    (
        'service {\n  name = "a"\n  check {\n    tcp = "127.0.0.1" # <-\n'
        '    interval = "1s"\n  }\n}',
        "service[0].check[0].tcp",
        "is not HOST:PORT",
    ),
    (
        'service {\n  name = "a"\n  check { # <-\n    tcp = "127.0.0.1:80"\n  }\n}',
        "service[0].check[0].interval",
        "is required for tcp checks",
    ),
    (
        'service {\n  name = "a"\n  check {\n    ttl = "1s"\n    interval = "1s" # <-\n  }\n}',
        "service[0].check[0].interval",
        "is for http and tcp checks only",
    ),
    (
        'service {\n  name = "a"\n  check {\n    ttl = "0s" # <-\n  }\n}',
        "service[0].check[0].ttl",
        "must be longer than 0s",
    ),
    (
        'service {\n  name = "a"\n  check {\n    ttl = "1s"\n    status = "ok" # <-\n  }\n}',
        "service[0].check[0].status",
        "is not passing, warning or critical",
    ),
    (
        'service {\n  name = "a"\n  id = "x"\n}\nservice {\n  name = "b"\n  id = "x" # <-\n}',
        "service[1].id",
        "service id 'x' is already defined at test.hcl:1",
    ),
    (
        'service {\n  name = "a"\n}\nservice { # <-\n  name = "a"\n}',
        "service[1].id",
        "service id 'a' is already defined at test.hcl:1 (give each instance its own id)",
    ),
    (
        'service {\n  name = "a"\n  check {\n    ttl = "1s"\n  }\n}\n'
        'service {\n  name = "b"\n  check {\n    id = "service:a" # <-\n    ttl = "1s"\n  }\n}',
        "service[1].check[0].id",
        "check id 'service:a' is already defined at test.hcl:3",
    ),
    ('datacenter = "dc_1" # <-', "datacenter", "is not a valid DNS label"),
    ('domain = "bad..name" # <-', "domain", "is not a valid domain name"),
    ('alt_domains = "x" # <-', "alt_domains", "must be a list"),
    ('alt_domains = ["nomad"] # <-', "alt_domains", "'nomad.' is the domain already"),
    ('alt_domains = ["a", "A."] # <-', "alt_domains", "lists a domain twice"),
    ('node_name = "my.host" # <-', "node_name", "is not a valid DNS label"),
    ('bind_addr = "localhost" # <-', "bind_addr", "is not an IPv4 or IPv6 address"),
    ('advertise_addr = "0.0.0.0" # <-', "advertise_addr", "cannot be advertised"),
    ('data_dir = "" # <-', "data_dir", "must be a non-empty string"),
    ("ports {\n  dns = 70000 # <-\n}", "ports.dns", "70000 is out of range 0-65535"),
    ('ports {\n  http = "80" # <-\n}', "ports.http", "must be an integer"),
    ("ports = 80 # <-", "ports", "must be a block"),
    ('addresses {\n  dns = "::g" # <-\n}', "addresses.dns", "is not an IPv4 or IPv6 address"),
    ('dns {\n  service_ttl = "5" # <-\n}', "dns.service_ttl", "is not a duration"),
    ('dns {\n  service_ttl = "250ms" # <-\n}', "dns.service_ttl", "not a whole number of seconds"),
    (
        'dns {\n  service_ttl = { "*web" = "5s" } # <-\n}',
        "dns.service_ttl.*web",
        'must be a service name, "prefix*" or "*"',
    ),
    ('dns {\n  service_ttl = { web = "-1s" } # <-\n}', "dns.service_ttl.web", "not a duration"),
    ("dns {\n  service_ttl = { web = -1 } # <-\n}", "dns.service_ttl.web", "must not be negative"),
    ('dns {\n  node_ttl = "3000000000s" # <-\n}', "dns.node_ttl", "longer than 2147483647"),
    ('dns {\n  soa {\n    refresh = "1.5s" # <-\n  }\n}', "dns.soa.refresh", "whole number"),
    ('dns {\n  only_passing = "yes" # <-\n}', "dns.only_passing", "must be true or false"),
    ("dns {\n  udp_answer_limit = 0 # <-\n}", "dns.udp_answer_limit", "0 is out of range 1-65535"),
    ("dns {\n  edns_max_payload = 100 # <-\n}", "dns.edns_max_payload", "out of range 512-65535"),
    ('dns {\n  recursors = ["dns.google"] # <-\n}', "dns.recursors[0]", "not looked up by name"),
    ('dns {\n  recursor_timeout = "0s" # <-\n}', "dns.recursor_timeout", "longer than 0s"),
    ("dns {\n  tcp_idle_timeout = true # <-\n}", "dns.tcp_idle_timeout", "must be a duration"),
    (
        'dns {\n  allow_recursion_from = ["10.0.0.0/33"] # <-\n}',
        "dns.allow_recursion_from[0]",
        "is not a CIDR network",
    ),
    # HCL itself
    ("datacenter = 1\ndatacenter = 2 # <-", "datacenter", "is defined twice"),
    ('datacenter = "${var.dc}" # <-', "datacenter", "expressions and interpolation"),
    ("ports {\n  dns = 8000 + 1 # <-\n}", "ports.dns", "expressions and interpolation"),
    ('service "web" { # <-\n}', "service", "a service block takes no labels"),
    ('dns {\n}\ndns {\n  soa {\n    x = "${y}" # <-\n  }\n}', "dns.soa.x", "expressions"),
    (
        'service {\n  name = "a"\n  meta = { v = "${x}" } # <-\n}',
        "service[0].meta.v",
        "expressions",
    ),
    (
        'service {\n  name = "a"\n}\nservice {\n  port = 1\n  port = 2 # <-\n}',
        "service[1].port",
        "twice",
    ),
    (
        "service {\n  weights {\n    passing = 1\n    passing = 2 # <-\n  }\n}",
        "service[0].weights.passing",
        "twice",
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), HCL_ERRORS)
def test_hcl_errors_name_file_line_and_key(text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        hcl(text)
    err = info.value
    assert (err.path, err.line, err.key) == ("test.hcl", marked_line(text), key), str(err)
    assert message in err.message
    assert str(err).startswith(f"test.hcl:{marked_line(text)}: {key}: ")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("datacenter = \n", 1, "syntax error"),
        ('service {\n  name = "a"\n', 3, "unexpected end of file"),
        ("a = 1\nb = ~\n", 2, "syntax error at column 5: unexpected '~'"),
        ("x {\n  y = [1,\n}\n", 3, "syntax error"),
    ],
)
def test_hcl_syntax_errors_give_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hcl(text, "syntax.hcl")
    assert (info.value.path, info.value.line) == ("syntax.hcl", line)
    assert message in info.value.message


JSON_ERRORS = [
    (
        '{\n  "service": [\n    {"name": "a"},\n    {"name": "b",\n     "port": 70000}\n  ]\n}',
        5,
        "service[1].port",
        "70000 is out of range",
    ),
    (
        '{\n  "dns": {\n    "soa": {\n      "minimum": 1\n    }\n  }\n}',
        4,
        "dns.soa.minimum",
        "unknown key",
    ),
    ('{\n  "Datacenter": "dc1"\n}', 2, "Datacenter", "unknown key"),
    ('{\n  "datacenter": "a",\n  "datacenter": "b"\n}', 3, "datacenter", "is defined twice"),
    (
        '{\n  "service": {"name": "a", "check": {"ttl": "1s", "status": 3}}\n}',
        2,
        "service.check.status",
        "is not passing",
    ),
    ('{\n  "service": [\n    "web"\n  ]\n}', 2, "service", "must be a block"),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), JSON_ERRORS)
def test_json_errors_name_file_line_and_key(text: str, line: int, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([parse_json(text, "test.json")])
    err = info.value
    assert (err.path, err.line, err.key) == ("test.json", line, key), str(err)
    assert message in err.message


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{\n  "a": 1,\n}', 3, "invalid JSON"),
        ('{\n  "a": [1 2]\n}', 2, "invalid JSON"),
        ("[1, 2]", None, "must hold a JSON object"),
        ("", 1, "invalid JSON"),
    ],
)
def test_json_syntax_errors(text: str, line: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_json(text, "x.json")
    assert (info.value.line, message in info.value.message) == (line, True), str(info.value)


def test_json_lines_of_nested_keys() -> None:
    raw = parse_json('{\n  "a": {\n    "b": [\n      1,\n      {"c": "}\\"{"}\n    ]\n  }\n}')
    assert {k: raw.lines[k] for k in ("a", "a.b", "a.b[0]", "a.b[1]", "a.b[1].c")} == {
        "a": 2,
        "a.b": 3,
        "a.b[0]": 4,
        "a.b[1]": 5,
        "a.b[1].c": 5,
    }


def test_file_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.hcl")
    with pytest.raises(ConfigError, match=r"nope\.hcl: no such file or directory"):
        load_config([missing])
    binary = tmp_path / "bin.hcl"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin\.hcl: is not UTF-8"):
        load_config([str(binary)])


def test_error_in_a_later_file_names_that_file(tmp_path: Path) -> None:
    good = write(tmp_path / "a.hcl", 'service {\n  name = "web"\n}\n')
    bad = write(tmp_path / "b.hcl", '\n\nservice {\n  name = "web"\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config([good, bad])
    assert str(info.value) == (
        f"{bad}:3: service[0].id: service id 'web' is already defined at {good}:1"
        " (give each instance its own id)"
    )


def test_raw_file_line_lookup_falls_back_to_the_enclosing_path() -> None:
    raw = RawFile("f", {}, {"service[1]": 7, "service[1].meta": 9})
    assert raw.line_of("service[1].meta.version") == 9
    assert raw.line_of("service[1].tags[3]") == 7
    assert raw.line_of("datacenter") is None


# -- the command line ----------------------------------------------------------------


def test_cli_config_error_exits_2_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from discovery.cli import main

    bad = write(tmp_path / "bad.hcl", 'service {\n  name = "a"\n  port = 70000\n}\n')
    assert main(["agent", "--dns-addr", "127.0.0.1:0", "--config", bad]) == 2
    err = capsys.readouterr().err
    assert err == f"waypost: {bad}:3: service[0].port: 70000 is out of range 0-65535\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["agent", "--dns-addr", "localhost:53"],
        ["agent", "--http-addr", "127.0.0.1"],
        ["agent", "--bogus"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from discovery.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: waypost" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("dns[0].soa[1].retry", "dns.soa.retry"),
        ("ports[0].dns", "ports.dns"),
        ("service[2].weights[0].passing", "service[2].weights.passing"),
        ("service[0].check[1].ttl", "service[0].check[1].ttl"),
        ("services[1].meta.a.b", "services[1].meta.a.b"),
        ("alt_domains[0]", "alt_domains[0]"),
    ],
)
def test_key_of_structural_paths(where: str, key: str) -> None:
    assert key_of(where) == key


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _paths(value: object, where: str) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            key = f"{where}.{name}" if where else name
            yield key
            yield from _paths(item, key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield f"{where}[{i}]"
            yield from _paths(item, f"{where}[{i}]")


@given(st.dictionaries(st.text(), json_values, max_size=5), st.sampled_from([None, 0, 2]))
def test_json_lines_cover_every_key(data: dict[str, object], indent: int | None) -> None:
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    raw = parse_json(text)
    assert raw.data == data
    lines = text.split("\n")  # JSON line breaks; str.splitlines also breaks on U+0085
    for path in _paths(data, ""):
        # Keys may contain "." or "[", so paths can collide; each still has a line in range.
        assert 1 <= raw.lines[path] <= len(lines)
    if indent:
        for name in data:
            assert (
                lines[raw.lines[name] - 1].lstrip().startswith(json.dumps(name, ensure_ascii=False))
            )


@pytest.mark.parametrize("recursor", ["127.0.0.1:0", "dns.google", "[::1", "1.2.3.4:99999"])
def test_recursor_rejected_at_config_time(recursor: str) -> None:
    # the same rule the forwarder applies, so nothing valid here is skipped at run time
    with pytest.raises(ConfigError, match=r"dns\.recursors"):
        hcl(f'dns {{\n  recursors = ["{recursor}"]\n}}')
