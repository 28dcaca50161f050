"""Tasks through the whole agent: they serve, die, restart, log, and outlive a killed agent.

Two kinds of agent.  In-process ones (tests.integration.test_jobs_agent's
`running`, as with `--dev`) for the task lifecycle, the logs endpoint (read with
aiohttp and with python-nomad, Nomad's own Python client) and blocking reads;
and a real agent process (tests.agentproc), without `--dev`, for `kill -9`: its
tasks must keep serving while it is gone and be adopted, not started again, by
the next agent on the same data dir.  Every job is host mode on 127.0.0.1 (it
only reserves ports) and every test ends with none of its task processes left
(checked by pid here and by conftest's `no_task_left`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import nomad

from discovery.agent import Agent
from tests.agentproc import AgentProcess, wait_for
from tests.integration.conftest import task_processes
from tests.integration.test_jobs_agent import (
    TIMEOUT,
    WAIT,
    agent_config,
    eventually,
    request,
    running,
    srv,
    url,
)

PYTHON = sys.executable


def server_job(job_id: str, count: int = 2, **restart: Any) -> dict[str, Any]:
    """`count` instances of a python http.server on their dynamic port `http`, checked."""
    task = {
        "Name": "server",
        "Driver": "raw_exec",
        "Config": {
            "command": PYTHON,
            "args": ["-m", "http.server", "--bind", "${NOMAD_IP_http}", "${NOMAD_PORT_http}"],
        },
        "Env": {"PYTHONUNBUFFERED": "1"},
        "KillTimeout": 2_000_000_000,
    }
    if restart:
        task["RestartPolicy"] = restart
    group = {
        "Name": "web",
        "Count": count,
        "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": "http"}]}],
        "Services": [{"Name": job_id, "PortLabel": "http", "Checks": [CHECK]}],
        "Tasks": [task],
    }
    return {"Job": {"ID": job_id, "TaskGroups": [group]}}


# In DNS only once the server answers (a service without checks is in DNS as soon as
# its task has started, before the server has bound its port).
CHECK = {"Type": "http", "Path": "/", "Interval": "300ms", "Timeout": "2s"}


def printer_job(job_id: str, script: str) -> dict[str, Any]:
    """One task running the Python `script` (its output is what the logs tests read)."""
    task = {
        "Name": "printer",
        "Driver": "raw_exec",
        "Config": {"command": PYTHON, "args": ["-u", "-c", textwrap.dedent(script)]},
        "KillTimeout": 1_000_000_000,
    }
    group = {"Name": "p", "Tasks": [task]}
    return {"Job": {"ID": job_id, "TaskGroups": [group]}}


def get(port: int, path: str = "/") -> int:
    """The status of a GET to a task's server on 127.0.0.1 (an error status too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it is the agent that did not reap it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def leaders(data_dir: Path) -> set[int]:
    """The pids of the task processes themselves (session leaders) of the agent on data_dir."""
    return {pid for pids in task_processes(data_dir, leaders=True).values() for pid in pids}


def all_pids(data_dir: Path) -> set[int]:
    return {pid for pids in task_processes(data_dir).values() for pid in pids}


async def only_alloc(http: aiohttp.ClientSession, agent: Agent) -> dict[str, Any]:
    _, stubs = await request(http, "GET", url(agent, "/v1/allocations"))
    assert len(stubs) == 1, stubs
    _, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stubs[0]['ID']}"))
    return dict(alloc)


# -- lifecycle -----------------------------------------------------------------------


async def test_a_killed_task_leaves_dns_at_once_is_restarted_and_comes_back(
    tmp_path: Path,
) -> None:
    job = server_job("kt", count=1, Attempts=2, Interval="10m", Delay="500ms", Mode="fail")
    async with running(agent_config(tmp_path), [job]) as agent, aiohttp.ClientSession() as http:
        ports = await eventually(_present(agent, "kt.service.nomad"), "kt in DNS")
        first = await eventually(lambda: asyncio.to_thread(leaders, tmp_path), "a task pid")
        assert len(first) == 1
        pid = next(iter(first))
        assert get(ports[0]) == 200

        os.kill(pid, signal.SIGKILL)
        # Out of DNS as soon as the exit is seen: long before the restart delay ends.
        gone = await eventually(
            _absent(agent, "kt.service.nomad"), "kt out of DNS after the kill", within=WAIT
        )
        assert gone
        alloc = await only_alloc(http, agent)
        assert alloc["TaskStates"]["server"]["State"] in ("pending", "running")

        back = await eventually(_present(agent, "kt.service.nomad"), "kt back in DNS")
        assert back == ports  # the allocation keeps its port across a task restart
        second = leaders(tmp_path)
        assert len(second) == 1 and pid not in second
        assert get(ports[0]) == 200
        state = (await only_alloc(http, agent))["TaskStates"]["server"]
        assert state["Restarts"] == 1
        assert state["State"] == "running" and state["Failed"] is False
        kinds = [e["Type"] for e in state["Events"]]
        for kind in ("Received", "Task Setup", "Started", "Terminated", "Restarting"):
            assert kind in kinds, kinds
        assert kinds.index("Terminated") < kinds.index("Restarting") < len(kinds) - 1
        terminated = next(e for e in state["Events"] if e["Type"] == "Terminated")
        assert terminated["Signal"] == signal.SIGKILL
        pids = second
    await asyncio.to_thread(wait_for, lambda: not any(alive(p) for p in pids), "tasks gone")


def _present(agent: Agent, name: str) -> Any:
    """A probe for `eventually`: the SRV ports of `name` once there are any."""

    async def probe() -> list[int] | None:
        _, ports = await srv(agent, name)
        return ports or None

    return probe


def _absent(agent: Agent, name: str) -> Any:
    async def probe() -> bool:
        _, ports = await srv(agent, name)
        return not ports

    return probe


async def test_a_task_past_its_attempts_fails_the_allocation_and_leaves_dns(
    tmp_path: Path,
) -> None:
    job = printer_job("dies", "import sys; print('bye'); sys.exit(3)")
    group = job["Job"]["TaskGroups"][0]
    group["Tasks"][0]["RestartPolicy"] = {"Attempts": 1, "Interval": "10m", "Delay": "200ms"}
    group["Networks"] = [{"Mode": "host", "DynamicPorts": [{"Label": "http"}]}]
    group["Services"] = [{"Name": "dies", "PortLabel": "http"}]
    async with running(agent_config(tmp_path), [job]) as agent, aiohttp.ClientSession() as http:

        async def failed() -> dict[str, Any] | None:
            alloc = await only_alloc(http, agent)
            return alloc if alloc["ClientStatus"] == "failed" else None

        alloc = await eventually(failed, "the allocation failed")
        state = alloc["TaskStates"]["printer"]
        assert state["State"] == "dead" and state["Failed"] is True
        assert state["Restarts"] == 1
        assert state["Events"][-1]["Type"] == "Not Restarting"
        assert any(e["Type"] == "Terminated" and e["ExitCode"] == 3 for e in state["Events"])
        assert (await srv(agent, "dies.service.nomad"))[1] == []
        # Still listed, as failed, in the job's allocations.
        _, listed = await request(http, "GET", url(agent, "/v1/job/dies/allocations"))
        assert [a["ClientStatus"] for a in listed] == ["failed"]


async def test_stop_leaves_no_process_of_the_task_nor_its_children(tmp_path: Path) -> None:
    # A shell that starts a grandchild which ignores SIGINT: only the SIGKILL after
    # KillTimeout, to the whole process group, ends it.
    script = """
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"])
        print(child.pid, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(300)
    """
    config = agent_config(tmp_path)
    async with (
        running(config, [printer_job("tree", script)]) as agent,
        aiohttp.ClientSession() as http,
    ):
        await eventually(
            lambda: asyncio.to_thread(lambda: len(all_pids(tmp_path)) >= 2),
            "the task and its child",
        )
        pids = all_pids(tmp_path)
        (leader,) = leaders(tmp_path)
        group = os.getpgid(leader)
        assert all(os.getpgid(p) == group for p in pids)
        status, _ = await request(http, "DELETE", url(agent, "/v1/job/tree"))
        assert status == 200
        assert not any(alive(p) for p in pids)
        alloc = await only_alloc(http, agent)
        assert alloc["DesiredStatus"] == "stop"
        kinds = [e["Type"] for e in alloc["TaskStates"]["printer"]["Events"]]
        assert kinds[-2:] == ["Killing", "Killed"]
    # The group itself is gone once init has reaped the orphaned grandchild's zombie.
    await asyncio.to_thread(wait_for, lambda: not _group_exists(group), "the process group gone")


def _group_exists(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# -- blocking reads ------------------------------------------------------------------


async def test_a_blocking_read_of_allocations_wakes_on_a_task_state_change(
    tmp_path: Path,
) -> None:
    job = server_job("bl", count=1, Attempts=3, Interval="10m", Delay="1s", Mode="delay")
    async with running(agent_config(tmp_path), [job]) as agent, aiohttp.ClientSession() as http:
        await eventually(_present(agent, "bl.service.nomad"), "bl in DNS")
        async with http.get(url(agent, "/v1/allocations")) as r:
            index = int(r.headers["X-Nomad-Index"])
            before = await r.json()
        assert before[0]["ClientStatus"] == "running"

        read = asyncio.create_task(
            request(http, "GET", url(agent, f"/v1/allocations?index={index}&wait=30s"))
        )
        await asyncio.sleep(0.3)
        assert not read.done()  # nothing changed yet: it blocks
        (pid,) = leaders(tmp_path)
        os.kill(pid, signal.SIGTERM)
        started = time.monotonic()
        status, after = await asyncio.wait_for(read, WAIT)
        assert status == 200
        assert time.monotonic() - started < 25  # woken by the change, not by wait=30s
        assert after[0]["ModifyIndex"] > before[0]["ModifyIndex"]
        assert after[0]["TaskStates"]["server"]["Events"][-1]["Type"] in (
            "Terminated",
            "Restarting",
        )
        await eventually(_present(agent, "bl.service.nomad"), "bl back in DNS")


# -- logs ----------------------------------------------------------------------------


LOGS_SCRIPT = """
    import sys, time
    print("hello out")
    print("hello err", file=sys.stderr)
    for i in range(600):
        print(f"tick {i}")
        time.sleep(0.05)
    time.sleep(300)
"""


async def test_the_logs_endpoint_plain_framed_and_follow(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    async with (
        running(config, [printer_job("lg", LOGS_SCRIPT)]) as agent,
        aiohttp.ClientSession() as http,
    ):
        alloc_id = (await only_alloc(http, agent))["ID"]
        logs = url(agent, f"/v1/client/fs/logs/{alloc_id}")

        async def plain(kind: str, extra: str = "") -> str:
            async with http.get(f"{logs}?task=printer&type={kind}&plain=true{extra}") as r:
                assert r.status == 200, await r.text()
                assert r.content_type == "text/plain"
                return await r.text()

        async def has_ticks() -> str:
            text = await plain("stdout")
            return text if "tick 3\n" in text else ""

        out = await eventually(has_ticks, "the task's first lines in its stdout log")
        assert out.startswith("hello out\ntick 0\n")
        assert await plain("stderr") == "hello err\n"
        # origin=end: the last bytes only.
        tail = await plain("stdout", "&origin=end&offset=5")
        assert len(tail) == 5 and tail.endswith("\n")
        # Under an unknown prefix of the id, or with a bad type: Nomad's errors.
        async with http.get(f"{logs}?task=printer&type=stdin") as r:
            assert r.status == 400
        async with http.get(f"{logs}?task=nope&type=stdout") as r:
            assert r.status == 404

        # Framed (Nomad's default): JSON frames of base64 data with file and offset.
        async with http.get(f"{logs}?task=printer&type=stderr") as r:
            assert r.status == 200
            frames = [json.loads(x) for x in _frames(await r.read())]
        data = b"".join(base64.b64decode(f["Data"]) for f in frames if f.get("Data"))
        assert data == b"hello err\n"
        assert frames[-1]["File"] == "alloc/logs/printer.stderr.0"
        assert frames[-1]["Offset"] == len(data)

        # Follow from the end: only lines written after the request, as they come.
        async with http.get(
            f"{logs}?task=printer&type=stdout&plain=true&follow=true&origin=end",
            timeout=aiohttp.ClientTimeout(total=WAIT),
        ) as r:
            seen = b""
            while seen.count(b"\n") < 4:
                seen += await asyncio.wait_for(r.content.read(4096), WAIT)
        text = seen.decode()
        before = {line for line in out.splitlines() if line}
        assert "hello out" not in text
        new = [line for line in text.splitlines() if line.startswith("tick ")]
        assert new and not set(new) & before


def _frames(body: bytes) -> list[bytes]:
    """The JSON objects of a framed stream (they follow each other without separators)."""
    decoder = json.JSONDecoder()
    text, pos, out = body.decode(), 0, []
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        _, end = decoder.raw_decode(text, pos)
        out.append(text[pos:end].encode())
        pos = end
    return out


async def test_python_nomad_reads_jobs_allocations_and_logs(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path), [printer_job("pn", LOGS_SCRIPT)]) as agent:
        ep = agent.http_endpoint
        client = nomad.Nomad(host=ep.host, port=ep.port, timeout=TIMEOUT)

        def read() -> tuple[Any, Any, str]:
            jobs = client.jobs.get_jobs()
            allocs = client.job.get_allocations("pn")
            alloc = client.allocation.get_allocation(allocs[0]["ID"])
            text = client.client.stream_logs.stream(alloc["ID"], "printer", "stdout", plain=True)
            return jobs, alloc, text

        async def ready() -> tuple[Any, Any, str] | None:
            found = await asyncio.to_thread(read)
            return found if "tick 1\n" in found[2] else None

        jobs, alloc, text = await eventually(ready, "python-nomad reads the task's log")
        assert [j["ID"] for j in jobs] == ["pn"]
        assert alloc["JobID"] == "pn" and alloc["TaskGroup"] == "p"
        assert alloc["TaskStates"]["printer"]["State"] == "running"
        assert text.startswith("hello out\n")
        framed = await asyncio.to_thread(
            client.client.stream_logs.stream, alloc["ID"], "printer", "stderr"
        )
        frames = [json.loads(x) for x in _frames(framed.encode())]
        assert base64.b64decode(frames[0]["Data"]) == b"hello err\n"
        await asyncio.to_thread(client.job.deregister_job, "pn", purge=True)
        assert await asyncio.to_thread(client.jobs.get_jobs) == []


# -- the agent killed ----------------------------------------------------------------


def test_kill_9_of_the_agent_leaves_tasks_serving_and_the_next_agent_adopts_them(
    tmp_path: Path,
) -> None:
    data = tmp_path  # conftest's no_task_left looks there too
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "advertise_addr": "127.0.0.1",
                "client": {"min_dynamic_port": 41000, "max_dynamic_port": 41999},
            }
        )
    )
    job = tmp_path / "web.json"
    job.write_text(json.dumps(server_job("adopt", count=2)))
    args = ["--data-dir", str(data), "--config", str(config), "--job", str(job)]
    args += ["--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
    first = AgentProcess(args).started()
    second: AgentProcess | None = None
    pids: set[int] = set()
    try:
        ports = wait_for(
            lambda: (p := first.srv_ports("adopt.service.nomad")) and len(p) == 2 and p,
            "both instances in DNS",
            WAIT,
        )
        pids = wait_for(lambda: len(leaders(data)) == 2 and leaders(data), "two task pids")
        first.kill()  # SIGKILL: nothing of the agent runs its shutdown

        # The tasks do not notice: they serve, and what they log waits in their pipes.
        assert all(alive(p) for p in pids)
        assert [get(p, "/while-the-agent-is-down") for p in ports] == [404, 404]

        second = AgentProcess(args).started()
        assert wait_for(
            lambda: second.srv_ports("adopt.service.nomad") == ports, "the same ports in DNS", WAIT
        )
        assert leaders(data) == pids  # adopted: none started again, none doubled
        _, allocs = second.http("GET", "/v1/job/adopt/allocations")
        assert len(allocs) == 2
        for stub in allocs:
            assert stub["ClientStatus"] == "running"
            state = stub["TaskStates"]["server"]
            assert state["State"] == "running" and state["Restarts"] == 0
            starts = [e for e in state["Events"] if e["Type"] == "Started"]
            assert len(starts) == 1
        # Logging went on: the request made while no agent ran is in the task's log.
        for stub in allocs:
            wait_for(
                lambda alloc_id=stub["ID"]: (
                    "/while-the-agent-is-down"
                    in second.http(
                        "GET",
                        f"/v1/client/fs/logs/{alloc_id}?task=server&type=stderr&plain=true",
                    )[1]
                ),
                "the request logged while the agent was down",
                WAIT,
            )
        status, _ = second.http("DELETE", "/v1/job/adopt?purge=true")
        assert status == 200
        assert not any(alive(p) for p in pids)
        assert second.stop() == 0
    finally:
        for agent in (first, second):
            if agent is not None:
                agent.kill()
        for pid in leaders(data) | pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
    assert not any(alive(p) for p in pids)
