"""Where the agent's time goes: py-spy samples and their summary.  Adapter + pure summary.

py-spy is not a project dependency (``.venv/bin/pip install py-spy`` to use
``--profile``).  :func:`start_py_spy` samples a running agent by pid
(``py-spy record --format raw --nonblocking``: the agent is never paused, so
it keeps its pace; the sampler runs on the client core), and
:func:`summarize` turns the collapsed stacks into the functions with the most
samples: *self* (the innermost Python frame of a sample) and *inclusive*
(anywhere in the stack, once per sample), as shares of all samples that were
not idle (py-spy leaves out samples of a sleeping thread, so a share means
"of the time the agent was on the CPU"; a sample whose innermost Python frame
is the loop's entry point was in uvloop's C code).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench.http_servers import CLIENT_CORE

SAMPLE_RATE = 200  # samples/s: enough for percentages over seconds, cheap for the agent
FAST_SAMPLE_RATE = 1000  # for events that last a fraction of a second
TOP = 15  # functions listed per view
# Innermost frames that mean "waiting", not work: py-spy does not always see that a thread
# sleeps (the store's writer thread waiting for its next batch shows as `_worker`).
IDLE_LEAVES = ("select (", "poll (", "_worker (concurrent/futures/thread.py)")
# A sample whose innermost Python frame is the loop's entry point was in uvloop's C code:
# polling, reading sockets, calling back into Python.
IN_LOOP = "Runner.run (asyncio/runners.py)"
# Frames that every sample has: not worth listing as inclusive time.
ROOT_FRAMES = ("_run_module_as_main", "_run_code", "<module>", "main (", "run_agent", "Runner.run")


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH; None when not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def start_py_spy(
    pid: int, seconds: float, out: Path, *, rate: int = SAMPLE_RATE
) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` for `seconds` into `out` (raw collapsed stacks); wait() on it.

    Its own messages go to `out` with the suffix ``.log``.
    """
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (.venv/bin/pip install py-spy)")
    command = ["taskset", "-c", str(CLIENT_CORE), exe, "record", "-p", str(pid)]
    command += ["-d", str(max(1, round(seconds))), "-r", str(rate), "-f", "raw"]
    command += ["-o", str(out), "--nolineno", "--nonblocking"]
    with out.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


@dataclass(frozen=True, slots=True)
class Profile:
    """Sample counts of one recording."""

    samples: int
    idle: int
    rate: int
    self_counts: Counter[str]
    inclusive: Counter[str]

    @property
    def busy(self) -> int:
        return self.samples - self.idle


def parse_collapsed(text: str, rate: int = SAMPLE_RATE) -> Profile:
    """py-spy's raw output: `frame;frame;...;leaf count` per line (root first)."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            if not frame.startswith(ROOT_FRAMES):
                inclusive[frame] += count
    return Profile(samples, idle, rate, self_counts, inclusive)


def summarize(profile: Profile, title: str, top: int = TOP) -> str:
    """The top functions by self and by inclusive share of the busy samples."""
    busy = max(1, profile.busy)
    lines = [
        f"{title}: {profile.samples} samples at {profile.rate}/s, "
        f"{profile.idle / max(1, profile.samples):.0%} idle; shares of the busy ones:",
        "  self (innermost frame):",
    ]
    lines += [
        f"    {n / busy:6.1%}  {_label(name)}" for name, n in profile.self_counts.most_common(top)
    ]
    lines.append("  inclusive (anywhere in the stack):")
    lines += [f"    {n / busy:6.1%}  {name}" for name, n in profile.inclusive.most_common(top)]
    return "\n".join(lines)


def _label(frame: str) -> str:
    if frame == IN_LOOP:
        return "(uvloop's C code: epoll, socket reads and writes, callbacks into Python)"
    return frame


def render_profiles(found: Sequence[tuple[str, Path, int]]) -> str:
    """The summaries of the recordings (title, raw file, sample rate) that exist."""
    parts = []
    for title, path, rate in found:
        if path.exists():
            profile = parse_collapsed(path.read_text(), rate)
            parts.append(summarize(profile, f"{title} ({path})"))
        else:
            log = path.with_suffix(".log")
            said = log.read_text(errors="replace")[-500:] if log.exists() else ""
            parts.append(f"{title}: no samples ({path} missing) {said}")
    return "\n\n".join(parts)
