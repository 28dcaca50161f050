"""Job updates through the agent, as Nomad makes them: in place, destructive, scaled; the plan.

In-process agents (tests.integration.test_jobs_agent's `running`), host mode on
127.0.0.1, real task processes (python http.servers), read with aiohttp and
with python-nomad.  Each test ends with its jobs purged and no task process
left (conftest's `no_task_left`).
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import signal
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import nomad

from netsetup.state import open_state
from tests.integration.conftest import task_processes
from tests.integration.test_jobs_agent import (
    TIMEOUT,
    agent_config,
    eventually,
    request,
    running,
    srv,
    url,
)
from tests.integration.test_tasks_agent import leaders, server_job


async def serving(agent: Any, http: aiohttp.ClientSession, job_id: str, n: int) -> list[Any]:
    """Wait for `n` allocations of `job_id` running and in DNS; their stubs."""

    async def ready() -> list[Any] | None:
        _, stubs = await request(http, "GET", url(agent, f"/v1/job/{job_id}/allocations"))
        live = [s for s in stubs if s["DesiredStatus"] == "run" and s["ClientStatus"] == "running"]
        _, ports = await srv(agent, f"{job_id}.service.nomad")
        return live if len(live) == n and len(ports) == n else None

    found: list[Any] = await eventually(ready, f"{n} allocations of {job_id} serving")
    return found


async def ports_of(agent: Any, http: aiohttp.ClientSession, stubs: list[Any]) -> dict[str, int]:
    out = {}
    for stub in stubs:
        _, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stub['ID']}"))
        out[stub["ID"]] = alloc["AllocatedResources"]["Shared"]["Ports"][0]["Value"]
    return out


def with_tags(job: dict[str, Any], *tags: str) -> dict[str, Any]:
    out = copy.deepcopy(job)
    out["Job"]["TaskGroups"][0]["Services"][0]["Tags"] = list(tags)
    return out


async def test_a_tag_change_is_in_place_and_a_command_change_replaces_new_first(
    tmp_path: Path,
) -> None:
    job = server_job("up", count=2)
    async with running(agent_config(tmp_path), [job]) as agent, aiohttp.ClientSession() as http:
        before = await serving(agent, http, "up", 2)
        ids = {s["ID"] for s in before}
        ports = await ports_of(agent, http, before)
        pids = leaders(tmp_path)

        # The plan first: it says what would happen and changes nothing.
        status, plan = await request(
            http, "POST", url(agent, "/v1/job/up/plan"), json={**with_tags(job, "v2"), "Diff": True}
        )
        assert status == 200, plan
        assert plan["Annotations"]["DesiredTGUpdates"]["web"]["InPlaceUpdate"] == 2
        assert plan["Annotations"]["DesiredTGUpdates"]["web"]["DestructiveUpdate"] == 0
        assert {a["ID"] for a in plan["Allocations"]} == ids
        assert {a["Action"] for a in plan["Allocations"]} == {"in-place update"}
        assert plan["Diff"]["Type"] == "Edited"
        _, version = await request(http, "GET", url(agent, "/v1/job/up"))
        assert version["Version"] == 0

        status, body = await request(
            http, "POST", url(agent, "/v1/jobs"), json=with_tags(job, "v2")
        )
        assert status == 200, body
        after = await serving(agent, http, "up", 2)
        assert {s["ID"] for s in after} == ids  # the same allocations
        assert {s["JobVersion"] for s in after} == {1}
        assert await ports_of(agent, http, after) == ports
        assert leaders(tmp_path) == pids  # the same processes
        _, tagged = await request(http, "GET", url(agent, "/v1/catalog/service/up"))
        assert [s["ServiceTags"] for s in tagged] == [["v2"], ["v2"]]

        changed = copy.deepcopy(job)
        changed["Job"]["TaskGroups"][0]["Tasks"][0]["Env"]["EXTRA"] = "1"
        status, plan = await request(http, "POST", url(agent, "/v1/job/up/plan"), json=changed)
        assert plan["Annotations"]["DesiredTGUpdates"]["web"]["DestructiveUpdate"] == 2
        assert plan["DestructiveReasons"]["web"] == ["task 'server': env"]
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=changed)
        assert status == 200, body
        replaced = await serving(agent, http, "up", 2)
        assert not {s["ID"] for s in replaced} & ids
        assert sorted(s["Name"] for s in replaced) == ["up.web[0]", "up.web[1]"]
        assert not leaders(tmp_path) & pids
        _, listed = await request(http, "GET", url(agent, "/v1/job/up/allocations"))
        old = [s for s in listed if s["ID"] in ids]
        assert {(s["DesiredStatus"], s["ClientStatus"]) for s in old} == {("stop", "complete")}
        await request(http, "DELETE", url(agent, "/v1/job/up?purge=true"))


async def test_scaling_up_with_one_free_port_and_down_to_the_lowest_index(tmp_path: Path) -> None:
    # Two ports in the dynamic range: 1 -> 2 fits only if the running one stays.  Below
    # the ephemeral range, used by no other test, and a new pair each run (a port that
    # served within the last minute has TIME_WAIT sockets, which dynamic selection skips).
    low = 31000 + random.randrange(0, 900, 2)
    config = agent_config(tmp_path, client={"min_dynamic_port": low, "max_dynamic_port": low + 1})
    job = server_job("sc", count=1)
    async with running(config, [job]) as agent, aiohttp.ClientSession() as http:
        (first,) = await serving(agent, http, "sc", 1)
        two = copy.deepcopy(job)
        two["Job"]["TaskGroups"][0]["Count"] = 2
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=two)
        assert status == 200, body
        both = await serving(agent, http, "sc", 2)
        assert first["ID"] in {s["ID"] for s in both}
        assert sorted(s["Name"] for s in both) == ["sc.web[0]", "sc.web[1]"]
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=job)
        assert status == 200, body
        (left,) = await serving(agent, http, "sc", 1)
        assert left["ID"] == first["ID"] and left["Name"] == "sc.web[0]"
        await request(http, "DELETE", url(agent, "/v1/job/sc?purge=true"))


async def test_python_nomad_registers_plans_and_reads_evaluations(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path), []) as agent, aiohttp.ClientSession() as http:
        ep = agent.http_endpoint
        client = nomad.Nomad(host=ep.host, port=ep.port, timeout=TIMEOUT)
        job = server_job("pyn", count=1)

        registered = await asyncio.to_thread(client.job.register_job, "pyn", job)
        assert registered["EvalID"]
        await serving(agent, http, "pyn", 1)
        evaluation = await asyncio.to_thread(client.evaluation.get_evaluation, registered["EvalID"])
        assert evaluation["JobID"] == "pyn" and evaluation["Status"] == "complete"
        assert evaluation["TriggeredBy"] == "job-register"
        placed = await asyncio.to_thread(client.evaluation.get_allocations, registered["EvalID"])
        assert [a["Name"] for a in placed] == ["pyn.web[0]"]
        plan = await asyncio.to_thread(client.job.plan_job, "pyn", with_tags(job, "x"), True)
        assert plan["Annotations"]["DesiredTGUpdates"]["web"]["InPlaceUpdate"] == 1
        summary = await asyncio.to_thread(client.job.get_summary, "pyn")
        assert summary["Summary"]["web"]["Running"] == 1
        assert await asyncio.to_thread(client.regions.get_regions) == ["global"]
        assert [j["ID"] for j in await asyncio.to_thread(client.jobs.get_jobs, "py")] == ["pyn"]
        assert await asyncio.to_thread(client.jobs.get_jobs, "zz") == []
        alloc_id = placed[0]["ID"]
        found = await asyncio.to_thread(client.allocations.get_allocations, alloc_id[:6])
        assert [a["ID"] for a in found] == [alloc_id]

        evals = await asyncio.to_thread(client.job.get_evaluations, "pyn")
        assert [e["ID"] for e in evals] == [registered["EvalID"]]  # a plan makes none
        stopped = await asyncio.to_thread(client.job.deregister_job, "pyn", True)
        assert stopped["EvalID"] and stopped["EvalID"] != registered["EvalID"]
        gone = await asyncio.to_thread(client.evaluation.get_evaluation, stopped["EvalID"])
        assert gone["TriggeredBy"] == "job-deregister"


async def test_a_task_level_service_follows_its_task(tmp_path: Path) -> None:
    # Nomad's usual style: the service block inside the task.  Two tasks: the service
    # is the server's, so it leaves DNS when the server dies, not when the other does.
    job = server_job("ts", count=1, Attempts=1, Interval="10m", Delay="30s", Mode="fail")
    group = job["Job"]["TaskGroups"][0]
    group["Tasks"][0]["Services"] = group.pop("Services")
    group["Tasks"].append(
        {"Name": "side", "Driver": "raw_exec", "Config": {"command": "sleep", "args": ["300"]}}
    )
    async with running(agent_config(tmp_path), [job]) as agent, aiohttp.ClientSession() as http:
        (stub,) = await serving(agent, http, "ts", 1)
        _, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stub['ID']}"))
        assert alloc["Services"] == [
            f"_nomad-task-{stub['ID']}-server-ts-http"
        ]  # Nomad's id of a task's service
        os.kill(alloc["TaskStates"]["server"]["Pid"], signal.SIGKILL)

        async def gone() -> bool:
            _, ports = await srv(agent, "ts.service.nomad")
            return not ports

        assert await eventually(gone, "the task's service out of DNS")
        _, alloc = await request(http, "GET", url(agent, f"/v1/allocation/{stub['ID']}"))
        assert alloc["TaskStates"]["side"]["State"] == "running"
        await request(http, "DELETE", url(agent, "/v1/job/ts?purge=true"))


# What `nomad job inspect` prints for a small job (Nomad 1.7's api.Job with its
# defaults filled in): every field present, most of them null, empty or zero.
INSPECTED: dict[str, Any] = {
    "Job": {
        "Affinities": None,
        "AllAtOnce": False,
        "Constraints": [{"LTarget": "${attr.kernel.name}", "Operand": "=", "RTarget": "linux"}],
        "ConsulNamespace": "",
        "ConsulToken": "",
        "CreateIndex": 11,
        "Datacenters": ["dc1"],
        "DispatchIdempotencyToken": "",
        "Dispatched": False,
        "ID": "insp",
        "JobModifyIndex": 11,
        "Meta": None,
        "ModifyIndex": 13,
        "Multiregion": None,
        "Name": "insp",
        "Namespace": "default",
        "NodePool": "default",
        "NomadTokenID": "",
        "ParameterizedJob": None,
        "ParentID": "",
        "Payload": None,
        "Periodic": None,
        "Priority": 50,
        "Region": "global",
        "Spreads": None,
        "Stable": False,
        "Status": "running",
        "StatusDescription": "",
        "Stop": False,
        "SubmitTime": 1733600000000000000,
        "TaskGroups": [
            {
                "Affinities": None,
                "Constraints": None,
                "Consul": {"Cluster": "default", "Namespace": "", "Partition": ""},
                "Count": 1,
                "Disconnect": None,
                "EphemeralDisk": {"Migrate": False, "SizeMB": 300, "Sticky": False},
                "MaxClientDisconnect": None,
                "Meta": None,
                "Migrate": {
                    "HealthCheck": "checks",
                    "HealthyDeadline": 300000000000,
                    "MaxParallel": 1,
                    "MinHealthyTime": 10000000000,
                },
                "Name": "web",
                "Networks": [
                    {
                        "CIDR": "",
                        "DNS": None,
                        "Device": "",
                        "DynamicPorts": [
                            {"HostNetwork": "default", "Label": "http", "To": 0, "Value": 0}
                        ],
                        "Hostname": "",
                        "IP": "",
                        "MBits": 0,
                        "Mode": "",
                        "ReservedPorts": None,
                    }
                ],
                "PreventRescheduleOnLost": False,
                "ReschedulePolicy": {
                    "Attempts": 0,
                    "Delay": 30000000000,
                    "DelayFunction": "exponential",
                    "Interval": 0,
                    "MaxDelay": 3600000000000,
                    "Unlimited": True,
                },
                "RestartPolicy": {
                    "Attempts": 2,
                    "Delay": 15000000000,
                    "Interval": 1800000000000,
                    "Mode": "fail",
                    "RenderTemplates": False,
                },
                "Scaling": None,
                "Services": [
                    {
                        "Address": "",
                        "AddressMode": "auto",
                        "CanaryMeta": None,
                        "CanaryTags": None,
                        "CheckRestart": None,
                        "Checks": None,
                        "Cluster": "default",
                        "Connect": None,
                        "EnableTagOverride": False,
                        "Identity": None,
                        "Meta": None,
                        "Name": "insp",
                        "OnUpdate": "require_healthy",
                        "PortLabel": "http",
                        "Provider": "nomad",
                        "TaggedAddresses": None,
                        "Tags": ["x"],
                        "TaskName": "",
                    }
                ],
                "ShutdownDelay": None,
                "StopAfterClientDisconnect": None,
                "Tasks": [
                    {
                        "Actions": None,
                        "Affinities": None,
                        "Artifacts": None,
                        "Config": {"args": ["300"], "command": "sleep"},
                        "Constraints": None,
                        "Consul": None,
                        "DispatchPayload": None,
                        "Driver": "raw_exec",
                        "Env": None,
                        "Identities": None,
                        "Identity": None,
                        "KillSignal": "",
                        "KillTimeout": 5000000000,
                        "Kind": "",
                        "Leader": False,
                        "Lifecycle": None,
                        "LogConfig": {"Disabled": False, "MaxFileSizeMB": 10, "MaxFiles": 10},
                        "Meta": None,
                        "Name": "server",
                        "Resources": {
                            "CPU": 100,
                            "Cores": 0,
                            "Devices": None,
                            "DiskMB": 0,
                            "IOPS": 0,
                            "MemoryMB": 300,
                            "MemoryMaxMB": 0,
                            "NUMA": None,
                            "Networks": None,
                            "SecretsMB": 0,
                        },
                        "RestartPolicy": {
                            "Attempts": 2,
                            "Delay": 15000000000,
                            "Interval": 1800000000000,
                            "Mode": "fail",
                            "RenderTemplates": False,
                        },
                        "ScalingPolicies": None,
                        "Schedule": None,
                        "Services": None,
                        "ShutdownDelay": 0,
                        "Templates": None,
                        "User": "",
                        "Vault": None,
                        "VolumeMounts": None,
                    }
                ],
                "Update": {
                    "AutoPromote": False,
                    "AutoRevert": False,
                    "Canary": 0,
                    "HealthCheck": "checks",
                    "HealthyDeadline": 300000000000,
                    "MaxParallel": 1,
                    "MinHealthyTime": 10000000000,
                    "ProgressDeadline": 600000000000,
                    "Stagger": 30000000000,
                },
                "Volumes": None,
            }
        ],
        "Type": "service",
        "UI": None,
        "Update": {
            "AutoPromote": False,
            "AutoRevert": False,
            "Canary": 0,
            "HealthCheck": "",
            "HealthyDeadline": 0,
            "MaxParallel": 1,
            "MinHealthyTime": 0,
            "ProgressDeadline": 0,
            "Stagger": 30000000000,
        },
        "VaultNamespace": "",
        "VaultToken": "",
        "Version": 0,
    }
}


async def test_the_json_nomad_prints_goes_in_as_it_is_with_warnings(tmp_path: Path) -> None:
    async with running(agent_config(tmp_path), []) as agent, aiohttp.ClientSession() as http:
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=INSPECTED)
        assert status == 200, body
        warned = body["Warnings"]
        for field in ("Job.Constraints", "Job.TaskGroups[0].Update", "Job.TaskGroups[0].Migrate"):
            assert field in warned, warned
        for quiet in ("Job.Affinities", "Job.VaultToken", "Job.CreateIndex", "Templates"):
            assert quiet not in warned, warned  # null, empty or Nomad's bookkeeping
        (stub,) = await serving(agent, http, "insp", 1)
        assert stub["Name"] == "insp.web[0]"
        # Something waypost cannot do is a 400 naming it, and changes nothing.
        refused = copy.deepcopy(INSPECTED)
        refused["Job"]["ID"] = "insp2"
        task = refused["Job"]["TaskGroups"][0]["Tasks"][0]
        task["Templates"] = [{"EmbeddedTmpl": "x", "DestPath": "local/x"}]
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=refused)
        assert status == 400 and "Templates" in body["field"], body
        _, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
        assert [j["ID"] for j in jobs] == ["insp"]
        await request(http, "DELETE", url(agent, "/v1/job/insp?purge=true"))


async def test_a_lost_waypost_db_leaves_nothing_running_that_no_job_owns(
    tmp_path: Path, caplog: Any
) -> None:
    # Outside --dev the tasks outlive the agent; then the agent's own database goes
    # (netsetup's stays): the next agent must tear down what no job owns, and say why.
    config = agent_config(tmp_path, dev=False)
    async with running(config, [server_job("lost", count=2)]) as agent:
        async with aiohttp.ClientSession() as http:
            await serving(agent, http, "lost", 2)
        pids = leaders(tmp_path)
        assert len(pids) == 2
    assert leaders(tmp_path) == pids  # detached, still running
    await asyncio.to_thread(_remove_db, tmp_path)
    async with running(config, []):
        assert not task_processes(tmp_path)  # killed by the sweep
        with closing(open_state(tmp_path)) as state:
            assert not state.allocations()
        assert "waypost.db is missing next to" in caplog.text


def _remove_db(data_dir: Path) -> None:
    for path in data_dir.glob("waypost.db*"):
        path.unlink()


async def test_an_unknown_host_network_is_a_400_at_its_port(tmp_path: Path) -> None:
    job = server_job("hn", count=1)
    job["Job"]["TaskGroups"][0]["Networks"][0]["DynamicPorts"][0]["HostNetwork"] = "nope"
    async with running(agent_config(tmp_path), []) as agent, aiohttp.ClientSession() as http:
        status, body = await request(http, "POST", url(agent, "/v1/jobs"), json=job)
        assert status == 400, body
        assert body["field"] == "Job.TaskGroups[0].Networks[0].DynamicPorts[0].HostNetwork"
        _, jobs = await request(http, "GET", url(agent, "/v1/jobs"))
        assert jobs == []
