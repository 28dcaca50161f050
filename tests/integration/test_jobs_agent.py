"""Jobs through the whole agent: HTTP on 127.0.0.1:0, DNS answers, restarts, bad input.

The agent is the real one (:func:`discovery.agent.start_agent`) on a temporary
data dir, its allocations in host mode on 127.0.0.1 (advertise_addr), which
only reserves ports: no kernel object is made.  Their tasks are real processes
(the example job's `python3 -m http.server`).  The agents run as with `--dev`
(their tasks stop with them) unless a test restarts one with its tasks running;
every test ends with no process of its allocations left (conftest's `no_task_left`).
Bridge mode appears once, with the agent made to believe it is not root, and
must change nothing.  Every test here sees a non-root uid
(tests/integration/conftest.py) and is checked against the machine's namespace
(tests/conftest.py): these tests cannot build a bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from discovery.agent import Agent, start_agent
from discovery.config import AgentConfig, Endpoint, Overrides, parse_config
from discovery.errors import StateError
from discovery.hclfile import parse_json
from discovery.jobs import parse_job
from discovery.netbridge import LazyNetwork
from netsetup.network import NetworkManager
from netsetup.spec import NetworkSpec
from netsetup.state import Reservation, open_state
from tests.integration.conftest import task_processes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILE = json.loads((ROOT / "examples/web.job.json").read_text())


def _without_checks(job: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(job))
    for group in copy["Job"]["TaskGroups"]:
        for service in group["Services"]:
            service.pop("Checks", None)
    return copy


# The example job without its HTTP check: its instances are in DNS as soon as their
# tasks run (the task check), without waiting for the first HTTP check.
EXAMPLE = _without_checks(EXAMPLE_FILE)
TIMEOUT = 5.0
WAIT = 20.0  # seconds a task may take to start and serve on a busy machine
WRITE_TOKEN = "write-token-123"
READ_TOKEN = "read-token-456"
STATIC_LOW = 30000  # static ports for the tests: below Linux's ephemeral range (32768-60999)
SLEEPER = {"Name": "t", "Driver": "raw_exec", "Config": {"command": "sleep", "args": ["300"]}}


def agent_config(data_dir: Path, *, dev: bool = True, **extra: Any) -> AgentConfig:
    settings = {
        "advertise_addr": "127.0.0.1",
        "client": {"min_dynamic_port": 41000, "max_dynamic_port": 41999},
        **extra,
    }
    overrides = Overrides(
        dev=dev,
        data_dir=str(data_dir),
        dns_addr=Endpoint("127.0.0.1", 0),
        http_addr=Endpoint("127.0.0.1", 0),
    )
    return parse_config([parse_json(json.dumps(settings), "test.json")], overrides)


@asynccontextmanager
async def running(config: AgentConfig, jobs: list[Any] | None = None) -> AsyncIterator[Agent]:
    agent = await start_agent(config, [parse_job(j) for j in jobs or []])
    try:
        yield agent
    finally:
        await agent.close()


def free_static_port() -> int:
    """A port free on 127.0.0.1 now, below the ephemeral range (only explicit binds use it)."""
    for port in range(STATIC_LOW, STATIC_LOW + 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port to use as a static port")


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def url(agent: Agent, path: str) -> str:
    return f"http://{agent.http_endpoint}{path}"


async def srv(agent: Agent, name: str) -> tuple[int, list[int]]:
    query = dns.message.make_query(name, dns.rdatatype.SRV)
    ep = agent.dns_endpoint
    reply = await dns.asyncquery.udp(query, ep.host, port=ep.port, timeout=TIMEOUT)
    ports = sorted(r.port for rrset in reply.answer for r in rrset)
    return reply.rcode(), ports


async def request(
    http: aiohttp.ClientSession, method: str, target: str, **kw: Any
) -> tuple[int, Any]:
    async with http.request(
        method, target, timeout=aiohttp.ClientTimeout(total=TIMEOUT), **kw
    ) as r:
        return r.status, await r.json()


async def eventually(probe: Callable[[], Any], what: str, within: float = WAIT) -> Any:
    """Call the coroutine function `probe` until it returns something true (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"never: {what} (last: {found!r})")
        await asyncio.sleep(0.1)


async def alloc_details(http: aiohttp.ClientSession, agent: Agent) -> list[dict[str, Any]]:
    _, stubs = await request(http, "GET", url(agent, "/v1/allocations"))
    out = []
    for stub in stubs:
        _, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stub['ID']}"))
        out.append(alloc)
    return out


async def test_the_example_job_is_served_by_the_tasks_the_agent_runs(tmp_path: Path) -> None:
    """The example as it is: its tasks serve, their HTTP checks pass, DNS lists them."""
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        status, _ = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE_FILE)
        assert status == 200
        ports = sorted(
            int(a["Env"]["server"]["NOMAD_PORT_http"]) for a in await alloc_details(http, agent)
        )
        assert len(ports) == 3

        async def all_in_dns() -> bool:
            return (await srv(agent, "web.service.nomad."))[1] == ports

        await eventually(all_in_dns, "the three tasks in DNS, their HTTP checks passing")
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/") as answer:
                assert answer.status == 200
        for alloc in await alloc_details(http, agent):
            server = alloc["TaskStates"]["server"]
            assert server["State"] == "running" and server["Pid"] > 0
            assert [e["Type"] for e in server["Events"]] == ["Received", "Task Setup", "Started"]
            assert alloc["ClientStatus"] == "running"


async def test_post_the_example_job_see_it_in_dns_and_delete_it(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE)
        assert status == 200 and body["JobModifyIndex"] > 0
        status, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
        assert status == 200
        assert sorted(a["Name"] for a in allocs) == [f"web.web[{i}]" for i in range(3)]
        assert {a["JobID"] for a in allocs} == {"web"}
        ports = []
        for stub in allocs:
            status, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stub['ID']}"))
            assert status == 200
            (port,) = alloc["AllocatedResources"]["Shared"]["Ports"]
            assert (port["Label"], port["HostIP"]) == ("http", "127.0.0.1")
            assert 41000 <= port["Value"] <= 41999
            env = alloc["Env"]["server"]
            assert env["NOMAD_PORT_http"] == str(port["Value"])
            assert env["NOMAD_ADDR_http"] == f"127.0.0.1:{port['Value']}"
            assert env["NOMAD_ALLOC_ID"] == stub["ID"]
            assert alloc["Network"]["Mode"] == "host"
            ports.append(port["Value"])

        async def in_dns() -> bool:
            return (await srv(agent, "web.service.nomad.")) == (dns.rcode.NOERROR, sorted(ports))

        await eventually(in_dns, "the job's instances in DNS once its tasks run")
        status, services = await request(http, "GET", url(agent, "/v1/service/web"))
        assert {s["AllocID"] for s in services} == {a["ID"] for a in allocs}
        assert [s["JobID"] for s in services] == ["web"] * 3
        query = {"filter": 'JobID == "web"'}
        _, chosen = await request(http, "GET", url(agent, "/v1/service/web"), params=query)
        assert len(chosen) == 3

        status, _ = await request(http, "DELETE", url(agent, "/v1/job/web"))
        assert status == 200
        rcode, answered = await srv(agent, "web.service.nomad.")
        assert rcode == dns.rcode.NXDOMAIN and answered == []
        assert task_processes(tmp_path) == {}  # stopped before the DELETE answered
        # Nomad's stop: the job stays, dead, with its allocations complete.
        status, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
        assert {(a["DesiredStatus"], a["ClientStatus"]) for a in allocs} == {("stop", "complete")}
        status, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
        assert [(j["ID"], j["Status"], j["Stop"]) for j in jobs] == [("web", "dead", True)]
        status, _ = await request(http, "DELETE", url(agent, "/v1/job/web?purge=true"))
        assert status == 200
        status, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
        assert allocs == []
        status, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
        assert jobs == []


async def test_a_restart_on_the_same_data_dir_brings_the_job_back(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path, dev=False)) as agent, aiohttp.ClientSession() as http:
        status, _ = await request(http, "PUT", url(agent, "/v1/jobs"), json=EXAMPLE)
        assert status == 200

        async def three() -> list[int]:
            _, ports = await srv(agent, "web.service.nomad.")
            return ports if len(ports) == 3 else []

        before = await eventually(three, "three instances in DNS")
        _, allocs_before = await request(http, "GET", url(agent, "/v1/allocations"))
    pids_before = task_processes(tmp_path, leaders=True)
    assert len(pids_before) == 3  # outside --dev the tasks outlive the agent
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        rcode, after = await srv(agent, "web.service.nomad.")
        assert rcode == dns.rcode.NOERROR and after == before and len(after) == 3
        assert task_processes(tmp_path, leaders=True) == pids_before  # adopted, none started again
        _, allocs_after = await request(http, "GET", url(agent, "/v1/allocations"))
        assert sorted(a["ID"] for a in allocs_after) == sorted(a["ID"] for a in allocs_before)
        status, job = await request(http, "GET", url(agent, "/v1/job/web"))
        assert status == 200 and job["TaskGroups"][0]["Count"] == 3
        _, services = await request(http, "GET", url(agent, "/v1/service/web"))
        assert [s["JobID"] for s in services] == ["web"] * 3  # after a restart too
        # Posting the same job again changes nothing.
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE)
        assert status == 200 and body["Warnings"] == "job unchanged"
        assert (await srv(agent, "web.service.nomad."))[1] == before


async def test_job_files_at_start_are_idempotent_across_restarts(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    async with running(config, [EXAMPLE]) as agent:
        first = agent.registry.snapshot.allocations
        version = agent.registry.snapshot.jobs["web"].version
    async with running(config, [EXAMPLE]) as agent:
        second = agent.registry.snapshot.allocations
        assert agent.registry.snapshot.jobs["web"].version == version  # unchanged: a no-op
    assert set(first) == set(second) and len(first) == 3


BAD_BODIES = [
    (b"{not json", "body"),
    (b"", "body"),
    (json.dumps({"Job": {"TaskGroups": [{"Name": "g"}]}}).encode(), "Job.ID"),
    (
        json.dumps({"Job": {"ID": "web", "TaskGroups": [{"Name": "g"}]}}).encode(),
        "Job.TaskGroups[0].Tasks",
    ),
    (
        json.dumps(
            {
                "Job": {
                    "ID": "web",
                    "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "docker"}]}],
                }
            }
        ).encode(),
        "Job.TaskGroups[0].Tasks[0].Driver",
    ),
    (
        json.dumps(
            {"Job": {"ID": "web", "TaskGroups": [{"Name": "g", "Count": "three"}]}}
        ).encode(),
        "Job.TaskGroups[0].Count",
    ),
    (
        json.dumps(
            {
                "Job": {
                    "ID": "web",
                    "TaskGroups": [
                        {"Name": "g", "Networks": [{"DynamicPorts": [{"Label": "a b"}]}]}
                    ],
                }
            }
        ).encode(),
        "Job.TaskGroups[0].Networks[0].DynamicPorts[0].Label",
    ),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=[f for _, f in BAD_BODIES])
async def test_bad_input_is_a_400_naming_the_field_and_changes_nothing(
    tmp_path: Path, body: bytes, field: str
) -> None:
    async with running(agent_config(tmp_path), [EXAMPLE]) as agent, aiohttp.ClientSession() as http:
        before = agent.registry.snapshot
        status, error = await request(http, "POST", url(agent, "/v1/jobs"), data=body)
        assert status == 400 and error["field"] == field
        after = agent.registry.snapshot
        assert list(after.jobs) == ["web"] and after.jobs["web"] == before.jobs["web"]
        assert set(after.allocations) == set(before.allocations)


async def test_unknown_ids_are_404(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        for method, path in [
            ("GET", "/v1/job/nope"),
            ("GET", "/v1/job/nope/allocations"),
            ("DELETE", "/v1/job/nope"),
            ("GET", "/v1/allocation/00000000-0000-4000-8000-000000000000"),
        ]:
            status, error = await request(http, method, url(agent, path))
            assert status == 404, (method, path)
            assert "not found" in error["error"]


async def test_a_static_port_taken_by_another_job_is_a_409_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    port = free_static_port()

    def static_job(job_id: str) -> dict[str, Any]:
        group = {
            "Name": "g",
            "Networks": [{"ReservedPorts": [{"Label": "p", "Value": port}]}],
            "Tasks": [SLEEPER],
        }
        return {"Job": {"ID": job_id, "TaskGroups": [group]}}

    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        status, _ = await request(http, "POST", url(agent, "/v1/jobs"), json=static_job("one"))
        assert status == 200
        status, error = await request(http, "POST", url(agent, "/v1/jobs"), json=static_job("two"))
        assert status == 409 and str(port) in error["error"]
        _, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
        assert [a["JobID"] for a in allocs] == ["one"]
        assert list(task_processes(tmp_path, leaders=True)) == [allocs[0]["ID"]]


async def test_writes_need_a_write_token_when_acls_are_on(tmp_path: Path) -> None:
    acl = {"enabled": True, "default_policy": "read", "tokens": {WRITE_TOKEN: "write"}}
    async with running(agent_config(tmp_path, acl=acl)) as agent, aiohttp.ClientSession() as http:
        status, _ = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE)
        assert status == 403 and not agent.registry.snapshot.jobs
        headers = {"X-Nomad-Token": WRITE_TOKEN}
        status, _ = await request(
            http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE, headers=headers
        )
        assert status == 200
        status, _ = await request(http, "DELETE", url(agent, "/v1/job/web"))
        assert status == 403 and not agent.registry.snapshot.jobs["web"].stop
        status, _ = await request(http, "GET", url(agent, "/v1/jobs"))
        assert status == 200


async def test_bridge_mode_without_root_says_so_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # netsetup checks the effective uid before it touches anything (NetworkManager._ensure_base).
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    bridge = {
        "Job": {
            "ID": "b",
            "TaskGroups": [
                {
                    "Name": "g",
                    "Networks": [{"Mode": "bridge", "DynamicPorts": [{"Label": "p"}]}],
                    "Tasks": [SLEEPER],
                }
            ],
        }
    }
    config = agent_config(
        # A bridge name of the test's own: were it made by mistake, it would be ours to find.
        tmp_path,
        client={
            "bridge_network_name": "wptestnone",
            "min_dynamic_port": 41000,
            "max_dynamic_port": 41999,
        },
    )
    async with running(config) as agent, aiohttp.ClientSession() as http:
        before = agent.registry.snapshot.index
        status, error = await request(http, "POST", url(agent, "/v1/jobs"), json=bridge)
        assert status == 500 and "needs root" in error["error"]
        assert agent.registry.snapshot.index == before and not agent.registry.snapshot.jobs
    assert not link_exists("wptestnone")


def job_with(job_id: str, count: int) -> dict[str, Any]:
    body = json.loads(json.dumps(EXAMPLE))
    body["Job"]["ID"] = job_id
    body["Job"]["TaskGroups"][0]["Count"] = count
    return body


async def test_every_route_needs_its_token_when_acls_deny(tmp_path: Path) -> None:
    acl = {
        "enabled": True,
        "default_policy": "deny",
        "tokens": {WRITE_TOKEN: "write", READ_TOKEN: "read"},
    }
    config = agent_config(tmp_path, acl=acl)
    async with running(config, [EXAMPLE]) as agent, aiohttp.ClientSession() as http:
        alloc = next(iter(agent.registry.snapshot.allocations))
        reads = ["/v1/jobs", "/v1/job/web", "/v1/job/web/allocations", "/v1/allocations"]
        reads.append("/v1/job/web/summary")
        reads.append(f"/v1/client/fs/logs/{alloc}?task=server&type=stdout&plain=true")
        reads.append(f"/v1/allocation/{alloc}")
        for path in reads:
            status, error = await request(http, "GET", url(agent, path))
            assert status == 403 and error["error"], path
            headers = {"X-Nomad-Token": READ_TOKEN}
            async with http.get(url(agent, path), headers=headers) as answer:
                assert answer.status == 200, path
        read_only = {"Authorization": f"Bearer {READ_TOKEN}"}
        for method, path in [("POST", "/v1/jobs"), ("PUT", "/v1/jobs"), ("DELETE", "/v1/job/web")]:
            for headers in ({}, read_only):
                status, _ = await request(
                    http, method, url(agent, path), json=job_with("web", 1), headers=headers
                )
                assert status == 403, (method, path, headers)
        assert len(agent.registry.snapshot.allocations) == 3


async def test_concurrent_posts_and_deletes_leave_netsetup_and_the_registry_agreeing(
    tmp_path: Path,
) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        posts = [job_with("a", 2), job_with("b", 2), job_with("same", 1), job_with("same", 1)]
        answers = await asyncio.gather(
            *(request(http, "POST", url(agent, "/v1/jobs"), json=body) for body in posts)
        )
        assert [status for status, _ in answers] == [200] * 4
        assert sorted(body["Warnings"] for _, body in answers[2:]) == ["", "job unchanged"]
        (status, _), (post_status, _) = await asyncio.gather(
            request(http, "DELETE", url(agent, "/v1/job/a")),
            request(http, "POST", url(agent, "/v1/jobs"), json=job_with("a", 3)),
        )
        assert (status, post_status) == (200, 200)
        snap = agent.registry.snapshot
        held = {a.id for a in snap.allocations.values() if not a.terminal}
        running_a = "a" in snap.jobs and not snap.jobs["a"].stop
        assert len(held) == 3 * running_a + 2 + 1
        with closing(open_state(tmp_path)) as state:
            assert {r.alloc_id for r in state.allocations()} == held
        assert set(agent.registry.snapshot.allocs) == held


async def test_lazy_network_refuses_calls_after_close(tmp_path: Path) -> None:
    network = LazyNetwork(agent_config(tmp_path).client)
    alloc_id = str(uuid.uuid4())
    assert (await network.setup(alloc_id, NetworkSpec())).mode == "host"
    assert await network.teardown(alloc_id)
    await network.close()
    with pytest.raises(StateError):
        await network.get(alloc_id)
    assert not [t for t in threading.enumerate() if t.name == "waypost-netsetup"]


async def test_persisted_bridge_allocations_are_not_reconciled_by_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data dir whose netsetup state holds a bridge allocation: as root, the agent
    would reconcile it in this namespace (bridge, sysctls, nft table)."""
    config = agent_config(tmp_path)
    async with running(config, [EXAMPLE]):
        pass
    with closing(open_state(tmp_path)) as state:
        state.reserve(
            str(uuid.uuid4()), NetworkSpec("bridge"), lambda _: Reservation((), ("172.26.64.9",))
        )

    async def refuse(_self: NetworkManager) -> None:
        raise AssertionError("a test reconciled allocations in this machine's namespace")

    monkeypatch.setattr(NetworkManager, "reconcile", refuse)
    async with running(config) as agent:
        assert len(agent.registry.snapshot.allocations) == 3
