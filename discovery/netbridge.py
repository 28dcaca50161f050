"""netsetup for the agent: its NetworkManager on a loop of its own, DNS on its bridge.  Adapter.

:class:`LazyNetwork` is the jobs' seam to netsetup (discovery.allocrunner's
NetworkPort): the manager, pyroute2 and its memory are loaded at the first call
only, so an agent without jobs never pays for them and never touches the host's
network.  pyroute2's netlink sockets need the standard asyncio loop (uvloop
refuses AF_NETLINK datagram endpoints), so the manager lives on a plain asyncio
loop in one thread and every call is passed to it; the agent's loop only awaits.

:class:`BridgeDns` is the agent's DNS for bridge allocations (DESIGN.md): UDP
and TCP on the bridge's gateway address, port 53, while the bridge exists.
LazyNetwork starts it after a bridge allocation is set up or restored (the
address is on the host once the bridge is up), the agent at start when the
bridge is already there; netsetup never removes the bridge, so it serves until
the agent stops.  Its sockets have IP_FREEBIND: a bridge deleted and created
again by netsetup's repair finds them still bound.  Its own Responder answers
the zone like the agent's main DNS, and forwards other names to `dns.recursors`,
or when there are none to the host's resolv.conf servers (loopback ones left
out: discovery.dns.forward.host_recursors); only clients on the bridge subnets
and in `allow_recursion_from` may recurse, any other gets REFUSED for a name
outside the zone (never an open resolver on an address the host routes).

Error handling: a DNS listener that cannot start is logged as an error and
tried again at the next bridge allocation; the allocation is not failed for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from discovery.dns.forward import DNS_PORT, host_recursors
from discovery.dns.responder import Responder
from discovery.dns.server import DnsServer, start_dns
from discovery.dns.settings import DnsSettings
from discovery.errors import StateError
from discovery.registry import Registry
from discovery.tasks.resolvconf import agent_dns, parse_resolv_conf, read_host_resolv_conf
from netsetup.spec import AllocNetwork, DnsConfig, NetConfig, NetworkSpec

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

    def __init__(
        self,
        config: NetConfig,
        *,
        privileged: Callable[[], bool] | None = None,
        dns: BridgeDns | None = None,
    ) -> None:
        """`privileged` says whether reconcile may touch the kernel (default: euid 0).

        `dns`: the DNS for bridge allocations, started after each bridge setup
        or restore (a no-op once it serves) and given to them as their DNS.
        """
        self._config = config
        self._dns = dns
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
        result = await self._call(lambda manager: manager.setup(alloc_id, spec))
        await self._bridged(result)
        return result

    async def teardown(self, alloc_id: str) -> bool:
        return await self._call(lambda manager: manager.teardown(alloc_id))

    async def get(self, alloc_id: str) -> AllocNetwork | None:
        result = await self._call(lambda manager: manager.get(alloc_id))
        await self._bridged(result)
        return result

    def alloc_dns(self, network: AllocNetwork) -> DnsConfig | None:
        """The DNS of a bridge allocation (allocrunner's AllocDnsSource); None in host mode."""
        if self._dns is None or network.mode != "bridge":
            return None
        return self._dns.alloc_dns()

    async def _bridged(self, result: AllocNetwork | None) -> None:
        if self._dns is not None and result is not None and result.mode == "bridge":
            await self._dns.ensure()

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


class BridgeDns:
    """The agent's DNS for bridge allocations (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        settings: DnsSettings,
        config: NetConfig,
        *,
        port: int = DNS_PORT,
        host_resolv: Callable[[], str] = read_host_resolv_conf,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._config = config
        self._port = port
        self._host_resolv = host_resolv
        self._host_servers: tuple[str, ...] = ()
        self._responder: Responder | None = None
        self._server: DnsServer | None = None
        self._starting = asyncio.Lock()  # binds no loop before its first use (3.10+)
        self._closed = False

    @property
    def address(self) -> str:
        """The gateway address it listens on (the allocations' nameserver)."""
        return self._config.gateway

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.serving

    @property
    def responder(self) -> Responder | None:
        """Its Responder once started (its counts are the allocations' queries)."""
        return self._responder

    def alloc_dns(self) -> DnsConfig:
        """What a bridge allocation's tasks get: this server, `service.<domain>`, `<domain>`."""
        return agent_dns(self._config.gateway, self._settings.domain)

    def bridge_settings(self, settings: DnsSettings) -> DnsSettings:
        """`settings` with this listener's recursors and recursion allow-list.  Pure."""
        nets = [ipaddress.ip_network(self._config.subnet)]
        if self._config.subnet6:
            nets.append(ipaddress.ip_network(self._config.subnet6))
        allowed = (
            *settings.recursion_allowed,
            *(n for n in nets if n not in settings.recursion_allowed),
        )
        recursors = settings.recursors or self._host_servers
        return replace(settings, recursors=recursors, recursion_allowed=allowed)

    def update_settings(self, settings: DnsSettings) -> None:
        """The agent's reloaded DNS settings (SIGHUP); the host's servers as read at start."""
        self._settings = settings
        if self._responder is not None:
            self._responder.update_settings(self.bridge_settings(settings))

    async def ensure(self) -> None:
        """Listen on the gateway when not yet (or no longer) listening.  Logs, never raises."""
        if self._done():
            return
        async with self._starting:  # one start at a time; the ones waiting find it done
            if self._done():
                return
            try:
                await self._start()
            except OSError as exc:
                log.error("DNS for bridge allocations is not serving (retried later): %s", exc)

    def _done(self) -> bool:
        return self._closed or self.serving

    async def _start(self) -> None:
        text = await asyncio.to_thread(self._host_resolv)
        self._host_servers = host_recursors(parse_resolv_conf(text).servers)
        settings = self.bridge_settings(self._settings)
        if self._responder is None:
            self._responder = Responder(self._registry, settings)
        else:
            self._responder.update_settings(settings)
        if self._server is not None:
            await _close_server(self._server)
            self._server = None
        host = self._config.gateway
        self._server = await start_dns(self._responder, host, self._port, freebind=True)
        upstream = ", ".join(settings.recursors) or "none (REFUSED outside the zone)"
        log.info(
            "DNS for bridge allocations on %s:%d (udp+tcp); upstream %s", host, self._port, upstream
        )

    async def close(self) -> None:
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            await _close_server(server)


async def _close_server(server: DnsServer) -> None:
    server.close()
    await server.wait_closed()


def bridge_exists(name: str) -> bool:
    """True when the interface `name` exists in this namespace (if_nametoindex(3))."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
