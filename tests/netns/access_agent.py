"""Tiny TCP/UDP servers and probes for the access-scope tests.  Adapter (sockets), stdlib only.

Run inside a namespace by path, e.g. ``ip netns exec NS python access_agent.py serve ...``:

    serve NAME ADDR:PORT/PROTO ...   bind every listener ([V6ADDR]:PORT for IPv6), print
                                     READY, answer each TCP line or UDP datagram with
                                     "NAME PEER-IP", exit on stdin EOF or after
                                     MAX_LIFETIME seconds, whichever comes first
    probe TIMEOUT JSON               JSON is a list of [proto, host, port]; each probe connects
                                     (TCP) or sends one datagram (UDP) concurrently and waits up
                                     to TIMEOUT for the answer; prints one JSON list of results
                                     {"ok": bool, "reply": str, "error": str}

The reply names the server and the source address it saw, so a test can tell which
listener answered and whether the packet was masqueraded.  Nothing here sends a packet
anywhere but the addresses a test passes (loopback or addresses inside its namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from typing import Any, cast

MAX_LIFETIME = 300.0  # a server left behind by a crashed test still goes away on its own


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.name} {addr[0]}".encode(), addr)


def _split(spec: str) -> tuple[str, int, str]:
    addr, proto = spec.rsplit("/", 1)
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port), proto


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _serve(name: str, specs: list[str]) -> None:
    loop = asyncio.get_running_loop()

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.wait_for(reader.readline(), 5.0)
            writer.write(f"{name} {peer}\n".encode())
            await writer.drain()
        writer.close()

    closers: list[Any] = []
    for spec in specs:
        host, port, proto = _split(spec)
        if proto == "tcp":
            closers.append(await asyncio.start_server(on_tcp, host, port, reuse_address=True))
        else:
            sock = socket.socket(_family(host), socket.SOCK_DGRAM)
            if sock.family == socket.AF_INET6:  # v6 only, as asyncio does for TCP
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            transport, _ = await loop.create_datagram_endpoint(lambda: _Echo(name), sock=sock)
            closers.append(transport)
    print("READY", flush=True)
    stdin = asyncio.StreamReader()
    pipe, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin.read(), MAX_LIFETIME)
    pipe.close()
    for closer in closers:
        closer.close()


async def _probe_tcp(host: str, port: int, wait: float) -> dict[str, Any]:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"hello\n")
            line = await reader.readline()
        if not line:
            return {"ok": False, "reply": "", "error": "closed without a reply"}
        return {"ok": True, "reply": line.decode().strip(), "error": ""}
    except (OSError, TimeoutError) as exc:
        return {"ok": False, "reply": "", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if writer is not None:
            writer.close()


async def _probe_udp(host: str, port: int, wait: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not got.done():
                got.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(
        _Client, remote_addr=(host, port), family=_family(host)
    )
    try:
        transport.sendto(b"hello")
        data = await asyncio.wait_for(got, wait)
        return {"ok": True, "reply": data.decode().strip(), "error": ""}
    except (OSError, TimeoutError) as exc:
        return {"ok": False, "reply": "", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        transport.close()


async def _probe(wait: float, probes: list[list[Any]]) -> list[dict[str, Any]]:
    jobs = [
        _probe_tcp(host, int(port), wait) if proto == "tcp" else _probe_udp(host, int(port), wait)
        for proto, host, port in probes
    ]
    return list(await asyncio.gather(*jobs))


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        asyncio.run(_serve(argv[1], argv[2:]))
        return 0
    if len(argv) == 3 and argv[0] == "probe":
        results = asyncio.run(_probe(float(argv[1]), json.loads(argv[2])))
        print(json.dumps(results), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
