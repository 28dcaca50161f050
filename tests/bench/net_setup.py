"""netsetup benchmark: setup/teardown latency per allocation, waypost vs the CNI plugins.

    .venv/bin/python -m tests.bench.net_setup [--quick] [--count 50] [--live 1000]
                                              [--cni-live 200] [--rounds 5]
                                              [--wrap nsenter] [--json FILE]

Root.  Bridge mode, one forwarded port (a dynamic host port -> 8080, TCP and UDP).
Four throwaway host namespaces `<prefix>-wl`, `-wh` (waypost), `-cl`, `-ch` (CNI), each
with a veth `ext0` (10.255.0.1/30, the default route: the host address; its peer `ext1`
stays in the namespace) and nothing else; allocation namespaces are
`/var/run/netns/<host namespace>-w<n>` or `-c<n>`, bridges `<prefix><tag>`; no packet
is sent.  One driver process per host namespace joins it (tests/bench/net_driver.py:
what each side runs and how it is timed), so both sides pay the same for being there.
A cycle is: set one more allocation up, tear it down, wait for the background work
(waypost's `settle()`; timed apart); `--rounds` rounds of `--count / --rounds`
cycles per side, the sides taking turns in each round, so a change of the machine's
load during the run hits them alike.

1. Alone: `wl` and `cl` fill up to 10 live allocations, then cycles.  The ratios.
2. Side by side: `wh` fills up to `--live` (1000), `ch` up to `--cni-live` (200: a
   CNI cycle costs ~0.3 s or more, and its iptables work grows with the rules), and
   all four take turns.  Growth is the median at the high count over the median at
   10 in the same rounds (`wl` then shares the kernel with the 1000 of `wh`, as the
   10th and the 1000th allocation of one host would not: compare its figures with
   phase 1 for that).  The fill of `wh` is reported too (setups #1-#20 vs the last 20).
3. Every namespace starting with the run prefix is unmounted and removed (the host
   namespaces take their bridge, veths, nft tables and iptables rules with them) and
   the temp dir is deleted, also after a failure or Ctrl-C; a leftover is reported.

Targets (printed as PASS/FAIL; the exit status is 1 only when something could not
run): setup <= 0.2 x CNI ADD, teardown <= 0.1 x CNI DEL (medians, at 10 live, phase 1),
and waypost at `--live` within 1.5 x of waypost at 10 (setup and teardown, phase 2).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/var/run/netns")
CNI_PLUGINS = ("loopback", "bridge", "firewall", "portmap", "host-local")
HOST_IP = "10.255.0.1"  # ext0 of each host namespace (nothing is ever sent)
HOST_GATEWAY = "10.255.0.2"
LOW = 10  # the first level of live allocations
READY_TIMEOUT = 60.0  # seconds for a driver to start
ANSWER_TIMEOUT = 1800.0  # seconds for one request (a fill of 1000 with CNI would take minutes)
TARGET_SETUP = 0.2  # waypost setup / CNI ADD
TARGET_TEARDOWN = 0.1  # waypost teardown / CNI DEL
TARGET_GROWTH = 1.5  # at --live over at 10
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


# --- statistics ----------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


# --- namespaces ------------------------------------------------------------------------------


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def make_host(name: str) -> None:
    """A host namespace: lo up, ext0 (a veth whose peer ext1 stays in the namespace) with
    the host address and the default route."""
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    run("ip", "-n", name, "link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
    run("ip", "-n", name, "addr", "add", f"{HOST_IP}/30", "dev", "ext0")
    run("ip", "-n", name, "link", "set", "ext1", "up")
    run("ip", "-n", name, "link", "set", "ext0", "up")
    run("ip", "-n", name, "route", "add", "default", "via", HOST_GATEWAY)


def our_namespaces(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def sweep(prefix: str) -> list[str]:
    """Unmount and remove every namespace file of this run; what could not be removed."""
    for name in our_namespaces(prefix):
        path = NETNS_DIR / name
        _libc.umount2(str(path).encode(), _MNT_DETACH)  # EINVAL: not mounted, fine
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return our_namespaces(prefix)


# --- the driver processes ----------------------------------------------------------------------


class Side:
    """A tests.bench.net_driver process (JSON lines, answered in order)."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        self._stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.ready: dict[str, Any] = self._next(READY_TIMEOUT)["ready"]
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"driver silent; stderr: {self.stderr()}") from None
        if line is None:
            raise ConnectionError(f"driver exited; stderr: {self.stderr()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")[-3000:]

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        answer = self._next(ANSWER_TIMEOUT)
        if not answer["ok"]:
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer["result"]

    def stop(self) -> None:
        """EOF, then wait; SIGKILL by pid when it does not go."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        with contextlib.suppress(OSError):
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        self._stderr.close()


def start_side(kind: str, tag: str, prefix: str, work: Path, wrap: str) -> Side:
    """A driver of `kind` (waypost/cni) in a new host namespace `<prefix>-<tag>`."""
    host = f"{prefix}-{tag}"
    make_host(host)
    argv = [sys.executable, "-m", "tests.bench.net_driver", "--netns", str(NETNS_DIR / host)]
    argv += ["--side", kind, "--prefix", f"{host}-", "--work", str(work / tag)]
    argv += ["--bridge", f"{prefix}{tag}", "--host-ip", HOST_IP]
    if kind == "cni" and wrap == "nsenter":
        argv += ["--wrap", f"nsenter --net={NETNS_DIR / host}"]
    return Side(argv, work / f"{tag}.stderr")


# --- the run --------------------------------------------------------------------------------

# The sides: name -> (kind, namespace tag).  "low" ones hold 10 allocations, "high" ones
# --live / --cni-live.
SIDES = {
    "waypost@low": ("waypost", "wl"),
    "cni@low": ("cni", "cl"),
    "waypost@high": ("waypost", "wh"),
    "cni@high": ("cni", "ch"),
}


Series = dict[str, list[float]]


@dataclass
class Results:
    command: str
    machine: dict[str, Any]
    live: dict[str, int] = field(default_factory=dict)  # side -> live allocations
    fills: dict[str, dict[str, Any]] = field(default_factory=dict)  # side -> fill series
    phases: dict[str, dict[str, Series]] = field(default_factory=dict)  # phase -> side -> ...
    inventory: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)


def _merge(into: Series, series: Series) -> None:
    for key, values in series.items():
        into.setdefault(key, []).extend(values)


def fill(results: Results, sides: dict[str, Side], name: str, live: int) -> None:
    print(f"... {name}: filling to {live} live allocations", flush=True)
    started = time.monotonic()
    results.fills[name] = sides[name].call("fill", n=live)
    results.fills[name]["seconds"] = [time.monotonic() - started]
    results.live[name] = live


def rounds(
    sides: dict[str, Side], names: Sequence[str], args: argparse.Namespace
) -> dict[str, Series]:
    """`args.rounds` rounds; in each, every side in turn runs its share of the cycles."""
    print(f"... cycles, interleaved: {', '.join(names)}", flush=True)
    out: dict[str, Series] = {name: {} for name in names}
    per_round = max(1, args.count // args.rounds)
    for _ in range(args.rounds):
        for name in names:
            _merge(out[name], sides[name].call("cycles", k=per_round))
    return out


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "load": os.getloadavg(),
        "nft": run("nft", "--version").strip(),
        "cni": run("dpkg-query", "-W", "-f", "${Version}", "containernetworking-plugins"),
    }


def benchmark(args: argparse.Namespace, command: str) -> Results:
    results = Results(command, machine())
    prefix = f"wpb{secrets.token_hex(2)}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    sides: dict[str, Side] = {}
    try:
        for name, (kind, tag) in SIDES.items():
            sides[name] = start_side(kind, tag, prefix, work, args.wrap)
        fill(results, sides, "waypost@low", LOW)
        fill(results, sides, "cni@low", LOW)
        results.phases["alone"] = rounds(sides, ["waypost@low", "cni@low"], args)
        fill(results, sides, "waypost@high", args.live)
        fill(results, sides, "cni@high", args.cni_live)
        results.phases["side by side"] = rounds(sides, list(SIDES), args)
        results.inventory = {name: side.call("inventory") for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.stop()
        results.leftovers = sweep(prefix)
        shutil.rmtree(work, ignore_errors=True)
    return results


# --- the report ------------------------------------------------------------------------------


def _row(label: str, live: int, xs: Sequence[float], note: str = "") -> str:
    return f"{label:<28}{live:>6}{len(xs):>5} {ms(median(xs))} {ms(p90(xs))}  {note}".rstrip()


def _verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


def _phase_rows(results: Results, phase: str) -> None:
    for name, series in results.phases[phase].items():
        live = results.live[name]
        if name.startswith("waypost"):
            print(_row("waypost setup", live, series["setup"]))
            print(_row("waypost teardown", live, series["teardown"]))
            print(_row("waypost background", live, series["background"], "settle() after it"))
        else:
            print(_row("CNI ADD", live, series["add"]))
            print(_row("CNI DEL", live, series["del"]))
            print(_row("CNI netns create + delete", live, _sums(series), "around ADD/DEL"))


def _sums(series: Series) -> list[float]:
    return [a + b for a, b in zip(series["netns_add"], series["netns_del"], strict=True)]


def _ratio_lines(phase: dict[str, Series]) -> None:
    w, c = phase["waypost@low"], phase["cni@low"]
    for what, cni, target in (("setup", "add", TARGET_SETUP), ("teardown", "del", TARGET_TEARDOWN)):
        ratio = median(w[what]) / median(c[cni])
        print(
            f"  {what} / CNI {cni.upper()} at {LOW} live: median {ratio:.3f}"
            f" (p90 {p90(w[what]) / p90(c[cni]):.3f})  target <= {target}"
            f"  {_verdict(ratio, target)}"
        )


def report(results: Results) -> None:
    m = results.machine
    print(f"$ {results.command}")
    print(
        f"{m['cpus']} CPUs, kernel {m['kernel']}, load {m['load'][0]:.2f} at start, "
        f"{m['nft']}, containernetworking-plugins {m['cni']}"
    )
    header = f"{'':<28}{'live':>6}{'n':>5} {'median':>8} {'p90':>8}  (ms)"
    print(f"phase 1, alone (nothing else set up):\n{header}")
    _phase_rows(results, "alone")
    print("ratios:")
    _ratio_lines(results.phases["alone"])
    print(f"phase 2, side by side (each in its own host namespace, rounds interleaved):\n{header}")
    _phase_rows(results, "side by side")
    both = results.phases["side by side"]
    high, live = both["waypost@high"], results.live["waypost@high"]
    print("growth (median at the high count / median at 10, same rounds):")
    for what in ("setup", "teardown"):
        growth = median(high[what]) / median(both["waypost@low"][what])
        print(
            f"  waypost {what} at {live} / at {LOW}: {growth:.3f}  target <= {TARGET_GROWTH}"
            f"  {_verdict(growth, TARGET_GROWTH)}"
        )
    for what in ("add", "del"):
        growth = median(both["cni@high"][what]) / median(both["cni@low"][what])
        print(f"  CNI {what.upper()} at {results.live['cni@high']} / at {LOW}: {growth:.3f}")
    print("ratios in phase 2:")
    _ratio_lines(both)
    series = results.fills["waypost@high"]["setup"]
    if len(series) >= 40:
        print(
            f"waypost fill to {live}: setups #1-#20 median {ms(median(series[:20])).strip()} ms,"
            f" last 20 {ms(median(series[-20:])).strip()} ms"
            f" ({results.fills['waypost@high']['seconds'][0]:.1f} s in all)"
        )
    for name, found in results.inventory.items():
        print(f"inventory {name}: {found}")
    print("waypost steps (median / p90 ms; a step's calls per cycle vary):")
    columns = [
        ("alone, 10", results.phases["alone"]["waypost@low"]),
        ("side by side, 10", both["waypost@low"]),
        (f"side by side, {live}", high),
    ]
    print(f"  {'':<30}" + "".join(f"{label:>19}" for label, _ in columns))
    names = sorted({k for _, s in columns for k in s if k.startswith("step:")})
    for name in names:
        cells = "".join(
            f" {ms(median(s.get(name, [])))} {ms(p90(s.get(name, [])))} " for _, s in columns
        )
        print(f"  {name[5:]:<30}{cells}")
    print("leftovers: " + (", ".join(results.leftovers) if results.leftovers else "none"))


def preflight() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, iptables)"
    for tool in ("ip", "nft", "iptables", "nsenter"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"needs `{tool}`"
    missing = [p for p in CNI_PLUGINS if not Path("/usr/lib/cni", p).exists()]
    if missing:
        return f"needs the CNI plugins {missing} (Debian containernetworking-plugins)"
    return ""


@contextlib.contextmanager
def _sigterm_is_exit() -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="net_setup", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="--count 15 --cni-live 50 --rounds 3")
    parser.add_argument("--count", type=int, default=50, help="measured cycles per level and side")
    parser.add_argument("--live", type=int, default=1000, help="waypost's high level")
    parser.add_argument("--cni-live", type=int, default=200, help="CNI's high level")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per level")
    parser.add_argument(
        "--wrap",
        choices=("none", "nsenter"),
        default="none",
        help="run each CNI plugin through `nsenter --net=<host ns>`",
    )
    parser.add_argument("--json", help="write every series to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.cni_live, args.rounds = 15, 50, 3
    reason = preflight()
    if reason:
        print(f"ERROR: {reason}", file=sys.stderr)
        return 1
    command = " ".join([".venv/bin/python", "-m", "tests.bench.net_setup", *argv])
    with _sigterm_is_exit():
        results = benchmark(args, command)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results.__dict__, indent=1))
    return 1 if results.leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
