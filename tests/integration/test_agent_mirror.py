"""The real agent with a `consul` block, against the Consul stand-in (no Consul binary here).

The agent is a process; the stand-in (tests/consul_standin.py) runs in the
test's event loop, so every blocking wait on the process goes through a
thread.  Covers the wiring: configured services pushed under the agent's own
ids, a foreign service pulled and answered over DNS, and the agent's health
degraded (429) while Consul is out of reach, then back to 200.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import dns.rdatatype

from tests.consul_standin import ConsulStandin
from tests.integration.test_agent_process import Agent

DEADLINE = 15.0  # seconds; convergence takes well under one here
HTTP_LISTENING = re.compile(r"http listening on 127\.0\.0\.1:(\d+)")


async def eventually(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def text_of(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def test_agent_pushes_pulls_and_reports_consul_health(tmp_path: Path) -> None:
    async with ConsulStandin() as consul:
        config = tmp_path / "agent.hcl"
        config.write_text(
            f'node_name = "hosta"\nconsul {{\n  address = "{consul.url}"\n}}\n'
            'service {\n  name = "web"\n  id = "web-1"\n  port = 8081\n}\n'
        )
        args = ["--dev", "--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
        agent = Agent([*args, "--data-dir", str(tmp_path / "data"), "--config", str(config)])
        try:
            await asyncio.to_thread(agent.started)
            http = int((await asyncio.to_thread(agent.expect, HTTP_LISTENING))[1])
            health = f"http://127.0.0.1:{http}/v1/agent/health"

            # push: our configured instance, under an id that says whose it is
            await eventually(lambda: "_waypost-hosta-web-1" in consul.agent_services(), "push")
            pushed = consul.agent_services()["_waypost-hosta-web-1"]
            assert (pushed["Service"], pushed["Port"]) == ("web", 8081)
            assert pushed["Meta"]["external-source"] == "waypost"

            # pull: another node's service is answered by our DNS
            consul.register_foreign(
                {
                    "Name": "db",
                    "ID": "db-1",
                    "Port": 5432,
                    "Check": {"TTL": "1m", "Status": "passing"},
                },
                node="hostb",
                address="127.0.0.9",
            )

            def db_answered() -> bool:
                reply = agent.query("db.service.nomad", "SRV")
                return any(rr.port == 5432 for rrset in reply.answer for rr in rrset)

            end = time.monotonic() + DEADLINE
            while not await asyncio.to_thread(db_answered):
                assert time.monotonic() < end, "pulled service never answered over DNS"
                await asyncio.sleep(0.05)
            reply = await asyncio.to_thread(agent.query, "db.service.nomad", "A")
            assert [rr.address for rrset in reply.answer for rr in rrset] == ["127.0.0.9"]
            assert reply.answer[0].rdtype == dns.rdatatype.A
            assert await status_of(health) == 200
            metrics = await text_of(f"http://127.0.0.1:{http}/v1/metrics")
            assert "waypost_consul_healthy 1.0" in metrics
            pulled = re.search(r"^waypost_consul_pulled_instances (\S+)$", metrics, re.M)
            assert pulled is not None and float(pulled[1]) >= 1  # db-1 (and Consul's own)

            # outage: degraded, not down; back to 200 once Consul answers again
            await consul.stop_listening()
            end = time.monotonic() + DEADLINE
            while await status_of(health) != 429:
                assert time.monotonic() < end, "health never degraded during the outage"
                await asyncio.sleep(0.1)
            reply = await asyncio.to_thread(agent.query, "web.service.nomad", "SRV")
            assert [rr.port for rrset in reply.answer for rr in rrset] == [8081]  # still served
            await consul.resume()
            end = time.monotonic() + 2 * DEADLINE
            while await status_of(health) != 200:
                assert time.monotonic() < end, "health never recovered after the outage"
                await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(agent.kill)
