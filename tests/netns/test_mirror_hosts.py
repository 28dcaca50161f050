"""Three hosts sharing one Consul: what host A registers, host C answers for.  Root.

Four throwaway namespaces of this run (tests/netns/conftest.py's prefix and sweep):
a "lan" namespace holding a bridge and the Consul stand-in (10.99.0.1:8500, run by
tests/netns/mirror_driver.py), and hosts A, B and C, each an agent process
(`ip netns exec <host> python -m discovery agent`) with DNS and HTTP on its lan
address and a `consul` block naming the stand-in.  Each host's eth0 is a veth
whose peer sits on the lan bridge; all links are created from inside the
namespaces, so the machine's own namespace never sees one, which the test checks.
A service is registered through A's HTTP API (as an application would), looked up
with `dig SRV` run inside C against C's agent, and must leave C's answers when A
deregisters it.  Everything is stopped and removed at the end, failed or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.conftest import ROOT, delete_namespace, ns_socket, run

SUBNET = "10.99.0"  # inside the lan namespace only
CONSUL = f"{SUBNET}.1"
CONSUL_PORT = 8500
DNS_PORT, HTTP_PORT = 8600, 4646
HOSTS = {"a": f"{SUBNET}.11", "b": f"{SUBNET}.12", "c": f"{SUBNET}.13"}
READY_TIMEOUT = 60.0  # seconds for a process to serve (imports on a busy machine)
CONVERGE_TIMEOUT = 15.0  # seconds for a change on A to show on C
STOP_TIMEOUT = 10.0


def _root_links() -> list[str]:
    return sorted(link["ifname"] for link in json.loads(run("ip", "-j", "link", "show")))


@dataclass
class Lan:
    """The namespaces of one test: `lan` with the bridge, and one per host."""

    lan: str
    hosts: dict[str, str]  # "a" -> namespace

    def close(self) -> None:
        for ns in (*self.hosts.values(), self.lan):
            delete_namespace(ns)


def build_lan(prefix: str) -> Lan:
    lan = Lan(f"{prefix}-mlan", {h: f"{prefix}-m{h}" for h in HOSTS})
    try:
        run("ip", "netns", "add", lan.lan)
        run("ip", "-n", lan.lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lan.lan, "addr", "add", f"{CONSUL}/24", "dev", "br0")
        run("ip", "-n", lan.lan, "link", "set", "br0", "up")
        run("ip", "-n", lan.lan, "link", "set", "lo", "up")
        for host, ns in lan.hosts.items():
            run("ip", "netns", "add", ns)
            peer = f"v{host}"
            run(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                peer,
                "netns",
                lan.lan,
            )
            run("ip", "-n", ns, "addr", "add", f"{HOSTS[host]}/24", "dev", "eth0")
            run("ip", "-n", lan.lan, "link", "set", peer, "master", "br0")
            for dev_ns, dev in ((ns, "eth0"), (ns, "lo"), (lan.lan, peer)):
                run("ip", "-n", dev_ns, "link", "set", dev, "up")
    except BaseException:
        lan.close()
        raise
    return lan


class Process:
    """A process inside a namespace; stdout says "ready" (drivers) or a port answers."""

    def __init__(self, ns: str, argv: list[str], log: Path) -> None:
        self.ns = ns
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_listening(self, ip: str, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"{self.ns} exited:\n{self.log()}"
            with ns_socket(self.ns, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                if sock.connect_ex((ip, port)) == 0:
                    return
            assert time.monotonic() < deadline, f"{self.ns}: nothing on {ip}:{port}\n{self.log()}"
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when it does not go; by pid, ours (`ip netns exec` execs)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._log.close()


def agent_config(host: str, data_dir: Path) -> str:
    ip = HOSTS[host]
    return f"""
node_name = "host-{host}"
datacenter = "dc1"
bind_addr = "{ip}"
data_dir = "{data_dir}"
ports {{
  dns = {DNS_PORT}
  http = {HTTP_PORT}
}}
consul {{
  address = "{CONSUL}:{CONSUL_PORT}"
}}
"""


def http(ns: str, ip: str, method: str, path: str, body: object = None) -> int:
    """One HTTP/1.1 request from inside `ns`; the status code."""
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {ip}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    with ns_socket(ns, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect((ip, HTTP_PORT))
        sock.sendall(head.encode() + data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def dig_srv(ns: str, ip: str, name: str) -> list[tuple[int, str]]:
    """`dig SRV` run inside `ns` against the agent at ip: (port, target) of each answer."""
    out = run(
        "ip", "netns", "exec", ns, "dig", f"@{ip}", "-p", str(DNS_PORT), "+short", "+tries=1",
        "+time=2", name, "SRV",
    )  # fmt: skip
    answers = []
    for line in out.splitlines():
        _priority, _weight, port, target = line.split()
        answers.append((int(port), target))
    return sorted(answers)


def until(what: str, check: Callable[[], bool], logs: Callable[[], str]) -> float:
    """Poll `check` every 20 ms up to CONVERGE_TIMEOUT; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > CONVERGE_TIMEOUT:
            pytest.fail(f"{what}: not within {CONVERGE_TIMEOUT}s\n{logs()}")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def lan(run_prefix: str) -> Iterator[Lan]:
    before = _root_links()
    made = build_lan(run_prefix)
    try:
        yield made
    finally:
        made.close()
        assert _root_links() == before, "the machine's own namespace changed"


@pytest.fixture
def hosts(lan: Lan, tmp_path: Path) -> Iterator[dict[str, Process]]:
    started: dict[str, Process] = {}
    try:
        consul = Process(
            lan.lan,
            [
                sys.executable,
                "-m",
                "tests.netns.mirror_driver",
                "standin",
                CONSUL,
                str(CONSUL_PORT),
            ],
            tmp_path / "consul.log",
        )
        started["consul"] = consul
        consul.wait_listening(CONSUL, CONSUL_PORT)
        for host, ns in lan.hosts.items():
            config = tmp_path / f"{host}.hcl"
            config.write_text(agent_config(host, tmp_path / f"data-{host}"))
            argv = [sys.executable, "-m", "discovery", "agent", "--config", str(config)]
            started[host] = Process(ns, argv, tmp_path / f"{host}.log")
        for host in lan.hosts:
            started[host].wait_listening(HOSTS[host], HTTP_PORT)
        yield started
    finally:
        for process in reversed(started.values()):
            process.stop()


def test_a_service_registered_on_a_answers_on_c(lan: Lan, hosts: dict[str, Process]) -> None:
    a, b, c = (lan.hosts[h] for h in "abc")

    def logs() -> str:
        return "\n".join(f"--- {name}\n{proc.log()}" for name, proc in hosts.items())

    assert dig_srv(c, HOSTS["c"], "web.service.nomad") == []
    web = {"Name": "web", "ID": "web-1", "Port": 8080, "Address": HOSTS["a"]}
    assert http(a, HOSTS["a"], "PUT", "/v1/agent/service/register", web) == 200
    took = until(
        "web on C",
        lambda: [p for p, _ in dig_srv(c, HOSTS["c"], "web.service.nomad")] == [8080],
        logs,
    )
    print(f"A -> C: {took * 1000:.0f} ms")
    assert dig_srv(b, HOSTS["b"], "web.service.nomad")[0][0] == 8080  # B too
    assert [p for p, _ in dig_srv(a, HOSTS["a"], "web.service.nomad")] == [8080]  # A: once

    other = {"Name": "web", "ID": "web-2", "Port": 8081, "Address": HOSTS["b"]}
    assert http(b, HOSTS["b"], "PUT", "/v1/agent/service/register", other) == 200
    until(
        "both on C",
        lambda: [p for p, _ in dig_srv(c, HOSTS["c"], "web.service.nomad")] == [8080, 8081],
        logs,
    )

    assert http(a, HOSTS["a"], "PUT", "/v1/agent/service/deregister/web-1") == 200
    until(
        "web-1 gone from C",
        lambda: [p for p, _ in dig_srv(c, HOSTS["c"], "web.service.nomad")] == [8081],
        logs,
    )
    until(
        "web-1 gone from A",
        lambda: [p for p, _ in dig_srv(a, HOSTS["a"], "web.service.nomad")] == [8081],
        logs,
    )
