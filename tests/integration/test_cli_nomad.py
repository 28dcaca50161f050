"""The `waypost job|alloc|service` CLI as a real process against a real agent.

Each test starts the agent in-process (tests/integration/test_jobs_agent.py's
`running` and `agent_config`: HTTP on 127.0.0.1 port 0, host-mode jobs on a
temporary data dir, tasks that are real processes) and runs
`python -m discovery job ...` as a subprocess with NOMAD_ADDR pointing at it
(asyncio subprocesses, so the agent keeps serving meanwhile).  Every job a test
runs is stopped with `job stop -purge`, and the test then checks that no task
process is left (conftest's `no_task_left` checks it again).

Plans and HCL job files need endpoints that a given agent may not have yet
(`POST /v1/job/:id/plan`, `POST /v1/jobs/parse`): their tests ask the agent at
run time and skip, saying so, when it answers "no such endpoint".  What the CLI
says to an agent without them is checked against a stand-in HTTP server (the
standard library's, on 127.0.0.1 port 0) that has no endpoint at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.agent import Agent
from tests.integration.conftest import task_processes
from tests.integration.test_jobs_agent import SLEEPER, agent_config, request, running, url

ROOT = Path(__file__).resolve().parents[2]
WEB_JOB = ROOT / "examples" / "web.job.json"
CLI_DEADLINE = 90.0  # seconds for one CLI run on a busy machine (a run waits for its tasks)
WAIT = 20.0  # seconds for a task to write its log lines
SHARED = "ab12cd"  # the prefix of every allocation id in the ambiguity test
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)"


async def waypost(agent: Agent | str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run `python -m discovery ARGS` against `agent`; (exit code, stdout, stderr)."""
    address = agent if isinstance(agent, str) else url(agent, "")
    env = {**os.environ, "NOMAD_ADDR": address}
    env.pop("WAYPOST_ADDR", None)
    env.pop("WAYPOST_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "discovery",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLI_DEADLINE):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()  # only the CLI process started here, by its pid
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def stop_and_check(agent: Agent, data_dir: Path, job_id: str) -> None:
    code, out, err = await waypost(agent, "job", "stop", "-purge", job_id)
    assert code == 0, (out, err)
    async with aiohttp.ClientSession() as http:
        status, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
    assert status == 200
    assert [a for a in allocs if a["JobID"] == job_id] == []
    assert task_processes(data_dir) == {}


def _write_job(tmp_path: Path, job: dict[str, Any]) -> Path:
    path = tmp_path / f"{job['ID']}.json"
    path.write_text(json.dumps({"Job": job}))
    return path


async def _has_endpoint(agent: Agent, method: str, path: str, body: object) -> bool:
    async with aiohttp.ClientSession() as http:
        status, answer = await request(http, method, url(agent, path), json=body)
    return not (status == 404 and str(answer.get("error", "")).startswith("no such endpoint"))


async def test_run_status_alloc_services_and_stop_of_the_example_job(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent:
        code, out, err = await waypost(agent, "job", "run", str(WEB_JOB))
        assert code == 0, (out, err)
        lines = out.splitlines()
        assert re.fullmatch(
            rf'==> {STAMP}: Monitoring (evaluation "[0-9a-f]{{8}}"|job .*)', lines[0]
        )
        created = [line for line in lines if " created: node " in line]
        assert len(created) == 3 or "(no evaluation)" in lines[0]
        assert re.fullmatch(rf'==> {STAMP}: Allocations of job "web" running: 3 of 3', lines[-1]), (
            out
        )

        code, out, _ = await waypost(agent, "job", "status")
        assert code == 0
        head, row = out.splitlines()
        assert head.split() == ["ID", "Type", "Priority", "Status", "Submit", "Date"]
        assert row.split()[:4] == ["web", "service", "50", "running"]

        code, out, _ = await waypost(agent, "job", "status", "we")  # a job id prefix
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == "ID            = web"
        allocs = lines[lines.index("Allocations") + 2 :]
        assert len(allocs) == 3
        assert all(r.split()[2:6] == ["web", "0", "run", "running"] for r in allocs)

        async with aiohttp.ClientSession() as http:
            _, stubs = await request(http, "GET", url(agent, "/v1/job/web/allocations"))
        first = sorted(stubs, key=lambda a: a["Name"])[0]
        prefix = first["ID"][:6]
        code, out, err = await waypost(agent, "alloc", "status", prefix)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"ID                  = {first['ID']}"
        assert f"Name                = {first['Name']}" in lines
        assert "Client Status       = running" in lines
        assert 'Task "server" is "running"' in lines
        events = lines[lines.index("Recent Events:") + 2 :]
        assert [e.split("  ")[1].strip() for e in events][-1] == "Received"

        code, out, err = await waypost(agent, "alloc", "status", "-json", prefix)
        assert code == 0
        assert json.loads(out)["ID"] == first["ID"]

        # The task's stderr gets a line per request (http.server's log).
        port = int(first_port(await alloc(agent, first["ID"])))
        for _ in range(3):
            await get_page(port)

        async def stderr_lines() -> list[str]:
            code, out, _ = await waypost(agent, "alloc", "logs", "-stderr", prefix)
            assert code == 0
            return [line for line in out.splitlines() if '"GET / HTTP/1.1" 200' in line]

        assert len(await eventually(stderr_lines, 3)) >= 3
        code, out, _ = await waypost(agent, "alloc", "logs", "-stderr", "-tail", "-n", "1", prefix)
        assert code == 0
        assert len(out.splitlines()) == 1 and '"GET / HTTP/1.1" 200' in out

        code, out, _ = await waypost(agent, "service", "list")
        assert code == 0
        assert out.splitlines() == ["Service Name  Tags", "web           [http,v1]"]
        code, out, _ = await waypost(agent, "service", "info", "web")
        assert code == 0
        head, *rows = out.splitlines()
        assert head.split() == ["Job", "ID", "Address", "Tags", "Node", "ID", "Alloc", "ID"]
        assert sorted(r.split()[4] for r in rows) == sorted(a["ID"][:8] for a in stubs)
        code, out, _ = await waypost(agent, "service", "list", "-json")
        assert json.loads(out)[0]["Services"][0]["ServiceName"] == "web"

        await stop_and_check(agent, tmp_path, "web")
        code, out, _ = await waypost(agent, "job", "status")
        assert (code, out.strip()) == (0, "No running jobs")
        code, out, err = await waypost(agent, "alloc", "status", prefix)
        assert code == 1
        assert err.strip() == f'No allocation(s) with prefix or id "{prefix}" found'


async def alloc(agent: Agent, alloc_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        status, body = await request(http, "GET", url(agent, f"/v1/allocation/{alloc_id}"))
    assert status == 200
    return dict(body)


def first_port(detail: dict[str, Any]) -> int:
    return int(detail["AllocatedResources"]["Shared"]["Ports"][0]["Value"])


async def get_page(port: int) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/", timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        assert r.status == 200


async def eventually(probe: Any, at_least: int) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        found: list[str] = await probe()
        if len(found) >= at_least or loop.time() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_logs_stdout_stderr_tail_and_task_argument(tmp_path: Path) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; exec sleep 300"
    task = {"Name": "t", "Driver": "raw_exec", "Config": {"command": "sh", "args": ["-c", script]}}
    job = {"ID": "talker", "TaskGroups": [{"Name": "g", "Tasks": [task]}]}
    path = _write_job(tmp_path, job)
    async with running(agent_config(tmp_path)) as agent:
        code, out, err = await waypost(agent, "job", "run", str(path))
        assert code == 0, (out, err)
        async with aiohttp.ClientSession() as http:
            _, stubs = await request(http, "GET", url(agent, "/v1/job/talker/allocations"))
        ident = stubs[0]["ID"]

        async def stdout_lines() -> list[str]:
            code, out, _ = await waypost(agent, "alloc", "logs", ident[:8])
            assert code == 0
            return out.splitlines()

        assert await eventually(stdout_lines, 5) == ["out1", "out2", "out3", "out4", "out5"]
        code, out, _ = await waypost(agent, "alloc", "logs", "-stderr", ident[:8], "t")
        assert (code, out.splitlines()) == (0, ["err1", "err2", "err3", "err4", "err5"])
        code, out, _ = await waypost(agent, "alloc", "logs", "-tail", "-n", "2", ident)
        assert (code, out) == (0, "out4\nout5\n")
        code, out, _ = await waypost(agent, "alloc", "logs", "-tail", "-c", "5", ident)
        assert (code, out) == (0, "out5\n")
        assert await follow_until(agent, ["-f", "-tail", "-n", "2", ident], "out4\nout5\n")
        assert await follow_until(agent, ["-f", ident], "")  # from the ends: nothing new
        code, _, err = await waypost(agent, "alloc", "logs", ident, "nosuchtask")
        assert code == 1 and "Failed to read stdout file" in err
        await stop_and_check(agent, tmp_path, "talker")


async def follow_until(
    agent: Agent, args: list[str], expected: str, *, stderr: bool = False
) -> bool:
    """`alloc logs ARGS` (following) prints `expected` on stdout, then exits 0 on Ctrl-C."""
    env = {**os.environ, "NOMAD_ADDR": url(agent, "")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "discovery", "alloc", "logs", *args),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        got = b""
        if expected:
            async with asyncio.timeout(WAIT):
                while len(got) < len(expected):
                    chunk = await proc.stdout.read(1024)
                    if not chunk:
                        break
                    got += chunk
        else:
            await asyncio.sleep(2)  # following; nothing new is written
        proc.send_signal(signal.SIGINT)  # only the CLI process started here, by its pid
        async with asyncio.timeout(CLI_DEADLINE):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (got + rest).decode() == expected
    return proc.returncode == 0


async def test_a_failing_allocation_exits_2(tmp_path: Path) -> None:
    task = {
        "Name": "t",
        "Driver": "raw_exec",
        "Config": {"command": "sh", "args": ["-c", "exit 3"]},
    }
    policy = {"Attempts": 0, "Mode": "fail", "Interval": "1m", "Delay": "1s"}
    job = {"ID": "failer", "TaskGroups": [{"Name": "g", "RestartPolicy": policy, "Tasks": [task]}]}
    path = _write_job(tmp_path, job)
    async with running(agent_config(tmp_path)) as agent:
        code, out, err = await waypost(agent, "job", "run", str(path))
        assert code == 2, (out, err)
        assert re.search(rf'==> {STAMP}: Allocation "[0-9a-f]{{8}}" is "failed"', out), out
        await stop_and_check(agent, tmp_path, "failer")


async def test_detach_ambiguous_prefix_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Allocation ids that share a prefix (the agent's are uuid4s; the CLI is not patched).
    real_uuid4 = uuid.uuid4
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(hex=SHARED + real_uuid4().hex[6:]))
    job = {"ID": "pair", "TaskGroups": [{"Name": "g", "Count": 2, "Tasks": [SLEEPER]}]}
    path = _write_job(tmp_path, job)
    async with running(agent_config(tmp_path)) as agent:
        code, out, err = await waypost(agent, "job", "run", "-detach", str(path))
        assert code == 0, err
        assert out.splitlines()[0] == "Job registration successful"
        async with aiohttp.ClientSession() as http:
            _, stubs = await request(http, "GET", url(agent, "/v1/allocations"))
        ids = sorted(a["ID"] for a in stubs)
        assert len(ids) == 2 and all(i.startswith(SHARED) for i in ids)
        code, _, err = await waypost(agent, "alloc", "status", SHARED[:4])
        assert code == 1
        assert err.startswith("Prefix matched multiple allocations\n\nID ")
        assert sorted(line.split()[0] for line in err.splitlines()[3:]) == [i[:8] for i in ids]
        code, out, err = await waypost(agent, "alloc", "status", ids[1][:12])
        assert code == 0 and out.startswith(f"ID                  = {ids[1]}")
        code, _, err = await waypost(agent, "job", "status", "nosuchjob")
        assert (code, err.strip()) == (1, 'No job(s) with prefix or ID "nosuchjob" found')
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"Job": {"ID": "bad", "TaskGroups": [{"Name": "g"}]}}))
        code, _, err = await waypost(agent, "job", "run", str(bad))
        assert code == 1 and err.startswith("Error submitting job: Unexpected response code: 400")
        code, out, _ = await waypost(agent, "job", "stop", "pai", stdin=b"n\n")
        assert code == 0 and "Cancelling job stop" in out
        await stop_and_check(agent, tmp_path, "pair")


async def test_plan_of_a_new_then_unchanged_job(tmp_path: Path) -> None:
    job = {"ID": "planned", "TaskGroups": [{"Name": "g", "Count": 2, "Tasks": [SLEEPER]}]}
    path = _write_job(tmp_path, job)
    async with running(agent_config(tmp_path)) as agent:
        if not await _has_endpoint(agent, "POST", "/v1/job/planned/plan", {"Job": job}):
            pytest.skip("this agent has no POST /v1/job/:id/plan yet")
        code, out, err = await waypost(agent, "job", "plan", str(path))
        assert code == 1, (out, err)  # allocations would be created
        lines = out.splitlines()
        assert lines[0] == '+ Job: "planned"'
        assert lines[1] == '+ Task Group: "g" (2 create)'
        assert "- All tasks successfully allocated." in lines
        assert any(line.startswith("Job Modify Index: ") for line in lines)
        code, out, err = await waypost(agent, "job", "run", str(path))
        assert code == 0, (out, err)
        code, out, err = await waypost(agent, "job", "plan", str(path))
        assert code == 0, (out, err)
        assert out.splitlines()[:2] == ['Job: "planned"', 'Task Group: "g" (2 ignore)']
        index = re.search(r"-check-index (\d+) ", out)
        assert index is not None
        code, out, err = await waypost(
            agent, "job", "run", "-detach", "-check-index", str(int(index[1]) + 1), str(path)
        )
        assert code == 1 and "Job not updated" in err
        await stop_and_check(agent, tmp_path, "planned")


HCL_JOB = """
job "hcl-sleeper" {
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "sleep"
        args    = ["300"]
      }
    }
  }
}
"""


async def test_run_an_hcl_job_file(tmp_path: Path) -> None:
    path = tmp_path / "sleeper.nomad.hcl"
    path.write_text(HCL_JOB)
    async with running(agent_config(tmp_path)) as agent:
        body = {"JobHCL": HCL_JOB, "Canonicalize": True}
        if not await _has_endpoint(agent, "POST", "/v1/jobs/parse", body):
            pytest.skip("this agent has no POST /v1/jobs/parse yet")
        code, out, err = await waypost(agent, "job", "run", str(path))
        assert code == 0, (out, err)
        assert 'Allocations of job "hcl-sleeper" running: 1 of 1' in out
        await stop_and_check(agent, tmp_path, "hcl-sleeper")


# -- an agent without the endpoints: a stand-in that has none ---------------------------


class _NoEndpoints(BaseHTTPRequestHandler):
    """Answers every request as waypost answers an unknown route; records the tokens."""

    tokens: list[str] = []

    def _answer(self) -> None:
        self.tokens.append(self.headers.get("X-Nomad-Token", ""))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"error": f"no such endpoint: {self.command} {self.path}"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@contextmanager
def no_endpoints() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoEndpoints)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_an_agent_without_parse_or_plan_gets_a_clear_error(tmp_path: Path) -> None:
    hcl = tmp_path / "sleeper.nomad.hcl"
    hcl.write_text(HCL_JOB)
    as_json = _write_job(tmp_path, {"ID": "x", "TaskGroups": []})
    _NoEndpoints.tokens.clear()
    with no_endpoints() as address:
        code, _, err = await waypost(address, "job", "run", "-token=secret", str(hcl))
        assert code == 1
        assert "POST /v1/jobs/parse" in err and "give the job as JSON" in err
        code, _, err = await waypost(address, "job", "plan", str(as_json))
        assert code == 255
        assert "POST /v1/job/:id/plan" in err
    assert _NoEndpoints.tokens[0] == "secret"
