"""The HTTP servers under test, each a child process pinned to one core.  Adapter.

- :func:`start_agent`: waypost's agent (`python -m discovery agent --dev`) with
  DNS and HTTP on 127.0.0.1:0, a fresh data dir and a JSON config holding the
  benchmark's services (`web` and some others); the HTTP port is read from its
  ``waypost: http listening on 127.0.0.1:PORT`` line.
- :func:`start_nginx`: nginx (Debian nginx-light) in the foreground, one
  worker, its own temp dir and ``nginx.conf``, serving one file at one path
  with a given Content-Type: the ceiling for "answer an HTTP GET with a JSON body".

Both start with ``taskset -c <core>`` (taskset execs, so the pid is the
server's; nginx's worker inherits the affinity) and return a :class:`Server`
whose ``close()`` ends that pid (SIGTERM, then SIGKILL) and removes the temp
dir.  :func:`http_get` / :func:`http_put` are plain ``http.client`` calls to
127.0.0.1 (no proxy settings are consulted).

Error handling: a server that exits or does not answer in time raises
:class:`ServerError` carrying its name, command and the tail of its log; the
process and temp dir are cleaned up before raising.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench.dns_servers import Server, ServerError

REPO = Path(__file__).resolve().parents[2]  # `python -m tests.bench...` needs it as cwd
SERVER_CORE = 0
CLIENT_CORE = 1
RESTART_ATTEMPTS = 3  # starts of the agent on a crashed one's data dir
PROBE_TIMEOUT = 1.0  # one readiness request
LISTEN_LINE = re.compile(r"waypost: http listening on 127\.0\.0\.1:(\d+)")
HOST = "127.0.0.1"

# The benchmark's registry: `web` (the service every benchmark reads) and some others,
# so that the registry is not trivially small.  Addresses are record data, never contacted.
DATACENTER = "dc1"
NODE_NAME = "bench"
WEB = "web"
WEB_INSTANCES = 3
OTHER_SERVICES = 99
INSTANCES_PER_OTHER = 3
# nginx-light's worker_connections must cover the load generator's connections.
NGINX_CONNECTIONS = 4096
NGINX_KEEPALIVE_REQUESTS = 1_000_000  # nginx's default (1000) would reconnect wrk every 1000


# -- plain HTTP on loopback ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, *, timeout: float = 10.0
) -> Reply:
    """One request to 127.0.0.1:port over a fresh connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, dict(response.getheaders()), data)
    finally:
        conn.close()


def http_get(port: int, path: str, *, timeout: float = 10.0) -> Reply:
    return http_request(port, "GET", path, timeout=timeout)


def http_put(port: int, path: str, doc: object, *, timeout: float = 10.0) -> Reply:
    return http_request(port, "PUT", path, json.dumps(doc).encode(), timeout=timeout)


def answers(port: int, path: str) -> bool:
    """True when 127.0.0.1:port answers GET `path` with 200."""
    try:
        return http_get(port, path, timeout=PROBE_TIMEOUT).status == 200
    except (OSError, http.client.HTTPException):
        return False


# -- starting ------------------------------------------------------------------------------


def spawn(
    name: str,
    command: Sequence[str],
    workdir: Path,
    *,
    find_port: Callable[[Server], int | None],
    probe: str,
    deadline: float,
    core: int,
    keep_workdir: bool = False,
) -> Server:
    """Start `command` on `core`, wait until it answers GET `probe`; clean up if it never does.

    With `keep_workdir` the temp dir survives a failed start (a restart may try again).
    """
    pinned = ["taskset", "-c", str(core), *command]
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            pinned, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    server = Server(name, 0, proc, workdir, pinned, log_path, keep_workdir=keep_workdir)
    try:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if not server.alive():
                raise ServerError(name, pinned, f"exited with {proc.returncode}", server.log_tail())
            port = find_port(server)
            if port and answers(port, probe):
                server.port = port
                return server
            time.sleep(0.05)
        raise ServerError(name, pinned, f"not answering after {deadline:.0f} s", server.log_tail())
    except BaseException:
        server.close()
        raise


def from_log(server: Server) -> int | None:
    try:
        found = LISTEN_LINE.findall(server.log_path.read_text(errors="replace"))
    except OSError:
        return None
    return int(found[-1]) if found else None  # the last start's (a restart appends)


def render_agent_config() -> str:
    """The agent's JSON config: `web` x WEB_INSTANCES and OTHER_SERVICES others, no checks."""
    services: list[dict[str, object]] = []
    for n in range(1, WEB_INSTANCES + 1):
        services.append(
            {
                "name": WEB,
                "id": f"{WEB}-{n}",
                "address": f"10.0.0.{n}",
                "port": 8080,
                "tags": ["v1"],
            }
        )
    for s in range(1, OTHER_SERVICES + 1):
        for n in range(1, INSTANCES_PER_OTHER + 1):
            services.append(
                {
                    "name": f"svc{s}",
                    "id": f"svc{s}-{n}",
                    "address": f"10.{s // 256}.{s % 256}.{n}",
                    "port": 9000 + n,
                }
            )
    doc = {"datacenter": DATACENTER, "node_name": NODE_NAME, "service": services}
    return json.dumps(doc, indent=1) + "\n"


def agent_command(config: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "discovery",
        "agent",
        "--dev",
        "--dns-addr",
        f"{HOST}:0",
        "--http-addr",
        f"{HOST}:0",
        "--data-dir",
        str(data_dir),
        "--config",
        str(config),
    ]


AGENT_PROBE = "/v1/agent/health"


def start_agent(*, deadline: float = 120.0, core: int = SERVER_CORE) -> Server:
    """waypost's agent on `core`, with the benchmark config and an empty data dir."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-waypost-"))
    try:
        config = workdir / "bench.json"
        config.write_text(render_agent_config())
        data_dir = workdir / "data"
        data_dir.mkdir()
        command = agent_command(config, data_dir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = spawn(
        "waypost",
        command,
        workdir,
        find_port=from_log,
        probe=AGENT_PROBE,
        deadline=deadline,
        core=core,
    )
    server.data_dir = data_dir
    return server


def restart_agent(
    crashed: Server, *, deadline: float = 300.0, attempts: int = RESTART_ATTEMPTS
) -> tuple[Server, list[str]]:
    """SIGKILL `crashed`, start the agent again on its config and data dir.

    Returns the new server (which owns the temp dir now) and the errors of the
    attempts that failed before it (a start can fail for reasons that are not
    about the data, e.g. a port taken; each attempt picks new ports).
    Error handling: the last attempt's ServerError propagates; the temp dir is removed.
    """
    assert crashed.data_dir is not None
    crashed.kill()
    crashed.closed = True  # its temp dir now belongs to the next process
    failures: list[str] = []
    for attempt in range(attempts):
        try:
            server = spawn(
                "waypost",
                crashed.command[3:],  # without `taskset -c N`
                crashed.workdir,
                find_port=from_log,
                probe=AGENT_PROBE,
                deadline=deadline,
                core=SERVER_CORE,
                keep_workdir=True,
            )
        except ServerError as exc:
            failures.append(str(exc).splitlines()[-1])
            if attempt + 1 == attempts:
                shutil.rmtree(crashed.workdir, ignore_errors=True)
                raise
            continue
        server.keep_workdir = False
        server.data_dir = crashed.data_dir
        return server, failures
    raise AssertionError("unreachable: the last attempt returns or raises")


def render_nginx_conf(workdir: Path, port: int, content_type: str) -> str:
    """One worker, no access log, the root in `workdir/root`, every file as `content_type`."""
    temp = {
        name: workdir / "tmp" / name
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections {NGINX_CONNECTIONS};
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests {NGINX_KEEPALIVE_REQUESTS};
    open_file_cache max=16 inactive=60s;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    types {{ }}
    default_type {content_type};
    server {{
        listen {HOST}:{port} backlog=4096;
        root {workdir}/root;
        location / {{ }}
    }}
}}
"""


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for nginx, which needs a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_nginx(
    path: str, body: bytes, content_type: str, *, deadline: float = 30.0, core: int = SERVER_CORE
) -> Server:
    """nginx on `core` serving `body` at `path` (any query string) as `content_type`."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-nginx-"))
    try:
        target = workdir / "root" / path.lstrip("/")
        target.parent.mkdir(parents=True)
        target.write_bytes(body)
        (workdir / "tmp").mkdir()
        port = free_tcp_port()
        conf = workdir / "nginx.conf"
        conf.write_text(render_nginx_conf(workdir, port, content_type))
        # nginx's worker runs as `nobody` when started by root: it must be able to read the root.
        for place in (workdir, *workdir.rglob("*")):
            place.chmod(0o755 if place.is_dir() else 0o644)
        command = ["nginx", "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")]
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return spawn(
        "nginx",
        command,
        workdir,
        find_port=lambda _server: port,
        probe=path,
        deadline=deadline,
        core=core,
    )
