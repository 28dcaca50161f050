"""Benchmark results, the side-by-side table and the PASS/FAIL verdicts.  Pure: no I/O.

Each server is measured in several interleaved rounds (the host is shared:
other processes only ever slow a run down), so a :class:`Measurement` keeps
the best full-speed round (highest QPS) and the best paced round (lowest
p99), plus every round's figure to show the spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench.dns_checks import SHUFFLE_TRIES
from tests.bench.dns_perf import CLIENT_CORE, MAX_OUTSTANDING, PerfResult, percentile
from tests.bench.dns_servers import SERVER_CORE

PACED_RATE = 5000  # queries/s of the latency run (the p99 target is at this rate)
MIB = 1024  # KiB per MiB

# The targets.
QPS_VS_KNOT = 0.75
QPS_VS_DNSMASQ = 0.85
P99_LIMIT = 0.3e-3  # seconds, at PACED_RATE
CHANGE_LIMIT = 1e-3  # seconds, registry change to DNS answer
RSS_LIMIT_MIB = 150
RSS_SIZE = 10_000  # the size the RSS target applies to
RCODE_TOLERANCE = 0.01  # share of an rcode under load may differ from Knot's by this much
EXPECTED_RCODES = frozenset({"NOERROR", "NXDOMAIN"})


@dataclass(frozen=True, slots=True)
class Round:
    """One full-speed run and one paced run of one server."""

    peak: PerfResult
    cpu_share: float  # server CPU seconds per wall second during the full-speed run
    paced: PerfResult


def paced_latencies(paced: PerfResult) -> list[float]:
    """Per-query latencies of a paced run; lost queries count as infinite."""
    lost = max(paced.timeouts, paced.lost)
    return [*paced.latencies, *([math.inf] * lost)]


@dataclass(frozen=True, slots=True)
class Measurement:
    """One server at one size: its best rounds and the spread over all rounds."""

    server: str
    size: int
    best_peak: Round  # highest QPS
    best_paced: Round  # lowest p99
    rss_kib: int  # after the runs
    rounds: tuple[Round, ...]
    rss_start_kib: int = 0  # once it answered, before any load

    @property
    def qps(self) -> float:
        return self.best_peak.peak.qps

    @property
    def qps_per_cpu(self) -> float:
        """Answers per second of server CPU: what one fully busy core would do, roughly."""
        share = self.best_peak.cpu_share
        return self.qps / share if share > 0 else math.nan

    def latency(self, pct: float) -> float:
        return percentile(paced_latencies(self.best_paced.paced), pct)


def plan_measurement(
    server: str, size: int, rounds: Sequence[Round], rss_kib: int, rss_start_kib: int
) -> Measurement:
    """Pick the best full-speed and paced rounds."""
    best_peak = max(rounds, key=lambda r: r.peak.qps)
    best_paced = min(rounds, key=lambda r: percentile(paced_latencies(r.paced), 99))
    return Measurement(server, size, best_peak, best_paced, rss_kib, tuple(rounds), rss_start_kib)


@dataclass
class Report:
    """Everything measured in one run."""

    measurements: list[Measurement] = field(default_factory=list)
    mismatches: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    orders: dict[tuple[str, int], int] = field(default_factory=dict)  # (qtype, N) -> orders
    changes: dict[int, Mapping[str, Any]] = field(default_factory=dict)  # by N
    errors: list[str] = field(default_factory=list)

    def get(self, server: str, size: int) -> Measurement | None:
        for m in self.measurements:
            if m.server == server and m.size == size:
                return m
        return None


# -- table -----------------------------------------------------------------------------


def render_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return "inf" if math.isinf(seconds) else f"{seconds * 1e3:.3f}"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "-"


ROW_NAMES = (
    "QPS, max UDP (best)",
    "QPS, all rounds (k)",
    "server CPU, best run",
    "QPS per server CPU-s",
    f"p50 ms @{PACED_RATE} QPS",
    f"p99 ms @{PACED_RATE} QPS",
    "p99 ms, all rounds",
    "lost, max/paced",
    "RSS MiB, start/after",
)
QPS_ROW, PER_CPU_ROW, P99_ROW = 0, 3, 5


def _column(m: Measurement | None) -> list[str]:
    if m is None:
        return ["-"] * len(ROW_NAMES)
    all_qps = "/".join(f"{r.peak.qps / 1000:.0f}" for r in m.rounds)
    all_p99 = "/".join(render_ms(percentile(paced_latencies(r.paced), 99)) for r in m.rounds)
    return [
        f"{m.qps:,.0f}",
        all_qps,
        f"{m.best_peak.cpu_share * 100:.0f}%",
        f"{m.qps_per_cpu:,.0f}",
        render_ms(m.latency(50)),
        render_ms(m.latency(99)),
        all_p99,
        f"{m.best_peak.peak.lost}/{m.best_paced.paced.lost}",
        f"{m.rss_start_kib / MIB:.1f}/{m.rss_kib / MIB:.1f}",
    ]


def render_table(report: Report, sizes: Sequence[int], kinds: Sequence[str]) -> str:
    """Side by side: one block per N, one column per server, then waypost's ratios."""
    header = ["N", "metric", *kinds, "waypost/knot", "waypost/dnsmasq"]
    lines: list[list[str]] = [header]
    for size in sizes:
        cols = {k: _column(report.get(k, size)) for k in kinds}
        wp, kn, dm = (report.get(k, size) for k in ("waypost", "knot", "dnsmasq"))
        for i, row in enumerate(ROW_NAMES):
            ratios = ["", ""]
            if i == QPS_ROW:
                ratios = [_ratio(_qps(wp), _qps(kn)), _ratio(_qps(wp), _qps(dm))]
            elif i == PER_CPU_ROW:
                ratios = [_ratio(_per_cpu(wp), _per_cpu(kn)), _ratio(_per_cpu(wp), _per_cpu(dm))]
            elif i == P99_ROW:
                ratios = [_ratio(_p99(wp), _p99(kn)), _ratio(_p99(wp), _p99(dm))]
            lines.append([str(size) if i == 0 else "", row, *(cols[k][i] for k in kinds), *ratios])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out: list[str] = []
    for n, line in enumerate(lines):
        cells = [line[0].rjust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(widths[c + 2]) for c, cell in enumerate(line[2:])]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _qps(m: Measurement | None) -> float | None:
    return m.qps if m is not None else None


def _per_cpu(m: Measurement | None) -> float | None:
    return m.qps_per_cpu if m is not None else None


def _p99(m: Measurement | None) -> float | None:
    return m.latency(99) if m is not None else None


# -- verdicts --------------------------------------------------------------------------


def _verdict(ok: bool, text: str) -> str:
    return f"[{'PASS' if ok else 'FAIL'}] {text}"


def _shares(result: PerfResult) -> dict[str, float]:
    total = sum(result.rcodes.values()) or 1
    return {code: count / total for code, count in result.rcodes.items()}


def render_rcode_verdict(m: Measurement, ref: Measurement | None) -> str:
    """Under full load: only NOERROR/NXDOMAIN, in the same shares as Knot's."""
    got = _shares(m.best_peak.peak)
    text = ", ".join(f"{code} {share:.1%}" for code, share in sorted(got.items()))
    ok = set(got) <= EXPECTED_RCODES
    if ref is not None:
        want = _shares(ref.best_peak.peak)
        ok = ok and all(
            abs(got.get(code, 0) - want.get(code, 0)) <= RCODE_TOLERANCE
            for code in set(got) | set(want)
        )
        text += " (Knot: " + ", ".join(f"{c} {s:.1%}" for c, s in sorted(want.items())) + ")"
    return _verdict(ok, f"N={m.size}: {m.server} rcodes under full load: {text}")


def _size_verdicts(report: Report, size: int) -> list[str]:
    wp, kn, dm = (report.get(k, size) for k in ("waypost", "knot", "dnsmasq"))
    out: list[str] = []
    if wp is None:
        return out
    for ref, name, limit in ((kn, "Knot", QPS_VS_KNOT), (dm, "dnsmasq", QPS_VS_DNSMASQ)):
        if ref is not None:
            ratio = wp.qps / ref.qps
            out.append(
                _verdict(ratio >= limit, f"N={size}: UDP QPS {ratio:.2f}x {name} (>= {limit})")
            )
    p99 = wp.latency(99)
    out.append(
        _verdict(
            p99 <= P99_LIMIT,
            f"N={size}: p99 {render_ms(p99)} ms at {PACED_RATE} QPS (<= {P99_LIMIT * 1e3:g} ms)",
        )
    )
    out.append(render_rcode_verdict(wp, kn))
    return out


def render_verdicts(report: Report, sizes: Sequence[int]) -> list[str]:
    """PASS/FAIL per target of the issue; a target with nothing measured is left out."""
    out: list[str] = []
    for size in sizes:
        out += _size_verdicts(report, size)
    rss = report.get("waypost", RSS_SIZE)
    if rss is not None:
        mib = rss.rss_kib / MIB
        out.append(
            _verdict(
                mib <= RSS_LIMIT_MIB,
                f"N={RSS_SIZE}: waypost RSS {mib:.1f} MiB (<= {RSS_LIMIT_MIB} MiB)",
            )
        )
    for _size, change in sorted(report.changes.items()):
        out.append(render_change_verdict(change))
        out.append(render_change_details(change))
    for (kind, size), problems in sorted(report.mismatches.items()):
        detail = "; ".join(problems[:3])
        if len(problems) > 3:
            detail += f" (+{len(problems) - 3} more)"
        text = f"N={size}: {kind} sample answers = Knot's" + (f": {detail}" if problems else "")
        out.append(_verdict(not problems, text))
    for (qtype, size), count in sorted(report.orders.items()):
        text = f"N={size}: waypost {qtype} answer order varies "
        text += f"({count} orders in {SHUFFLE_TRIES} queries)"
        out.append(_verdict(count > 1, text))
    return out


def render_change_verdict(change: Mapping[str, Any]) -> str:
    worst, median = change["visible_max"], change["visible_median"]
    return _verdict(
        worst <= CHANGE_LIMIT,
        f"N={change['services']}: registry change visible over DNS: median "
        f"{render_ms(median)} ms, max {render_ms(worst)} ms over {change['changes']} "
        f"changes (max <= {CHANGE_LIMIT * 1e3:g} ms)",
    )


def render_change_details(change: Mapping[str, Any]) -> str:
    rtt = statistics.median(change["query_rtt"])
    ups = change["upsert"]
    return (
        f"       (same process: plain query round trip median {render_ms(rtt)} ms; "
        f"Registry.upsert alone median {render_ms(statistics.median(ups))} ms, "
        f"max {render_ms(max(ups))} ms)"
    )


NOTES = f"""\
How measured (tool per figure):
- QPS: dnsperf on core {CLIENT_CORE}, `-m udp -c 1 -T 1 -q {MAX_OUTSTANDING}`, no rate limit,
  after a warm-up (one pass through the query file, at most 20 s); each server pinned alone
  to core {SERVER_CORE}, and idle before the next server's run. Best of the rounds
  (rounds interleave the servers; all rounds are listed, in thousands).
  "server CPU" = server CPU time / wall time in that run (/proc/<pid>/stat): near 100% means
  the server was the bottleneck, lower means the load generator or the host was.
  "QPS per server CPU-s" = QPS / server CPU: a rough one-core capacity when the server
  was not saturated (dnsperf on one core cannot saturate Knot; servers that batch get
  more efficient under more load, so this underestimates them).
- p50/p99: dnsperf `-Q {PACED_RATE} -v`; nearest-rank percentiles of dnsperf's own per-query
  latencies (dnsperf 2.10 prints no percentiles); lost queries count as infinite.
  The round with the lowest p99 is shown; all rounds are listed. By default (--realtime
  paced) the server's threads and dnsperf run SCHED_FIFO during paced runs, so other
  processes on a shared host cannot preempt them and add their time slices to the tail
  (not for a server under 2x the paced rate at full speed: it is saturated anyway).
- lost: dnsperf "Queries lost" (no answer within 2 s, including those in flight at the end).
- rcodes under load: dnsperf's response-code counts of the best full-speed run.
- registry change: tests/bench/dns_change.py in one process on core {SERVER_CORE}:
  Registry.upsert, then UDP queries from the same event loop until a reply holds the new
  address; time from before the upsert to that reply (SCHED_FIFO unless --realtime off).
- sample answers: dnspython over UDP without EDNS; answer and additional record sets
  compared with Knot's (order and TTL ignored); order variation over 20 identical queries.
- RSS: VmRSS from /proc/<pid>/status once the server answers (start) and after its last
  run (after); the target applies to "after"."""
