"""The real agent as a process: `python -m discovery agent` on 127.0.0.1:0, queried by dnspython.

Covers start-up (the bound port is read from stderr), SIGHUP reloads (new
services and DNS settings served, removed ones gone, no query lost while it
happens), a bad config on SIGHUP (old one kept) and at start (exit 2, nothing
bound), and shutdown on SIGTERM/SIGINT (exit 0).  Only processes started here
are signalled, by their pid.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

PYTHON = sys.executable  # .venv/bin/python when the suite runs through .venv/bin/pytest
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 15.0  # seconds for the agent to start, reload or stop; it takes well under one
QUERY_TIMEOUT = 2.0  # a reply on loopback takes milliseconds
LISTENING = re.compile(r"^waypost: dns listening on 127\.0\.0\.1:(\d+) \(udp\+tcp\)$")

WEB = """\
service {
  name = "web"
  id   = "web-1"
  port = 8081
  tags = ["primary"]
}
service {
  name = "web"
  id   = "web-2"
  port = 8082
}
dns {
  service_ttl = "5s"
}
"""

API = """\
service {
  name = "api"
  id   = "api-1"
  port = 9090
}
dns {
  service_ttl = { "api" = "30s" }
}
"""

BAD_PORT = """\
service {
  name = "web"
  id   = "web-1"
  port = 70000
}
"""
BAD_LINE = 4


class Agent:
    """A running agent process; stderr is read by a thread into a queue of lines."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "discovery", "agent", *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """Wait for a stderr line matching `pattern` (search); fails after DEADLINE."""
        end = time.monotonic() + DEADLINE
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.stderr.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        pytest.fail(f"no stderr line matching {pattern!r}; stderr so far: {self.stderr}")

    def started(self) -> Agent:
        self.port = int(self.expect(LISTENING)[1])
        return self

    def query(self, name: str, rdtype: str = "SRV", *, tcp: bool = False) -> dns.message.Message:
        request = dns.message.make_query(name, rdtype)
        ask = dns.query.tcp if tcp else dns.query.udp
        return ask(request, "127.0.0.1", port=self.port, timeout=QUERY_TIMEOUT)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def exit_code(self) -> int:
        return self.proc.wait(timeout=DEADLINE)

    def rest_of_stderr(self) -> list[str]:
        """Every stderr line up to EOF (call once the process has exited)."""
        self._reader.join(timeout=DEADLINE)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return self.stderr
            if line is not None:
                self.stderr.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "agent.hcl"


@pytest.fixture
def run_agent(tmp_path: Path, config: Path) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def run(*extra: str, dns_addr: str = "127.0.0.1:0") -> Agent:
        args = ["--dev", "--dns-addr", dns_addr, "--http-addr", "127.0.0.1:0"]
        args += ["--data-dir", str(tmp_path / "data")]
        agent = Agent([*args, "--config", str(config), *extra])
        started.append(agent)
        return agent

    yield run
    for agent in started:
        agent.kill()


def replace_config(path: Path, text: str) -> None:
    """Write atomically, as editors and config managers do, so a reload never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def srv(reply: dns.message.Message) -> list[tuple[int, int]]:
    """(port, ttl) of each SRV answer, sorted."""
    return sorted(
        (rr.port, rrset.ttl)
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for rr in rrset
    )


# -- start and stop --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_configured_services_then_exits_0(
    run_agent: Callable[..., Agent], config: Path, sig: signal.Signals
) -> None:
    config.write_text(WEB)
    agent = run_agent().started()
    for tcp in (False, True):
        reply = agent.query("web.service.nomad", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert srv(reply) == [(8081, 5), (8082, 5)]
    tagged = agent.query("primary.web.service.nomad")
    assert srv(tagged) == [(8081, 5)]
    assert agent.query("api.service.nomad").rcode() == dns.rcode.NXDOMAIN
    agent.signal(sig)
    assert agent.exit_code() == 0
    assert "waypost: shutting down" in agent.rest_of_stderr()


def test_bad_config_at_start_exits_2_before_binding(
    run_agent: Callable[..., Agent], config: Path
) -> None:
    config.write_text(BAD_PORT)
    # Hold the port the agent is told to use: had it tried to bind, it would
    # fail with "cannot listen" and exit 1; the config error must come first.
    with held_port() as port:
        agent = run_agent(dns_addr=f"127.0.0.1:{port}")
        assert agent.exit_code() == 2
    assert agent.rest_of_stderr() == [
        f"waypost: {config}:{BAD_LINE}: service[0].port: 70000 is out of range 0-65535"
    ]


def test_port_in_use_exits_1(run_agent: Callable[..., Agent], config: Path) -> None:
    config.write_text(WEB)
    with held_port() as port:
        agent = run_agent(dns_addr=f"127.0.0.1:{port}")
        assert agent.exit_code() == 1
    stderr = agent.rest_of_stderr()
    assert any(
        "cannot listen" in line and f"127.0.0.1:{port}" in line and "DNS" in line for line in stderr
    ), stderr


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port bound here for UDP and TCP, so that nobody else can bind it."""
    for _ in range(20):  # port 0 picks for UDP; TCP may have it taken, then try another
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                tcp.listen()
                yield port
                return
    raise AssertionError("no free loopback port for UDP and TCP")


# -- SIGHUP --------------------------------------------------------------------------


class QueryLoop:
    """Queries `name` over UDP in a thread, back to back, recording each outcome in order."""

    MAX_QUERIES = 5000  # bounds the loop even if stop() is never reached
    MAX_SECONDS = 30.0

    def __init__(self, agent: Agent, name: str) -> None:
        self.agent = agent
        self.name = name
        self.outcomes: list[str] = []  # rcode text, or "timeout" / the exception
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.MAX_SECONDS
        while not self._stop.is_set() and len(self.outcomes) < self.MAX_QUERIES:
            if time.monotonic() > end:
                break
            try:
                reply = self.agent.query(self.name)
                self.outcomes.append(dns.rcode.to_text(reply.rcode()))
            except dns.exception.Timeout:
                self.outcomes.append("timeout")
            except Exception as exc:  # recorded, and the test fails on it
                self.outcomes.append(repr(exc))

    def start(self) -> QueryLoop:
        self._thread.start()
        return self

    def wait_for(self, count: int) -> None:
        """Until `count` more outcomes are in (bounded by DEADLINE)."""
        target = len(self.outcomes) + count
        end = time.monotonic() + DEADLINE
        while len(self.outcomes) < target and time.monotonic() < end:
            time.sleep(0.01)
        assert len(self.outcomes) >= target, f"only {len(self.outcomes)} queries answered"

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=DEADLINE)
        assert not self._thread.is_alive()
        return self.outcomes


def test_sighup_swaps_services_and_settings_without_losing_queries(
    run_agent: Callable[..., Agent], config: Path
) -> None:
    config.write_text(WEB)
    agent = run_agent().started()
    loop = QueryLoop(agent, "web.service.nomad").start()
    try:
        loop.wait_for(50)
        replace_config(config, API)
        agent.signal(signal.SIGHUP)
        agent.expect(r"^waypost: config reloaded: 1 services from 1 files$")
        loop.wait_for(50)
    finally:
        outcomes = loop.stop()
    # Every query answered; web was served until the swap and is gone after it.
    assert set(outcomes) == {"NOERROR", "NXDOMAIN"}, set(outcomes)
    first_gone = outcomes.index("NXDOMAIN")
    assert set(outcomes[:first_gone]) == {"NOERROR"}
    assert set(outcomes[first_gone:]) == {"NXDOMAIN"}
    # The new service is served with the new DNS settings (its TTL).
    assert srv(agent.query("api.service.nomad")) == [(9090, 30)]
    assert srv(agent.query("api.service.nomad", tcp=True)) == [(9090, 30)]
    assert agent.query("web.service.nomad").rcode() == dns.rcode.NXDOMAIN
    assert agent.proc.poll() is None
    agent.signal(signal.SIGTERM)
    assert agent.exit_code() == 0


def test_bad_config_on_sighup_keeps_the_running_one(
    run_agent: Callable[..., Agent], config: Path
) -> None:
    config.write_text(WEB)
    agent = run_agent().started()
    replace_config(config, BAD_PORT)
    agent.signal(signal.SIGHUP)
    agent.expect(
        re.escape(
            "waypost: error: reload failed, keeping the running config: "
            f"{config}:{BAD_LINE}: service[0].port: 70000 is out of range 0-65535"
        )
    )
    assert srv(agent.query("web.service.nomad")) == [(8081, 5), (8082, 5)]
    assert agent.proc.poll() is None
    # A config that is fixed later is picked up by the next SIGHUP.
    replace_config(config, API)
    agent.signal(signal.SIGHUP)
    agent.expect(r"^waypost: config reloaded: 1 services from 1 files$")
    assert srv(agent.query("api.service.nomad")) == [(9090, 30)]
    assert agent.query("web.service.nomad").rcode() == dns.rcode.NXDOMAIN


def test_sighup_rereads_a_config_directory(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "10-web.hcl").write_text(WEB)
    args = ["--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
    args += ["--data-dir", str(tmp_path / "d"), "--config", str(conf)]
    agent = Agent(args)
    try:
        agent.started()
        (conf / "20-api.json").write_text('{"service": {"name": "api", "port": 9090}}')
        agent.signal(signal.SIGHUP)
        agent.expect(r"^waypost: config reloaded: 3 services from 2 files$")
        assert srv(agent.query("api.service.nomad")) == [(9090, 5)]
        assert srv(agent.query("web.service.nomad")) == [(8081, 5), (8082, 5)]
        agent.signal(signal.SIGTERM)
        assert agent.exit_code() == 0
    finally:
        agent.kill()


def test_reload_keeps_what_needs_a_restart(run_agent: Callable[..., Agent], config: Path) -> None:
    config.write_text('node_name = "first"\n' + WEB)
    agent = run_agent().started()
    targets = {str(rr.target) for rr in agent.query("web.service.nomad").answer[0]}
    assert targets == {"first.node.dc1.nomad."}
    replace_config(config, 'node_name = "second"\ndatacenter = "east"\n' + WEB)
    agent.signal(signal.SIGHUP)
    agent.expect(r"^waypost: warning: node_name changed to second; restart waypost to apply it$")
    agent.expect(r"^waypost: config reloaded: 2 services from 1 files$")
    # The node stays; the datacenter, a DNS setting, changes at once.
    reply = agent.query("web.service.nomad")
    assert {str(rr.target) for rr in reply.answer[0]} == {"first.node.east.nomad."}
    assert agent.query("web.service.dc1.nomad").rcode() == dns.rcode.NXDOMAIN
    assert agent.query("second.node.nomad", "A").rcode() == dns.rcode.NXDOMAIN


def test_reload_never_logs_tokens(run_agent: Callable[..., Agent], config: Path) -> None:
    acl = 'acl {{\n  enabled = true\n  tokens = {{\n    "{}" = "write"\n  }}\n}}\n'
    first, second = "first-secret-token-1", "second-secret-token-2"
    config.write_text(acl.format(first) + WEB)
    agent = run_agent().started()
    replace_config(config, acl.format(second) + WEB)
    agent.signal(signal.SIGHUP)
    agent.expect(r"^waypost: warning: acl changed; restart waypost to apply it$")
    agent.expect(r"^waypost: config reloaded")
    agent.signal(signal.SIGTERM)
    assert agent.exit_code() == 0
    logged = "\n".join(agent.rest_of_stderr())
    assert first not in logged and second not in logged


def test_net_command_is_netsetups(tmp_path: Path) -> None:
    """`waypost net ...` is netsetup's command line (here `list` of an empty state)."""
    done = subprocess.run(
        [PYTHON, "-m", "discovery", "net", "list", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
    bad = subprocess.run(
        [PYTHON, "-m", "discovery", "net", "up", "--alloc", "a1", "--port", "x:1:2:3"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert bad.returncode == 2 and "LABEL[:STATIC][:TO]" in bad.stderr
