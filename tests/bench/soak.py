"""Soak: DNS under load, registration churn and a job started and stopped every second.

    .venv/bin/python -m tests.bench.soak [--duration 60] [--rate 0] [--json FILE]

One agent process on 127.0.0.1 (free ports, a temp data dir, --dev so that its
tasks stop with it) with `make run`'s services and job.  First a 5 s dnsperf
run finds its maximum UDP QPS for `web.service.nomad`-style questions; then,
for `--duration` seconds
(bounded), at once:

- dnsperf at half that maximum (or `--rate`), paced, over a query file of the
  services' names (SRV and A, existing and missing ones);
- registration churn: a service registered and deregistered through the
  Consul API every 50 ms (py-consul's endpoint, plain urllib here);
- one host-mode job (one `sleep` task) registered and purged every second.

Figures: queries sent / answered / lost (target: none lost), the agent's RSS and
open file descriptors before and after (targets: RSS growth < 5 %, no fd growth,
both measured after the same warm-up), the churn's and the jobs' error counts.
Everything started is stopped, by pid; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.agentproc import ROOT, AgentProcess
from tests.bench.dns_perf import run_dnsperf

JOB = {
    "Job": {
        "ID": "soak",
        "TaskGroups": [
            {
                "Name": "g",
                "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": "p"}]}],
                "Services": [{"Name": "soak", "PortLabel": "p"}],
                "Tasks": [
                    {
                        "Name": "t",
                        "Driver": "raw_exec",
                        "Config": {"command": "sleep", "args": ["300"]},
                        "KillTimeout": 1_000_000_000,
                    }
                ],
            }
        ],
    }
}
QUERIES = [
    "web.service.nomad SRV",
    "web.service.nomad A",
    "api.service.nomad SRV",
    "v1.api.service.nomad SRV",
    "db.service.nomad SRV",
    "nope.service.nomad SRV",
    "vm.node.nomad A",
]


def status(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of `pid`."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Churn(threading.Thread):
    """Calls `step(n)` every `period` seconds until stopped; counts errors."""

    def __init__(self, period: float, step: Any) -> None:
        super().__init__(daemon=True)
        self.period, self.step = period, step
        self.stop_flag = threading.Event()
        self.done = self.errors = 0
        self.last_error = ""

    def run(self) -> None:
        n = 0
        while not self.stop_flag.wait(self.period):
            try:
                self.step(n)
                self.done += 1
            except Exception as exc:
                self.errors += 1
                self.last_error = repr(exc)
            n += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=0, help="QPS (default: half the maximum)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if shutil.which("dnsperf") is None:
        sys.exit("soak: dnsperf is missing (make bench-deps)")
    work = Path(tempfile.mkdtemp(prefix="waypost-soak-"))
    queryfile = work / "queries.txt"
    queryfile.write_text("\n".join(QUERIES) + "\n")
    agent = AgentProcess(
        [
            "--dev",  # its tasks stop with it
            "--config",
            str(ROOT / "examples/services.hcl"),
            "--job",
            str(ROOT / "examples/web.nomad.hcl"),
            "--data-dir",
            str(work / "data"),
            "--dns-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ]
    ).started()
    base = f"http://127.0.0.1:{agent.http_port}"

    def call(method: str, path: str, body: object = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()

    def churn(n: int) -> None:
        if n % 2 == 0:
            call("PUT", "/v1/agent/service/register", {"Name": "churn", "ID": "churn-1", "Port": n})
        else:
            call("PUT", "/v1/agent/service/deregister/churn-1")

    def jobs(n: int) -> None:
        if n % 2 == 0:
            call("POST", "/v1/jobs", JOB)
        else:
            call("DELETE", "/v1/job/soak?purge=true")

    results: dict[str, Any] = {}
    try:
        time.sleep(3.0)  # the example job's tasks up
        peak = run_dnsperf(agent.dns_port, str(queryfile), duration=5.0)
        rate = args.rate or max(1000, int(peak.qps / 2))
        warm = run_dnsperf(agent.dns_port, str(queryfile), duration=5.0, rate=rate)
        before = status(agent.pid)
        workers = [Churn(0.05, churn), Churn(1.0, jobs)]
        for w in workers:
            w.start()
        load = run_dnsperf(agent.dns_port, str(queryfile), duration=args.duration, rate=rate)
        for w in workers:
            w.stop_flag.set()
            w.join(timeout=60)
        if workers[1].done % 2:  # the last one was a run
            call("DELETE", "/v1/job/soak?purge=true")
        time.sleep(2.0)
        after = status(agent.pid)
        results = {
            "peak_qps": peak.qps,
            "rate": rate,
            "warmup_lost": warm.lost,
            "sent": load.sent,
            "completed": load.completed,
            "lost": load.lost,
            "qps": load.qps,
            "rcodes": load.rcodes,
            "rss_kib": [before[0], after[0]],
            "fds": [before[1], after[1]],
            "churn": [workers[0].done, workers[0].errors, workers[0].last_error],
            "jobs": [workers[1].done, workers[1].errors, workers[1].last_error],
        }
    finally:
        code = agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    growth = (results["rss_kib"][1] - results["rss_kib"][0]) / results["rss_kib"][0]
    peak, rate = results["peak_qps"], results["rate"]
    print(f"peak {peak:.0f} QPS; soak at {rate} QPS for {args.duration:.0f} s")
    print(
        f"{'PASS' if results['lost'] == 0 else 'FAIL'}  queries: {results['sent']} sent,"
        f" {results['completed']} answered, {results['lost']} lost; rcodes {results['rcodes']}"
    )
    print(
        f"{'PASS' if growth < 0.05 else 'FAIL'}  RSS {results['rss_kib'][0]} -> "
        f"{results['rss_kib'][1]} KiB ({growth * 100:+.1f} %)"
    )
    fds = results["fds"]
    print(f"{'PASS' if fds[1] <= fds[0] else 'FAIL'}  open fds {fds[0]} -> {fds[1]}")
    print(
        f"churn: {results['churn'][0]} writes, {results['churn'][1]} errors {results['churn'][2]}"
    )
    print(
        f"jobs: {results['jobs'][0]} runs/stops, {results['jobs'][1]} errors {results['jobs'][2]}"
    )
    print(f"agent exit status {code}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
