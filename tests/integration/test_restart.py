"""Persistence across `kill -9`: every acknowledged registration is back after a restart.

A real process (restart_child.py) registers instances one by one and prints
each one once durable() returned; the test SIGKILLs it in the middle of the
stream, reads every line it managed to print (each is an acknowledgement),
then reopens the store and checks that each acknowledged instance is back,
with its check status and output, and that the stored index is at least the
last acknowledged one.  A second run on the same data dir restores, goes on,
and is killed too.  Only the processes started here are killed, by pid.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from discovery.model import Health
from discovery.store import Restored, open_store

PYTHON = sys.executable
CHILD = Path(__file__).with_name("restart_child.py")
DEADLINE = 30.0  # seconds for a child to print what the test waits for
MANY = 1_000_000  # registrations asked of a child: it never finishes before the kill


@dataclass
class Run:
    restored_index: int
    restored_count: int
    acked: dict[str, int]  # instance id -> index acknowledged
    returncode: int


async def run_and_kill(data_dir: Path, prefix: str, kill_after: int) -> Run:
    """Start a child, SIGKILL it after `kill_after` acks, collect every line it printed."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        str(CHILD),
        str(data_dir),
        prefix,
        str(MANY),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    acked: dict[str, int] = {}
    try:
        async with asyncio.timeout(DEADLINE):
            first = (await proc.stdout.readline()).decode().split()
            assert first[:1] == ["restored"], (first, await proc.stderr.read())
            while len(acked) < kill_after:
                line = (await proc.stdout.readline()).decode()
                assert line, f"child ended early: {(await proc.stderr.read()).decode()}"
                _, ident, index = line.split()
                acked[ident] = int(index)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # our child, by its pid
        async with asyncio.timeout(DEADLINE):
            rest, _ = await proc.communicate()
    for line in rest.decode().splitlines():  # printed before it died: acknowledged too
        if line.strip():
            _, ident, index = line.split()
            acked[ident] = int(index)
    assert proc.returncode == -signal.SIGKILL
    return Run(int(first[1]), int(first[2]), acked, proc.returncode)


async def reopen(data_dir: Path) -> Restored:
    store = open_store(data_dir)
    try:
        return store.load()
    finally:
        await store.close()


def assert_all_back(restored: Restored, acked: dict[str, int]) -> None:
    back = {i.id: i for i in restored.instances}
    missing = sorted(set(acked) - set(back))
    assert missing == [], f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
    for ident in acked:
        inst = back[ident]
        n = int(ident.rsplit("-", 1)[1])
        assert inst.health is Health.PASSING, ident
        assert [(c.id, c.status, c.output) for c in inst.checks] == [
            (f"service:{ident}", Health.PASSING, f"ok {n}")
        ]
    assert restored.index >= max(acked.values())


@pytest.mark.parametrize("kill_after", [1, 150])
async def test_acknowledged_registrations_survive_sigkill(tmp_path: Path, kill_after: int) -> None:
    first = await run_and_kill(tmp_path, "a", kill_after)
    assert first.restored_count == 0
    assert len(first.acked) >= kill_after
    restored = await reopen(tmp_path)
    assert_all_back(restored, first.acked)

    second = await run_and_kill(tmp_path, "b", kill_after)
    assert second.restored_count >= len(first.acked)
    assert second.restored_index > max(first.acked.values())  # the index never goes back
    assert min(second.acked.values()) > max(first.acked.values())
    restored = await reopen(tmp_path)
    assert_all_back(restored, first.acked | second.acked)
