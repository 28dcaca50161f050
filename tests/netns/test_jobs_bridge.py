"""The agent's job runner in bridge mode, in a throwaway host namespace.  Root.

A child process (this module run as `python -m tests.netns.test_jobs_bridge`) joins
the topology's host namespace, opens netsetup's NetworkManager and a real store and
registry there, and runs a bridge-mode job through discovery.allocations.JobRunner
with run-prefixed allocation ids (so the session sweep finds anything left).  It
prints the allocations and instances as one JSON line, waits for "stop" on stdin,
stops the job and prints the teardown errors.  The test connects from the external
namespace to the host's forwarded port and is answered by a listener inside the
allocation's namespace on the `To` port.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import NETNS_DIR, ROOT, EchoServer, Topology, is_namespace, tcp_ask

pytestmark = pytest.mark.root

TO_PORT = 8080
LINE_TIMEOUT = 60.0  # seconds for the child to answer (imports and a setup on a busy box)
JOB = {
    "Job": {
        "ID": "web",
        "TaskGroups": [
            {
                "Name": "web",
                "Networks": [
                    {"Mode": "bridge", "DynamicPorts": [{"Label": "http", "To": TO_PORT}]}
                ],
                "Services": [
                    {"Name": "web", "PortLabel": "http"},
                    {"Name": "web-inside", "PortLabel": "http", "AddressMode": "alloc"},
                ],
            }
        ],
    }
}


# -- the child, inside the host namespace ----------------------------------------------------


async def child(data_dir: str, prefix: str) -> None:
    from discovery.allocations import JobRunner
    from discovery.jobs import parse_job
    from discovery.model import Node
    from discovery.registry import Registry
    from discovery.store import open_store
    from netsetup.firewall import Firewall
    from netsetup.network import start_network_manager
    from netsetup.spec import NetConfig, render_result
    from netsetup.state import open_state

    config = NetConfig(data_dir=data_dir)
    state = open_state(data_dir)
    firewall = Firewall(config)
    manager = await start_network_manager(config, state, firewall)
    store = open_store(data_dir)
    try:
        registry = Registry(Node("host", manager.host_ip), index=store.load().index + 1)
        store.attach(registry)
        ids = (f"{prefix}-j{n}" for n in itertools.count(1))

        async def opener() -> Any:
            return manager

        runner = JobRunner(registry, store, opener, "host", new_id=lambda: next(ids))
        await runner.start()
        job, _ = await runner.run(parse_job(JOB))
        instances = [(i.service, i.address, i.port) for i in registry.snapshot.instances.values()]
        allocs = [render_result(a.network) for a in job.allocs]
        print(json.dumps({"allocs": allocs, "instances": sorted(instances)}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        errors = await runner.stop("web")
        print(json.dumps({"errors": errors, "left": len(registry.snapshot.instances)}), flush=True)
    finally:
        await store.close()
        await manager.close()
        firewall.close()
        state.close()


def main() -> None:
    from tests.netns.driver import join_namespace

    parser = argparse.ArgumentParser()
    parser.add_argument("--netns", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    join_namespace(args.netns)
    asyncio.run(child(args.data_dir, args.prefix))


# -- the test --------------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], LINE_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the job runner said nothing: {err}")
    answer: dict[str, Any] = json.loads(line)
    return answer


def test_a_bridge_job_is_reachable_through_its_forwarded_host_port(
    topology: Topology, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "tests.netns.test_jobs_bridge"]
    argv += ["--netns", str(NETNS_DIR / topology.host), "--data-dir", str(tmp_path / "data")]
    argv += ["--prefix", topology.prefix]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = read_line(proc)
        (alloc,) = started["allocs"]
        (mapping,) = alloc["ports"]
        assert alloc["mode"] == "bridge" and alloc["alloc_id"].startswith(topology.prefix)
        assert is_namespace(alloc["alloc_id"])
        assert mapping["alloc_port"] == TO_PORT
        assert started["instances"] == [
            ["web", topology.host_ip, mapping["host_port"]],
            ["web-inside", alloc["alloc_ip"], TO_PORT],
        ]
        with EchoServer(alloc["alloc_id"], alloc["alloc_ip"], TO_PORT, name="inside"):
            answer = tcp_ask(topology.external, topology.host_ip, mapping["host_port"])
        assert answer.startswith("inside ")
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        stopped = read_line(proc)
        assert stopped == {"errors": [], "left": 0}
        assert proc.wait(timeout=LINE_TIMEOUT) == 0
        assert not is_namespace(alloc["alloc_id"])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


if __name__ == "__main__":
    main()
