"""The Consul stand-in as a process, for the root mirror test.

    python -m tests.netns.mirror_driver standin HOST PORT

Serves tests/consul_standin.py on HOST:PORT, prints "ready" on stdout once
listening and stops cleanly on SIGTERM or SIGINT.  Run inside a namespace with
`ip netns exec`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from tests.consul_standin import ConsulStandin


async def standin(host: str, port: int) -> None:
    consul = ConsulStandin(host=host)
    await consul.start(port)
    try:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
    finally:
        await consul.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if argv[:1] != ["standin"] or len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(standin(argv[1], int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
