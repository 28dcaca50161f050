"""The agent: composition root wiring config, registry, DNS responder and server.  Top layer.

:func:`start_agent` builds the registry around the local node, loads the
configured services, and starts DNS; :func:`serve` runs it until SIGTERM or
SIGINT and re-reads the configuration on SIGHUP; :func:`run_agent` is the
synchronous entry point (uvloop when installed).

A reload swaps the configured services (one registry batch) and the DNS
settings; sockets stay open, so no query is dropped.  A config that does not
parse is logged and the running one is kept.  What is fixed at start (node,
listen addresses, data dir) needs a restart; a reload that changes it says so.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import replace

from discovery.config import SOURCE, AgentConfig, Endpoint, service_instances
from discovery.dns.responder import Responder
from discovery.dns.server import DnsServer, start_dns
from discovery.errors import WaypostError
from discovery.registry import Registry

log = logging.getLogger(__name__)

ConfigLoader = Callable[[], AgentConfig]

# Fixed for the life of the process: the node the registry is built around and the sockets.
RESTART_ONLY = ("node_name", "node_address", "dns_addr", "http_addr", "data_dir")
EXIT_OK = 0
EXIT_FAILED = 1  # could not start (address in use...)


class Agent:
    """The running parts.  Built by :func:`start_agent`; `close()` then `wait_closed()`."""

    def __init__(
        self, config: AgentConfig, registry: Registry, responder: Responder, dns: DnsServer
    ) -> None:
        self.config = config
        self.registry = registry
        self.responder = responder
        self.dns = dns

    @property
    def dns_endpoint(self) -> Endpoint:
        """Where DNS is actually listening (the bound port when 0 was asked)."""
        return Endpoint(self.dns.host or self.config.dns_addr.host, self.dns.port)

    def apply(self, new: AgentConfig) -> None:
        """Make a re-read config current: services and DNS settings; keep the rest as started."""
        running = self.config
        for name in RESTART_ONLY:
            if getattr(new, name) != getattr(running, name):
                log.warning(
                    "%s changed to %s; restart waypost to apply it", name, getattr(new, name)
                )
        dns = replace(new.dns, node_name=running.node_name, node_address=running.node_address)
        fixed = {name: getattr(running, name) for name in RESTART_ONLY}
        self.registry.replace_source(
            SOURCE, service_instances(new.services, self.registry.local_node)
        )
        self.responder.update_settings(dns)
        self.config = replace(new, dns=dns, **fixed)

    def close(self) -> None:
        self.dns.close()

    async def wait_closed(self) -> None:
        await self.dns.wait_closed()


async def start_agent(config: AgentConfig) -> Agent:
    """Build the registry and responder from `config` and start DNS.

    Error handling: an address that cannot be bound raises OSError; nothing stays open.
    """
    node = config.node
    registry = Registry(node)
    registry.replace_source(SOURCE, service_instances(config.services, node))
    responder = Responder(registry, config.dns)
    dns = await start_dns(responder, config.dns_addr.host, config.dns_addr.port)
    return Agent(config, registry, responder, dns)


class _Reloads:
    """Runs reloads one at a time; a SIGHUP during a reload queues exactly one more."""

    def __init__(self, load: ConfigLoader) -> None:
        self._load = load
        self._agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def attach(self, agent: Agent) -> None:
        self._agent = agent
        if self._again:  # a SIGHUP arrived while starting
            self.request()

    def request(self) -> None:
        if self._agent is None or (self._task is not None and not self._task.done()):
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self._agent))

    async def _run(self, agent: Agent) -> None:
        """Error handling: a failed reload is logged and the running config stays."""
        self._again = True
        while self._again:
            self._again = False
            try:
                new = await asyncio.to_thread(self._load)
                agent.apply(new)
            except WaypostError as err:
                log.error("reload failed, keeping the running config: %s", err)
                continue
            except Exception:
                log.exception("reload failed, keeping the running config")
                continue
            log.info(
                "config reloaded: %d services from %d files", len(new.services), len(new.files)
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def serve(config: AgentConfig, load: ConfigLoader) -> int:
    """Run the agent until SIGTERM or SIGINT (exit 0); SIGHUP re-reads the config via `load`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads = _Reloads(load)
    # Before anything is bound, so that an early signal is never fatal (SIGHUP's default is).
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    try:
        try:
            agent = await start_agent(config)
        except OSError as exc:
            log.error("cannot listen for DNS on %s: %s", config.dns_addr, exc)
            return EXIT_FAILED
        try:
            log.info("dns listening on %s (udp+tcp)", agent.dns_endpoint)
            log.info(
                "node %s (%s), datacenter %s, domain %s, %d services",
                config.node_name,
                config.node_address,
                config.datacenter,
                config.domain,
                len(config.services),
            )
            reloads.attach(agent)
            await stop.wait()
            log.info("shutting down")
        finally:
            await reloads.close()
            agent.close()
            await agent.wait_closed()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return EXIT_OK


def run_agent(config: AgentConfig, load: ConfigLoader) -> int:
    """Run :func:`serve` on a new event loop (uvloop when importable); returns the exit code."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(config, load))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # the `fast` extra is optional
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
