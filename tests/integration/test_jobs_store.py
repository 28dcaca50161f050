"""Jobs through the whole agent when its store fails, holds an unreadable job, or
netsetup cannot reconcile: the HTTP answer says what the state is.

Failures are real SQLite ones: a second connection to the agent's database adds
triggers that abort the writes of one table (`meta` fails every registry batch,
`jobs` every job record: a run's or stop's write), and drops them to let the store
recover.  The agent
runs host-mode jobs on 127.0.0.1 (ports only, no kernel object), as in
tests/integration/test_jobs_agent.py, whose helpers these tests use.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import dns.rcode
import pytest

from discovery.netbridge import LazyNetwork
from discovery.store import DB_NAME
from netsetup.errors import NetsetupError
from netsetup.network import NetworkManager
from netsetup.spec import NetworkSpec
from netsetup.state import Reservation, open_state
from tests.integration.conftest import task_processes
from tests.integration.test_jobs_agent import (
    EXAMPLE,
    agent_config,
    eventually,
    job_with,
    request,
    running,
    srv,
    url,
)

RECOVERY = 10.0  # seconds for the store to write again once the failure is gone (backoff)


@contextmanager
def failing_writes(data_dir: Path, table: str) -> Iterator[None]:
    """Every insert, update and delete of `table` aborts while inside (real SQLite errors)."""
    with closing(sqlite3.connect(data_dir / DB_NAME, timeout=5.0)) as conn:
        for op in ("INSERT", "UPDATE", "DELETE"):
            conn.execute(
                f"CREATE TRIGGER fail_{table}_{op.lower()} BEFORE {op} ON {table}"
                " BEGIN SELECT RAISE(ABORT, 'injected: disk refuses writes'); END"
            )
        conn.commit()
        try:
            yield
        finally:
            for op in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(f"DROP TRIGGER fail_{table}_{op.lower()}")
            conn.commit()


def job_rows(data_dir: Path) -> dict[str, str]:
    with closing(sqlite3.connect(data_dir / DB_NAME, timeout=5.0)) as conn:
        rows = conn.execute("SELECT id, data FROM jobs").fetchall()
    return {bytes(k).decode(): v for k, v in rows}


def held_allocs(data_dir: Path) -> set[str]:
    with closing(open_state(data_dir)) as state:
        return {r.alloc_id for r in state.allocations()}


async def store_healthy(http: aiohttp.ClientSession, target: str) -> None:
    """Wait (bounded) until the agent's health says the store writes again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY
    while loop.time() < deadline:
        _, health = await request(http, "GET", target)
        if "the last commit failed" not in json.dumps(health):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the store never wrote again")


async def three_in_dns(agent: Any) -> list[int]:
    async def probe() -> list[int]:
        rcode, ports = await srv(agent, "web.service.nomad.")
        return ports if rcode == dns.rcode.NOERROR and len(ports) == 3 else []

    found: list[int] = await eventually(probe, "the job's three instances in DNS")
    return found


async def test_a_registry_batch_that_fails_after_the_records_is_a_200_with_warnings(
    tmp_path: Path,
) -> None:
    async with running(agent_config(tmp_path, dev=False)) as agent, aiohttp.ClientSession() as http:
        with failing_writes(tmp_path, "meta"):
            status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE)
            assert status == 200, body
            assert "not on disk yet" in body["Warnings"] and "injected" in body["Warnings"]
            # The answer matches the state: running, served, its records on disk.
            ports = await three_in_dns(agent)
            _, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
            assert [(j["ID"], j["Status"]) for j in jobs] == [("web", "running")]
            assert set(job_rows(tmp_path)) == {"web"}
            _, health = await request(http, "GET", url(agent, "/v1/agent/health"))
            assert "the last commit failed" in json.dumps(health)
        await store_healthy(http, url(agent, "/v1/agent/health"))
    async with running(agent_config(tmp_path)) as agent:  # the records bring it back
        assert (await srv(agent, "web.service.nomad."))[1] == ports


async def test_records_that_cannot_be_written_are_a_500_and_nothing_is_applied(
    tmp_path: Path,
) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        with failing_writes(tmp_path, "jobs"):
            status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=EXAMPLE)
        assert status == 500 and "injected" in body["error"]
        assert (await srv(agent, "web.service.nomad."))[0] == dns.rcode.NXDOMAIN
        assert (await request(http, "GET", url(agent, "/v1/jobs")))[1] == []
        assert (await request(http, "GET", url(agent, "/v1/allocations")))[1] == []
        assert not agent.registry.snapshot.allocs
        assert held_allocs(tmp_path) == set() and job_rows(tmp_path) == {}
        assert task_processes(tmp_path) == {}  # no task was started


async def test_a_stop_whose_registry_batch_fails_still_tears_down(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    async with running(config, [EXAMPLE]) as agent, aiohttp.ClientSession() as http:
        assert len(held_allocs(tmp_path)) == 3
        await three_in_dns(agent)
        with failing_writes(tmp_path, "meta"):
            status, body = await request(http, "DELETE", url(agent, "/v1/job/web"))
            assert status == 200 and "not on disk yet" in body["Warnings"]
            assert held_allocs(tmp_path) == set() and task_processes(tmp_path) == {}
            assert json.loads(job_rows(tmp_path)["web"])["Stop"] is True
            assert (await srv(agent, "web.service.nomad."))[0] == dns.rcode.NXDOMAIN
        await store_healthy(http, url(agent, "/v1/agent/health"))
    async with running(config) as agent:  # a restart does not bring it back
        assert agent.registry.snapshot.jobs["web"].stop
        assert (await srv(agent, "web.service.nomad."))[0] == dns.rcode.NXDOMAIN
        assert held_allocs(tmp_path) == set()


async def test_an_unreadable_job_is_dead_and_the_agent_starts_the_others(
    tmp_path: Path,
) -> None:
    config = agent_config(tmp_path)
    async with running(config, [EXAMPLE, job_with("other", 1)]):
        pass
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("UPDATE jobs SET data = ? WHERE id = ?", ('{"Job": 7}', b"other"))
        conn.commit()
    async with running(config) as agent, aiohttp.ClientSession() as http:
        await three_in_dns(agent)  # its tasks run
        _, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
        assert [(j["ID"], j["Status"]) for j in jobs] == [("other", "dead"), ("web", "running")]
        assert "cannot be read" in jobs[0]["StatusDescription"]
        status, job = await request(http, "GET", url(agent, "/v1/job/other"))
        assert status == 200 and job["Status"] == "dead"
        assert (await request(http, "GET", url(agent, "/v1/job/other/allocations")))[1] == []
        assert (await srv(agent, "other.service.nomad."))[0] == dns.rcode.NXDOMAIN
        web = {a.id for a in agent.registry.snapshot.allocations.values() if a.job_id == "web"}
        assert held_allocs(tmp_path) == web  # nothing runs what the dead job had
        status, body = await request(http, "DELETE", url(agent, "/v1/job/other"))
        assert status == 200 and "Warnings" not in body
        assert (await request(http, "GET", url(agent, "/v1/job/other")))[0] == 404
        assert set(job_rows(tmp_path)) == {"web"}


async def test_a_failed_reconcile_fails_that_call_and_is_retried_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """netsetup sees no root here (conftest) and reconcile is replaced: no kernel work."""
    with closing(open_state(tmp_path)) as state:
        state.reserve(
            str(uuid.uuid4()), NetworkSpec("bridge"), lambda _: Reservation((), ("172.26.64.9",))
        )
    attempts: list[int] = []

    async def reconcile(_self: NetworkManager) -> str:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise NetsetupError("nft: injected failure")
        return "nothing to do"

    monkeypatch.setattr(NetworkManager, "reconcile", reconcile)
    network = LazyNetwork(agent_config(tmp_path).client, privileged=lambda: True)
    alloc_id = str(uuid.uuid4())
    try:
        with pytest.raises(NetsetupError, match="injected"):
            await network.setup(alloc_id, NetworkSpec())
        assert (await network.setup(alloc_id, NetworkSpec())).mode == "host"
        assert await network.teardown(alloc_id)
    finally:
        await network.close()
    assert attempts == [0, 1]  # retried once, then not again


async def test_a_stop_that_cannot_be_written_is_a_500_and_the_job_runs_on(
    tmp_path: Path,
) -> None:
    async with running(agent_config(tmp_path), [EXAMPLE]) as agent, aiohttp.ClientSession() as http:
        await three_in_dns(agent)
        before = task_processes(tmp_path, leaders=True)
        with failing_writes(tmp_path, "jobs"):
            status, body = await request(http, "DELETE", url(agent, "/v1/job/web"))
        assert status == 500 and "nothing changed" in body["error"]
        assert len((await srv(agent, "web.service.nomad."))[1]) == 3
        assert len(held_allocs(tmp_path)) == 3 and set(job_rows(tmp_path)) == {"web"}
        assert task_processes(tmp_path, leaders=True) == before
