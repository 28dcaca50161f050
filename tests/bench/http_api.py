"""HTTP API benchmark: lookups vs nginx, blocked watchers, registrations.  Composition root.

1. lookup: `GET /v1/health/service/web?passing` with wrk against the agent
   and, in the same run, against nginx serving the agent's very body from a
   file (the ceiling for an HTTP JSON lookup on this host); full speed
   (requests/s, target >= 0.3x nginx) and paced at 2,000 req/s (p50/p99,
   target p99 <= 5 ms), in interleaved rounds.
2. watchers: 10,000 blocking GETs on that service from one client process;
   once the agent reports them all blocked, one registration; the time until
   every watcher has its answer (target <= 500 ms) and the agent's memory
   per watcher.
3. registrations: PUT /v1/agent/service/register with a TTL check from 64
   wrk connections for --duration seconds, each acknowledged once durable
   (target >= 2,000/s); then SIGKILL, restart, and every acknowledged one
   must be back.

Servers run pinned to core 0, clients to core 1; every process started is
ended by pid, every temp dir removed, traffic only to 127.0.0.1.  Targets
are printed PASS/FAIL and never change the exit status; it is 1 only when a
server or tool could not run (listed as ERROR lines).  See tests/bench/README.md.

    .venv/bin/python -m tests.bench.http_api [--quick] [--duration 10] [--rounds 3]
        [--watchers 10000] [--connections 64] [--only lookup,watchers,registrations]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.bench.dns_servers import Server, set_realtime
from tests.bench.http_profile import (
    FAST_SAMPLE_RATE,
    SAMPLE_RATE,
    py_spy,
    render_profiles,
    start_py_spy,
)
from tests.bench.http_report import (
    NOTES,
    PACED_CONNECTIONS,
    PACED_RATE,
    PEAK_CONNECTIONS,
    Lookup,
    RegisterResult,
    Report,
    Round,
    WatchResult,
    best_register,
    best_watch,
    parse_metric,
    render_lookup,
    render_register,
    render_verdicts,
    render_watch,
)
from tests.bench.http_servers import (
    CLIENT_CORE,
    REPO,
    WEB,
    http_get,
    http_put,
    restart_agent,
    start_agent,
    start_nginx,
)
from tests.bench.http_watchers import FD_MARGIN, ensure_nofile, start_watchers
from tests.bench.http_wrk import REGISTER_PATH, run_wrk, wrk_version

BENCHMARKS = ("lookup", "watchers", "registrations")
REALTIME_SCOPE = {"off": "nothing", "paced": "the paced lookup runs", "all": "every measured run"}
LOOKUP_PATH = f"/v1/health/service/{WEB}?passing"
WARMUP = 1.0  # seconds of full-speed load before each measured run
REALTIME_MIN_HEADROOM = 2  # paced runs go SCHED_FIFO only if the server did 2x the rate
BLOCK_TIMEOUT = 120.0  # seconds for all watchers to be connected and blocked
ANSWER_DEADLINE = 60.0  # seconds for all watchers to be answered after the change
METRICS_POLL = 0.1  # seconds between gauge reads
SETTLE = 1.0  # seconds for the agent to drop closed watcher connections before RSS
CHANGE_ID = "web-watch-change"
PROFILE_WATCH = 3.0  # seconds py-spy samples around the watchers' wake-up
PROFILE_ATTACH = 0.5  # seconds for py-spy to attach before the change
PROFILE_SLACK = 30.0  # seconds py-spy may take beyond its duration to write its file
BENCH_PREFIX = "bench-"  # IDs of the registration benchmark's instances


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.http_api",
        description="waypost's HTTP API: lookups vs nginx, blocked watchers, registrations "
        "(tests/bench/README.md)",
    )
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, help="rounds of each benchmark (default 3)")
    parser.add_argument("--quick", action="store_true", help="defaults become 3 s runs, 1 round")
    parser.add_argument("--watchers", type=int, default=10_000, help="blocked watchers")
    parser.add_argument(
        "--connections", type=int, default=64, help="wrk connections registering at once"
    )
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="subset of " + ",".join(BENCHMARKS)
    )
    parser.add_argument(
        "--realtime",
        choices=["off", "paced", "all"],
        default="paced",
        help="SCHED_FIFO for the server and its client during the paced latency runs "
        "(default), never, or every measured run ('all' starves other processes on both "
        "cores while a run lasts: for a dedicated host)",
    )
    parser.add_argument("--json", default="", help="also write the raw results to this file")
    parser.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="after the measured runs, one more of each benchmark with py-spy sampling the "
        "agent; raw stacks go to DIR/<benchmark>.raw and a summary is printed",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.benchmarks = [b for b in args.only.split(",") if b.strip()]
    unknown = set(args.benchmarks) - set(BENCHMARKS)
    if unknown:
        parser.error(
            f"unknown benchmark {sorted(unknown)[0]!r}; choose from {', '.join(BENCHMARKS)}"
        )
    return args


def _progress(text: str) -> None:
    print(f"  {text} ...", file=sys.stderr, flush=True)


# -- 1. lookup --------------------------------------------------------------------------------


def lookup_round(server: Server, duration: float, realtime: str) -> Round:
    """Warm up, a full-speed run (with the server's CPU share), then the paced run.

    `realtime` ("off", "paced", "all") says which runs put the server and wrk in SCHED_FIFO.
    """
    run_wrk(server.port, LOOKUP_PATH, duration=WARMUP, connections=PEAK_CONNECTIONS)
    peak_rt = realtime == "all"
    with server.realtime(peak_rt):
        cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
        peak = run_wrk(
            server.port,
            LOOKUP_PATH,
            duration=duration,
            connections=PEAK_CONNECTIONS,
            realtime=peak_rt,
        )
        share = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    # A server that cannot do twice the rate would sit at 100% CPU in SCHED_FIFO and
    # starve the host; its latency is queueing anyway, so it runs normally.
    headroom = peak.ok_rate >= REALTIME_MIN_HEADROOM * PACED_RATE
    paced_rt = peak_rt or (realtime == "paced" and headroom)
    with server.realtime(paced_rt):
        paced = run_wrk(
            server.port,
            LOOKUP_PATH,
            duration=duration,
            connections=PACED_CONNECTIONS,
            rate=PACED_RATE,
            realtime=paced_rt,
        )
    return Round(peak, share, paced, paced_rt)


def run_lookup(args: argparse.Namespace, report: Report) -> None:
    with contextlib.ExitStack() as stack:
        _progress("lookup: starting the agent")
        agent = start_agent()
        stack.callback(agent.close)
        reply = http_get(agent.port, LOOKUP_PATH)
        if reply.status != 200:
            raise RuntimeError(
                f"agent answered {reply.status} to GET {LOOKUP_PATH}: {reply.body[:200]!r}"
            )
        content_type = reply.headers.get("Content-Type", "")
        _progress("lookup: starting nginx with the agent's body")
        nginx = start_nginx(LOOKUP_PATH.partition("?")[0], reply.body, content_type)
        stack.callback(nginx.close)
        mirrored = http_get(nginx.port, LOOKUP_PATH)
        report.body_identical = (
            mirrored.status == 200
            and mirrored.body == reply.body
            and mirrored.headers.get("Content-Type") == content_type
        )
        servers = {"waypost": agent, "nginx": nginx}
        rounds: dict[str, list[Round]] = {name: [] for name in servers}
        for n in range(args.rounds):
            for name, server in servers.items():
                _progress(f"lookup: round {n + 1}/{args.rounds} {name}")
                rounds[name].append(lookup_round(server, args.duration, args.realtime))
        for name, server in servers.items():
            report.lookups.append(
                Lookup(name, tuple(rounds[name]), server.rss_kib(), len(reply.body))
            )
        if args.profile:
            _progress("lookup: one more full-speed run, profiled")
            out = Path(args.profile) / "lookup.raw"
            spy = start_py_spy(agent.pid, args.duration, out)
            try:
                run_wrk(
                    agent.port, LOOKUP_PATH, duration=args.duration, connections=PEAK_CONNECTIONS
                )
            finally:
                _finish(spy)
            report.profiles.append((f"lookup at full speed, {args.duration:g} s", out, SAMPLE_RATE))


# -- 2. watchers ------------------------------------------------------------------------------


def _finish(spy: subprocess.Popen[bytes]) -> None:
    """Wait for py-spy to write its file; end it by pid if it overstays."""
    try:
        spy.wait(PROFILE_SLACK)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(PROFILE_SLACK)


def blocked_now(agent: Server) -> int:
    """The agent's gauge of blocked requests."""
    text = http_get(agent.port, "/v1/metrics").body.decode()
    value = parse_metric(text, "waypost_blocking_queries")
    if value is None:
        raise RuntimeError("no waypost_blocking_queries in /v1/metrics")
    return int(value)


def wait_blocked(agent: Server, count: int, timeout: float) -> int:
    """Poll the gauge until `count` requests are blocked (or `timeout`); the last value."""
    end = time.monotonic() + timeout
    blocked = blocked_now(agent)
    while blocked < count and time.monotonic() < end:
        time.sleep(METRICS_POLL)
        blocked = blocked_now(agent)
    return blocked


def watch_round(count: int, *, realtime: bool, profile: Path | None = None) -> WatchResult:
    """A fresh agent, `count` watchers blocked on `web`, one registration; timings and RSS.

    With `realtime`, the agent and the watcher process are SCHED_FIFO from the change
    until the answers are in; with `profile`, py-spy samples the agent over that time.
    """
    with contextlib.ExitStack() as stack:
        agent = start_agent()
        stack.callback(agent.close)
        reply = http_get(agent.port, f"/v1/health/service/{WEB}")
        index = int(reply.headers["X-Consul-Index"])
        for _ in range(10):  # the read path warm, as it is for the watchers' first answers
            http_get(agent.port, f"/v1/health/service/{WEB}")
        rss_before = agent.rss_kib()
        path = f"/v1/health/service/{WEB}?index={index}&wait=5m"
        started = time.monotonic()
        watchers = start_watchers(
            agent.port, path, count, expect=CHANGE_ID, deadline=ANSWER_DEADLINE
        )
        stack.callback(watchers.close)
        sent = watchers.sent(BLOCK_TIMEOUT)
        blocked = wait_blocked(agent, sent.connected, BLOCK_TIMEOUT)
        block_seconds = time.monotonic() - started
        rss_blocked = agent.rss_kib()
        change = {"Name": WEB, "ID": CHANGE_ID, "Address": "10.0.0.200", "Port": 8080}
        spy = None
        if profile is not None:
            spy = start_py_spy(agent.pid, PROFILE_WATCH, profile, rate=FAST_SAMPLE_RATE)
            stack.callback(_finish, spy)
            time.sleep(PROFILE_ATTACH)
        if realtime:
            agent.set_realtime(True)
            set_realtime(watchers.proc.pid, True)
        cpu_before = agent.cpu_seconds()
        t0 = time.monotonic()
        put = http_put(agent.port, REGISTER_PATH, change)
        put_seconds = time.monotonic() - t0
        if put.status != 200:
            raise RuntimeError(f"register answered {put.status}: {put.body[:200]!r}")
        answers = watchers.answers(ANSWER_DEADLINE + 30)
        cpu = agent.cpu_seconds() - cpu_before
        if realtime:
            agent.set_realtime(False)
        if spy is not None:
            _finish(spy)  # before the watchers disconnect: only the wake-up is sampled
        watchers.close()
        time.sleep(SETTLE)
        rss_after = agent.rss_kib()
        return WatchResult(
            count=count,
            connected=sent.connected,
            connect_seconds=sent.seconds,
            blocked=blocked,
            block_seconds=block_seconds,
            rss_before_kib=rss_before,
            rss_blocked_kib=rss_blocked,
            rss_after_kib=rss_after,
            put_seconds=put_seconds,
            answered_after=tuple(t - t0 for t in answers.times),
            early=sum(1 for t in answers.times if t < t0),
            statuses=answers.statuses,
            indexes=answers.indexes,
            index_before=index,
            with_change=answers.with_expected,
            errors=answers.errors,
            client_cpu=answers.cpu,
            agent_cpu=cpu,
        )


def run_watchers(args: argparse.Namespace, report: Report) -> None:
    limit = ensure_nofile(args.watchers + FD_MARGIN)  # inherited by the agent and the client
    count = args.watchers
    if limit < count + FD_MARGIN:
        count = max(1, limit - FD_MARGIN)
        report.errors.append(f"watchers: RLIMIT_NOFILE hard limit {limit}: ran {count} watchers")
    for n in range(args.rounds):
        _progress(f"watchers: round {n + 1}/{args.rounds}, {count} watchers")
        report.watches.append(watch_round(count, realtime=args.realtime == "all"))
    if args.profile:
        _progress(f"watchers: one more round, profiled, {count} watchers")
        out = Path(args.profile) / "watchers.raw"
        watch_round(count, realtime=args.realtime == "all", profile=out)
        report.profiles.append((f"{count} watchers woken by one change", out, FAST_SAMPLE_RATE))


# -- 3. registrations -------------------------------------------------------------------------


def bench_instances(agent: Server) -> int:
    """How many of the registration benchmark's instances the agent lists."""
    reply = http_get(agent.port, "/v1/agent/services", timeout=60)
    services: dict[str, object] = json.loads(reply.body)
    return sum(1 for ident in services if ident.startswith(BENCH_PREFIX))


def commits(agent: Server) -> int:
    text = http_get(agent.port, "/v1/metrics").body.decode()
    value = parse_metric(text, "waypost_store_transactions_total")
    return int(value) if value is not None else 0


def register_round(
    duration: float, connections: int, *, realtime: bool, profile: Path | None = None
) -> RegisterResult:
    """A fresh agent, wrk registering for `duration`; then the counts, a crash and a restart.

    With `realtime` the agent and wrk run SCHED_FIFO; with `profile` py-spy samples the agent.
    """
    with contextlib.ExitStack() as stack:
        agent = start_agent()
        stack.callback(agent.close)
        before = commits(agent)
        spy = start_py_spy(agent.pid, duration, profile) if profile is not None else None
        try:
            with agent.realtime(realtime):
                cpu_before, wall_before = agent.cpu_seconds(), time.monotonic()
                run = run_wrk(
                    agent.port,
                    REGISTER_PATH,
                    duration=duration,
                    connections=connections,
                    register=True,
                    realtime=realtime,
                )
                share = (agent.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
        finally:
            if spy is not None:
                _finish(spy)
        registered = bench_instances(agent)
        committed = commits(agent) - before
        started = time.monotonic()
        again, failed = restart_agent(agent)  # SIGKILL, the same command on the same data dir
        stack.callback(again.close)
        restart_seconds = time.monotonic() - started
        restored = bench_instances(again)
        return RegisterResult(
            run, connections, registered, committed, restored, restart_seconds, share, tuple(failed)
        )


def run_registrations(args: argparse.Namespace, report: Report) -> None:
    for n in range(args.rounds):
        _progress(f"registrations: round {n + 1}/{args.rounds}")
        report.registers.append(
            register_round(args.duration, args.connections, realtime=args.realtime == "all")
        )
    if args.profile:
        _progress("registrations: one more round, profiled")
        out = Path(args.profile) / "registrations.raw"
        register_round(
            args.duration, args.connections, realtime=args.realtime == "all", profile=out
        )
        report.profiles.append((f"registrations, {args.connections} connections", out, SAMPLE_RATE))


# -- output -----------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _tool_version(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _fs_type(path: str) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _revision() -> str:
    """The commit measured, and whether discovery/ differs from it in the working tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            check=False,
            text=True,
            cwd=REPO,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "discovery"],
            capture_output=True,
            check=False,
            text=True,
            cwd=REPO,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown revision"
    return f"commit {head or '?'}" + (" + uncommitted changes in discovery/" if dirty else "")


def render_header(args: argparse.Namespace, argv: Sequence[str]) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = Path("/proc/loadavg").read_text().split()[0]
    tmp = tempfile.gettempdir()
    return (
        f"HTTP benchmark {now}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load {load}\n"
        f"command: .venv/bin/python -m tests.bench.http_api {shlex.join(argv)} ({_revision()})\n"
        f"{args.rounds} round(s) of {args.duration:g} s runs; {wrk_version()}; "
        f"{_tool_version(['nginx', '-v'])}; "
        f"aiohttp {_version('aiohttp')}, uvloop {_version('uvloop')}; "
        f"data dirs on {_fs_type(tmp)} ({tmp}); "
        f"SCHED_FIFO for: {REALTIME_SCOPE[args.realtime]}"
    )


def render_report(report: Report) -> str:
    """The tables: lookup side by side, then the best watcher and registration rounds."""
    parts: list[str] = []
    if report.lookups:
        parts.append(render_lookup(report))
    if report.watches:
        parts.append(render_watch(best_watch(report.watches)))
    if report.registers:
        parts.append(render_register(best_register(report.registers)))
    return "\n\n".join(parts)


def _dump(report: Report, path: str) -> None:
    def wrk(r: object) -> dict[str, object]:
        fields = (
            "duration",
            "requests",
            "errors",
            "status_errors",
            "p50",
            "p90",
            "p99",
            "max",
            "late",
            "client_cpu",
        )
        return {name: getattr(r, name) for name in fields}

    doc = {
        "lookup": {
            m.server: [
                {"peak": wrk(r.peak), "server_cpu": r.server_cpu, "paced": wrk(r.paced)}
                for r in m.rounds
            ]
            for m in report.lookups
        },
        "watchers": [
            {
                "count": w.count,
                "all_answered": w.all_answered,
                "put_seconds": w.put_seconds,
                "rss_kib": [w.rss_before_kib, w.rss_blocked_kib, w.rss_after_kib],
            }
            for w in report.watches
        ],
        "registrations": [
            {
                "run": wrk(r.run),
                "registered": r.registered,
                "commits": r.commits,
                "restored": r.restored,
            }
            for r in report.registers
        ],
        "errors": report.errors,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


RUNNERS = {"lookup": run_lookup, "watchers": run_watchers, "registrations": run_registrations}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.profile:
        if py_spy() is None:
            print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
            return 2
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if len(os.sched_getaffinity(0)) < 2:
        print("http_api needs 2 CPUs (servers on core 0, clients on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})  # keep this process off the servers' core
    # SIGTERM unwinds like Ctrl-C, so every server is ended and every temp dir removed.
    signal.signal(signal.SIGTERM, _terminated)
    print(render_header(args, argv), flush=True)
    report = Report()
    for name in args.benchmarks:
        try:
            RUNNERS[name](args, report)
        except Exception as exc:
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
    print()
    print(render_report(report))
    print()
    for line in render_verdicts(report):
        print(line)
    print()
    print(NOTES)
    if report.profiles:
        print()
        print(render_profiles(report.profiles))
    for error in report.errors:
        print(f"ERROR {error}")
    if args.json:
        _dump(report, args.json)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
