"""Fallback DNS server for the benchmark: Registry + Responder + start_dns.  Composition root.

Used while the agent CLI is not available, or with `dns_qps --waypost inproc`.
It takes the agent's arguments (`agent --dev --dns-addr 127.0.0.1:0
--data-dir DIR --config FILE.json`), loads the JSON config's `service` list
into a Registry, serves DNS with waypost's own Responder and server, logs
`waypost: dns listening on 127.0.0.1:PORT (udp+tcp)` to stderr as the agent
does, and runs until SIGTERM or SIGINT.  Like the agent it runs on uvloop
(`--asyncio` for the plain loop: roughly 20-25% fewer answers per CPU second).

    .venv/bin/python -m tests.bench.dns_inproc agent --dev --dns-addr 127.0.0.1:0 \\
        --data-dir /tmp/x --config bench.json [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from discovery.dns.responder import Responder
from discovery.dns.server import start_dns
from discovery.dns.settings import DnsSettings
from discovery.model import Instance, Node, make_instance
from discovery.registry import Registry

NODE_ADDRESS = "127.0.0.1"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dns_inproc")
    parser.add_argument("command", choices=["agent"])
    parser.add_argument("--dev", action="store_true")
    parser.add_argument("--dns-addr", default="127.0.0.1:0")
    parser.add_argument("--data-dir", default="")  # accepted for CLI parity; unused
    parser.add_argument("--http-addr", default="")  # accepted for CLI parity; no HTTP here
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--asyncio", action="store_true", help="plain asyncio loop (default: uvloop, as the agent)"
    )
    return parser.parse_args(argv)


def plan_instances(doc: Mapping[str, Any], node: str) -> list[Instance]:
    """The config's `service` entries as instances on `node`."""
    services: Iterable[Mapping[str, Any]] = doc.get("service", [])
    return [
        make_instance(
            service=svc["name"],
            id=svc.get("id"),
            node=node,
            address=svc["address"],
            port=svc.get("port", 0),
            tags=svc.get("tags"),
            meta=svc.get("meta"),
            source="config",
        )
        for svc in services
    ]


def build(doc: Mapping[str, Any]) -> tuple[Registry, Responder]:
    """A registry holding the config's services and a responder over it."""
    node_name = str(doc.get("node_name", "localhost"))
    datacenter = str(doc.get("datacenter", "dc1"))
    registry = Registry(Node(node_name, NODE_ADDRESS))
    registry.upsert(*plan_instances(doc, node_name))
    settings = DnsSettings(datacenter=datacenter, node_name=node_name, node_address=NODE_ADDRESS)
    return registry, Responder(registry, settings)


async def serve(args: argparse.Namespace, doc: Mapping[str, Any]) -> None:
    _registry, responder = build(doc)
    host, _, port = args.dns_addr.rpartition(":")
    server = await start_dns(responder, host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"waypost: dns listening on {server.host}:{server.port} (udp+tcp)", file=sys.stderr)
    sys.stderr.flush()
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.config, encoding="utf-8") as f:
        doc = json.load(f)
    if args.asyncio:
        asyncio.run(serve(args, doc))
    else:
        import uvloop

        uvloop.run(serve(args, doc))


if __name__ == "__main__":
    main()
