"""The peer of the task start benchmark: a Nomad client's path, step by step, in a host namespace.

Started by tests/bench/task_start.py as

    python -m tests.bench.task_peer --netns /var/run/netns/<host> --prefix <run prefix>
                                    --work <temp dir> --http <agent's HTTP port>
                                    --host-ip <host address>

It joins the host namespace first (as tests/bench/net_driver.py does, whose CNI
chain it uses: Nomad's bridge conflist, one process per plugin as libcni runs them),
then, per request, starts `n` allocations the way a Nomad client does, all at once
(Nomad runs one allocation runner per allocation, concurrently):

- bridge: create the allocation's namespace, CNI ADD (loopback, bridge, firewall,
  portmap with the host port -> 8080), start the task inside it (`nsenter --net`),
  register the instance (PUT /v1/agent/service/register on the agent, the host
  address and port: what Nomad's service hook does against Consul);
- host: start the task on a host port, register it.

Protocol, JSON lines: {"op": "start", "n": N, "mode": "bridge"|"host", "service": S}
answered {"ok": true, "result": {"pids": [...]}} once every step returned (the caller
times from its request to the instances answering); {"op": "stop"} undoes it all (task
killed, deregistered, CNI DEL, namespace deleted); first {"ready": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsetup.links import Links, start_links
from netsetup.spec import NetConfig
from tests.bench.net_driver import CniChain, nomad_conflist
from tests.netns.driver import emit, join_namespace

PYTHON = sys.executable
ALLOC_PORT = 8080
FIRST_HOST_PORT = 24000
CNI_SUBNET = "172.28.0.0/20"  # not the agent's bridge subnet (172.26.64.0/20)
# The task of both sides: accept connections and close them.
SERVER = (
    "import socket,sys\n"
    "s=socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.listen(64)\n"
    "while True:\n"
    " c,_=s.accept(); c.close()\n"
)


@dataclass
class Alloc:
    name: str
    host_port: int
    mode: str
    service: str
    pid: int = 0


class Peer:
    def __init__(self, links: Links, chain: CniChain, args: argparse.Namespace) -> None:
        self._links = links
        self._chain = chain
        self._args = args
        self._serial = 0
        self.live: list[Alloc] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def _ports(self, alloc: Alloc) -> dict[str, Any]:
        mapping = {"hostPort": alloc.host_port, "containerPort": ALLOC_PORT}
        mapping["hostIP"] = self._args.host_ip
        return {"portMappings": [{**mapping, "protocol": p} for p in ("tcp", "udp")]}

    def _agent(self, method: str, path: str, body: object = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self._args.http}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()

    def _spawn(self, argv: list[str]) -> int:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._procs[proc.pid] = proc
        return proc.pid

    async def _start_one(self, alloc: Alloc) -> None:
        if alloc.mode == "bridge":
            await self._links.create_namespace(alloc.name)
            path = str(self._links.namespace_path(alloc.name))
            await asyncio.to_thread(self._chain.add, alloc.name, path, self._ports(alloc))
            nsenter = shutil.which("nsenter") or "nsenter"
            argv = [nsenter, f"--net={path}", PYTHON, "-S", "-c", SERVER, "0.0.0.0"]
            argv.append(str(ALLOC_PORT))
        else:
            argv = [PYTHON, "-S", "-c", SERVER, "0.0.0.0", str(alloc.host_port)]
        alloc.pid = await asyncio.to_thread(self._spawn, argv)
        body = {
            "Name": alloc.service,
            "ID": alloc.name,
            "Address": self._args.host_ip,
            "Port": alloc.host_port,
        }
        await asyncio.to_thread(self._agent, "PUT", "/v1/agent/service/register", body)

    async def start(self, n: int, mode: str, service: str) -> dict[str, Any]:
        batch = []
        for _ in range(n):
            self._serial += 1
            name = f"{self._args.prefix}p{self._serial}"
            batch.append(Alloc(name, FIRST_HOST_PORT + self._serial % 4000, mode, service))
        self.live.extend(batch)
        await asyncio.gather(*(self._start_one(a) for a in batch))
        return {"pids": [a.pid for a in batch]}

    async def _stop_one(self, alloc: Alloc) -> None:
        await asyncio.to_thread(self._agent, "PUT", f"/v1/agent/service/deregister/{alloc.name}")
        proc = self._procs.pop(alloc.pid, None)
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        if alloc.mode == "bridge":
            path = str(self._links.namespace_path(alloc.name))
            await asyncio.to_thread(self._chain.delete, alloc.name, path, self._ports(alloc))
            await self._links.delete_namespace(alloc.name)

    async def stop(self) -> dict[str, Any]:
        live, self.live = self.live, []
        await asyncio.gather(*(self._stop_one(a) for a in live))
        return {"stopped": len(live)}

    def kill_all(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def serve(args: argparse.Namespace) -> None:
    work = Path(args.work)
    links = await start_links(NetConfig(data_dir=str(work / "peer-links")))
    conflist = nomad_conflist(f"{args.prefix}c", CNI_SUBNET, str(work / "peer-ipam"))
    peer = Peer(links, CniChain(conflist, work / "peer-cache", []), args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"ready": {"pid": os.getpid()}})
    try:
        while line := await reader.readline():
            request = json.loads(line)
            try:
                if request["op"] == "start":
                    result = await peer.start(
                        int(request["n"]), request["mode"], request["service"]
                    )
                elif request["op"] == "stop":
                    result = await peer.stop()
                else:
                    raise ValueError(f"unknown op {request['op']!r}")
            except Exception as exc:  # reported to the orchestrator, which stops
                emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            else:
                emit({"ok": True, "result": result})
    finally:
        peer.kill_all()
        links.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--http", type=int, required=True)
    parser.add_argument("--host-ip", required=True)
    args = parser.parse_args()
    join_namespace(args.netns)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
