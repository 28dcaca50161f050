"""The DNS servers under test, each a child process pinned to one core.  Adapter.

`start_knot`, `start_dnsmasq` and `start_waypost` write their config into a
fresh temp dir, start the server with `taskset -c <core>` (taskset execs, so
the pid is the server's), wait until it answers on 127.0.0.1, and return a
:class:`Server` whose `close()` ends that pid (SIGTERM, then SIGKILL) and
removes the temp dir.

Error handling: a server that exits or does not answer in time raises
:class:`ServerError` carrying its name, command and the tail of its log; the
process and temp dir are cleaned up before raising.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from tests.bench import dns_data
from tests.bench.dns_perf import REALTIME_PRIORITY

REPO = Path(__file__).resolve().parents[2]  # `python -m tests.bench...` needs it as cwd
SERVER_CORE = 0
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
PROBE_TIMEOUT = 0.5  # one readiness query
LISTEN_LINE = re.compile(r"waypost: dns listening on 127\.0\.0\.1:(\d+)")
LOG_TAIL = 2000  # characters of a failed server's log shown in the error
IDLE_SHARE = 0.05  # a server using less of its core than this is idle
IDLE_TIMEOUT = 60.0  # seconds wait_idle() waits at most


class ServerError(RuntimeError):
    """A benchmark server could not be started."""

    def __init__(self, name: str, command: Sequence[str], message: str, log: str) -> None:
        super().__init__(f"{name}: {message}\ncommand: {' '.join(command)}\nlog tail:\n{log}")
        self.name = name


@dataclass
class Server:
    """A running server: `name`, its `port` on 127.0.0.1, its `pid`; close() ends it."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    command: Sequence[str]
    log_path: Path
    data_dir: Path | None = None
    keep_workdir: bool = False  # a restart in progress: the next process needs the dir
    closed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server's pid and its children's (nginx's worker)."""
        found = [self.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
            found += [int(p) for p in children.split()]
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's processes so far (/proc/<pid>/stat)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # fields[11], fields[12] are utime and stime (stat(5) fields 14 and 15).
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def wait_idle(
        self, *, busy: float = IDLE_SHARE, interval: float = 0.2, timeout: float = IDLE_TIMEOUT
    ) -> bool:
        """Wait until the server uses under `busy` of a core over `interval`; False on timeout.

        A server slower than the paced rate ends a run with a socket buffer full
        of queries and keeps its core busy answering them after dnsperf exits;
        the next server measured on that core would share it.
        """
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline and self.alive():
            time.sleep(interval)
            after = self.cpu_seconds()
            if after - before < busy * interval:
                return True
            before = after
        return not self.alive()

    def rss_kib(self) -> int:
        """VmRSS of the server's main process in KiB (/proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise ServerError(self.name, self.command, "no VmRSS in /proc status", "")

    @contextlib.contextmanager
    def realtime(self, on: bool = True) -> Iterator[None]:
        """The server's threads SCHED_FIFO for the block (when `on`), then back to normal."""
        if not on:
            yield
            return
        self.set_realtime(True)
        try:
            yield
        finally:
            if self.alive():
                self.set_realtime(False)

    def set_realtime(self, on: bool) -> None:
        """Every thread of the server's processes SCHED_FIFO (on) or back to SCHED_OTHER."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                set_realtime(pid, on)

    def kill(self) -> None:
        """SIGKILL by pid (the crash of the durability check), wait for it; keeps the temp dir."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """End the process by pid (SIGTERM, then SIGKILL) and remove the temp dir."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT)
        finally:
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def set_realtime(pid: int, on: bool) -> None:
    """SCHED_FIFO (on) or SCHED_OTHER for every thread of process `pid`.

    On a shared host, other processes preempting the server or dnsperf add
    milliseconds to the latency tail; a real-time class keeps them off while it
    runs.  The kernel's RT throttling (sched_rt_runtime_us) still leaves 5% to others.
    """
    policy = os.SCHED_FIFO if on else os.SCHED_OTHER
    param = os.sched_param(REALTIME_PRIORITY if on else 0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setscheduler(int(task.name), policy, param)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (servers needing a fixed one)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1 after 50 tries")


def answers(port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when something on 127.0.0.1:port answers an SOA query for the zone."""
    query = dns.message.make_query(f"{dns_data.DOMAIN}.", dns.rdatatype.SOA)
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return True


def _spawn(
    name: str,
    command: Sequence[str],
    workdir: Path,
    *,
    find_port: Callable[[Server], int | None],
    deadline: float,
) -> Server:
    """Start `command` on SERVER_CORE, wait until it answers; clean up if it never does."""
    pinned = ["taskset", "-c", str(SERVER_CORE), *command]
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            pinned, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    server = Server(name, 0, proc, workdir, pinned, log_path)
    try:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if not server.alive():
                raise ServerError(name, pinned, f"exited with {proc.returncode}", server.log_tail())
            port = find_port(server)
            if port and answers(port):
                server.port = port
                return server
            time.sleep(0.05)
        raise ServerError(name, pinned, f"not answering after {deadline:.0f} s", server.log_tail())
    except BaseException:
        server.close()
        raise


def _fixed(port: int) -> Callable[[Server], int | None]:
    return lambda _server: port


def _from_log(server: Server) -> int | None:
    try:
        match = LISTEN_LINE.search(server.log_path.read_text(errors="replace"))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def start_knot(instances: Sequence[dns_data.BenchInstance], *, deadline: float = 60.0) -> Server:
    """knotd in the foreground with one UDP and one TCP worker, serving `nomad.`."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-knot-"))
    try:
        port = free_port()
        zone = workdir / "nomad.zone"
        zone.write_text(dns_data.render_knot_zone(instances))
        (workdir / "run").mkdir()
        (workdir / "storage").mkdir()
        conf = workdir / "knot.conf"
        conf.write_text(
            dns_data.render_knot_conf(
                port=port,
                rundir=str(workdir / "run"),
                storage=str(workdir / "storage"),
                zonefile=str(zone),
            )
        )
        command = ["knotd", "-c", str(conf)]
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return _spawn("knot", command, workdir, find_port=_fixed(port), deadline=deadline)


def start_dnsmasq(instances: Sequence[dns_data.BenchInstance], *, deadline: float = 60.0) -> Server:
    """dnsmasq in the foreground, only local data, unknown `nomad` names NXDOMAIN."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-dnsmasq-"))
    try:
        port = free_port()
        conf = workdir / "dnsmasq.conf"
        conf.write_text(dns_data.render_dnsmasq_conf(instances))
        command = [
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--conf-file={conf}",
            "--cache-size=10000",  # dnsmasq's maximum; host-record data is not evicted anyway
            "--dns-forward-max=10000",
            "--pid-file=",  # no pid file: we hold the pid
            "--log-facility=-",
        ]
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return _spawn("dnsmasq", command, workdir, find_port=_fixed(port), deadline=deadline)


def start_waypost(
    instances: Sequence[dns_data.BenchInstance], *, inproc: bool, deadline: float = 120.0
) -> Server:
    """waypost's agent (`python -m discovery agent --dev`), or the in-process fallback script.

    Both log `waypost: dns listening on 127.0.0.1:PORT` to stderr; the port is read from there.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bench-waypost-"))
    try:
        config = workdir / "bench.json"
        config.write_text(dns_data.render_waypost_config(instances))
        data_dir = workdir / "data"
        data_dir.mkdir()
        module = "tests.bench.dns_inproc" if inproc else "discovery"
        command = [
            sys.executable,
            "-m",
            module,
            "agent",
            "--dev",
            "--dns-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",  # the HTTP API is not measured; port 0 avoids clashes on 4646
            "--data-dir",
            str(data_dir),
            "--config",
            str(config),
        ]
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    name = "waypost-inproc" if inproc else "waypost"
    return _spawn(name, command, workdir, find_port=_from_log, deadline=deadline)
