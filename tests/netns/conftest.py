"""Root fixtures for netsetup: throwaway namespaces, a driver process, real traffic.

Every test here needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and is skipped with that
reason otherwise.  Nothing touches the machine's own network namespace: the "host"
is a namespace of its own, every name starts with the run prefix, and everything is
removed when the test ends, failed or not (finalizers, then a sweep of the prefix at
the end of the session).  Packets only go to addresses inside these namespaces.

Fixtures (reusable by any root test in this directory):

    run_prefix  "wpt<4 hex>" (session): the first characters of every namespace
                and allocation id this run creates; the sweep removes what is left.
    topology    a `Topology`: namespaces `host` and `external` joined by a veth
                (host side `ext0` 10.<n>.0.1/30, external side `eth0` 10.<n>.0.2/30),
                lo up in both, the host's default route via the external side.
                `topology.alloc_id("web")` gives a run-prefixed allocation id.
    make_topology  a factory for more topologies in one test.
    driver      a `Driver` running `python -m tests.netns.driver` inside
                `topology.host` with the default NetConfig and a fresh data dir.
    start_driver   a factory: start_driver(topology, config={...}, data_dir=...) for
                other configs, or a second driver on the same data dir (restarts).

`Driver.call(op, **args)` sends one request and returns its result (DriverError on
failure, with .type, .errno); `send` / `wait` run requests concurrently; `kill()`
SIGKILLs the process (crash tests); `wait_event("paused")` pairs with
`call("fault", step=..., action="pause")`.  See tests/netns/driver.py for the ops.

Traffic, in this process: `ns_socket(ns, kind)` is a socket created inside namespace
`ns` (a thread setns()s, creates it and comes back), so a test talks from any
namespace without starting processes.  `EchoServer(ns, ip)` answers TCP lines and UDP
datagrams with "<name> <peer ip>" (which listener answered, from which source
address); `tcp_ask` / `udp_ask` are the clients.  Inspection: `ip_json(ns, ...)`,
`owned_links(ns)`, `nft_elements(ns)`, `namespaces(prefix)`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netsetup.links import is_owned_link_name

ROOT = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/var/run/netns")
STARTUP_TIMEOUT = 30.0  # seconds for a driver to answer "ready" (imports on a busy box)
CALL_TIMEOUT = 60.0
ECHO_LIFETIME = 120.0  # an echo server stops on its own after this long
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)


def _skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN/CAP_SYS_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    return ""


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


# --- running commands ---------------------------------------------------------------------


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> str:
    """Run a command, return stdout; a failure raises with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ip_json(ns: str, *args: str) -> Any:
    """`ip -n ns -j <args>` parsed."""
    out = run("ip", "-n", ns, "-j", *args)
    return json.loads(out) if out.strip() else []


def owned_links(ns: str, prefix: str = "wp") -> list[str]:
    """Names of links in `ns` that netsetup owns (veths named veth_prefix + hash)."""
    return sorted(
        link["ifname"]
        for link in ip_json(ns, "-d", "link", "show")
        if is_owned_link_name(prefix, link["ifname"])
        and link.get("linkinfo", {}).get("info_kind") == "veth"
    )


def nft_elements(ns: str, table: str = "waypost") -> list[dict[str, Any]]:
    """The elements of the `ports` maps of `table` in `ns` ([] without the table)."""
    found: list[dict[str, Any]] = []
    for name in ("ports", "ports6"):
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "list", "map", "inet", table, name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            continue
        for item in json.loads(done.stdout)["nftables"]:
            found += item.get("map", {}).get("elem", [])
    return found


def namespaces(prefix: str) -> list[str]:
    """Namespace files under /var/run/netns starting with `prefix`."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def is_namespace(name: str) -> bool:
    """True when a namespace is mounted at /var/run/netns/<name>."""
    try:
        return (NETNS_DIR / name).stat().st_dev != NETNS_DIR.stat().st_dev
    except FileNotFoundError:
        return False


def delete_namespace(name: str) -> None:
    """`ip netns del`, and whatever a test put at that path instead (a file, a directory)."""
    run("ip", "netns", "del", name, check=False)
    path = NETNS_DIR / name
    if path.is_dir() and not is_namespace(name):
        shutil.rmtree(path)
    elif path.exists() and not is_namespace(name):
        path.unlink()


def nft(ns: str, script: str) -> None:
    """Run an nft script inside `ns`."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- namespaces -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run_prefix() -> Iterator[str]:
    prefix = f"wpt{secrets.token_hex(2)}"
    yield prefix
    if _skip_reason():
        return
    for name in namespaces(prefix):  # whatever a finalizer could not remove
        delete_namespace(name)
    left = namespaces(prefix)
    assert not left, f"namespaces left behind: {left}"


@dataclass
class Topology:
    """A throwaway host namespace and an external one, joined by a veth."""

    prefix: str  # "<run prefix>-<n>": every name of this topology starts with it
    host: str
    external: str
    host_ip: str  # ext0 in host
    external_ip: str  # eth0 in external
    _allocs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def alloc_id(self, tag: str = "a") -> str:
        return f"{self.prefix}-{tag}{next(self._allocs)}"

    def close(self) -> None:
        for name in namespaces(self.prefix + "-"):
            delete_namespace(name)
        for name in (self.host, self.external):
            delete_namespace(name)

    def reboot(self) -> None:
        """A simulated reboot: every namespace of this topology gone (allocations' too,
        with the bridge, the veths and the nft table), then host and external rebuilt
        with the same names and addresses.  Stop the driver first."""
        self.close()
        _wire(self)


def build_topology(run_prefix: str) -> Topology:
    n = next(_counter)
    prefix = f"{run_prefix}-{n}"
    octet = n % 250 + 1
    topo = Topology(
        prefix=prefix,
        host=f"{prefix}h",
        external=f"{prefix}x",
        host_ip=f"10.{octet}.0.1",
        external_ip=f"10.{octet}.0.2",
    )
    _wire(topo)
    return topo


def _wire(topo: Topology) -> None:
    try:
        run("ip", "netns", "add", topo.host)
        run("ip", "netns", "add", topo.external)
        h, x = topo.host, topo.external
        run("ip", "-n", h, "link", "add", "ext0", "type", "veth", "peer", "eth0", "netns", x)
        run("ip", "-n", h, "addr", "add", f"{topo.host_ip}/30", "dev", "ext0")
        run("ip", "-n", x, "addr", "add", f"{topo.external_ip}/30", "dev", "eth0")
        for ns, dev in ((h, "ext0"), (h, "lo"), (x, "eth0"), (x, "lo")):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", h, "route", "add", "default", "via", topo.external_ip)
    except BaseException:
        topo.close()
        raise


@pytest.fixture
def make_topology(run_prefix: str) -> Iterator[Callable[[], Topology]]:
    made: list[Topology] = []

    def make() -> Topology:
        made.append(build_topology(run_prefix))
        return made[-1]

    yield make
    for topo in made:
        topo.close()


@pytest.fixture
def topology(make_topology: Callable[[], Topology]) -> Topology:
    return make_topology()


# --- the driver process ---------------------------------------------------------------------


class DriverError(Exception):
    """A request the driver answered with an error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['type']}: {error['message']}")
        self.type: str = error["type"]
        self.errno: int | None = error.get("errno")
        self.notes: list[str] = error.get("notes", [])


class Driver:
    """A `tests.netns.driver` process inside a host namespace (see the module docstring)."""

    def __init__(self, topology: Topology, config: dict[str, Any], stderr_path: Path) -> None:
        self.topology = topology
        self.config = config
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr_path = stderr_path
        self._stderr = stderr_path.open("ab")
        argv = [sys.executable, "-m", "tests.netns.driver"]
        argv += ["--netns", str(NETNS_DIR / topology.host), "--config", json.dumps(config)]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.host_ip: str = self.wait_event("ready", STARTUP_TIMEOUT)["host_ip"]
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode())
        self._lines.put(None)

    def _pump(self, deadline: float) -> None:
        """Take one line (or time out); answers and events are filed."""
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"driver silent; stderr: {self.stderr()[-2000:]}") from None
        if line is None:
            self._lines.put(None)
            raise ConnectionError(f"driver exited; stderr: {self.stderr()[-2000:]}")
        message = json.loads(line)
        if "id" in message:
            self._answers[message["id"]] = message
        else:
            self._events.append(message)

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")

    def send(self, op: str, **args: Any) -> int:
        ident = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": ident, "op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return ident

    def wait(self, ident: int, timeout: float = CALL_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while ident not in self._answers:
            self._pump(deadline)
        answer = self._answers.pop(ident)
        if not answer["ok"]:
            raise DriverError(answer["error"])
        return answer["result"]

    def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        return self.wait(self.send(op, **args), timeout)

    def wait_event(self, name: str, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                if event.get("event") == name:
                    self._events.remove(event)
                    return event
            self._pump(deadline)

    def setup(
        self, alloc: str, mode: str = "bridge", ports: list[dict[str, Any]] | None = None
    ) -> Any:
        return self.call("setup", alloc=alloc, spec={"mode": mode, "ports": ports or []})

    def kill(self) -> None:
        """SIGKILL (a crash); by pid, ours."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_pipes()

    def stop(self) -> None:
        """EOF on stdin, then wait; SIGKILL when it does not go."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()


@pytest.fixture
def start_driver(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    started: list[Driver] = []

    def start(
        topology: Topology, config: dict[str, Any] | None = None, data_dir: Path | None = None
    ) -> Driver:
        settings = {"data_dir": str(data_dir or tmp_path / "data"), **(config or {})}
        driver = Driver(topology, settings, tmp_path / f"driver{len(started)}.stderr")
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.stop()


@pytest.fixture
def driver(topology: Topology, start_driver: Callable[..., Driver]) -> Driver:
    return start_driver(topology)


# --- traffic from inside namespaces ------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def ns_socket(ns: str, kind: int, family: int = socket.AF_INET) -> socket.socket:
    """A socket living in namespace `ns`: created by a thread that setns()s there."""
    made: list[socket.socket | BaseException] = []

    def create() -> None:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                made.append(socket.socket(family, kind))
            finally:
                _setns(original)  # a thread that cannot come back dies below anyway
        except BaseException as exc:
            made.append(exc)
        finally:
            os.close(original)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join(timeout=10)
    if not made:
        raise TimeoutError(f"socket in {ns}: thread did not finish")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class EchoServer:
    """TCP and UDP on one ip:port inside `ns`, answering "<name> <peer ip>".

    One thread serves both until close() (or ECHO_LIFETIME); a TCP peer gets one answer
    per connection after its first line.
    """

    def __init__(self, ns: str, ip: str, port: int = 0, name: str = "echo") -> None:
        self.name = name
        self.ip = ip
        self._tcp = ns_socket(ns, socket.SOCK_STREAM, _family(ip))
        self._udp = ns_socket(ns, socket.SOCK_DGRAM, _family(ip))
        try:
            self._tcp.bind((ip, port))
            self.port: int = self._tcp.getsockname()[1]
            self._udp.bind((ip, self.port))
            self._tcp.listen(64)
        except BaseException:
            self._tcp.close()
            self._udp.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + ECHO_LIFETIME
        with selectors.DefaultSelector() as sel:
            sel.register(self._tcp, selectors.EVENT_READ)
            sel.register(self._udp, selectors.EVENT_READ)
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.1):
                    if key.fileobj is self._udp:
                        _, peer = self._udp.recvfrom(2048)
                        self._udp.sendto(f"{self.name} {peer[0]}".encode(), peer)
                    elif key.fileobj is self._tcp:
                        self._answer_tcp()

    def _answer_tcp(self) -> None:
        conn, peer = self._tcp.accept()
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2.0)
            conn.recv(2048)
            conn.sendall(f"{self.name} {peer[0]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._tcp.close()
        self._udp.close()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tcp_ask(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """Connect from `ns` to ip:port, send a line, return the answer (OSError otherwise)."""
    with ns_socket(ns, socket.SOCK_STREAM, _family(ip)) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(b"hello\n")
        return sock.recv(2048).decode().strip()


def udp_ask(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """Send one datagram from `ns` to ip:port, return the answer (OSError otherwise)."""
    with ns_socket(ns, socket.SOCK_DGRAM, _family(ip)) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello", (ip, port))
        return sock.recv(2048).decode().strip()
