"""The Consul mirror against the Consul stand-in (tests/consul_standin.py) on loopback.

Push: registration, deregistration, health, anti-entropy, foreign entries, outages.
Pull: foreign services in the registry and in DNS answers, datacenters, health,
own entries, index resets.  Also the pure planning functions and the `consul`
config block.  Everything waits for convergence by polling, bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from discovery import mirror as mirror_module
from discovery.config import MirrorSettings, Overrides, parse_config
from discovery.errors import ConfigError
from discovery.hclfile import parse_hcl
from discovery.mirror import Mirror, MirrorTiming, start_mirror
from discovery.mirror_plan import (
    CHECK_SUFFIX,
    PushEntry,
    Seen,
    Wanted,
    node_label,
    parse_pulled,
    parse_seen,
    plan_push,
    plan_wanted,
    worst_status,
)
from discovery.model import CheckKind, Health, Instance, Node, make_check, make_instance
from discovery.registry import Registry
from tests.consul_standin import ConsulStandin
from tests.integration.conftest import RunningDns, StartWaypost

NODE = "agent"  # tests/integration/conftest.py's LOCAL_NODE
DEADLINE = 10.0  # seconds for anything that should take milliseconds
# Fast clocks: anti-entropy and backoff in tenths of seconds, short blocking waits.
FAST = MirrorTiming(
    debounce=0.02,
    anti_entropy=0.3,
    wait=5.0,
    min_query_gap=0.01,
    backoff_min=0.05,
    backoff_max=0.2,
    request_timeout=2.0,
)
SLOW_AE = MirrorTiming(  # no anti-entropy during the test: only changes cause syncs
    debounce=0.02, anti_entropy=3600.0, wait=5.0, backoff_min=0.05, backoff_max=0.2
)


def sid(instance_id: str, node: str = NODE) -> str:
    return f"_waypost-{node}-{instance_id}"


def instance(
    ident: str,
    service: str = "web",
    *,
    port: int = 8080,
    address: str = "10.0.0.1",
    source: str = "api",
    node: str = NODE,
    **kw: Any,
) -> Instance:
    return make_instance(
        service=service, id=ident, node=node, address=address, port=port, source=source, **kw
    )


def settings(standin: ConsulStandin, **kw: Any) -> MirrorSettings:
    return MirrorSettings(host=standin.host, port=standin.port, **kw)


async def eventually(what: str, predicate: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Poll `predicate` every 10 ms until it holds; fail naming `what` after `deadline` s."""
    async with asyncio.timeout(deadline):
        while not predicate():  # noqa: ASYNC110 - the state lives in other components
            await asyncio.sleep(0.01)
    assert predicate(), what


def ours(standin: ConsulStandin, node: str = NODE) -> dict[str, dict[str, Any]]:
    """The entries agent `node` owns: its ID prefix and its meta."""
    prefix = f"_waypost-{node}-"
    return {
        k: v
        for k, v in standin.agent_services().items()
        if k.startswith(prefix) and v["Meta"].get("waypost-node") == node
    }


def expected_ids(registry: Registry) -> set[str]:
    return {
        sid(i.id, registry.local_node.name)
        for i in registry.snapshot.instances.values()
        if i.source != "consul"
    }


def pushed(standin: ConsulStandin, registry: Registry) -> bool:
    """Consul holds exactly the registry's local instances, with matching check statuses."""
    node = registry.local_node.name
    have = ours(standin, node)
    if set(have) != expected_ids(registry):
        return False
    checks = standin.checks()
    for inst in registry.snapshot.instances.values():
        if inst.source == "consul":
            continue
        svc, check = have[sid(inst.id, node)], checks.get(sid(inst.id, node) + CHECK_SUFFIX)
        if (svc["Port"], svc["Address"], svc["Tags"]) != (inst.port, inst.address, list(inst.tags)):
            return False
        if check is None or check["Status"] != inst.health.value:
            return False
    return True


def writes(standin: ConsulStandin, since: int = 0) -> list[tuple[str, str]]:
    return [r for r in standin.requests[since:] if r[0] == "PUT"]


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandin]:
    async with ConsulStandin() as running:
        yield running


@pytest.fixture
async def agent(start_waypost: StartWaypost) -> RunningDns:
    """A waypost DNS server (domain nomad., dc dc1) whose registry the mirror uses."""
    return await start_waypost()


@asynccontextmanager
async def mirror(
    registry: Registry,
    standin: ConsulStandin,
    timing: MirrorTiming = FAST,
    *,
    node: str | None = None,
    datacenter: str = "dc1",
    **kw: Any,
) -> AsyncIterator[Mirror]:
    running = await start_mirror(
        registry,
        settings(standin, **kw),
        node=node or registry.local_node.name,
        datacenter=datacenter,
        timing=timing,
    )
    try:
        yield running
    finally:
        await running.close()


@contextmanager
def consul_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    with caplog.at_level(logging.INFO, logger="discovery.mirror"):
        yield records
        records.extend(r for r in caplog.records if r.name == "discovery.mirror")


async def http_put(url: str, body: Any = None) -> int:
    async with aiohttp.ClientSession() as session, session.put(url, json=body) as resp:
        await resp.read()
        return resp.status


# -- pure: planning and parsing ---------------------------------------------------------------


def test_plan_wanted_marks_the_entry_as_ours() -> None:
    inst = instance("web-1", tags=["v1"], meta={"version": "2"}, weights={"passing": 3})
    want = plan_wanted(inst, NODE)
    assert want.entry == PushEntry(
        id="_waypost-agent-web-1",
        service="web",
        address="10.0.0.1",
        port=8080,
        tags=("v1",),
        meta=(("external-source", "waypost"), ("version", "2"), ("waypost-node", NODE)),
        weights=(3, 1),
    )
    assert want.status is Health.PASSING


def test_plan_push_writes_only_differences() -> None:
    a = plan_wanted(instance("a"), NODE)
    b = plan_wanted(instance("b", port=1), NODE)
    c = plan_wanted(instance("c"), NODE)
    seen = {
        a.entry.id: Seen(a.entry, Health.PASSING),  # in sync
        b.entry.id: Seen(plan_wanted(instance("b", port=2), NODE).entry, Health.PASSING),
        "_waypost-agent-gone": Seen(a.entry, Health.PASSING),
    }
    critical_c = Wanted(c.entry, Health.CRITICAL)
    plan = plan_push({w.entry.id: w for w in (a, b, critical_c)}, seen)
    assert plan.register == (b, critical_c)
    assert plan.update == ()
    assert plan.deregister == ("_waypost-agent-gone",)
    seen[b.entry.id] = Seen(b.entry, Health.CRITICAL)
    seen[c.entry.id] = Seen(c.entry, None)  # its check is missing: register again
    plan = plan_push({w.entry.id: w for w in (a, b, c)}, seen)
    assert (plan.register, plan.update) == ((c,), (b,))
    assert len(plan_push({a.entry.id: a}, {a.entry.id: Seen(a.entry, Health.PASSING)})) == 0


def test_parse_seen_keeps_only_entries_this_agent_owns() -> None:
    mine = {"ID": sid("w"), "Service": "web", "Meta": {"waypost-node": NODE}, "Port": 1}
    services = {
        sid("w"): mine,
        sid("x"): {**mine, "ID": sid("x"), "Meta": {"waypost-node": "other"}},  # prefix only
        sid("y", "other"): {**mine, "ID": sid("y", "other")},  # meta only
        "redis": {"ID": "redis", "Service": "redis", "Meta": None},
    }
    checks = {sid("w") + CHECK_SUFFIX: {"Status": "warning", "ServiceID": sid("w")}}
    seen = parse_seen(services, checks, NODE)
    assert list(seen) == [sid("w")]
    assert seen[sid("w")].status is Health.WARNING
    assert parse_seen(services, {}, NODE)[sid("w")].status is None


def pulled_entry(
    sid_: str, *, node: str = "node-2", meta: dict[str, str] | None = None, **kw: Any
) -> dict[str, Any]:
    checks = kw.pop("checks", [{"CheckID": "serfHealth", "Status": "passing"}])
    service = {"ID": sid_, "Service": "web", "Address": "", "Port": 80, "Meta": meta} | kw
    return {
        "Node": {"Node": node, "Address": "10.1.0.2", "Datacenter": kw.pop("dc", "dc1")},
        "Service": service,
        "Checks": checks,
    }


def test_parse_pulled_builds_instances_and_skips_our_own() -> None:
    entries = [
        pulled_entry("web-1", Tags=["a"], Weights={"Passing": 5, "Warning": 1}),
        pulled_entry("mine", meta={"waypost-node": NODE}),
        pulled_entry("theirs", meta={"waypost-node": "host-b"}, Address="10.9.9.9"),
        pulled_entry("bad", Address="db.example.com"),
        pulled_entry("n", node="ip-10-1-0-2.ec2.internal"),
    ]
    got = parse_pulled(entries, node=NODE, datacenter="dc1", default_dc="dc1")
    by_id = {i.id: i for i in got.instances}
    assert set(by_id) == {
        "consul/node-2/web-1",
        "consul/node-2/theirs",
        "consul/ip-10-1-0-2.ec2.internal/n",
    }
    web = by_id["consul/node-2/web-1"]
    assert (web.address, web.port, web.tags, web.weights.passing) == ("10.1.0.2", 80, ("a",), 5)
    assert (web.source, web.node, web.datacenter, web.health) == (
        "consul",
        "node-2",
        "",
        Health.PASSING,
    )
    assert by_id["consul/node-2/theirs"].address == "10.9.9.9"
    assert by_id["consul/ip-10-1-0-2.ec2.internal/n"].node == "ip-10-1-0-2-ec2-internal"
    assert {n.name for n in got.nodes} == {"node-2", "ip-10-1-0-2-ec2-internal"}
    assert len(got.skipped) == 1 and got.skipped[0].startswith("consul/node-2/bad: address")
    other = parse_pulled(entries[:1], node=NODE, datacenter="dc2", default_dc="dc2")
    assert other.instances[0].datacenter == "dc1"
    assert other.nodes[0].datacenter == "dc1"


@pytest.mark.parametrize(
    ("statuses", "health"),
    [
        ([], Health.PASSING),
        (["passing", "passing"], Health.PASSING),
        (["passing", "warning"], Health.WARNING),
        (["warning", "critical", "passing"], Health.CRITICAL),
        (["maintenance"], Health.CRITICAL),  # unknown: critical
    ],
)
def test_worst_status(statuses: list[str], health: Health) -> None:
    assert worst_status({"Status": s} for s in statuses) is health


@pytest.mark.parametrize(
    ("name", "label"),
    [("node-2", "node-2"), ("a.b_c", "a-b-c"), ("___", ""), ("x" * 70, "x" * 63)],
)
def test_node_label(name: str, label: str) -> None:
    assert node_label(name) == label


# -- the consul config block ----------------------------------------------------------------


def consul_block(text: str, overrides: Overrides | None = None) -> MirrorSettings | None:
    return parse_config([parse_hcl(text, "t.hcl")], overrides or Overrides()).consul


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("consul {}", MirrorSettings()),
        ('consul {\n address = "10.0.0.5:8501"\n}', MirrorSettings(host="10.0.0.5", port=8501)),
        (
            'consul {\n address = "https://consul.example/"\n token = "s3cret"\n}',
            MirrorSettings(host="consul.example", scheme="https", token="s3cret"),
        ),
        (
            'consul {\n address = "[::1]:9"\n datacenter = "DC2"\n services = ["web"]\n}',
            MirrorSettings(host="::1", port=9, datacenter="dc2", services=("web",)),
        ),
        ("consul {\n push = false\n}", MirrorSettings(push=False)),
        ("consul {\n push = false\n pull = false\n}", None),
    ],
)
def test_consul_block(text: str, expected: MirrorSettings | None) -> None:
    assert consul_block(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('consul {\n address = "ftp://x:1"\n}', "t.hcl:2: consul.address: 'ftp://x:1'"),
        ('consul {\n address = "::1:80"\n}', "write an IPv6 host as [addr]:port"),
        ('consul {\n address = "x:0"\n}', "the port must be 1-65535"),
        ('consul {\n token = "has space"\n}', "t.hcl:2: consul.token: must be"),
        ('consul {\n services = ["a_b"]\n}', "consul.services[0]"),
        ('consul {\n services = ["a", "A"]\n}', "lists a service twice"),
        ('consul {\n adress = "x"\n}', "t.hcl:2: consul.adress: unknown key"),
    ],
)
def test_consul_block_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        consul_block(text)
    assert message in str(err.value)
    assert "has space" not in str(err.value)  # a token is never repeated


def test_consul_environment_is_the_default_of_the_block() -> None:
    env = Overrides(consul_http_addr="http://10.0.0.9:8500", consul_http_token="env-token")
    assert consul_block("", env) is None  # the environment alone turns nothing on
    assert consul_block("consul {}", env) == MirrorSettings(host="10.0.0.9", token="env-token")
    block = 'consul {\n address = "10.0.0.1:1"\n token = "mine"\n}'
    assert consul_block(block, env) == MirrorSettings(host="10.0.0.1", port=1, token="mine")
    assert "env-token" not in repr(consul_block("consul {}", env))
    with pytest.raises(ConfigError, match="environment: CONSUL_HTTP_ADDR"):
        consul_block("consul {}", Overrides(consul_http_addr="bad host"))


# -- push ---------------------------------------------------------------------------------------


async def test_push_registers_local_instances_only(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    registry.upsert(
        instance("web-1", tags=["v1", "blue"], meta={"version": "1.2"}, weights={"passing": 3}),
        instance("db-1", "db", port=5432, address="10.0.0.2", source="config"),
        instance("job-1", "batch", port=0, source="job"),
        instance("remote-1", "web", source="consul"),  # pulled: never pushed back
    )
    async with mirror(registry, standin):
        await eventually("pushed", lambda: pushed(standin, registry))
        services = standin.agent_services()
        web = services[sid("web-1")]
        assert web["Service"] == "web"
        assert (web["Address"], web["Port"], web["Tags"]) == ("10.0.0.1", 8080, ["v1", "blue"])
        assert web["Meta"] == {"version": "1.2", "external-source": "waypost", "waypost-node": NODE}
        assert web["Weights"] == {"Passing": 3, "Warning": 1}
        assert sid("remote-1") not in services
        check = standin.checks()[sid("web-1") + CHECK_SUFFIX]
        assert (check["ServiceID"], check["Status"], check["Type"]) == (
            sid("web-1"),
            "passing",
            "ttl",
        )
        assert len([c for c in standin.checks() if c.startswith(sid(""))]) == 3


async def test_deregistration_removes_the_entry_and_its_check(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    registry.upsert(instance("web-1"), instance("web-2"))
    async with mirror(registry, standin):
        await eventually("pushed", lambda: pushed(standin, registry))
        registry.remove("web-1")
        await eventually("web-1 gone", lambda: sid("web-1") not in standin.agent_services())
        assert set(ours(standin)) == {sid("web-2")}
        assert sid("web-1") + CHECK_SUFFIX not in standin.checks()
        assert ("PUT", f"/v1/agent/service/deregister/{sid('web-1')}") in standin.requests


async def test_health_is_mirrored_as_the_ttl_check(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    check = make_check(id="service:web-1", name="web", kind=CheckKind.TTL, ttl=60.0)
    registry.upsert(instance("web-1", checks=[check]))  # TTL checks start critical

    def status() -> str:
        return str(standin.checks()[sid("web-1") + CHECK_SUFFIX]["Status"])

    async with mirror(registry, standin):
        await eventually("critical", lambda: pushed(standin, registry))
        assert status() == "critical"
        for health in (Health.PASSING, Health.WARNING, Health.CRITICAL, Health.PASSING):
            registry.update_check("service:web-1", health, output=f"now {health}")
            await eventually(f"{health} in Consul", lambda: status() == health.value)  # noqa: B023
        check_state = standin.checks()[sid("web-1") + CHECK_SUFFIX]
        assert check_state["Output"] == "web: now passing"


async def test_anti_entropy_repairs_what_changed_behind_our_back(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    registry.upsert(instance("web-1"), instance("web-2"), instance("web-3"))
    async with mirror(registry, standin):
        await eventually("pushed", lambda: pushed(standin, registry))
        base = f"{standin.url}/v1/agent/service"
        assert await http_put(f"{base}/deregister/{sid('web-1')}") == 200
        altered = {"ID": sid("web-2"), "Name": "web", "Port": 9, "Address": "10.0.0.1"}
        assert await http_put(f"{base}/register", altered | {"Meta": {"waypost-node": NODE}}) == 200
        standin.set_check_status(sid("web-3") + CHECK_SUFFIX, "critical")
        assert not pushed(standin, registry)
        await eventually("repaired", lambda: pushed(standin, registry))
        assert ours(standin)[sid("web-2")]["Port"] == 8080


async def test_a_sync_with_nothing_changed_writes_nothing(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    registry.upsert(*(instance(f"web-{n}") for n in range(50)))
    async with mirror(registry, standin, pull=False) as running:
        await eventually("pushed", lambda: pushed(standin, registry))
        await eventually("no pending", lambda: running.stats.pending == 0)
        since = len(standin.requests)
        await asyncio.sleep(FAST.anti_entropy * 4)  # three full syncs at least
        later = standin.requests[since:]
        assert writes(standin, since) == []
        reads = [r for r in later if r[0] == "GET"]
        assert 4 <= len(reads) <= 12, reads  # two per full sync, whatever the size
        assert {path for _, path in reads} == {"/v1/agent/services", "/v1/agent/checks"}


async def test_ttl_is_refreshed_before_it_expires(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    registry.upsert(instance("web-1"))
    timing = MirrorTiming(debounce=0.02, anti_entropy=0.2, check_ttl=1.0, backoff_min=0.05)
    async with mirror(registry, standin, timing):
        await eventually("pushed", lambda: pushed(standin, registry))
        await asyncio.sleep(2.5)  # 2.5 TTLs: it would have expired without refreshes
        assert standin.checks()[sid("web-1") + CHECK_SUFFIX]["Status"] == "passing"
        refreshes = [r for r in writes(standin) if r[1].startswith("/v1/agent/check/pass/")]
        assert 3 <= len(refreshes) <= 10


async def test_foreign_entries_are_left_alone(agent: RunningDns, standin: ConsulStandin) -> None:
    base = f"{standin.url}/v1/agent/service/register"
    other_agent = {
        "ID": sid("web-1", "host-b"),
        "Name": "web",
        "Port": 1,
        "Meta": {"waypost-node": "host-b", "external-source": "waypost"},
    }
    foreign = [
        other_agent,  # another waypost agent sharing this Consul agent (Nomad issue 9916)
        {"ID": "redis", "Name": "redis", "Port": 6379},  # a plain Consul registration
        {"ID": sid("lookalike"), "Name": "web", "Port": 2},  # our prefix, not our meta
        {"ID": "spoof", "Name": "web", "Port": 3, "Meta": {"waypost-node": NODE}},  # our meta
    ]
    for body in foreign:
        assert await http_put(base, body) == 200
    standin.register_foreign({"Name": "web", "ID": sid("web-9"), "Port": 4}, node="node-2")
    before = {k: v for k, v in standin.agent_services().items() if not k.startswith(sid(""))}
    registry = agent.registry
    registry.upsert(instance("web-1"))
    async with mirror(registry, standin):
        await eventually("pushed", lambda: pushed(standin, registry))
        registry.remove("web-1")
        await eventually("removed", lambda: pushed(standin, registry))
        await asyncio.sleep(FAST.anti_entropy * 2)  # full syncs too
        services = standin.agent_services()
        assert set(services) == {*before, sid("lookalike")}
        assert ("PUT", f"/v1/agent/service/deregister/{sid('lookalike')}") not in standin.requests
        assert len(standin.catalog.instances("web")) == 4


async def test_two_agents_sharing_one_consul_agent(standin: ConsulStandin) -> None:
    a, b = Registry(Node("host-a", "127.0.0.1")), Registry(Node("host-b", "127.0.0.1"))
    a.upsert(instance("web-1", node="host-a"), instance("web-2", node="host-a"))
    b.upsert(instance("web-1", node="host-b"))
    async with mirror(a, standin, pull=False), mirror(b, standin, pull=False):
        await eventually("both pushed", lambda: pushed(standin, a) and pushed(standin, b))
        a.remove("web-1", "web-2")
        await eventually("a's gone", lambda: ours(standin, "host-a") == {})
        await asyncio.sleep(FAST.anti_entropy * 2)
        assert set(ours(standin, "host-b")) == {sid("web-1", "host-b")}
        assert pushed(standin, b)


async def test_outage_during_100_registrations_converges_exactly(
    agent: RunningDns, standin: ConsulStandin, caplog: pytest.LogCaptureFixture
) -> None:
    registry = agent.registry
    registry.upsert(*(instance(f"old-{n}") for n in range(10)))
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, pull=False) as running:
            await eventually("pushed", lambda: pushed(standin, registry))
            await standin.stop_listening()
            for n in range(100):  # one registration at a time, as the HTTP API makes them
                registry.upsert(instance(f"new-{n}", port=9000 + n))
                await asyncio.sleep(0.005)
            registry.remove("old-0", "old-1")
            registry.upsert(instance("old-2", port=1))
            await eventually("unhealthy", lambda: not running.healthy)
            stats = running.stats
            assert (stats.push_ok, stats.pending) == (False, 103)
            assert agent.registry.snapshot.service("web")  # the registry goes on
            answer = await agent.udp(dns.message.make_query("web.service.nomad", "SRV"))
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer  # so does DNS
            await asyncio.sleep(1.0)  # several retries
            since = len(standin.requests)
            await standin.resume()
            await eventually("converged", lambda: pushed(standin, registry))
            await eventually("healthy", lambda: running.healthy)
            assert running.stats.pending == 0
    assert len(ours(standin)) == 108
    registrations = [p for m, p in writes(standin, since) if p == "/v1/agent/service/register"]
    assert len(registrations) == 101  # 100 new + old-2; nothing twice
    warnings = [r for r in logs if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "retrying with backoff" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in logs)


async def test_server_errors_are_retried_with_backoff(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    registry = agent.registry
    standin.fail_status = 500
    registry.upsert(instance("web-1"))
    async with mirror(registry, standin, pull=False) as running:
        await eventually("errors", lambda: running.stats.errors >= 3)
        failing = running.stats
        await asyncio.sleep(0.5)
        # Backoff capped at 0.2 s: a handful of attempts, not a storm.
        assert running.stats.requests - failing.requests <= 0.5 / (FAST.backoff_max / 2) + 2
        assert (failing.healthy, failing.push_ok, failing.last_push) == (False, False, None)
        standin.fail_status = None
        recovered = time.time()
        await eventually("pushed", lambda: pushed(standin, registry))
        await eventually("healthy", lambda: running.healthy)
        last = running.stats.last_push
        assert last is not None and last >= recovered


async def test_a_token_is_sent_and_a_bad_one_reported(
    agent: RunningDns, caplog: pytest.LogCaptureFixture
) -> None:
    registry = agent.registry
    registry.upsert(instance("web-1"))
    async with ConsulStandin(acl_tokens={"good-token"}) as secured:
        with consul_logs(caplog) as logs:
            async with mirror(registry, secured, token="bad-token") as running:
                await eventually("refused", lambda: running.stats.errors >= 2)
                assert ours(secured) == {}
        assert any("permission denied" in r.getMessage() for r in logs)
        assert all("bad-token" not in r.getMessage() for r in logs)
        async with mirror(registry, secured, token="good-token"):
            await eventually("pushed", lambda: pushed(secured, registry))


async def test_a_refused_registration_does_not_block_the_others(
    agent: RunningDns, standin: ConsulStandin, caplog: pytest.LogCaptureFixture
) -> None:
    registry = agent.registry
    full_meta = {f"k{n}": "v" for n in range(63)}  # + 2 of ours: above Consul's 64
    registry.upsert(instance("web-1"), instance("big", meta=full_meta))
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, SLOW_AE) as running:
            await eventually("web-1", lambda: sid("web-1") in ours(standin))
            registry.upsert(instance("web-2"))
            await eventually("web-2", lambda: sid("web-2") in ours(standin))
            assert sid("big") not in ours(standin)
            stats = running.stats
            assert (stats.pending, stats.refused, running.healthy) == (0, 1, True)
    refused = [r.getMessage() for r in logs if "refuses" in r.getMessage()]
    assert len(refused) == 1 and sid("big") in refused[0]


# -- pull ---------------------------------------------------------------------------------------


def foreign(
    standin: ConsulStandin,
    ident: str,
    name: str = "web",
    *,
    node: str = "node-2",
    address: str = "127.0.0.2",
    status: str = "passing",
    **kw: Any,
) -> None:
    """A service of another Consul agent's node, with one TTL check in `status`."""
    body = {"ID": ident, "Name": name, "Port": kw.pop("port", 8080), "Address": address} | kw
    body["Check"] = {"CheckID": f"service:{ident}", "TTL": "60s", "Status": status}
    standin.register_foreign(body, node=node, address=address)


def pulled(registry: Registry, service: str = "web") -> dict[str, Instance]:
    return {i.id: i for i in registry.snapshot.service(service) if i.source == "consul"}


async def srv(agent: RunningDns, name: str) -> list[tuple[int, str]]:
    """(port, target) of each SRV answer for `name`, sorted; [] on NXDOMAIN."""
    reply = await agent.udp(dns.message.make_query(name, "SRV"))
    assert reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN), dns.rcode.to_text(
        reply.rcode()
    )
    return sorted(
        (rr.port, rr.target.to_text())
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for rr in rrset
    )


async def test_foreign_services_are_pulled_into_the_registry_and_dns(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    foreign(standin, "web-1", port=8081, Tags=["v1"], Meta={"version": "7"})
    foreign(standin, "web-2", node="node-3", address="127.0.0.3", port=8082)
    foreign(standin, "db-1", "db", port=5432, status="critical")
    registry = agent.registry
    async with mirror(registry, standin, push=False) as running:
        await eventually(
            "pulled", lambda: len(pulled(registry)) == 2 and bool(pulled(registry, "db"))
        )
        web1 = pulled(registry)["consul/node-2/web-1"]
        assert (web1.node, web1.address, web1.port, web1.datacenter) == (
            "node-2",
            "127.0.0.2",
            8081,
            "",
        )
        assert (web1.tags, dict(web1.meta), web1.health) == (("v1",), {"version": "7"}, "passing")
        assert registry.snapshot.nodes["node-3"] == Node("node-3", "127.0.0.3", "")
        assert pulled(registry, "db")["consul/node-2/db-1"].health is Health.CRITICAL
        answers = await srv(agent, "web.service.nomad")
        assert [port for port, _ in answers] == [8081, 8082]
        assert await srv(agent, "web.service.dc1.nomad") == answers
        assert await srv(agent, "db.service.nomad") == []  # critical: not served
        stats = running.stats
        assert (stats.pulled, stats.watched, stats.pull_ok) == (4, 3, True)  # + "consul"


async def test_pulled_changes_follow_consul(agent: RunningDns, standin: ConsulStandin) -> None:
    foreign(standin, "web-1")
    registry = agent.registry
    async with mirror(registry, standin, push=False):
        await eventually("pulled", lambda: "consul/node-2/web-1" in pulled(registry))
        foreign(standin, "web-2", port=9)
        await eventually("added", lambda: "consul/node-2/web-2" in pulled(registry))
        standin.set_check_status("service:web-1", "critical", node="node-2")

        def health() -> Health:
            return pulled(registry)["consul/node-2/web-1"].health

        await eventually("critical", lambda: health() is Health.CRITICAL)
        standin.set_check_status("service:web-1", "passing", node="node-2")
        standin.set_check_status("serfHealth", "critical", node="node-2")  # the node is down
        await eventually("node down", lambda: health() is Health.CRITICAL)
        standin.set_check_status("serfHealth", "passing", node="node-2")
        await eventually("node up", lambda: health() is Health.PASSING)
        standin.deregister_foreign("web-1")
        standin.deregister_foreign("web-2")
        await eventually("gone", lambda: pulled(registry) == {})
        assert await srv(agent, "web.service.nomad") == []


async def test_own_entries_are_not_pulled_back_but_other_agents_are(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    host_b = Registry(Node("host-b", "127.0.0.1"))
    host_b.upsert(instance("web-1", node="host-b", port=7001, address="127.0.0.7"))
    registry = agent.registry
    registry.upsert(instance("web-1", port=7000, address="127.0.0.1"))
    async with mirror(host_b, standin, pull=False), mirror(registry, standin):
        await eventually("pulled", lambda: len(pulled(registry)) == 1)
        await eventually("both pushed", lambda: pushed(standin, registry))
        assert list(pulled(registry)) == [f"consul/consul-1/{sid('web-1', 'host-b')}"]
        assert len(registry.snapshot.service("web")) == 2  # ours once, host B's once
        assert [port for port, _ in await srv(agent, "web.service.nomad")] == [7000, 7001]
        host_b.remove("web-1")
        await eventually("host B's gone", lambda: pulled(registry) == {})


async def test_another_datacenter_is_selected_by_its_label(
    agent: RunningDns, start_waypost: StartWaypost
) -> None:
    async with ConsulStandin(datacenter="dc2") as dc2:
        foreign(dc2, "api-1", "api", port=9001)
        registry = agent.registry
        async with mirror(registry, dc2, push=False):
            await eventually("pulled", lambda: len(pulled(registry, "api")) == 1)
            api = pulled(registry, "api")["consul/node-2/api-1"]
            assert api.datacenter == "dc2"
            assert registry.snapshot.nodes["node-2"].datacenter == "dc2"
            assert [p for p, _ in await srv(agent, "api.service.dc2.nomad")] == [9001]
            assert await srv(agent, "api.service.nomad") == []  # not in our datacenter
        # A mirror told its Consul is in dc2 asks for dc2 (?dc=), which that Consul is.
        async with mirror(registry, dc2, push=False, datacenter="dc2") as same:
            await eventually("pulled", lambda: same.stats.pull_ok)
            assert pulled(registry, "api")["consul/node-2/api-1"].datacenter == ""


async def test_listed_services_only(agent: RunningDns, standin: ConsulStandin) -> None:
    foreign(standin, "web-1")
    foreign(standin, "db-1", "db")
    registry = agent.registry
    async with mirror(registry, standin, push=False, services=("db", "cache")) as running:
        await eventually("db pulled", lambda: len(pulled(registry, "db")) == 1)
        foreign(standin, "cache-1", "cache")
        await eventually("cache pulled", lambda: len(pulled(registry, "cache")) == 1)
        assert pulled(registry) == {}
        assert running.stats.watched == 2
        assert ("GET", "/v1/catalog/services") not in standin.requests


async def test_an_idle_catalog_costs_no_requests(agent: RunningDns, standin: ConsulStandin) -> None:
    for n in range(20):
        foreign(standin, f"svc-{n}", f"svc-{n}")
    async with mirror(agent.registry, standin, push=False) as running:
        await eventually("pulled", lambda: running.stats.pulled == 21)
        await eventually("all waiting", lambda: standin.blocked == 22)  # 21 services + catalog
        count = len(standin.requests)
        await asyncio.sleep(0.5)
        assert len(standin.requests) == count


async def test_index_reset_resyncs_everything(
    agent: RunningDns, standin: ConsulStandin, caplog: pytest.LogCaptureFixture
) -> None:
    foreign(standin, "web-1")
    foreign(standin, "db-1", "db")
    registry = agent.registry
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, push=False):
            await eventually("pulled", lambda: len(pulled(registry)) == 1)
            await eventually("waiting", lambda: standin.blocked == 4)  # web, db, consul, catalog
            since = len(standin.requests)
            standin.reset_index()  # Consul restored an older snapshot: every index is 1
            standin.deregister_foreign("web-1")
            foreign(standin, "web-2")
            await eventually("resynced", lambda: list(pulled(registry)) == ["consul/node-2/web-2"])
            resync = standin.requests[since:]
            for name in ("web", "db", "consul"):  # every service read again from index 0
                assert ("GET", f"/v1/health/service/{name}") in resync
    assert any("index went back" in r.getMessage() for r in logs)


async def test_pulled_instances_stay_while_consul_is_down(
    agent: RunningDns, standin: ConsulStandin
) -> None:
    foreign(standin, "web-1")
    registry = agent.registry
    async with mirror(registry, standin, push=False) as running:
        await eventually("pulled", lambda: len(pulled(registry)) == 1)
        await standin.stop_listening()
        await eventually("down", lambda: not running.stats.pull_ok)
        assert len(pulled(registry)) == 1
        assert [p for p, _ in await srv(agent, "web.service.nomad")] == [8080]
        foreign(standin, "web-2", port=9)  # while down
        await standin.resume()
        await eventually("caught up", lambda: len(pulled(registry)) == 2)
        assert running.healthy


async def test_unusable_entries_are_skipped_with_one_warning(
    agent: RunningDns, standin: ConsulStandin, caplog: pytest.LogCaptureFixture
) -> None:
    foreign(standin, "ok-1", "web")
    standin.register_foreign({"ID": "h-1", "Name": "web", "Address": "db.example.com"})
    standin.register_foreign({"ID": "u-1", "Name": "under_score", "Port": 1})
    registry = agent.registry
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, push=False):
            await eventually("pulled", lambda: len(pulled(registry)) == 1)
            foreign(standin, "ok-2", "web")  # the service is read again: no second warning
            await eventually("pulled", lambda: len(pulled(registry)) == 2)
    skipped = [r.getMessage() for r in logs if "skipping" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert any("h-1: address" in m for m in skipped)
    assert any("'under_score'" in m for m in skipped)


async def test_close_leaves_consul_as_it_is(agent: RunningDns, standin: ConsulStandin) -> None:
    registry = agent.registry
    registry.upsert(instance("web-1"))
    async with mirror(registry, standin) as running:
        await eventually("pushed", lambda: pushed(standin, registry))
    count = len(standin.requests)
    await running.close()  # twice is harmless
    await asyncio.sleep(0.1)
    assert len(standin.requests) == count
    assert set(ours(standin)) == {sid("web-1")}  # a restarted agent finds it in place


async def test_services_beyond_max_watches_are_polled(
    agent: RunningDns, standin: ConsulStandin, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(5):
        foreign(standin, f"svc{n}-1", f"svc{n}", port=9000 + n)
    timing = MirrorTiming(
        debounce=0.02, wait=5.0, min_query_gap=0.01, max_watches=3, poll_interval=0.3
    )
    registry = agent.registry
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, timing, push=False) as running:
            await eventually("pulled", lambda: running.stats.pulled == 6)  # + "consul"
            assert (running.stats.watched, running.stats.polled) == (3, 3)
            for n in range(5):  # watched or polled, a change shows
                foreign(standin, f"svc{n}-2", f"svc{n}", port=9100 + n)
            await eventually("changes", lambda: running.stats.pulled == 11, 3.0)
            for n in range(3):
                standin.deregister_foreign(f"svc{n}-1")
                standin.deregister_foreign(f"svc{n}-2")
            await eventually("slots reused", lambda: running.stats.polled == 0)
            assert running.stats.watched == 3
            await eventually("removed", lambda: running.stats.pulled == 5)
    messages = [r.getMessage() for r in logs]
    assert len([m for m in messages if "are watched" in m]) == 1
    assert "consul pull: every service is watched again" in messages


async def test_an_unexpected_error_is_logged_once_and_the_loop_goes_on(
    agent: RunningDns,
    standin: ConsulStandin,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    foreign(standin, "web-1")
    real = mirror_module.parse_pulled
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError("a bug in parsing")
        return real(*args, **kw)

    monkeypatch.setattr(mirror_module, "parse_pulled", flaky)
    registry = agent.registry
    with consul_logs(caplog) as logs:
        async with mirror(registry, standin, push=False, services=("web",)):
            await eventually("pulled", lambda: len(pulled(registry)) == 1)
    bugs = [r for r in logs if r.getMessage() == "consul pull: unexpected error"]
    assert len(bugs) == 1 and bugs[0].exc_info is not None
    assert calls["n"] >= 4
