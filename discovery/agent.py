"""The agent: composition root wiring every part.  Top layer.

:func:`start_agent` opens the state in the data dir, rebuilds the registry
from it around the local node (the index continues where it stopped), loads
the configured services, and starts the check runner, the event log, DNS
and the HTTP API; :func:`serve` runs it until SIGTERM or SIGINT and re-reads
the configuration on SIGHUP; :func:`run_agent` is the synchronous entry point
(uvloop when installed).

Jobs (:mod:`discovery.allocations`): the runner comes back with the persisted
jobs before the API serves (their tasks adopted, or started), then the `--job`
files are run (a file whose job runs unchanged is a no-op, so restarts are
idempotent).  netsetup (pyroute2 and its memory, :mod:`discovery.netbridge`) is
imported only when a job has allocations to restore or one is posted; it
reconciles the kernel side at that moment only when it has bridge allocations
and runs as root (host mode touches no kernel object, so an agent without jobs
in bridge mode never changes the host).  Stopping: in `--dev` the tasks are
stopped with the agent (services out, kill signal, network down); otherwise
they run on and the next agent adopts them.

A reload swaps the configured services (one registry batch) and the DNS
settings; sockets stay open, so no query is dropped.  A config that does not
parse is logged and the running one is kept.  What is fixed at start (node,
listen addresses, data dir) needs a restart; a reload that changes it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from discovery import api_consul, api_jobs, api_jobspec, api_nomad, api_waypost
from discovery.allocations import JobFailed, JobRunner
from discovery.api import ApiContext
from discovery.api_logs import logs_route
from discovery.checks import CheckRunner
from discovery.config import SOURCE, AgentConfig, Endpoint, service_instances
from discovery.dns.responder import Responder
from discovery.dns.server import DnsServer, start_dns
from discovery.errors import StateError, WaypostError
from discovery.events import EventLog
from discovery.httpapi import HttpServer, HttpStats, StreamRoute, start_http
from discovery.metrics import MetricsSources
from discovery.netbridge import BridgeDns, LazyNetwork, bridge_exists

if TYPE_CHECKING:
    from discovery.jobs import JobSpec
    from discovery.mirror import Mirror
from discovery.registry import Registry
from discovery.store import DB_NAME, Store, open_store

log = logging.getLogger(__name__)

ConfigLoader = Callable[[], AgentConfig]
ALLOC_DIR = "alloc"  # <data_dir>/alloc/<alloc id>: Nomad's allocation directories

# Fixed for the life of the process: the node the registry is built around and the sockets.
RESTART_ONLY = (
    "node_name",
    "node_address",
    "dns_addr",
    "http_addr",
    "data_dir",
    "acl",
    "consul",
    "client",
    "dev",
)
HOLDS_SECRETS = frozenset({"acl", "consul"})
EXIT_OK = 0
EXIT_FAILED = 1  # could not start (address in use...)


class Agent:
    """The running parts.  Built by :func:`start_agent`; `await close()` stops them all."""

    def __init__(
        self,
        config: AgentConfig,
        registry: Registry,
        responder: Responder,
        dns: DnsServer,
        http: HttpServer,
        parts: contextlib.AsyncExitStack,
        jobs: JobRunner,
        bridge_dns: BridgeDns | None = None,
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.bridge_dns = bridge_dns  # the allocations' DNS on the bridge gateway
        self.registry = registry
        self.responder = responder
        self.dns = dns
        self.http = http
        self._parts = parts

    @property
    def http_endpoint(self) -> Endpoint:
        """Where the HTTP API is actually listening."""
        return Endpoint(self.http.host or self.config.http_addr.host, self.http.port)

    @property
    def dns_endpoint(self) -> Endpoint:
        """Where DNS is actually listening (the bound port when 0 was asked)."""
        return Endpoint(self.dns.host or self.config.dns_addr.host, self.dns.port)

    def apply(self, new: AgentConfig) -> None:
        """Make a re-read config current: services and DNS settings; keep the rest as started."""
        running = self.config
        for name in RESTART_ONLY:
            value = getattr(new, name)
            if value == getattr(running, name):
                continue
            if name in HOLDS_SECRETS:  # tokens: never in logs
                log.warning("%s changed; restart waypost to apply it", name)
            else:
                log.warning("%s changed to %s; restart waypost to apply it", name, value)
        dns = replace(new.dns, node_name=running.node_name, node_address=running.node_address)
        fixed = {name: getattr(running, name) for name in RESTART_ONLY}
        self.registry.replace_source(
            SOURCE, service_instances(new.services, self.registry.local_node)
        )
        self.responder.update_settings(dns)
        if self.bridge_dns is not None:
            self.bridge_dns.update_settings(dns)
        self.config = replace(new, dns=dns, **fixed)

    async def close(self) -> None:
        """Stop serving and flush the state, in the reverse order of start."""
        await self._parts.aclose()


async def _start_jobs(
    config: AgentConfig,
    registry: Registry,
    store: Store,
    parts: contextlib.AsyncExitStack,
    bridge_dns: BridgeDns,
) -> JobRunner:
    network = LazyNetwork(config.client, dns=bridge_dns)
    parts.push_async_callback(network.close)

    async def opener() -> LazyNetwork:
        return network

    runner = JobRunner(
        registry,
        store,
        opener,
        config.node_name,
        alloc_root=Path(config.data_dir) / ALLOC_DIR,
        datacenter=config.datacenter,
    )
    # Closed first (the stack unwinds in reverse): a run or stop in progress finishes,
    # and in --dev the tasks are stopped, before netsetup's loop stops under them.
    parts.push_async_callback(runner.close, stop_tasks=config.dev)
    await runner.start()
    return runner


async def run_jobs(runner: JobRunner, jobs: Sequence[JobSpec]) -> None:
    """Run the `--job` files' jobs.  Error handling: a job that fails is logged, not fatal."""
    for spec in jobs:
        try:
            result = await runner.run(spec)
        except (JobFailed, WaypostError) as err:
            log.error("job %s from --job could not run: %s", spec.id, err)
            continue
        what = "running" if result.changed else "unchanged"
        count = sum(g.count for g in spec.groups)
        log.info("job %s %s: %d allocations", spec.id, what, count)


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one, as Go's runtime does for Consul and
    Nomad (every HTTP connection and watcher is a descriptor); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as err:  # an infinite hard limit, above fs.nr_open
        log.warning("open files limit stays at %d (hard limit %d): %s", soft, hard, err)
        return soft
    return hard


async def start_agent(config: AgentConfig, jobs: Sequence[JobSpec] = ()) -> Agent:
    """Open the state, rebuild the registry, start every part, then run `jobs`.

    Error handling: an unusable data dir raises StateError and an address that
    cannot be bound raises OSError; either way nothing stays open or running.
    """
    raise_open_files_limit()
    parts = contextlib.AsyncExitStack()
    try:
        data = Path(config.data_dir)
        if (data / "netsetup.db").exists() and not (data / DB_NAME).exists():
            log.warning(
                "%s is missing next to %s: registrations and jobs are gone; allocations"
                " that no job owns will be torn down",
                data / DB_NAME,
                data / "netsetup.db",
            )
        store = await asyncio.to_thread(open_store, config.data_dir)
        parts.push_async_callback(store.close)
        restored = store.load()
        node = config.node
        # Index 1 at least: Consul clients read index 0 as "no index" (and never block).
        registry = Registry(node, index=max(1, restored.index + 1))
        registry.apply(upserts=restored.instances, allocs=restored.allocs)
        store.attach(registry)
        registry.replace_source(SOURCE, service_instances(config.services, node))
        responder = Responder(registry, config.dns)
        checks = CheckRunner(registry)
        checks.start()
        parts.push_async_callback(checks.close)
        mirror = None
        if config.consul is not None:
            # Imported only when configured: py-consul brings `requests` and its TLS stack.
            from discovery.mirror import start_mirror

            mirror = await start_mirror(
                registry, config.consul, node=config.node_name, datacenter=config.datacenter
            )
            parts.push_async_callback(mirror.close)
        # The allocations' DNS on the bridge gateway: closed after the jobs (their tasks
        # resolve through it until they stop); started now if the bridge is already up.
        bridge_dns = BridgeDns(registry, config.dns, config.client)
        parts.push_async_callback(bridge_dns.close)
        runner = await _start_jobs(config, registry, store, parts, bridge_dns)
        if await asyncio.to_thread(bridge_exists, config.client.bridge):
            await bridge_dns.ensure()
        dns = await start_dns(responder, config.dns_addr.host, config.dns_addr.port)
        parts.push_async_callback(_close_dns, dns)
        http = await _start_http(
            config, registry, responder, dns, store, checks, mirror, runner, parts
        )
        await run_jobs(runner, jobs)
        log.info(
            "restored %d instances from %s (index %d)",
            len(restored.instances),
            config.data_dir,
            registry.snapshot.index,
        )
        return Agent(config, registry, responder, dns, http, parts, runner, bridge_dns)
    except BaseException:
        await parts.aclose()
        raise


async def _start_http(
    config: AgentConfig,
    registry: Registry,
    responder: Responder,
    dns: DnsServer,
    store: Store,
    checks: CheckRunner,
    mirror: Mirror | None,
    runner: JobRunner,
    parts: contextlib.AsyncExitStack,
) -> HttpServer:
    events = EventLog(registry, datacenter=config.datacenter)
    stats = HttpStats()
    sources = MetricsSources(
        registry,
        dns_counts=lambda: responder.counts,
        http_counts=stats.requests,
        waiters=lambda: stats.blocked,
        store=store,
        event_subscribers=lambda: events.subscribers,
        mirror=None if mirror is None else (lambda: mirror.stats),
    )
    status = api_waypost.StatusOf(sources, dns_serving=lambda: dns.serving)
    routes = (
        api_consul.ROUTES
        + api_nomad.ROUTES
        + api_waypost.routes(status)
        + api_jobs.routes(
            runner,
            config.node_name,
            config.datacenter,
            host_networks=[n.name for n in config.client.host_networks],
        )
        + api_jobspec.ROUTES
    )
    streams = [
        StreamRoute("/v1/event/stream", api_waypost.event_stream(events)),
        logs_route(runner, registry),
    ]
    ctx = ApiContext(registry, store, checks, config.datacenter, config.node_name)
    host, port = config.http_addr.host, config.http_addr.port
    http = await start_http(ctx, routes, config.acl, host, port, streams=streams, stats=stats)
    parts.push_async_callback(http.close)
    # Streams end before the server closes, so their clients see a clean end of stream.
    parts.callback(events.close)
    return http


async def _close_dns(dns: DnsServer) -> None:
    dns.close()
    await dns.wait_closed()


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


async def serve(config: AgentConfig, load: ConfigLoader, jobs: Sequence[JobSpec] = ()) -> int:
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
            agent = await start_agent(config, jobs)
            # Everything built so far lives as long as the agent: keep it out of the
            # collector's full passes, which otherwise stall wake-ups of many watchers.
            gc.freeze()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return EXIT_FAILED
        except StateError as exc:
            log.error("cannot use the data dir: %s", exc)
            return EXIT_FAILED
        try:
            log.info("dns listening on %s (udp+tcp)", agent.dns_endpoint)
            log.info("http listening on %s", agent.http_endpoint)
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
            await agent.close()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return EXIT_OK


def run_agent(config: AgentConfig, load: ConfigLoader, jobs: Sequence[JobSpec] = ()) -> int:
    """Run :func:`serve` on a new event loop (uvloop when importable); returns the exit code."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(config, load, jobs))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # the `fast` extra is optional
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
