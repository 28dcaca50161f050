"""A process for test_restart.py: registers instances one by one, printing each durable one.

    python restart_child.py DATA_DIR PREFIX COUNT

Opens the store in DATA_DIR, restores a Registry from it (as the agent does:
``index = stored + 1``, stored instances upserted), attaches, prints
``restored <index> <count>``, then for n in 0..COUNT-1 registers
``<PREFIX>-<n>`` (source "api", one TTL check), sets the check passing with
output ``ok <n>``, awaits durable() and prints ``acked <id> <index>``, flushed:
a line is printed only once its change is on disk.  The test kills it with
SIGKILL somewhere in the middle.
"""

from __future__ import annotations

import asyncio
import sys

from discovery.model import CheckKind, Health, Node, make_check, make_instance
from discovery.registry import Registry
from discovery.store import open_store

NODE = Node("agent", "127.0.0.1")


async def main(data_dir: str, prefix: str, count: int) -> None:
    store = open_store(data_dir)
    restored = store.load()
    registry = Registry(NODE, index=restored.index + 1)
    registry.upsert(*restored.instances)
    store.attach(registry)
    print(f"restored {registry.snapshot.index} {len(restored.instances)}", flush=True)
    try:
        for n in range(count):
            ident = f"{prefix}-{n}"
            check = make_check(id=f"service:{ident}", name="ttl", kind=CheckKind.TTL, ttl=30)
            registry.upsert(
                make_instance(
                    service=f"svc{n % 10}",
                    id=ident,
                    node=NODE.name,
                    address="10.0.0.1",
                    port=1000 + n % 60000,
                    checks=[check],
                )
            )
            snap = registry.update_check(check.id, Health.PASSING, output=f"ok {n}")
            await store.durable(snap.index)
            print(f"acked {ident} {snap.index}", flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
