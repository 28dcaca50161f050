"""netsetup's NetworkManager for the agent, on an event loop of its own.  Adapter.

:class:`LazyNetwork` is the jobs' seam to netsetup (discovery.allocrunner's
NetworkPort): the manager, pyroute2 and its memory are loaded at the first call
only, so an agent without jobs never pays for them and never touches the host's
network.  pyroute2's netlink sockets need the standard asyncio loop (uvloop
refuses AF_NETLINK datagram endpoints), so the manager lives on a plain asyncio
loop in one thread and every call is passed to it; the agent's loop only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from discovery.errors import StateError
from netsetup.spec import AllocNetwork, NetConfig, NetworkSpec

if TYPE_CHECKING:
    from netsetup.network import NetworkManager
    from netsetup.state import NetState

log = logging.getLogger(__name__)
T = TypeVar("T")


class LazyNetwork:
    """netsetup's NetworkManager, started at its first use, on a loop of its own.

    pyroute2's netlink sockets need the standard asyncio loop (uvloop refuses
    AF_NETLINK datagram endpoints), so the manager lives on a plain asyncio loop
    in one thread and every call is passed to it; the agent's loop only awaits.
    Exceptions come back to the caller as raised; a cancelled caller cancels the
    call on that loop (netsetup then undoes a setup it cut short).  After close()
    every call raises StateError: no second loop or thread is started.

    Reconcile (persisted bridge allocations, as root) runs before the first call
    is served.  Error handling: when it fails, that call raises its error and the
    next call tries again; no call is served on an unreconciled host.
    """

    def __init__(self, config: NetConfig, *, privileged: Callable[[], bool] | None = None) -> None:
        """`privileged` says whether reconcile may touch the kernel (default: euid 0)."""
        self._config = config
        self._privileged = privileged or (lambda: os.geteuid() == 0)
        self._reconciled = False
        self._manager: NetworkManager | None = None
        self._state: NetState | None = None
        self._close_firewall: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    async def _call(self, work: Callable[[NetworkManager], Awaitable[T]]) -> T:
        if self._closed:
            raise StateError("allocation networking is closed (the agent is stopping)")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="waypost-netsetup", daemon=True
            )
            self._thread.start()

        async def inside() -> T:
            return await work(await self._open())

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(inside(), self._loop))

    async def _open(self) -> NetworkManager:
        manager = await self._start_manager()
        if not self._reconciled and self._state is not None:
            await self._reconcile(manager, self._state)
            self._reconciled = True
        return manager

    async def _reconcile(self, manager: NetworkManager, state: NetState) -> None:
        bridged = any(r.spec.mode == "bridge" for r in state.allocations())
        if bridged and self._privileged():
            try:
                report = await manager.reconcile()
            except Exception as exc:
                log.error("allocation networking could not be reconciled (retried): %s", exc)
                raise
            log.info("allocation networking reconciled: %s", report)

    async def _start_manager(self) -> NetworkManager:
        if self._manager is not None:
            return self._manager
        # Imported here: pyroute2 costs the agent memory it needs only for jobs.
        from netsetup.firewall import Firewall
        from netsetup.network import start_network_manager
        from netsetup.state import open_state

        state = open_state(self._config.data_dir)
        firewall = Firewall(self._config)
        try:
            manager = await start_network_manager(self._config, state, firewall)
        except BaseException:
            firewall.close()
            state.close()
            raise
        self._manager, self._state, self._close_firewall = manager, state, firewall.close
        return manager

    async def setup(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork:
        return await self._call(lambda manager: manager.setup(alloc_id, spec))

    async def teardown(self, alloc_id: str) -> bool:
        return await self._call(lambda manager: manager.teardown(alloc_id))

    async def get(self, alloc_id: str) -> AllocNetwork | None:
        return await self._call(lambda manager: manager.get(alloc_id))

    async def list(self) -> tuple[AllocNetwork, ...]:
        return await self._call(lambda manager: manager.list())

    async def _close_inside(self) -> None:
        try:
            if self._manager is not None:
                await self._manager.close()
        finally:
            self._close_firewall()
            if self._state is not None:
                self._state.close()

    async def close(self) -> None:
        """Close the manager on its loop, then stop the loop and its thread."""
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._close_inside(), loop)
            await asyncio.wrap_future(future)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()
            self._loop = self._thread = None
