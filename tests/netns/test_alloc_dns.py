"""DNS inside a bridge allocation: the agent on the bridge gateway, port 53.  Root.

The agent runs under `nsenter --net=<throwaway host namespace>` (as in
test_tasks_bridge.py), with `dns.recursors` pointing at a fake upstream DNS
server this test runs inside that host namespace, on its address (so no query
leaves the machine).  A bridge job has two tasks: `server` (HTTP on port 8080,
the service `web`, address_mode alloc) and `probe`, which resolves names with
glibc's getaddrinfo through its /etc/resolv.conf (the agent's file, bind-mounted
in the task's own mount namespace), fetches http://web.service.nomad:8080/ and
prints one JSON line, then sleeps.  From the host namespace, a client bound to
an address outside the bridge subnet gets the zone but REFUSED for an outside
name.  The machine's /etc/resolv.conf is never changed.  Everything is removed
in the finalizers: the agent (by pid), the task processes (by marker), the
allocation namespaces (by the ids netsetup recorded), the fake upstream.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from discovery.tasks.process import find_marked
from netsetup.spec import NetConfig
from tests.agentproc import PYTHON, AgentProcess, wait_for
from tests.netns.conftest import Topology, ns_socket
from tests.netns.test_tasks_bridge import agents, running_alloc, start

__all__ = ["agents"]  # the fixture, imported to be used here

pytestmark = pytest.mark.root

GATEWAY = NetConfig().gateway  # 172.26.64.1: the default bridge's first address
OUTSIDE = "outside.example."
OUTSIDE_IP = "192.0.2.7"  # TEST-NET-1: what the fake upstream answers
PROBE = textwrap.dedent(
    """
    import json, socket, sys, time, urllib.request
    def addrs(name):
        return sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)})
    out = {"resolv_conf": open("/etc/resolv.conf").read()}
    deadline = time.monotonic() + 40
    while True:
        try:
            out["web"] = addrs("web")
            out["web.service.nomad"] = addrs("web.service.nomad")
            out["outside"] = addrs("outside.example")
            with urllib.request.urlopen("http://web.service.nomad:8080/", timeout=3) as r:
                out["http"] = r.status
            break
        except OSError as exc:
            out["error"] = repr(exc)
            if time.monotonic() > deadline:
                break
            time.sleep(0.3)
    print(json.dumps(out), flush=True)
    time.sleep(3600)
    """
)
JOB = {
    "Job": {
        "ID": "web",
        "TaskGroups": [
            {
                "Name": "web",
                "Networks": [{"Mode": "bridge", "DynamicPorts": [{"Label": "http", "To": 8080}]}],
                "Services": [{"Name": "web", "PortLabel": "http", "AddressMode": "alloc"}],
                "Tasks": [
                    {
                        "Name": "server",
                        "Driver": "raw_exec",
                        "Config": {
                            "command": PYTHON,
                            "args": ["-m", "http.server", "--bind", "0.0.0.0", "8080"],
                        },
                    },
                    {
                        "Name": "probe",
                        "Driver": "raw_exec",
                        "Config": {"command": PYTHON, "args": ["-c", PROBE]},
                    },
                ],
            }
        ],
    }
}


class FakeUpstream:
    """A UDP DNS server in a throwaway namespace: A OUTSIDE_IP for any name, else NODATA."""

    def __init__(self, ns: str, ip: str) -> None:
        self.sock = ns_socket(ns, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.settimeout(0.2)
        self.address = f"{ip}:{self.sock.getsockname()[1]}"
        self.asked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            reply = dns.message.make_response(query)
            question = query.question[0]
            self.asked.append(question.name.to_text())
            if question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", OUTSIDE_IP))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        assert not self._thread.is_alive()


@pytest.fixture
def upstream(topology: Topology) -> Iterator[FakeUpstream]:
    server = FakeUpstream(topology.host, topology.host_ip)
    try:
        yield server
    finally:
        server.close()


def ask_gateway(topology: Topology, name: str, source: str) -> dns.message.Message:
    """One UDP query to the gateway's port 53 from the host namespace, from `source`."""
    query = dns.message.make_query(name, "A")
    with ns_socket(topology.host, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(5.0)
        sock.sendto(query.to_wire(), (GATEWAY, 53))
        data, _ = sock.recvfrom(65535)
    return dns.message.from_wire(data)


def probe_output(data: Path, alloc_id: str) -> dict[str, Any] | None:
    log = data / "alloc" / alloc_id / "alloc" / "logs" / "probe.stdout.0"
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[0]) if lines else None


def test_a_bridge_task_resolves_the_zone_and_outside_names_through_the_gateway(
    topology: Topology, tmp_path: Path, agents: list[AgentProcess], upstream: FakeUpstream
) -> None:
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    agent = start(topology, tmp_path, agents, dns={"recursors": [upstream.address]})
    status, body = agent.http("POST", "/v1/jobs", JOB)
    assert status == 200, body
    alloc = running_alloc(agent)
    alloc_id = alloc["ID"]
    alloc_ip = alloc["Network"]["AllocIP"]
    data = tmp_path / "data"

    out: dict[str, Any] = wait_for(lambda: probe_output(data, alloc_id), "the probe's report")
    assert out.get("http") == 200, out
    resolv = out["resolv_conf"]
    assert resolv.splitlines()[:2] == [f"nameserver {GATEWAY}", "search service.nomad nomad"]
    assert resolv == (data / "alloc" / alloc_id / "alloc" / "resolv.conf").read_text()
    assert out["web"] == [alloc_ip] and out["web.service.nomad"] == [alloc_ip]
    assert out["outside"] == [OUTSIDE_IP]
    assert OUTSIDE in upstream.asked  # forwarded by the agent, not asked elsewhere
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv  # the mount stayed private

    # From the host namespace, outside the bridge subnet: the zone, but no recursion.
    asked = len(upstream.asked)
    outside = ask_gateway(topology, OUTSIDE, topology.host_ip)
    assert outside.rcode() == dns.rcode.REFUSED
    zone = ask_gateway(topology, "web.service.nomad.", topology.host_ip)
    assert zone.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in zone.answer for r in rrset] == [alloc_ip]
    assert len(upstream.asked) == asked  # the refused name never went upstream

    status, _ = agent.http("DELETE", "/v1/job/web?purge=true")
    assert status == 200
    assert find_marked(alloc_id) == []
    assert agent.stop() == 0
