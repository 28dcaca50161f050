"""dnsperf runs and the parsing of their output.  Adapter (`run_dnsperf`) + pure parsers.

dnsperf 2.10 prints no percentiles, only average/min/max/stddev.  With `-v`
it prints one line per answered query (`> NOERROR name TYPE 0.000167`, latency
in seconds, or `> T name TYPE` on timeout); :func:`parse_dnsperf` keeps those
latencies so p50/p99 come from dnsperf's own per-query measurement.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

CLIENT_CORE = 1
REALTIME_PRIORITY = 10  # chrt -f priority when a run is real-time
# Found by trying -c 1..8, -q 100..2000 against Knot, dnsmasq and waypost on this
# host (see README): one socket and 100 queries outstanding saturate every server
# as well as any other setting, and lose no queries at the end of the run.
MAX_CLIENTS = 1
MAX_OUTSTANDING = 100
RUN_SLACK = 30.0  # seconds allowed beyond -l before dnsperf is killed
QUERY_TIMEOUT = 2.0  # dnsperf -t: a query unanswered for this long is lost

_STAT = re.compile(
    r"^\s*(Queries sent|Queries completed|Queries lost|Queries per second):\s+([\d.]+)"
)
_AVG = re.compile(r"^\s*Average Latency \(s\):\s+([\d.]+)")
_RCODES = re.compile(r"^\s*Response codes:\s+(.*)$")


@dataclass(frozen=True, slots=True)
class PerfResult:
    """What one dnsperf run measured."""

    sent: int
    completed: int
    lost: int
    qps: float
    avg_latency: float  # seconds
    rcodes: dict[str, int] = field(hash=False)
    latencies: tuple[float, ...] = ()  # seconds, per answered query (only with -v)
    timeouts: int = 0  # `T` lines (only with -v)
    command: tuple[str, ...] = ()


class PerfError(RuntimeError):
    """dnsperf failed or printed no statistics."""


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def parse_dnsperf(text: str) -> PerfResult:
    """The statistics block (and `-v` lines, if any) of dnsperf's output."""
    stats: dict[str, float] = {}
    avg = math.nan
    rcodes: dict[str, int] = {}
    latencies: list[float] = []
    timeouts = 0
    for line in text.splitlines():
        if line.startswith("> "):
            parts = line.split()
            if parts[1] == "T":
                timeouts += 1
            else:
                with contextlib.suppress(ValueError):
                    latencies.append(float(parts[-1]))
            continue
        if match := _STAT.match(line):
            stats[match.group(1)] = float(match.group(2))
        elif match := _AVG.match(line):
            avg = float(match.group(1))
        elif match := _RCODES.match(line):
            for code, count in re.findall(r"([A-Z]+) (\d+) \(", match.group(1)):
                rcodes[code] = int(count)
    if "Queries per second" not in stats:
        raise PerfError(f"no statistics in dnsperf output:\n{text[-2000:]}")
    return PerfResult(
        sent=int(stats.get("Queries sent", 0)),
        completed=int(stats.get("Queries completed", 0)),
        lost=int(stats.get("Queries lost", 0)),
        qps=stats["Queries per second"],
        avg_latency=avg,
        rcodes=rcodes,
        latencies=tuple(latencies),
        timeouts=timeouts,
    )


def run_dnsperf(
    port: int,
    queryfile: str,
    *,
    duration: float,
    rate: int | None = None,
    verbose: bool = False,
    realtime: bool = False,
    clients: int = MAX_CLIENTS,
    outstanding: int = MAX_OUTSTANDING,
    passes: int | None = None,
) -> PerfResult:
    """One dnsperf run against 127.0.0.1:port over UDP, pinned to CLIENT_CORE.

    `rate` (queries/s) makes it a paced run (-Q); `verbose` records per-query latency;
    `realtime` runs dnsperf as SCHED_FIFO (chrt) so other processes do not preempt it;
    `passes` ends the run after that many passes through `queryfile` (-n) if sooner.
    """
    command = [
        "taskset",
        "-c",
        str(CLIENT_CORE),
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        "udp",
        "-d",
        queryfile,
        "-l",
        f"{duration:g}",
        "-c",
        str(clients),
        "-T",
        "1",
        "-q",
        str(outstanding),
        "-t",
        f"{QUERY_TIMEOUT:g}",
    ]
    if realtime:
        command[:0] = ["chrt", "-f", str(REALTIME_PRIORITY)]
    if rate is not None:
        command += ["-Q", str(rate)]
    if verbose:
        command.append("-v")
    if passes is not None:
        command += ["-n", str(passes)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=duration + QUERY_TIMEOUT + RUN_SLACK,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PerfError(f"dnsperf did not finish: {' '.join(command)}") from exc
    if done.returncode != 0:
        raise PerfError(f"dnsperf exited {done.returncode}: {' '.join(command)}\n{done.stderr}")
    return replace(parse_dnsperf(done.stdout), command=tuple(command))
