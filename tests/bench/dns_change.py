"""How fast a registry change becomes visible over DNS.  Composition root (in-process).

One process (on uvloop, as the agent) holds a Registry of N services x 3
instances, waypost's Responder and DNS server on 127.0.0.1:0, and a UDP client
on the same event loop.  For each change it times from just before
`Registry.upsert` until the first UDP reply that carries the new address
(re-asking until it does).  Even changes
add a new service (`chg<i>`), odd ones move an existing instance to a new
address.  Prints one JSON object with the durations (seconds), the time of
the upsert call alone, and a plain query round trip for comparison.

    .venv/bin/python -m tests.bench.dns_change --services 10000 --changes 50 [--realtime]

With --realtime the timed part runs SCHED_FIFO (after loading), so other
processes on a shared host do not preempt it.  Like the agent, it calls
gc.freeze() once the registry is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import dns.message
import uvloop

from discovery.dns.server import start_dns
from discovery.model import make_instance
from discovery.registry import Registry
from tests.bench import dns_data
from tests.bench.dns_inproc import build
from tests.bench.dns_perf import REALTIME_PRIORITY

REPLY_TIMEOUT = 0.5  # seconds for one reply
MAX_ASKS = 1000  # re-asks per change before giving up (bounded loop)


class _Client(asyncio.DatagramProtocol):
    """Receives replies; `wait()` returns the next one and its arrival time (ns)."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[tuple[bytes, int]] | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        arrived = time.perf_counter_ns()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((data, arrived))

    async def ask(self, transport: asyncio.DatagramTransport, query: bytes) -> tuple[bytes, int]:
        self._waiter = asyncio.get_running_loop().create_future()
        transport.sendto(query)
        return await asyncio.wait_for(self._waiter, REPLY_TIMEOUT)


def _query(name: str) -> bytes:
    return dns.message.make_query(name, "A", use_edns=False).to_wire()


def _new_address(i: int) -> str:
    return f"172.16.{(i >> 8) & 0xFF}.{i & 0xFF}"


async def _visible(
    client: _Client, transport: asyncio.DatagramTransport, query: bytes, packed: bytes
) -> int:
    """Ask until a reply holds `packed` (the new address); the arrival time in ns."""
    for _ in range(MAX_ASKS):
        reply, arrived = await client.ask(transport, query)
        if packed in reply[12:]:
            return arrived
    raise RuntimeError(f"change not visible after {MAX_ASKS} queries")


def _change(registry: Registry, i: int, services: int) -> tuple[str, str]:
    """Apply change `i`; the (name to ask, new address)."""
    address = _new_address(i)
    snap = registry.snapshot
    if i % 2 == 0:
        inst = make_instance(
            service=f"chg{i}", id=f"chg{i}-1", node=snap.local_node, address=address, port=30000
        )
        registry.upsert(inst)
        return f"chg{i}.service.{dns_data.DOMAIN}", address
    name = dns_data.service_name(1 + (i * 7919) % services)
    current = snap.instances[f"{name}-1"]
    registry.upsert(replace(current, address=address))
    return f"{name}.service.{dns_data.DOMAIN}", address


async def measure(services: int, changes: int, *, realtime: bool) -> dict[str, Any]:
    instances = dns_data.plan_instances(services)
    doc = json.loads(dns_data.render_waypost_config(instances))
    registry, responder = build(doc)
    gc.freeze()  # as the agent does once loaded: collections skip the loaded registry
    if realtime:  # after loading: only the timed part runs SCHED_FIFO
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    server = await start_dns(responder, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        _Client, remote_addr=("127.0.0.1", server.port)
    )
    try:
        baseline: list[float] = []
        probe = _query(f"{dns_data.service_name(1)}.service.{dns_data.DOMAIN}")
        for _ in range(changes):
            start = time.perf_counter_ns()
            _, arrived = await client.ask(transport, probe)
            baseline.append((arrived - start) / 1e9)
        visible: list[float] = []
        upsert: list[float] = []
        for i in range(changes):
            start = time.perf_counter_ns()
            name, address = _change(registry, i, services)
            upsert.append((time.perf_counter_ns() - start) / 1e9)
            packed = ipaddress.ip_address(address).packed
            arrived = await _visible(client, transport, _query(name), packed)
            visible.append((arrived - start) / 1e9)
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
    return {
        "services": services,
        "changes": changes,
        "visible": visible,
        "upsert": upsert,
        "query_rtt": baseline,
        "visible_median": statistics.median(visible),
        "visible_max": max(visible),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dns_change")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--realtime", action="store_true", help="time the changes as SCHED_FIFO")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(measure(args.services, args.changes, realtime=args.realtime))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
