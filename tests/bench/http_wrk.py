"""wrk runs: the Lua scripts they use and the parsing of what they print.  Adapter + pure parts.

Debian's wrk 4.1 has no constant-rate mode (that is wrk2, not packaged), so
the paced run uses wrk's Lua ``delay()`` hook: :func:`render_script` with a
rate gives each wrk thread a schedule of send slots ``1000/rate`` ms apart
(LuaJIT's ffi reads CLOCK_MONOTONIC); each time a connection is ready to send,
``delay()`` hands it the next free slot, so the thread sends ``rate``
requests/s whatever the latency, as long as one of its connections is free
(a request whose slot has passed by more than 1 ms is counted as ``late``).
wrk measures each latency from the moment the request is written, so a late
send's wait is not in it (no coordinated-omission correction, unlike wrk2);
``late`` says whether that happened.  wrk's timers have 1 ms resolution:
a send can be up to 1 ms early, never drifting from the schedule.

Every script's ``done()`` prints one ``WRK_RESULT {json}`` line (requests,
errors, latency percentiles in microseconds from wrk's own histogram) that
:func:`parse_wrk` reads.  :func:`render_script` with ``register=True`` makes
each request a Consul service registration with a unique ID and a TTL check.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from tests.bench.dns_perf import REALTIME_PRIORITY
from tests.bench.http_servers import CLIENT_CORE, HOST

RUN_SLACK = 30.0  # seconds allowed beyond -d before wrk is killed
REQUEST_TIMEOUT = 10.0  # wrk --timeout: a response slower than this is an error
REGISTER_PATH = "/v1/agent/service/register"
REGISTER_SERVICES = 100  # registrations spread over this many service names
REGISTER_TTL = "10m"  # longer than any run: no check expires while it lasts
_RESULT = re.compile(r"^WRK_RESULT (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run measured (latencies in seconds)."""

    duration: float
    requests: int
    bytes: int
    errors: int  # connect + read + write + timeouts
    status_errors: int  # responses with a status above 399
    timeouts: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    late: int  # paced runs: sends more than 1 ms behind their slot
    client_cpu: float = 0.0  # wrk's CPU seconds / wall seconds
    command: tuple[str, ...] = ()
    output: str = ""

    @property
    def rate(self) -> float:
        """Completed requests per second (error statuses included)."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def ok_rate(self) -> float:
        """Completed requests without an error status, per second."""
        return (self.requests - self.status_errors) / self.duration if self.duration > 0 else 0.0


class WrkError(RuntimeError):
    """wrk failed or printed no result line."""


_CLOCK = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } waypost_bench_timespec;
int clock_gettime(int clk_id, waypost_bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("waypost_bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
"""

_PACING = """\
-- One schedule per wrk thread: slot k is at start + k * interval ms.
local interval = 1000 / RATE
local next_slot = nil
function delay()
  local now = now_ms()
  if next_slot == nil then next_slot = now end
  local slot = next_slot
  if slot < now - 1 then
    late = late + 1
    slot = now
  end
  next_slot = slot + interval
  return slot - now
end
"""

_REGISTER = """\
local counter = 0
local headers = {["Content-Type"] = "application/json"}
function request()
  counter = counter + 1
  local c = counter
  local body = string.format(
    '{"Name":"reg%d","ID":"bench-%d-%d","Address":"10.%d.%d.%d","Port":%d,' ..
    '"Tags":["bench"],"Meta":{"run":"bench"},"Check":{"TTL":"TTL_VALUE"}}',
    c % SERVICES, tid, c, tid % 256, math.floor(c / 256) % 256, c % 256, 8000 + c % 1000)
  return wrk.format("PUT", "REGISTER_PATH", headers, body)
end
"""

_REPORT = """\
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function done(summary, latency, requests)
  local late_total = 0
  for _, t in ipairs(threads) do late_total = late_total + (t:get("late") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"late":%d}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50.0), latency:percentile(90.0),
    latency:percentile(99.0), latency:percentile(99.9), latency.max, late_total))
end
"""


def render_script(*, rate: float = 0.0, register: bool = False) -> str:
    """The Lua script of one run: paced at `rate` requests/s per thread (0: unpaced)."""
    parts = ["-- generated by tests/bench/http_wrk.py", "late = 0", "tid = 0", _CLOCK]
    if rate > 0:
        parts.append(_PACING.replace("RATE", repr(float(rate))))
    if register:
        body = _REGISTER.replace("SERVICES", str(REGISTER_SERVICES))
        parts.append(
            body.replace("TTL_VALUE", REGISTER_TTL).replace("REGISTER_PATH", REGISTER_PATH)
        )
    parts.append(_REPORT)
    return "\n".join(parts)


def parse_wrk(text: str) -> WrkResult:
    """The WRK_RESULT line of a run's output."""
    match = _RESULT.search(text)
    if match is None:
        raise WrkError(f"no WRK_RESULT line in wrk output:\n{text[-2000:]}")
    doc = json.loads(match.group(1))
    us = 1e-6
    return WrkResult(
        duration=doc["duration_us"] * us,
        requests=doc["requests"],
        bytes=doc["bytes"],
        errors=doc["connect"] + doc["read"] + doc["write"] + doc["timeout"],
        status_errors=doc["status"],
        timeouts=doc["timeout"],
        p50=doc["p50_us"] * us,
        p90=doc["p90_us"] * us,
        p99=doc["p99_us"] * us,
        p999=doc["p999_us"] * us,
        max=doc["max_us"] * us,
        late=doc["late"],
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    port: int,
    path: str,
    *,
    duration: float,
    connections: int,
    rate: float = 0.0,
    register: bool = False,
    realtime: bool = False,
    threads: int = 1,
) -> WrkResult:
    """One wrk run against 127.0.0.1:port, pinned to CLIENT_CORE; `rate` is the total req/s.

    `realtime` runs wrk as SCHED_FIFO (chrt) so other processes do not preempt it.
    """
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "run.lua"
        script.write_text(render_script(rate=rate / threads, register=register))
        command = ["taskset", "-c", str(CLIENT_CORE), "wrk"]
        command += [f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
        command += ["--timeout", f"{REQUEST_TIMEOUT:g}s", "-s", str(script)]
        command.append(f"http://{HOST}:{port}{path}")
        if realtime:
            command[:0] = ["chrt", "-f", str(REALTIME_PRIORITY)]
        cpu_before = _children_cpu()
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=duration + REQUEST_TIMEOUT + RUN_SLACK,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise WrkError(f"wrk did not finish: {' '.join(command)}") from exc
        cpu = _children_cpu() - cpu_before
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {' '.join(command)}\n{done.stderr}")
    result = parse_wrk(done.stdout)
    shown = tuple(c if c != str(script) else "<script>.lua" for c in command)
    share = cpu / result.duration if result.duration > 0 else 0.0
    return replace(result, client_cpu=share, command=shown, output=done.stdout)


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False, timeout=10)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].strip() if first else "wrk (version unknown)"
