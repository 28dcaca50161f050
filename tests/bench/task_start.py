"""Task start benchmark: POST /v1/jobs to every allocation answering, vs a Nomad client.

    .venv/bin/python -m tests.bench.task_start [--counts 1,50] [--modes host,bridge]
                                               [--rounds 3] [--exits 10] [--json FILE]

Root.  One throwaway host namespace `<prefix>-h` (lo, and a veth `ext0` with the host
address 10.255.0.1/30 and the default route, as in tests/bench/net_setup.py; every
packet stays inside it).  In it run a waypost agent (`nsenter --net`, as a service
manager would start it, not --dev) and the peer driver (tests/bench/task_peer.py).
The task of both sides is the same tiny Python TCP server (`python -S`).

- **start**: waypost: the time from sending `POST /v1/jobs` (count N, host or bridge
  mode, one dynamic port, one service) to DNS answering N SRV records for the
  service *and* each of their ports accepting a TCP connection on the host address.
  Peer: the same, from asking the peer driver to start N allocations the way a
  Nomad client does (bridge: namespace + CNI ADD with Nomad's conflist, the task
  started inside with nsenter, the instance registered over the agent's HTTP API;
  host: the task started, registered), all N at once.  The agent's own DNS answers
  for both sides, so the same reader measures both.  Sides take turns within each
  round; between runs everything is stopped (waypost: DELETE ?purge=true).
  The first job after the agent's start also loads netsetup: it is timed apart.
- **exit**: a job of one task restarted by its policy (delay 200 ms); its process is
  SIGKILLed and the time until DNS stops answering for it is measured, `--exits` times.
- **memory**: the agent's RSS (VmRSS) with no job running (after the runs above, so
  warm) and with N tasks running (the largest count, host mode): the cost per task.

Targets (PASS/FAIL): one bridge allocation <= 150 ms, 50 <= 3 s; task exit -> out of
DNS <= 100 ms; agent memory per running task <= 200 KiB.  Everything this run made is
removed at the end, also after a failure or Ctrl-C: the agent stopped, jobs purged,
the peer's processes killed, every namespace with the run prefix removed; a task
process left over is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rdatatype

from discovery.tasks.process import find_marked
from netsetup.netns import call_in_namespace
from tests.agentproc import AgentProcess
from tests.bench.net_setup import HOST_IP, NETNS_DIR, make_host, sweep
from tests.bench.task_peer import SERVER

PYTHON = sys.executable
DEADLINE = 60.0  # seconds for one start to be answering on a busy machine
POLL = 0.002  # seconds between two looks at DNS
T = TypeVar("T")


def job(
    job_id: str, count: int, mode: str, restart: dict[str, Any] | None = None
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": "server",
        "Driver": "raw_exec",
        "Config": {
            "command": PYTHON,
            "args": ["-S", "-c", SERVER, "0.0.0.0", "${NOMAD_PORT_http}"],
        },
        "KillTimeout": 1_000_000_000,
    }
    port: dict[str, Any] = {"Label": "http"}
    if mode == "bridge":
        port["To"] = 8080
    group: dict[str, Any] = {
        "Name": "g",
        "Count": count,
        "Networks": [{"Mode": mode, "DynamicPorts": [port]}],
        "Services": [{"Name": job_id, "PortLabel": "http"}],
        "Tasks": [task],
    }
    if restart:
        group["RestartPolicy"] = restart
    return {"Job": {"ID": job_id, "TaskGroups": [group]}}


class Bench:
    """The agent and the peer in the host namespace, and probes from inside it."""

    def __init__(self, prefix: str, work: Path) -> None:
        self.prefix = prefix
        self.netns = str(NETNS_DIR / f"{prefix}-h")
        config = work / "agent.json"
        config.write_text(
            json.dumps(
                {
                    "advertise_addr": HOST_IP,
                    "client": {"network_interface": "ext0", "bridge_network_name": f"{prefix}b"},
                }
            )
        )
        args = ["--config", str(config), "--data-dir", str(work / "agent")]
        args += ["--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]
        self.agent = AgentProcess(args, netns=self.netns).started()
        self.data_dir = work / "agent"
        peer_argv = [PYTHON, "-m", "tests.bench.task_peer", "--netns", self.netns]
        peer_argv += ["--prefix", prefix, "--work", str(work), "--host-ip", HOST_IP]
        peer_argv += ["--http", str(self.agent.http_port)]
        self.peer = subprocess.Popen(
            peer_argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self._peer_call(None)  # the ready line

    def _peer_call(self, request: dict[str, Any] | None) -> Any:
        assert self.peer.stdin is not None and self.peer.stdout is not None
        if request is not None:
            self.peer.stdin.write(json.dumps(request) + "\n")
            self.peer.stdin.flush()
        line = self.peer.stdout.readline()
        if not line:
            raise RuntimeError("the peer driver exited")
        answer = json.loads(line)
        if request is not None and not answer.get("ok"):
            raise RuntimeError(f"peer: {answer.get('error')}")
        return answer.get("result", answer)

    def inside(self, fn: Callable[[], T]) -> T:
        return call_in_namespace(self.netns, fn)

    # -- probes (run inside the namespace) ----------------------------------------------

    def srv_ports(self, name: str) -> list[int]:
        query = dns.message.make_query(f"{name}.service.nomad", dns.rdatatype.SRV)
        # TCP: over UDP without EDNS at most 3 answers (udp_answer_limit)
        reply = dns.query.tcp(query, "127.0.0.1", port=self.agent.dns_port, timeout=5)
        return sorted(r.port for rrset in reply.answer for r in rrset)

    @staticmethod
    def listening(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex((HOST_IP, port)) == 0

    def wait_answering(self, name: str, n: int, start: float) -> float:
        """Seconds from `start` until `name` has n SRV answers whose ports all accept."""
        ready: set[int] = set()
        while time.perf_counter() - start < DEADLINE:
            ports = self.srv_ports(name)
            if len(ports) == n:
                ready |= {p for p in ports if p not in ready and self.listening(p)}
                if ready >= set(ports):
                    return time.perf_counter() - start
            time.sleep(POLL)
        raise RuntimeError(f"{name}: never {n} answering within {DEADLINE}s")

    def wait_gone(self, name: str, start: float) -> float:
        while time.perf_counter() - start < DEADLINE:
            if not self.srv_ports(name):
                return time.perf_counter() - start
            time.sleep(POLL / 2)
        raise RuntimeError(f"{name}: still in DNS after {DEADLINE}s")

    def http(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.agent.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"null")

    # -- the measured runs --------------------------------------------------------------

    def waypost_start(self, n: int, mode: str, name: str) -> float:
        def run() -> float:
            start = time.perf_counter()
            self.http("POST", "/v1/jobs", job(name, n, mode))
            took = self.wait_answering(name, n, start)
            self.http("DELETE", f"/v1/job/{name}?purge=true")
            self.wait_gone(name, time.perf_counter())
            return took

        return self.inside(run)

    def peer_start(self, n: int, mode: str, name: str) -> float:
        def run() -> float:
            start = time.perf_counter()
            self._peer_call({"op": "start", "n": n, "mode": mode, "service": name})
            took = self.wait_answering(name, n, start)
            self._peer_call({"op": "stop"})
            self.wait_gone(name, time.perf_counter())
            return took

        return self.inside(run)

    def exits(self, k: int) -> list[float]:
        restart = {"Attempts": 1000, "Interval": "30m", "Delay": "200ms", "Mode": "delay"}

        def run() -> list[float]:
            self.http("POST", "/v1/jobs", job("exit", 1, "host", restart))
            took = []
            for _ in range(k):
                self.wait_answering("exit", 1, time.perf_counter())
                (stub,) = self.http("GET", "/v1/job/exit/allocations")
                pid = self.http("GET", f"/v1/allocation/{stub['ID']}")["TaskStates"]["server"][
                    "Pid"
                ]
                os.kill(pid, signal.SIGKILL)
                took.append(self.wait_gone("exit", time.perf_counter()))
            self.http("DELETE", "/v1/job/exit?purge=true")
            return took

        return self.inside(run)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.agent.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def memory(self, n: int) -> tuple[int, int]:
        """(RSS with no job, RSS with n tasks running), KiB."""

        def run() -> tuple[int, int]:
            time.sleep(1.0)
            before = self.rss_kib()
            self.http("POST", "/v1/jobs", job("mem", n, "host"))
            self.wait_answering("mem", n, time.perf_counter())
            time.sleep(1.0)
            during = self.rss_kib()
            self.http("DELETE", "/v1/job/mem?purge=true")
            self.wait_gone("mem", time.perf_counter())
            return before, during

        return self.inside(run)

    def close(self) -> list[str]:
        """Stop everything; what was left (task processes still alive)."""
        left: list[str] = []
        with contextlib.suppress(Exception):
            self._peer_call({"op": "stop"})
        if self.peer.stdin:
            self.peer.stdin.close()
        try:
            self.peer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.peer.kill()
            self.peer.wait()
        with contextlib.suppress(Exception):
            for stub in self.inside(lambda: self.http("GET", "/v1/jobs")):
                self.inside(lambda s=stub: self.http("DELETE", f"/v1/job/{s['ID']}?purge=true"))
        self.agent.stop()
        allocs = self.data_dir / "alloc"
        for alloc in sorted(p.name for p in allocs.iterdir()) if allocs.is_dir() else []:
            for pid in find_marked(alloc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                left.append(f"task process {pid} of {alloc}")
        return left


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "wtb" + secrets.token_hex(2)
    results: dict[str, Any] = {"prefix": prefix, "start": {}, "exit": [], "memory": {}}
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    bench: Bench | None = None
    try:
        make_host(f"{prefix}-h")
        bench = Bench(prefix, work)
        counts = [int(c) for c in args.counts.split(",")]
        # The agent loads netsetup (pyroute2, its own loop, a reconcile) at its first job:
        # timed apart, then both sides are warm.
        modes = args.modes.split(",")
        results["first_job"] = bench.waypost_start(1, modes[-1], "warmw")
        bench.peer_start(1, modes[-1], "warmp")
        print(f"first job after the agent's start ({modes[-1]} x1): {ms(results['first_job'])}")
        for mode in modes:
            for n in counts:
                key = f"{mode} x{n}"
                series: dict[str, list[float]] = {"waypost": [], "peer": []}
                for r in range(args.rounds):
                    order = ("waypost", "peer") if r % 2 == 0 else ("peer", "waypost")
                    for side in order:
                        name = f"s{side[0]}{mode[0]}{n}r{r}"
                        run = bench.waypost_start if side == "waypost" else bench.peer_start
                        series[side].append(run(n, mode, name))
                results["start"][key] = series
                print(
                    f"{key:10} waypost median {ms(statistics.median(series['waypost']))}"
                    f"  peer median {ms(statistics.median(series['peer']))}",
                    flush=True,
                )
        results["exit"] = bench.exits(args.exits)
        top = max(counts)
        before, during = bench.memory(top)
        results["memory"] = {"tasks": top, "before_kib": before, "with_tasks_kib": during}
    finally:
        left: list[str] = []
        if bench is not None:
            left = bench.close()
        left += sweep(prefix)
        subprocess.run(["rm", "-rf", str(work)], check=False)
        results["left_over"] = left
    return results


def report(results: dict[str, Any]) -> None:
    print()
    print(f"{'start (to answering)':22} {'waypost':>22} {'Nomad-client path':>22} {'ratio':>7}")
    for key, series in results["start"].items():
        w, p = statistics.median(series["waypost"]), statistics.median(series["peer"])
        print(
            f"{key:22} {ms(w) + ' (max ' + ms(max(series['waypost'])) + ')':>22}"
            f" {ms(p) + ' (max ' + ms(max(series['peer'])) + ')':>22} {w / p:>6.2f}x"
        )
    exits = results["exit"]
    mem = results["memory"]
    per_task = (mem["with_tasks_kib"] - mem["before_kib"]) / mem["tasks"]
    print()
    targets = []
    if "bridge x1" in results["start"]:
        one = statistics.median(results["start"]["bridge x1"]["waypost"])
        targets.append((f"one bridge allocation {ms(one)}", "<= 150 ms", one <= 0.150))
    if "bridge x50" in results["start"]:
        fifty = statistics.median(results["start"]["bridge x50"]["waypost"])
        targets.append((f"50 bridge allocations {ms(fifty)}", "<= 3 s", fifty <= 3.0))
    worst = max(exits)
    targets.append(
        (
            f"task exit -> out of DNS: median {ms(statistics.median(exits))}, max {ms(worst)}"
            f" ({len(exits)} exits)",
            "<= 100 ms",
            worst <= 0.100,
        )
    )
    targets.append(
        (
            f"agent RSS {mem['before_kib']} KiB -> {mem['with_tasks_kib']} KiB with"
            f" {mem['tasks']} tasks: {per_task:.0f} KiB per task",
            "<= 200 KiB",
            per_task <= 200,
        )
    )
    for text, target, ok in targets:
        print(f"{verdict(ok)}  {text} (target {target})")
    if results["left_over"]:
        print("LEFT OVER:", results["left_over"])


@contextlib.contextmanager
def _sigterm_is_exit() -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,50")
    parser.add_argument("--modes", default="host,bridge")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exits", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("task_start: needs root (throwaway namespaces, bridge mode)")
    if "bridge" in args.modes and not Path("/usr/lib/cni/bridge").exists():
        sys.exit("task_start: the CNI plugins are missing (make bench-deps)")
    with _sigterm_is_exit():
        results = benchmark(args)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(1 if results["left_over"] else 0)


if __name__ == "__main__":
    main()
