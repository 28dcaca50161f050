"""A netsetup process for the root tests: NetworkManager inside a throwaway namespace.

Started by tests/netns/conftest.py (`Driver`) as

    python -m tests.netns.driver --netns /var/run/netns/<host> --config '<NetConfig JSON>'
    python -m tests.netns.driver --netns /var/run/netns/<host> --cli up --alloc ...

(the second form runs `waypost net ...` in that namespace and exits with its code).

It joins the namespace first (setns on the main thread, before any other thread
exists), so netlink, `nft` and /proc/sys/net all act on that namespace, while it
stays in the machine's mount namespace: the namespaces it bind-mounts under
/var/run/netns are visible to every process and outlive it, exactly what a crashed
agent leaves behind.  (`ip netns exec` gives its child a private mount namespace,
where those bind mounts would vanish with the driver.)

Protocol, JSON lines.  Requests on stdin: {"id": n, "op": "...", ...arguments}; each
runs in a task of its own, so twenty setups written at once are twenty concurrent
setups.  Answers on stdout: {"id": n, "ok": true, "result": ...} or {"id": n, "ok":
false, "error": {"type": "KernelError", "message": "...", "errno": 17}}.  Events have
no id: {"event": "ready", "host_ip": ...}, {"event": "paused", "step": ..., "alloc": ...}.

    setup {alloc, spec}    spec as netsetup.spec.render_spec; the result as render_result
    teardown {alloc}       true when the state knew the allocation
    list / get {alloc}     results
    settle                 wait for background veth deletions; their failures
    reconcile              the ReconcileReport as a dict
    fault {step, action, alloc?}
                           the next call of `step` (create_namespace, create_veth,
                           configure_inside, add_alloc, complete), for `alloc` when
                           given, stops for good ("pause", after a "paused" event: the
                           test then SIGKILLs us), waits SLOW seconds ("slow") or fails
                           ("fail"; see FAULTS)
    cancelled_setup {alloc, spec}
                           a setup cancelled while its "slow" step runs; true when it was

The failures are real operations that fail, not raised exceptions: a default route
via an address off the subnet (ENETUNREACH), elements added to a table that does not
exist (after the real ones were added), completing an allocation the state lacks.
Namespace and veth failures come from name clashes the tests create (EEXIST).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import sys
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

from netsetup import cli
from netsetup.errors import KernelError, NetsetupError
from netsetup.firewall import Element, Firewall
from netsetup.links import start_links
from netsetup.network import NetworkManager, start_network_manager
from netsetup.spec import AllocNetwork, HostNetwork, NetConfig, parse_spec, render_result
from netsetup.state import NetState, open_state

_CLONE_NEWNET = 0x40000000
STEPS = ("create_namespace", "create_veth", "configure_inside", "add_alloc", "complete")
# Every step can pause or be slow; the namespace and veth steps fail through clashes the tests
# create themselves (a real EEXIST), the others through the operations described above.
SLOW = 0.5  # seconds a "slow" step waits after its real work, before it returns
FAULTS = {(step, action) for step in STEPS for action in ("pause", "slow")} | {
    ("configure_inside", "fail"),
    ("add_alloc", "fail"),
    ("complete", "fail"),
}
_OFF_SUBNET_GATEWAY = IPv4Address("192.0.2.1")  # TEST-NET-1: no route, so the kernel refuses


class Faults:
    """Armed faults: step -> (action, alloc id or "" for any), each fires once."""

    def __init__(self, emit: Any) -> None:
        self._armed: dict[str, tuple[str, str]] = {}
        self._emit = emit
        self.slow_started = asyncio.Event()

    def arm(self, step: str, action: str, alloc: str = "") -> None:
        if (step, action) not in FAULTS:
            raise ValueError(f"unknown fault {step}/{action}")
        self._armed[step] = (action, alloc)

    def _take(self, step: str, alloc: str, actions: tuple[str, ...]) -> str:
        action, only = self._armed.get(step, ("", ""))
        if action not in actions or (only and only != alloc):
            return ""
        del self._armed[step]
        return action

    async def check(self, step: str, alloc: str) -> str:
        """Before a step: "" when no pause/fail is armed for it, else "fail" (a pause
        never returns)."""
        action = self._take(step, alloc, ("pause", "fail"))
        if action == "pause":
            self._emit({"event": "paused", "step": step, "alloc": alloc})
            await asyncio.Event().wait()
        return action

    async def slow(self, step: str, alloc: str) -> None:
        """After a step's real work, before it returns: the window a cancellation that
        arrives while the kernel works falls into."""
        if self._take(step, alloc, ("slow",)):
            self.slow_started.set()
            await asyncio.sleep(SLOW)


class FaultyLinks:
    """netsetup.links.Links with faults on three steps; delegates everything else."""

    def __init__(self, links: Any, faults: Faults) -> None:
        self._links = links
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._links, name)

    async def create_namespace(self, name: str) -> None:
        await self._faults.check("create_namespace", name)
        await self._links.create_namespace(name)
        await self._faults.slow("create_namespace", name)

    async def create_veth(self, name: str, namespace: str, bridge: int, *, hairpin: bool) -> int:
        await self._faults.check("create_veth", namespace)
        result: int = await self._links.create_veth(name, namespace, bridge, hairpin=hairpin)
        await self._faults.slow("create_veth", namespace)
        return result

    async def configure_inside(
        self,
        namespace: str,
        address: IPv4Interface,
        gateway: IPv4Address,
        address6: IPv6Interface | None = None,
        gateway6: IPv6Address | None = None,
    ) -> None:
        if await self._faults.check("configure_inside", namespace):
            gateway = _OFF_SUBNET_GATEWAY
        await self._links.configure_inside(namespace, address, gateway, address6, gateway6)
        await self._faults.slow("configure_inside", namespace)


class FaultyFirewall:
    """netsetup.firewall.Firewall with a fault on add_alloc."""

    def __init__(self, firewall: Firewall, config: NetConfig, faults: Faults) -> None:
        self._firewall = firewall
        self._missing = Firewall(dataclasses.replace(config, nft_table="wpt_no_such_table"))
        self._faults = faults

    async def ensure_base(self) -> None:
        await self._firewall.ensure_base()

    async def add_alloc(self, alloc: AllocNetwork) -> None:
        await self._firewall.add_alloc(alloc)
        if await self._faults.check("add_alloc", alloc.alloc_id):
            await self._missing.add_alloc(alloc)  # ENOENT: that table does not exist
        await self._faults.slow("add_alloc", alloc.alloc_id)

    async def remove_alloc(self, alloc: AllocNetwork) -> None:
        await self._firewall.remove_alloc(alloc)

    async def elements(self) -> list[Element]:
        return await self._firewall.elements()

    async def remove_unclaimed(self, claimed: Collection[str]) -> set[str]:
        return await self._firewall.remove_unclaimed(claimed)


class FaultyState:
    """netsetup.state.NetState with a fault on complete (called from a thread)."""

    def __init__(self, state: NetState, faults: Faults, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._faults = faults
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def complete(self, alloc_id: str, result: AllocNetwork) -> None:
        check = asyncio.run_coroutine_threadsafe(
            self._faults.check("complete", alloc_id), self._loop
        )
        if check.result():
            self._state.complete(alloc_id + "-never-reserved", result)  # KeyError
        self._state.complete(alloc_id, result)
        slow = asyncio.run_coroutine_threadsafe(self._faults.slow("complete", alloc_id), self._loop)
        slow.result()


def parse_config(raw: dict[str, Any]) -> NetConfig:
    networks = tuple(HostNetwork(**n) for n in raw.pop("host_networks", []))
    return NetConfig(**raw, host_networks=networks)


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "errno": exc.errno if isinstance(exc, KernelError) else None,
        "notes": list(getattr(exc, "__notes__", [])),
    }


class Session:
    """Runs the requests of one driver process against its NetworkManager."""

    def __init__(self, manager: NetworkManager, faults: Faults) -> None:
        self.manager = manager
        self.faults = faults

    async def run(self, op: str, args: dict[str, Any]) -> Any:
        manager = self.manager
        if op == "setup":
            spec = parse_spec(args["spec"])
            return render_result(await manager.setup(args["alloc"], spec))
        if op == "teardown":
            return await manager.teardown(args["alloc"])
        if op == "list":
            return [render_result(a) for a in await manager.list()]
        if op == "get":
            found = await manager.get(args["alloc"])
            return None if found is None else render_result(found)
        if op == "reconcile":
            return dataclasses.asdict(await manager.reconcile())
        if op == "fault":
            self.faults.arm(args["step"], args["action"], args.get("alloc", ""))
            return None
        if op == "host_ip":
            return manager.host_ip
        if op == "cancelled_setup":  # cancel the setup once its slow step has begun
            spec = parse_spec(args["spec"])
            self.faults.slow_started.clear()
            task = asyncio.create_task(manager.setup(args["alloc"], spec))
            await asyncio.wait_for(self.faults.slow_started.wait(), 30)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return task.cancelled()
        if op == "settle":
            return [str(e) for e in await manager.settle()]
        raise ValueError(f"unknown op {op!r}")


def join_namespace(path: str) -> None:
    """Move this process (its only thread) into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(fd)


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (the driver protocol)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _answer(session: Session, request: dict[str, Any]) -> None:
    ident = request.get("id")
    try:
        result = await session.run(str(request.get("op")), request)
    except (NetsetupError, KeyError, ValueError, TypeError, OSError) as exc:
        emit({"id": ident, "ok": False, "error": _error(exc)})
    else:
        emit({"id": ident, "ok": True, "result": result})


async def serve(config: NetConfig) -> None:
    loop = asyncio.get_running_loop()
    faults = Faults(emit)
    state = open_state(config.data_dir)
    firewall = FaultyFirewall(Firewall(config), config, faults)
    links = FaultyLinks(await start_links(config), faults)
    manager = await start_network_manager(
        config, FaultyState(state, faults, loop), firewall, links=links
    )
    try:
        emit({"event": "ready", "host_ip": manager.host_ip, "pid": os.getpid()})
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        tasks: set[asyncio.Task[None]] = set()
        session = Session(manager, faults)
        while line := await reader.readline():
            task = asyncio.create_task(_answer(session, json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
    finally:
        await manager.close()
        state.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True, help="namespace file to join first")
    parser.add_argument("--config", help="NetConfig fields as a JSON object")
    parser.add_argument("--cli", nargs=argparse.REMAINDER, help="run `waypost net` instead")
    args = parser.parse_args()
    join_namespace(args.netns)
    if args.cli is not None:
        sys.exit(cli.main(args.cli))
    asyncio.run(serve(parse_config(json.loads(args.config))))


if __name__ == "__main__":
    main()
