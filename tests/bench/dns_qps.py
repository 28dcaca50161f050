"""DNS benchmark: waypost against Knot DNS and dnsmasq, same data, same run.  Composition root.

For each size N (services x 3 instances) the three servers get the same
records and the same query file (70% SRV, 20% A, 10% NXDOMAIN, fixed seed).
They run side by side pinned to core 0 but only one is loaded at a time, by
dnsperf on core 1: a full-speed run (max UDP QPS) and a run paced at 5,000 QPS
(p50/p99 from dnsperf's per-query latencies), in interleaved rounds.  Sample
answers are compared with Knot's (dnspython) and waypost's answer order must
vary.  Then, in-process at each N, the time until a registry change is
visible over DNS; and waypost's RSS at N=10000.

Targets are printed PASS/FAIL and never change the exit status; only a
server or tool that cannot run makes it non-zero.  See tests/bench/README.md.

    .venv/bin/python -m tests.bench.dns_qps [--sizes 10,1000,10000] [--duration 10]
        [--rounds 3] [--quick] [--servers knot,dnsmasq,waypost] [--waypost cli|inproc]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.bench import dns_checks, dns_data
from tests.bench.dns_perf import CLIENT_CORE, percentile, run_dnsperf
from tests.bench.dns_report import (
    NOTES,
    PACED_RATE,
    Measurement,
    Report,
    Round,
    paced_latencies,
    plan_measurement,
    render_table,
    render_verdicts,
)
from tests.bench.dns_servers import (
    IDLE_TIMEOUT,
    REPO,
    SERVER_CORE,
    Server,
    start_dnsmasq,
    start_knot,
    start_waypost,
)

KINDS = ("knot", "dnsmasq", "waypost")
REALTIME_SCOPE = {
    "off": "nothing",
    "paced": "paced runs and change timing",
    "all": "every measured run",
}
# Before each measured run: one pass through the query file at full speed (every name
# asked once, so every server has seen every question), stopped after WARMUP_MAX seconds.
WARMUP_MAX = 20.0
REALTIME_MIN_HEADROOM = 2  # paced runs go SCHED_FIFO only if the server did 2x the rate
CHANGE_TIMEOUT = 300.0  # seconds for the in-process change measurement


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.dns_qps",
        description="waypost vs Knot DNS vs dnsmasq on one core each (tests/bench/README.md)",
    )
    parser.add_argument("--sizes", help="comma-separated service counts (default 10,1000,10000)")
    parser.add_argument("--duration", type=float, help="seconds per dnsperf run (default 10)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per server (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="defaults become sizes 10,1000, 3 s, 1 round"
    )
    parser.add_argument("--servers", default=",".join(KINDS), help="subset of " + ",".join(KINDS))
    parser.add_argument(
        "--waypost",
        choices=["auto", "cli", "inproc"],
        default="auto",
        help="the agent CLI (python -m discovery agent), the in-process fallback "
        "(tests/bench/dns_inproc.py), or auto: the CLI when discovery.cli exists",
    )
    parser.add_argument(
        "--realtime",
        choices=["off", "paced", "all"],
        default="paced",
        help="which runs make the server and dnsperf SCHED_FIFO (default: the paced "
        "latency runs and the change timing; 'all' also the full-speed runs, which "
        "starves other processes on both cores while they last)",
    )
    parser.add_argument("--changes", type=int, default=50, help="registry changes to time")
    parser.add_argument("--json", default="", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = args.sizes or ("10,1000" if quick else "10,1000,10000")
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.rounds = args.rounds or (1 if quick else 3)
    args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.server_list = [s for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_list) - set(KINDS)
    if unknown:
        parser.error(f"unknown server {sorted(unknown)[0]!r}; choose from {', '.join(KINDS)}")
    if args.waypost == "auto":
        args.waypost = "cli" if importlib.util.find_spec("discovery.cli") else "inproc"
    return args


def _starter(kind: str, inproc: bool) -> Callable[[Sequence[dns_data.BenchInstance]], Server]:
    if kind == "knot":
        return start_knot
    if kind == "dnsmasq":
        return start_dnsmasq
    return lambda instances: start_waypost(instances, inproc=inproc)


def run_round(server: Server, queryfile: str, duration: float, realtime: str) -> Round:
    """Warm up, then the full-speed run (with the server's CPU use) and the paced run.

    `realtime` ("off", "paced", "all") says which runs put the server and
    dnsperf in SCHED_FIFO, so other processes on a shared host cannot preempt them.
    """
    run_dnsperf(server.port, queryfile, duration=WARMUP_MAX, passes=1)
    peak_rt = realtime == "all"
    with server.realtime(peak_rt):
        cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
        peak = run_dnsperf(server.port, queryfile, duration=duration, realtime=peak_rt)
        cpu_share = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    # A server that cannot sustain the paced rate would sit at 100% CPU in SCHED_FIFO and
    # starve the rest of the host; its latency is queueing anyway, so it runs normally.
    paced_rt = realtime != "off" and peak.qps >= REALTIME_MIN_HEADROOM * PACED_RATE
    with server.realtime(paced_rt):
        paced = run_dnsperf(
            server.port,
            queryfile,
            duration=duration,
            rate=PACED_RATE,
            verbose=True,
            realtime=paced_rt,
        )
    # dnsmasq cannot keep up with the paced rate at N=10000: it answers its backlog for
    # seconds after dnsperf exits, on the core the next server is measured on.
    if not server.wait_idle():
        _progress(f"{server.name} still busy {IDLE_TIMEOUT:g} s after its run")
    return Round(peak, cpu_share, paced)


def check_answers(report: Report, servers: dict[str, Server], size: int) -> None:
    """Sample answers, Knot's as the reference; waypost's order must vary."""
    samples = dns_checks.plan_samples(size)
    got = {kind: dns_checks.collect(server.port, samples) for kind, server in servers.items()}
    reference = got.get("knot")
    for kind in servers:
        if kind != "knot" and reference is not None:
            report.mismatches[(kind, size)] = dns_checks.compare(reference, got[kind])
    if "waypost" in servers:
        name = f"{dns_data.service_name(1)}.service.{dns_data.DOMAIN}"
        for qtype in ("SRV", "A"):
            port = servers["waypost"].port
            report.orders[(qtype, size)] = dns_checks.distinct_orders(port, name, qtype)


def _start_all(
    stack: contextlib.ExitStack, args: argparse.Namespace, size: int, report: Report
) -> dict[str, Server]:
    instances = dns_data.plan_instances(size)
    servers: dict[str, Server] = {}
    for kind in args.server_list:
        _progress(f"N={size}: starting {kind}")
        try:
            server = _starter(kind, args.waypost == "inproc")(instances)
        except Exception as exc:
            report.errors.append(f"N={size} {kind}: {type(exc).__name__}: {exc}")
            continue
        stack.callback(server.close)
        servers[kind] = server
    return servers


def run_size(size: int, args: argparse.Namespace, report: Report, workdir: Path) -> None:
    """Every selected server at one size; rounds interleave the servers."""
    queryfile = workdir / f"queries-{size}.txt"
    queryfile.write_text(dns_data.render_queries(dns_data.plan_queries(size)))
    with contextlib.ExitStack() as stack:
        servers = _start_all(stack, args, size, report)
        try:
            check_answers(report, servers, size)
        except Exception as exc:
            report.errors.append(f"N={size} answer check: {type(exc).__name__}: {exc}")
        rss_start = {kind: server.rss_kib() for kind, server in servers.items()}
        rounds: dict[str, list[Round]] = {kind: [] for kind in servers}
        for n in range(args.rounds):
            for kind, server in servers.items():
                _progress(f"N={size}: round {n + 1}/{args.rounds} {kind}")
                try:
                    rounds[kind].append(
                        run_round(server, str(queryfile), args.duration, args.realtime)
                    )
                except Exception as exc:
                    report.errors.append(f"N={size} {kind}: {type(exc).__name__}: {exc}")
        for kind, done in rounds.items():
            if done:
                rss = servers[kind].rss_kib() if servers[kind].alive() else 0
                measured = plan_measurement(kind, size, done, rss, rss_start[kind])
                report.measurements.append(measured)


def run_change(services: int, changes: int, realtime: bool) -> dict[str, Any]:
    """The in-process registry-change measurement, as a child pinned to the server core."""
    command = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "tests.bench.dns_change"]
    command += ["--services", str(services), "--changes", str(changes)]
    if realtime:
        command.append("--realtime")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHANGE_TIMEOUT, check=False, cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _progress(text: str) -> None:
    print(f"  {text} ...", file=sys.stderr, flush=True)


def render_header(args: argparse.Namespace, argv: Sequence[str]) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = Path("/proc/loadavg").read_text().split()[0]
    return (
        f"DNS benchmark {now}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load {load}\n"
        f"command: .venv/bin/python -m tests.bench.dns_qps {shlex.join(argv)}\n"
        f"N = {','.join(map(str, args.size_list))} services x {dns_data.INSTANCES_PER_SERVICE} "
        f"instances; {args.rounds} round(s) of {args.duration:g} s runs; "
        f"SCHED_FIFO for: {REALTIME_SCOPE[args.realtime]}; "
        f"waypost via {'the agent CLI' if args.waypost == 'cli' else 'tests/bench/dns_inproc.py'}"
    )


def _dump(report: Report, path: str) -> None:
    def row(m: Measurement) -> dict[str, Any]:
        return {
            "server": m.server,
            "size": m.size,
            "qps": [r.peak.qps for r in m.rounds],
            "cpu_share": [r.cpu_share for r in m.rounds],
            "p50": [percentile(paced_latencies(r.paced), 50) for r in m.rounds],
            "p99": [percentile(paced_latencies(r.paced), 99) for r in m.rounds],
            "lost": [[r.peak.lost, r.paced.lost] for r in m.rounds],
            "rcodes": [r.peak.rcodes for r in m.rounds],
            "rss_kib": m.rss_kib,
            "rss_start_kib": m.rss_start_kib,
            "commands": [list(m.best_peak.peak.command), list(m.best_paced.paced.command)],
        }

    doc: dict[str, Any] = {
        "measurements": [row(m) for m in report.measurements],
        "changes": {str(n): dict(c) for n, c in report.changes.items()},
        "errors": report.errors,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("dns_qps needs 2 CPUs (servers on core 0, dnsperf on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})  # keep this process off the servers' core
    # SIGTERM unwinds like Ctrl-C, so every server is ended and every temp dir removed.
    signal.signal(signal.SIGTERM, _terminated)
    print(render_header(args, argv), flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        for size in args.size_list:
            try:
                run_size(size, args, report, Path(tmp))
            except Exception as exc:  # report what was measured so far
                report.errors.append(f"N={size}: {type(exc).__name__}: {exc}")
    if "waypost" in args.server_list and args.changes > 0:
        realtime = args.realtime != "off"
        for size in args.size_list:
            _progress(f"N={size}: registry change x{args.changes}")
            try:
                report.changes[size] = run_change(size, args.changes, realtime)
            except Exception as exc:
                report.errors.append(f"N={size} registry change: {type(exc).__name__}: {exc}")
    print()
    print(render_table(report, args.size_list, args.server_list))
    print()
    for line in render_verdicts(report, args.size_list):
        print(line)
    print()
    print(NOTES)
    for error in report.errors:
        print(f"ERROR {error}")
    if args.json:
        _dump(report, args.json)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
