"""A bridge job run by the agent, its task inside its allocation's namespace.  Root.

The agent is a process started as a service manager would start it, with
`nsenter --net=<throwaway host namespace>` (same mount namespace, so the
allocation namespaces it binds under /var/run/netns are the machine's view too).
The job's task (`python -m http.server` on its `To` port) must run inside the
allocation's namespace (the same /proc/<pid>/ns/net as /var/run/netns/<alloc id>)
and answer from the "external" namespace through the forwarded host port; the
agent is then stopped (SIGTERM, outside --dev: the task runs on) and started
again, and must adopt the task: same pid, still answering, no second process.
The job is stopped at the end; whatever is left (processes, namespaces) is
removed in the finalizer by the allocation ids the agent recorded.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from discovery.tasks.process import boot_id, find_marked, kill_marked
from netsetup.state import open_state
from tests.agentproc import PYTHON, AgentProcess, wait_for
from tests.netns.conftest import NETNS_DIR, Topology, delete_namespace, is_namespace, ns_socket

pytestmark = pytest.mark.root

TO_PORT = 8080
JOB = {
    "Job": {
        "ID": "web",
        "TaskGroups": [
            {
                "Name": "web",
                "Networks": [
                    {"Mode": "bridge", "DynamicPorts": [{"Label": "http", "To": TO_PORT}]}
                ],
                "Services": [{"Name": "web", "PortLabel": "http"}],
                "Tasks": [
                    {
                        "Name": "server",
                        "Driver": "raw_exec",
                        "Config": {
                            "command": PYTHON,
                            "args": [
                                "-m",
                                "http.server",
                                "--bind",
                                "0.0.0.0",
                                "${NOMAD_PORT_http}",
                            ],
                        },
                    }
                ],
            }
        ],
    }
}


def alive(pid: int) -> bool:
    """Running (a zombie is dead: its reaper is whoever adopted it when the agent went)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def http_get_from(ns: str, ip: str, port: int) -> str:
    """`GET /` from namespace `ns`: the status line ("" when nothing answers)."""
    with ns_socket(ns, socket.SOCK_STREAM) as sock:
        sock.settimeout(3.0)
        try:
            sock.connect((ip, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
        except OSError:
            return ""


@pytest.fixture
def agents(topology: Topology, tmp_path: Path) -> Iterator[list[AgentProcess]]:
    """Agents started in the topology's host namespace; everything of theirs removed after."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()
        print("\n".join(agent.stderr[-40:]))  # shown with a failure's report
    data = tmp_path / "data"
    if (data / "netsetup.db").exists():
        with closing(open_state(data)) as state:
            ids = [r.alloc_id for r in state.allocations()]
        for ident in ids:
            kill_marked(ident, "", boot_id())
            delete_namespace(ident)


def start(
    topology: Topology, tmp_path: Path, agents: list[AgentProcess], **settings: Any
) -> AgentProcess:
    """An agent in the topology's host namespace; `settings` go into its config file."""
    config = tmp_path / "agent.json"
    client = {"min_dynamic_port": 21000, "max_dynamic_port": 21999}
    config.write_text(json.dumps({"client": client, **settings}))
    args = ["--data-dir", str(tmp_path / "data"), "--config", str(config)]
    args += ["--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
    agent = AgentProcess(args, netns=str(NETNS_DIR / topology.host))
    agents.append(agent)
    return agent.started()


def running_alloc(agent: AgentProcess) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        _, stubs = agent.http("GET", "/v1/allocations")
        live = [s for s in stubs if s["ClientStatus"] == "running"]
        if len(live) != 1:
            return None
        _, alloc = agent.http("GET", f"/v1/allocation/{live[0]['ID']}")
        found: dict[str, Any] = alloc
        return found

    alloc: dict[str, Any] = wait_for(probe, "the allocation running")
    return alloc


def test_a_bridge_task_runs_in_its_namespace_and_is_adopted_by_the_next_agent(
    topology: Topology, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = start(topology, tmp_path, agents)
    status, body = agent.http("POST", "/v1/jobs", JOB)
    assert status == 200, body
    alloc = running_alloc(agent)
    alloc_id, pid = alloc["ID"], alloc["TaskStates"]["server"]["Pid"]
    (port,) = alloc["AllocatedResources"]["Shared"]["Ports"]
    assert alloc["Network"]["Mode"] == "bridge" and is_namespace(alloc_id)
    assert alloc["Env"]["server"]["NOMAD_PORT_http"] == str(TO_PORT)
    # The task process is in the allocation's namespace, not the agent's.
    task_ns = os.stat(f"/proc/{pid}/ns/net").st_ino
    assert task_ns == os.stat(NETNS_DIR / alloc_id).st_ino
    assert task_ns != os.stat(f"/proc/{agent.pid}/ns/net").st_ino
    host_port = port["Value"]
    answer = wait_for(
        lambda: http_get_from(topology.external, topology.host_ip, host_port),
        "the task answering through the forwarded port",
    )
    assert answer.startswith("HTTP/1.0 200")
    assert agent.srv_ports("web.service.nomad.") == [host_port]

    assert agent.stop() == 0  # outside --dev: the task runs on
    assert find_marked(alloc_id, leaders_only=True) == [pid]
    again = start(topology, tmp_path, agents)
    adopted = running_alloc(again)
    assert adopted["TaskStates"]["server"]["Pid"] == pid
    assert find_marked(alloc_id, leaders_only=True) == [pid]  # adopted, not started twice
    assert http_get_from(topology.external, topology.host_ip, host_port).startswith("HTTP/1.0 200")
    assert again.srv_ports("web.service.nomad.") == [host_port]

    status, _ = again.http("DELETE", "/v1/job/web?purge=true")
    assert status == 200
    assert find_marked(alloc_id) == [] and not is_namespace(alloc_id)
    assert not alive(pid)
    assert again.stop() == 0


def test_the_bridge_example_runs_as_it_is(
    topology: Topology, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """examples/bridge.nomad.hcl (Nomad's guide: `port "http" { to = 3000 }`), by HCL."""
    agent = start(topology, tmp_path, agents)
    text = (Path(__file__).resolve().parents[2] / "examples/bridge.nomad.hcl").read_text()
    status, job = agent.http("POST", "/v1/jobs/parse", {"JobHCL": text, "Canonicalize": True})
    assert status == 200, job
    status, body = agent.http("POST", "/v1/jobs", {"Job": job})
    assert status == 200, body
    alloc = running_alloc(agent)
    (port,) = alloc["AllocatedResources"]["Shared"]["Ports"]
    assert port["To"] == 3000
    answer = wait_for(
        lambda: http_get_from(topology.external, topology.host_ip, port["Value"]),
        "the example answering through the forwarded port",
    )
    assert answer.startswith("HTTP/1.0 200")
    wait_for(lambda: agent.srv_ports("bridge.service.nomad.") == [port["Value"]], "in DNS")
    status, _ = agent.http("DELETE", "/v1/job/bridge?purge=true")
    assert status == 200
    assert find_marked(alloc["ID"]) == [] and not is_namespace(alloc["ID"])
    assert agent.stop() == 0
