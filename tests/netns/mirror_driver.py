"""Processes for the root mirror test: the Consul stand-in, or an agent with the mirror.

    python -m tests.netns.mirror_driver standin HOST PORT
    python -m tests.netns.mirror_driver agent CONFIG_FILE

`standin` serves tests/consul_standin.py on HOST:PORT.  `agent` runs the agent as
`python -m discovery agent --config CONFIG_FILE` does (discovery.agent.start_agent)
and, for as long as the agent does not start the mirror itself, the Consul mirror
from the config's `consul` block next to it.  Both print "ready" on stdout once
serving and stop cleanly on SIGTERM or SIGINT.  Run inside a namespace with
`ip netns exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

import discovery.agent
from discovery.agent import start_agent
from discovery.hclfile import load_config
from discovery.mirror import start_mirror
from tests.consul_standin import ConsulStandin


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


async def standin(host: str, port: int) -> None:
    consul = ConsulStandin(host=host)
    await consul.start(port)
    try:
        await _until_signalled()
    finally:
        await consul.close()


@contextlib.asynccontextmanager
async def _agent(path: str) -> AsyncIterator[None]:
    config = load_config([path], hostname=socket.gethostname())
    agent = await start_agent(config)
    mirror = None
    try:
        # The agent starts the mirror itself once it is wired there (discovery.agent).
        if config.consul is not None and not hasattr(discovery.agent, "start_mirror"):
            mirror = await start_mirror(
                agent.registry,
                config.consul,
                node=config.node_name,
                datacenter=config.datacenter,
            )
        yield
    finally:
        if mirror is not None:
            await mirror.close()
        await agent.close()


async def agent(path: str) -> None:
    async with _agent(path):
        await _until_signalled()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if argv[:1] == ["standin"] and len(argv) == 3:
        asyncio.run(standin(argv[1], int(argv[2])))
    elif argv[:1] == ["agent"] and len(argv) == 2:
        asyncio.run(agent(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
