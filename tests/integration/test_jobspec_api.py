"""HCL jobspecs through the agent: `POST /v1/jobs/parse` on 127.0.0.1:0 and
`waypost agent --job file.hcl` (discovery.cli.load_jobs) running the jobs they give.

The agents are the real ones of tests/integration/test_jobs_agent.py (host mode on
127.0.0.1, dynamic ports 41000-41999); the jobs that run are real processes, stopped
and purged before each test ends (conftest's `no_task_left` checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from discovery.agent import start_agent
from discovery.cli import load_jobs
from discovery.errors import ConfigError
from discovery.hclfile import hcl_to_json
from tests.integration.conftest import task_processes
from tests.integration.test_jobs_agent import (
    agent_config,
    eventually,
    request,
    running,
    srv,
    url,
)

ROOT = Path(__file__).resolve().parents[2]
WEB_HCL = (ROOT / "examples/web.nomad.hcl").read_text()
READ_TOKEN = "read-token-789"

JOBSPEC = """
variable "count" { default = 1 }
job "api" {
  group "api" {
    count = var.count
    network {
      port "http" {}
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "sleep"
        args    = ["300", "${NOMAD_PORT_http}"]
      }
      kill_timeout = "2s"
    }
  }
}
"""


async def test_parse_answers_the_job_object_as_nomad_does(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        body = {"JobHCL": WEB_HCL, "Canonicalize": False}
        status, job = await request(http, "POST", url(agent, "/v1/jobs/parse"), json=body)
        assert status == 200
        assert job == hcl_to_json(WEB_HCL)["Job"]  # the Job itself, not {"Job": ...}
        expected = json.loads((ROOT / "examples/web.job.json").read_text())["Job"]
        assert job["TaskGroups"][0]["RestartPolicy"]["Delay"] == 2 * 10**9
        assert (
            job["TaskGroups"][0]["Tasks"][0]["Config"]
            == expected["TaskGroups"][0]["Tasks"][0]["Config"]
        )
        assert not agent.registry.snapshot.jobs  # a parse runs nothing


async def test_parse_takes_variables_and_canonicalizes(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        body = {"JobHCL": JOBSPEC, "Variables": "count = 0\n", "Canonicalize": True}
        status, job = await request(http, "PUT", url(agent, "/v1/jobs/parse"), json=body)
        assert status == 200
        group = job["TaskGroups"][0]
        assert group["Count"] == 0  # the variables file's value over the default
        assert group["RestartPolicy"]["Attempts"] == 2  # Nomad's default, filled in
        assert group["Tasks"][0]["Config"]["args"] == ["300", "${NOMAD_PORT_http}"]


@pytest.mark.parametrize(
    ("body", "field", "piece"),
    [
        ({"JobHCL": 'job "x" {\n group "g" {\n cuont = 1\n }\n}'}, "job.x.group.g.cuont", ":3:"),
        ({"JobHCL": 'job "x" {\n  count = \n}'}, "JobHCL", "job.hcl:2: syntax error"),
        ({"JobHCL": JOBSPEC, "Variables": "nope = 1"}, "JobHCL", "'nope' is given a value"),
        ({"JobHCL": ""}, "JobHCL", "is required"),
        ({"JobHcl": "x"}, "JobHcl", "unknown field"),
        ({"JobHCL": JOBSPEC, "Canonicalize": "yes"}, "Canonicalize", "true or false"),
    ],
)
async def test_a_bad_jobspec_is_a_400_with_its_line(
    tmp_path: Path, body: dict[str, object], field: str, piece: str
) -> None:
    async with running(agent_config(tmp_path)) as agent, aiohttp.ClientSession() as http:
        status, answer = await request(http, "POST", url(agent, "/v1/jobs/parse"), json=body)
        assert status == 400, answer
        assert answer["field"] == field and piece in answer["error"], answer


async def test_parse_needs_a_read_token_when_acls_deny(tmp_path: Path) -> None:
    acl = {"enabled": True, "default_policy": "deny", "tokens": {READ_TOKEN: "read"}}
    config = agent_config(tmp_path, acl=acl)
    async with running(config) as agent, aiohttp.ClientSession() as http:
        target = url(agent, "/v1/jobs/parse")
        status, _ = await request(http, "POST", target, json={"JobHCL": WEB_HCL})
        assert status == 403
        headers = {"X-Nomad-Token": READ_TOKEN}
        status, _ = await request(http, "POST", target, json={"JobHCL": WEB_HCL}, headers=headers)
        assert status == 200


async def test_job_files_in_hcl_run_at_start(tmp_path: Path) -> None:
    """`--job examples/dynamic-port.nomad.hcl`: it runs as it is and answers on its port."""
    specs = load_jobs([str(ROOT / "examples/dynamic-port.nomad.hcl")])
    agent = await start_agent(agent_config(tmp_path / "data"), specs)
    try:
        async with aiohttp.ClientSession() as http:

            async def address() -> str:
                _, allocs = await request(http, "GET", url(agent, "/v1/allocations"))
                if not allocs or allocs[0]["TaskStates"]["server"]["State"] != "running":
                    return ""
                _, alloc = await request(
                    http, "GET", url(agent, f"/v1/allocation/{allocs[0]['ID']}")
                )
                return str(alloc["Env"]["server"]["NOMAD_ADDR_http"])

            addr = await eventually(address, "the dynamic-port task running")

            async def answers() -> str:
                try:
                    async with http.get(f"http://{addr}/") as reply:
                        return await reply.text() if reply.status == 200 else ""
                except aiohttp.ClientError:
                    return ""

            assert await eventually(answers, "the task serving") == "hello from a dynamic port\n"
            status, _ = await request(http, "DELETE", url(agent, "/v1/job/dynamic-port?purge=true"))
            assert status == 200
            assert task_processes(tmp_path / "data") == {}
    finally:
        await agent.close()


def test_load_jobs_reads_hcl_by_name_or_content(tmp_path: Path) -> None:
    by_content = tmp_path / "api.job"
    by_content.write_text(JOBSPEC)
    (web,) = load_jobs([str(ROOT / "examples/web.nomad.hcl")])
    (api,) = load_jobs([str(by_content)])
    assert (web.id, web.groups[0].count, api.id) == ("web", 3, "api")
    (json_web,) = load_jobs([str(ROOT / "examples/web.job.json")])
    assert json_web == web


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        # an HCL error: the parser's line
        ('job "x" {\n group "g" {\n count = upper("a")\n }\n}\n', 3, "job.x.group.g.count"),
        # an error the job model finds: the line of the HCL that gave the field
        (
            JOBSPEC.replace('driver = "raw_exec"', 'driver = "docker"'),
            10,
            "job.api.group.api.task.server.driver",
        ),
        (JOBSPEC.replace("count = var.count", "count = 9999"), 5, "job.api.group.api.count"),
    ],
)
def test_a_bad_hcl_job_file_names_the_file_the_line_and_the_key(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    bad = tmp_path / "bad.nomad"
    bad.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_jobs([str(bad)])
    err = caught.value
    assert (err.path, err.line, err.key) == (str(bad), line, key), str(err)
    assert str(err).startswith(f"{bad}:{line}: {key}: ")


async def test_the_static_port_example_runs_as_it_is(tmp_path: Path) -> None:
    """examples/static-port.nomad.hcl: on its static port, in DNS once its check passes."""
    text = (ROOT / "examples/static-port.nomad.hcl").read_text()
    async with running(agent_config(tmp_path), []) as agent, aiohttp.ClientSession() as http:
        status, job = await request(
            http, "POST", url(agent, "/v1/jobs/parse"), json={"JobHCL": text}
        )
        assert status == 200, job
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json={"Job": job})
        assert status == 200, body

        async def in_dns() -> list[int] | None:
            _, ports = await srv(agent, "static-port.service.nomad")
            return ports or None

        assert await eventually(in_dns, "the static port in DNS", within=40) == [30080]
        async with http.get("http://127.0.0.1:30080/") as reply:
            assert reply.status == 200
        status, _ = await request(http, "DELETE", url(agent, "/v1/job/static-port?purge=true"))
        assert status == 200
