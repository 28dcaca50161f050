"""The agent as a process, for tests and benchmarks: start it, talk to it, stop it.

`AgentProcess(args, netns=...)` runs `python -m discovery agent ...`, optionally
under `nsenter --net=<namespace>` (how a service manager would start it inside a
throwaway "host" namespace: same mount namespace, its own network).  Its stderr
is read by a thread; `started()` waits for the listening lines and records the
HTTP and DNS ports.  `http(method, path, body)` talks to its HTTP API from the
namespace it runs in (a thread that joins it opens the socket: netsetup.netns);
`dns(name, type)` likewise with dnspython.  Only the process started here is
signalled, by its pid; `kill()` is SIGKILL, `stop()` SIGTERM and a wait.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from netsetup.netns import call_in_namespace

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0  # seconds for the agent to start or stop on a busy machine
TIMEOUT = 10.0  # seconds for one HTTP or DNS exchange
HTTP_LINE = re.compile(r"^waypost: http listening on 127\.0\.0\.1:(\d+)$")
DNS_LINE = re.compile(r"^waypost: dns listening on 127\.0\.0\.1:(\d+) \(udp\+tcp\)$")


class AgentError(AssertionError):
    pass


class AgentProcess:
    """A running agent process (see the module docstring)."""

    def __init__(self, args: list[str], *, netns: str = "", env: dict[str, str] | None = None):
        argv = [PYTHON, "-m", "discovery", "agent", *args]
        if netns:
            nsenter = shutil.which("nsenter") or "nsenter"
            argv = [nsenter, f"--net={netns}", *argv]
        self.netns = netns
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http_port = 0
        self.dns_port = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str | re.Pattern[str], within: float = DEADLINE) -> re.Match[str]:
        """Wait for a stderr line matching `pattern` (search); AgentError after `within`."""
        end = time.monotonic() + within
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.stderr.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AgentError(f"no stderr line matching {pattern!r}; stderr so far: {self.stderr}")

    def started(self) -> AgentProcess:
        self.dns_port = int(self.expect(DNS_LINE)[1])
        self.http_port = int(self.expect(HTTP_LINE)[1])
        return self

    def _inside(self, fn: Any) -> Any:
        return call_in_namespace(self.netns, fn) if self.netns else fn()

    def http(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """One request from the agent's namespace: (status, decoded JSON, or text)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )

        def exchange() -> tuple[int, bytes, str]:
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                    return answer.status, answer.read(), answer.headers.get("Content-Type", "")
            except urllib.error.HTTPError as err:
                return err.code, err.read(), err.headers.get("Content-Type", "")

        status, raw, kind = self._inside(exchange)
        return status, json.loads(raw) if "json" in kind else raw.decode()

    def dns(self, name: str, rdtype: str = "SRV") -> dns.message.Message:
        query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        reply: dns.message.Message = self._inside(
            lambda: dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=TIMEOUT)
        )
        return reply

    def srv_ports(self, name: str) -> list[int]:
        reply = self.dns(name)
        return sorted(r.port for rrset in reply.answer for r in rrset)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        self._drain()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.stderr.append(line)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def wait_for(probe: Any, what: str, within: float = DEADLINE, every: float = 0.05) -> Any:
    """Call `probe()` until it returns something true; AgentError after `within` seconds."""
    end = time.monotonic() + within
    last = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AgentError(f"never: {what} (last: {last!r})")
