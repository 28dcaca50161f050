"""The Consul mirror: push this agent's instances into Consul, pull the others' back.

Adapter: the only module that imports `consul` (py-consul's asyncio client).
What is written, and what answers mean, is planned in the pure
:mod:`discovery.mirror_plan`; :func:`start_mirror` starts a push loop and a
pull loop on the agent's event loop and returns the :class:`Mirror` owning them.

Push (local -> Consul), through the Consul agent's API (DESIGN.md: the agent's
anti-entropy drops catalog entries on its node that it does not know):

- Each instance with source config, api or job is the Consul service
  ``_waypost-<node>-<instance id>``: its name, tags, address, port, weights and
  meta plus ``external-source = "waypost"`` and ``waypost-node = <node>``, and
  one TTL check ``<that id>:health`` whose status is the instance's health.
  The TTL (5m) matters only if this agent dies: its entries then turn critical.
- A sync compares what we want with what Consul has of ours and writes only the
  difference (register, TTL update, deregister), a few requests at a time.
  "Ours" is strict, ID prefix ``_waypost-<node>-`` AND meta waypost-node ==
  node: agents sharing a Consul agent never touch each other's entries (Nomad
  issue 9916), and nothing else is ever deregistered.
- Consul is read in full (GET /v1/agent/services and /v1/agent/checks: two
  requests whatever the size) at start, every 30 s (anti-entropy) and after
  any error.  In between, a registry change is compared with that read plus
  our own successful writes, so a change costs its writes only.  Changes are
  debounced: the first after a quiet spell goes out at once, then at most one
  sync per 100 ms.  Nothing to change, nothing written; a TTL is refreshed by
  the 30 s sync once half of it has passed.
- Consul unreachable or failing (refused, timeouts, 5xx, 403): the registry, DNS
  and HTTP do not notice; syncs retry with backoff (0.5 s doubling to 30 s,
  jittered) and the first one after recovery reads Consul in full, so Consul
  converges without duplicates (IDs are deterministic) or stale entries.  One
  log line when the link breaks, one when it is back.  A registration Consul
  refuses (400: e.g. too many meta pairs) is logged once and retried when the
  instance changes or at the next full sync.
- Nothing is deregistered on close: a restarted agent finds its entries in
  place (no flapping); an agent that never comes back leaves entries whose TTL
  check turns critical, so DNS stops sending clients there.

Pull (Consul -> local), with Consul's blocking queries:

- GET /v1/catalog/services?index= says which services exist (not asked when
  `services` are listed); each service has its own blocking GET
  /v1/health/service/<name>?index=&wait=5m returning its instances with their
  checks.  A change costs one request per changed service, an idle catalog
  costs one request per service per 5 minutes.  Each watch holds an HTTP
  connection while it waits, and Consul allows 200 per client address by
  default (http_max_conns_per_client): beyond 128 watches (max_watches), the
  other services are read every 30 s instead, with a warning saying so (list
  the services a host needs in `services`); a slot that frees up goes to one
  of them.
- Instances get source "consul", id ``consul/<consul node>/<service id>``,
  their Consul node (added to the registry, except a node named like ours) and
  datacenter ("" when it is ours, so DNS serves them unlabeled; else
  ``<svc>.service.<dc>.<domain>`` selects them).  Health is the worst of all
  the entry's checks, node checks included (a node failing serfHealth is down,
  as Consul's DNS sees it).  Entries this agent pushed (meta waypost-node ==
  our node) are skipped; other waypost agents' are pulled.  Entries our model
  cannot hold (a name that is not a DNS label, a host name as address) are
  skipped with one warning each.  Results that arrive in one loop iteration are
  one registry batch.
- Indexes, as Consul's blocking-query guide says: an index below 1 is taken as
  1; an index that goes backwards (Consul restored a snapshot) resets to 0 (a
  full read), and when the catalog's does, every service watch restarts from
  0; an error resets to 0 too (a restarted Consul has lower indexes, and a query
  with an index ahead of Consul's blocks for the whole wait).  Queries of one
  watch start at least 50 ms apart; failures back off as push does.
- While Consul is unreachable the pulled instances stay (a Consul agent serves
  its last known catalog as well); the first successful read replaces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import consul
import consul.aio
from consul.exceptions import ACLPermissionDenied, BadRequest, ConsulException

from discovery.config import MirrorSettings
from discovery.mirror_plan import (
    PUSHED_SOURCES,
    Pulled,
    PushPlan,
    Seen,
    Wanted,
    check_id,
    parse_pulled,
    parse_seen,
    plan_push,
    plan_wanted,
    render_check,
)
from discovery.model import Health, Instance, Node, is_label
from discovery.registry import Registry, Snapshot

log = logging.getLogger(__name__)

POLL_CONNECTIONS = 8  # pull connections besides the watches (the catalog, polls)


@dataclass(frozen=True, slots=True)
class MirrorTiming:
    """The mirror's clocks and limits (defaults for production; tests shorten them)."""

    debounce: float = 0.1  # seconds between two syncs caused by registry changes
    anti_entropy: float = 30.0  # seconds between full reads of what Consul has
    check_ttl: float = 300.0  # TTL of the pushed checks; refreshed after half of it
    wait: float = 300.0  # blocking-query wait (Consul's default, 5m)
    min_query_gap: float = 0.05  # seconds between the starts of two queries of one watch
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    request_timeout: float = 10.0  # a non-blocking request; blocking ones get wait + this
    concurrency: int = 32  # writes in flight during a sync
    # Services watched with blocking queries, each holding a connection (Consul allows 200
    # per client address by default); more services are read every poll_interval instead.
    max_watches: int = 128
    poll_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class MirrorStats:
    """What the mirror reports for metrics and the agent's health."""

    url: str  # the Consul agent (never a token)
    push: bool  # push enabled
    pull: bool  # pull enabled
    push_ok: bool  # the last push attempt succeeded (False before the first)
    pull_ok: bool  # the last pull request succeeded (False before the first)
    last_push: float | None  # time.time() of the last successful push sync
    last_pull: float | None  # time.time() of the last successful pull response
    pending: int  # local changes not in Consul yet (registrations, updates, removals)
    refused: int  # registrations Consul refused (400), retried when they change
    pushed: int  # our entries in Consul, as last seen
    pulled: int  # instances pulled into the registry
    watched: int  # services the pull watches with blocking queries
    polled: int  # services the pull reads every poll_interval (more than max_watches)
    requests: int  # HTTP requests made
    errors: int  # requests that failed

    @property
    def healthy(self) -> bool:
        return (self.push_ok or not self.push) and (self.pull_ok or not self.pull)


def backoff(attempt: int, timing: MirrorTiming) -> float:
    """Seconds before retry `attempt` (1, 2, ...): doubling from backoff_min, capped, jittered."""
    ceiling = min(timing.backoff_max, timing.backoff_min * 2 ** min(attempt - 1, 30))
    return random.uniform(ceiling / 2, ceiling)


# -- the connection to Consul -------------------------------------------------------------------


class MirrorError(Exception):
    """A Consul request that failed for the whole link (unreachable, 5xx, 403, timeout)."""


def _client(settings: MirrorSettings, connections: int, timeout: float) -> Any:
    """A py-consul asyncio client for `settings` (its aiohttp session is opened here)."""
    with warnings.catch_warnings():
        # py-consul 1.8 hands aiohttp deprecated connector arguments (verify_ssl, ssl_context).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="consul")
        warnings.filterwarnings("ignore", r".*(verify_ssl|ssl_context)", DeprecationWarning)
        client = consul.aio.Consul(
            host=settings.host,
            port=settings.port,
            scheme=settings.scheme,
            dc=settings.datacenter or None,
            verify=settings.scheme == "https",
            connections_limit=connections,
            connections_timeout=timeout,
        )
    client.token = settings.token or None  # py-consul lets CONSUL_HTTP_TOKEN win otherwise
    return client


class _Link:
    """Counts requests and tells, once per change of state, whether Consul answers."""

    def __init__(self, what: str, url: str) -> None:
        self.what = what
        self.url = url
        self.ok = False
        self.ever_ok = False
        self.last_ok: float | None = None
        self.down_since: float | None = None
        self.requests = 0
        self.errors = 0
        self._bugs: set[type[Exception]] = set()

    async def call(self, request: Awaitable[Any], limit: float) -> Any:
        """Await one py-consul request; anything but a 4xx answer becomes MirrorError."""
        self.requests += 1
        try:
            async with asyncio.timeout(limit):
                return await request
        except BadRequest:
            self.errors += 1
            raise
        except ACLPermissionDenied as exc:
            self.errors += 1
            raise MirrorError(f"permission denied (check the consul token): {exc}") from None
        except ConsulException as exc:
            self.errors += 1
            raise MirrorError(str(exc) or type(exc).__name__) from None
        except TimeoutError:
            self.errors += 1
            raise MirrorError(f"no answer within {limit:g}s") from None
        except (OSError, ValueError) as exc:
            self.errors += 1
            raise MirrorError(str(exc) or type(exc).__name__) from None
        except Exception as exc:  # aiohttp's client errors (aiohttp is httpapi's only)
            self.errors += 1
            raise MirrorError(f"{type(exc).__name__}: {exc}") from None

    def succeeded(self, detail: str) -> None:
        self.last_ok = time.time()
        if self.ok:
            return
        if self.down_since is not None:
            log.info(
                "consul %s: %s answers again after %.0fs; %s",
                self.what,
                self.url,
                time.monotonic() - self.down_since,
                detail,
            )
        elif not self.ever_ok:
            log.info("consul %s: connected to %s; %s", self.what, self.url, detail)
        self.ok = self.ever_ok = True
        self.down_since = None

    async def retry(self, error: Exception, attempt: int, timing: MirrorTiming) -> None:
        """Note a failed attempt (`attempt` in a row) and back off before the next one.

        A MirrorError is Consul's doing; anything else is ours (a bug, an answer we
        did not expect): its traceback is logged once per exception type.
        """
        if not isinstance(error, MirrorError) and type(error) not in self._bugs:
            self._bugs.add(type(error))
            log.error("consul %s: unexpected error", self.what, exc_info=error)
        self.failed(error)
        await asyncio.sleep(backoff(attempt, timing))

    def failed(self, error: Exception) -> None:
        if self.ok or self.down_since is None:
            log.warning(
                "consul %s: %s: %s; retrying with backoff (local DNS and HTTP are unaffected)",
                self.what,
                self.url,
                error,
            )
            self.down_since = time.monotonic()
        self.ok = False


Op = Callable[[], Awaitable[None]]


async def _run_all(ops: list[Op], concurrency: int) -> None:
    """Run `ops` with at most `concurrency` in flight; after a failure none starts; re-raise it."""
    pending = iter(ops)
    failures: list[Exception] = []

    async def worker() -> None:
        for op in pending:  # one iterator shared by the workers
            if failures:
                return
            try:
                await op()
            except MirrorError as err:
                failures.append(err)
                return

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(ops)))))
    if failures:
        raise failures[0]


# -- push ---------------------------------------------------------------------------------------


class _Push:
    """The push loop and what it knows of our entries in Consul.  State."""

    def __init__(
        self, client: Any, registry: Registry, node: str, timing: MirrorTiming, link: _Link
    ) -> None:
        self._client = client
        self._registry = registry
        self._node = node
        self._timing = timing
        self.link = link
        self._seen: dict[str, Seen] = {}  # the last full read plus our writes since
        self._fresh = False  # False: read Consul in full before trusting _seen
        self._refreshed: dict[str, float] = {}  # monotonic time each TTL was last reset
        self._rejected: dict[str, Wanted] = {}  # registrations Consul refused (400)
        self._cache: dict[str, tuple[Instance, Wanted]] = {}
        self._wanted: tuple[Snapshot | None, dict[str, Wanted]] = (None, {})
        self._wake = asyncio.Event()
        self._next_full = 0.0
        self._last_start = -timing.debounce
        self.unsubscribe = registry.subscribe(lambda _snap, _keys: self._wake.set())

    @property
    def pending(self) -> int:
        return len(plan_push(self.wanted(), self._seen, self._rejected))

    @property
    def pushed(self) -> int:
        return len(self._seen)

    @property
    def refused(self) -> int:
        return len(self._rejected)

    def wanted(self) -> dict[str, Wanted]:
        """What Consul should hold now (instances unchanged since the last call are reused)."""
        snap = self._registry.snapshot
        if self._wanted[0] is snap:
            return self._wanted[1]
        cache: dict[str, tuple[Instance, Wanted]] = {}
        out: dict[str, Wanted] = {}
        for inst in snap.instances.values():
            if inst.source not in PUSHED_SOURCES:
                continue
            hit = self._cache.get(inst.id)
            if hit is None or hit[0] is not inst:
                hit = (inst, plan_wanted(inst, self._node))
            cache[inst.id] = hit
            out[hit[1].entry.id] = hit[1]
        self._cache = cache
        self._wanted = (snap, out)
        return out

    async def run(self) -> None:
        """Sync on changes and every anti_entropy seconds.

        Error handling: a failed sync (MirrorError) is logged once per outage and
        retried with backoff; the next sync reads Consul in full.  Only
        cancellation ends the loop.
        """
        attempt = 0
        while True:
            await self._next_turn()
            try:
                await self._sync()
            except Exception as err:  # MirrorError, or a bug (logged with its traceback)
                attempt += 1
                self._fresh = False
                await self.link.retry(err, attempt, self._timing)
                continue
            attempt = 0
            self.link.succeeded(f"{len(self._seen)} entries in sync")

    async def _next_turn(self) -> None:
        """Until a registry change or the next full sync; at once when Consul must be read."""
        if self._fresh and not self._wake.is_set():
            delay = self._next_full - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        # Debounce; sleep(0) at least, so that changes made in this loop iteration join.
        await asyncio.sleep(max(0.0, self._last_start + self._timing.debounce - time.monotonic()))
        self._wake.clear()
        self._last_start = time.monotonic()

    async def _sync(self) -> None:
        now = time.monotonic()
        full = not self._fresh or now >= self._next_full
        if full:
            await self._read()
            self._next_full = now + self._timing.anti_entropy * random.uniform(0.9, 1.1)
        wanted = self.wanted()
        # Refused registrations are tried again once per full sync (or when they change).
        self._rejected = {k: v for k, v in self._rejected.items() if wanted.get(k) == v}
        plan = plan_push(wanted, self._seen, {} if full else self._rejected)
        ops: list[Op] = [partial(self._register, w) for w in plan.register]
        ops += [partial(self._update, w) for w in plan.update]
        if full:
            ops += [partial(self._update, w) for w in self._refresh_due(wanted, plan)]
        ops += [partial(self._deregister, i) for i in plan.deregister]
        if ops:
            log.debug("consul push: %d writes (%s)", len(ops), "full sync" if full else "changes")
        await _run_all(ops, self._timing.concurrency)

    def _refresh_due(self, wanted: Mapping[str, Wanted], plan: PushPlan) -> list[Wanted]:
        """In-sync entries whose TTL is half gone (all of them after a restart)."""
        planned = {w.entry.id for w in (*plan.register, *plan.update)}
        horizon = time.monotonic() - self._timing.check_ttl / 2
        return [
            want
            for ident, want in wanted.items()
            if ident in self._seen
            and ident not in planned
            and self._refreshed.get(ident, -math.inf) <= horizon
        ]

    async def _read(self) -> None:
        agent, timeout = self._client.agent, self._timing.request_timeout
        try:
            services = await self.link.call(agent.services(), timeout)
            checks = await self.link.call(agent.checks(), timeout)
        except BadRequest as exc:
            raise MirrorError(f"reading the agent's services: {exc}") from None
        self._seen = parse_seen(services or {}, checks or {}, self._node)
        self._refreshed = {k: v for k, v in self._refreshed.items() if k in self._seen}
        self._fresh = True

    async def _register(self, want: Wanted) -> None:
        entry, before = want.entry, self._seen.get(want.entry.id)
        request = self._client.agent.service.register(
            entry.service,
            service_id=entry.id,
            address=entry.address,
            port=entry.port,
            tags=list(entry.tags),
            check=render_check(want, self._node, self._timing.check_ttl),
            meta=dict(entry.meta),
            weights={"Passing": entry.weights[0], "Warning": entry.weights[1]},
            replace_existing_checks=True,
        )
        try:
            accepted = await self.link.call(request, self._timing.request_timeout)
        except BadRequest as exc:
            if self._rejected.get(entry.id) != want:
                log.warning("consul push: Consul refuses %s (%s): %s", entry.id, entry.service, exc)
            self._rejected[entry.id] = want
            return
        if not accepted:
            raise MirrorError(f"registering {entry.id}: not accepted")
        self._rejected.pop(entry.id, None)
        self._refreshed[entry.id] = time.monotonic()
        # A check that exists keeps its status when its service is registered again (Consul).
        kept = before.status if before is not None and before.status is not None else None
        self._seen[entry.id] = Seen(entry, kept or want.status)
        if kept is not None and kept is not want.status:
            await self._update(want)

    async def _update(self, want: Wanted) -> None:
        ttl = self._client.agent.check
        send = {Health.PASSING: ttl.ttl_pass, Health.WARNING: ttl.ttl_warn}.get(
            want.status, ttl.ttl_fail
        )
        ident = want.entry.id
        try:
            found = await self.link.call(
                send(check_id(ident), notes=want.output or None), self._timing.request_timeout
            )
        except BadRequest as exc:
            raise MirrorError(f"updating {check_id(ident)}: {exc}") from None
        seen = self._seen.get(ident)
        if seen is None:  # deregistered meanwhile
            return
        if not found:  # 404: the check went away behind our back; the next sync registers it
            self._seen[ident] = Seen(seen.entry, None)
            self._wake.set()
            return
        self._seen[ident] = Seen(seen.entry, want.status)
        self._refreshed[ident] = time.monotonic()

    async def _deregister(self, ident: str) -> None:
        request = self._client.agent.service.deregister(ident)
        try:
            await self.link.call(request, self._timing.request_timeout)  # False: already gone
        except BadRequest as exc:
            raise MirrorError(f"deregistering {ident}: {exc}") from None
        self._seen.pop(ident, None)
        self._refreshed.pop(ident, None)


# -- pull ---------------------------------------------------------------------------------------


class _Pull:
    """The catalog watch, one watch per service, and what they put in the registry.  State."""

    def __init__(
        self,
        client: Any,
        registry: Registry,
        settings: MirrorSettings,
        *,
        node: str,
        datacenter: str,
        timing: MirrorTiming,
        link: _Link,
    ) -> None:
        self._client = client
        self._registry = registry
        self._settings = settings
        self._node = node
        self._datacenter = datacenter
        self._timing = timing
        self.link = link
        self._tasks: dict[str, asyncio.Task[None]] = {}  # per service: its watch or poll
        self._polled: set[str] = set()  # services read every poll_interval (no slot left)
        self._poll_slots = asyncio.Semaphore(POLL_CONNECTIONS - 2)  # the catalog's, a spare
        self._overflow = False
        self._current: dict[str, frozenset[str]] = {}  # service -> ids in the registry
        self._owner: dict[str, str] = {}  # instance id -> the service that put it there
        self._updates: dict[str, Pulled] = {}  # answers waiting for the next batch
        self._flush: asyncio.Handle | None = None
        self._warned: set[str] = set()

    @property
    def pulled(self) -> int:
        return len(self._owner)

    @property
    def watched(self) -> int:
        return len(self._tasks) - len(self._polled)

    @property
    def polled(self) -> int:
        return len(self._polled)

    async def run(self) -> None:
        """Watch the listed services, or the catalog's list of services."""
        if self._settings.services:
            self._set_services(set(self._settings.services))
            return
        await self._catalog_loop()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._flush is not None:
            self._flush.cancel()

    async def _catalog_loop(self) -> None:
        """Error handling: failures are logged once per outage and retried with backoff."""
        index, attempt, started = 0, 0, -self._timing.min_query_gap
        while True:
            started = await self._pace(started)
            try:
                new, services = await self._query(self._client.catalog.services, index=index)
                index = self._catalog_changed(index, new, set(services or {}))
            except Exception as err:  # MirrorError, or a bug (logged with its traceback)
                attempt, index = attempt + 1, 0
                await self.link.retry(err, attempt, self._timing)
                continue
            attempt = 0
            self.link.succeeded(f"{len(services or {})} services in the catalog")

    def _catalog_changed(self, index: int, new: int, names: set[str]) -> int:
        """Follow the catalog's list of services; the index of the next query."""
        self._set_services(names)
        if new >= index:
            return max(new, 1)
        log.info(
            "consul pull: the catalog index went back from %d to %d (a restored or "
            "restarted Consul); reading every service again",
            index,
            new,
        )
        self._restart_watches()
        return 0

    def _set_services(self, names: set[str]) -> None:
        """Watch new services (blocking while there are slots, else polled); drop gone ones."""
        for name in set(self._tasks) - names:
            self._tasks.pop(name).cancel()
            self._polled.discard(name)
            self._receive(name, Pulled((), ()))
        for name in sorted(names - set(self._tasks)):
            if not is_label(name):
                self._warn_once(name, f"consul pull: skipping service {name!r}: not a DNS label")
                continue
            self._start(name, polled=self.watched >= self._timing.max_watches)
        free = self._timing.max_watches - self.watched
        for name in sorted(self._polled)[: max(0, free)]:  # slots freed by services that left
            self._tasks[name].cancel()
            self._start(name, polled=False)
        overflow = bool(self._polled)
        if overflow != self._overflow:
            self._overflow = overflow
            if overflow:
                log.warning(
                    "consul pull: %d services; %d are watched (blocking queries), the others "
                    "read every %gs (Consul allows 200 connections per client by default: list "
                    "the services this host needs in consul.services)",
                    len(self._tasks),
                    self.watched,
                    self._timing.poll_interval,
                )
            else:
                log.info("consul pull: every service is watched again")

    def _start(self, name: str, *, polled: bool) -> None:
        if polled:
            self._polled.add(name)
        else:
            self._polled.discard(name)
        self._tasks[name] = asyncio.create_task(self._service_loop(name, polled=polled))

    def _restart_watches(self) -> None:
        for name in list(self._tasks):
            self._tasks[name].cancel()
            self._start(name, polled=name in self._polled)

    async def _service_loop(self, name: str, *, polled: bool) -> None:
        """Blocking queries (or, `polled`, a read every poll_interval) of one service.

        Error handling: as the catalog loop; an index going backwards restarts from 0.
        """
        index, attempt, started = 0, 0, -self._timing.min_query_gap
        while True:
            started = await self._pace(started)
            try:
                new, entries = await self._read_service(name, index, polled=polled)
                if new != index:  # else: a wait that ran out, or a poll of unchanged data
                    if new < index:
                        log.info("consul pull: %s: index went back from %d to %d", name, index, new)
                    self._receive(name, self._parse(entries or []))
                    index = 0 if new < index and not polled else max(new, 1)
            except Exception as err:  # MirrorError, or a bug (logged with its traceback)
                attempt, index = attempt + 1, 0
                await self.link.retry(err, attempt, self._timing)
                continue
            attempt = 0
            self.link.succeeded(f"reading {len(self._tasks)} services")
            if polled:
                await asyncio.sleep(self._timing.poll_interval * random.uniform(0.9, 1.1))

    async def _read_service(self, name: str, index: int, *, polled: bool) -> tuple[int, Any]:
        if not polled:
            return await self._query(self._client.health.service, name, index=index)
        async with self._poll_slots:  # polls queue here, not inside a request's timeout
            return await self._query(self._client.health.service, name, index=0)

    def _parse(self, entries: list[Mapping[str, Any]]) -> Pulled:
        pulled = parse_pulled(
            entries,
            node=self._node,
            datacenter=self._datacenter,
            default_dc=self._settings.datacenter or self._datacenter,
        )
        for reason in pulled.skipped:
            self._warn_once(reason, f"consul pull: skipping {reason}")
        return pulled

    async def _pace(self, started: float) -> float:
        """Keep the starts of one watch's queries min_query_gap apart; the new start."""
        gap = started + self._timing.min_query_gap - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)
        return time.monotonic()

    async def _query(self, method: Callable[..., Any], *args: str, index: int) -> tuple[int, Any]:
        """One (blocking when index > 0) read: (X-Consul-Index, body)."""
        timing = self._timing
        timeout = timing.request_timeout + (timing.wait * 17 / 16 if index else 0)
        request = method(*args, index=index or None, wait=f"{round(timing.wait)}s")
        try:
            found, data = await self.link.call(request, timeout)
            return int(found), data
        except BadRequest as exc:
            raise MirrorError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise MirrorError(f"bad X-Consul-Index: {exc}") from None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _receive(self, name: str, pulled: Pulled) -> None:
        """Queue a service's new instances; answers of one loop iteration are one batch."""
        self._updates[name] = pulled
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._apply)

    def _apply(self) -> None:
        self._flush = None
        updates, self._updates = self._updates, {}
        upserts: list[Instance] = []
        removals: list[str] = []
        nodes: dict[str, Node] = {}
        local = self._registry.local_node.name.lower()
        for name, pulled in updates.items():
            ids = frozenset(i.id for i in pulled.instances)
            for ident in self._current.get(name, frozenset()) - ids:
                if self._owner.get(ident) == name:
                    del self._owner[ident]
                    removals.append(ident)
            for inst in pulled.instances:
                self._owner[inst.id] = name
            upserts.extend(pulled.instances)
            nodes.update((n.name.lower(), n) for n in pulled.nodes if n.name.lower() != local)
            if ids:
                self._current[name] = ids
            else:
                self._current.pop(name, None)
        self._registry.apply(upserts=upserts, removals=removals, nodes=nodes.values())


# -- the mirror ---------------------------------------------------------------------------------


class Mirror:
    """The running mirror.  Built by :func:`start_mirror`; `await close()` stops it."""

    def __init__(
        self,
        settings: MirrorSettings,
        push: _Push | None,
        pull: _Pull | None,
        tasks: list[asyncio.Task[None]],
        clients: list[Any],
    ) -> None:
        self.settings = settings
        self._push = push
        self._pull = pull
        self._tasks = tasks
        self._clients = clients
        self._closed = False

    @property
    def stats(self) -> MirrorStats:
        push, pull = self._push, self._pull
        links = [part.link for part in (push, pull) if part is not None]
        return MirrorStats(
            url=self.settings.url,
            push=push is not None,
            pull=pull is not None,
            push_ok=push is not None and push.link.ok,
            pull_ok=pull is not None and pull.link.ok,
            last_push=None if push is None else push.link.last_ok,
            last_pull=None if pull is None else pull.link.last_ok,
            pending=0 if push is None else push.pending,
            refused=0 if push is None else push.refused,
            pushed=0 if push is None else push.pushed,
            pulled=0 if pull is None else pull.pulled,
            watched=0 if pull is None else pull.watched,
            polled=0 if pull is None else pull.polled,
            requests=sum(link.requests for link in links),
            errors=sum(link.errors for link in links),
        )

    @property
    def healthy(self) -> bool:
        """Every enabled direction's last attempt succeeded."""
        return self.stats.healthy

    async def close(self) -> None:
        """Stop both loops and close the connections; Consul keeps our entries (see above)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pull is not None:
            await self._pull.close()
        if self._push is not None:
            self._push.unsubscribe()
        for client in self._clients:
            await client.close()


async def start_mirror(
    registry: Registry,
    settings: MirrorSettings,
    *,
    node: str,
    datacenter: str,
    timing: MirrorTiming = MirrorTiming(),
) -> Mirror:
    """Start pushing and/or pulling as `settings` say; returns at once (Consul may be down).

    `node` is this agent's node name (it names our entries in Consul), `datacenter`
    ours (pulled instances of that datacenter are served unlabeled).
    """
    tasks: list[asyncio.Task[None]] = []
    clients: list[Any] = []
    push = pull = None
    if settings.push:
        client = _client(settings, timing.concurrency, timing.request_timeout)
        clients.append(client)
        push = _Push(client, registry, node, timing, _Link("push", settings.url))
        tasks.append(asyncio.create_task(push.run(), name="consul push"))
    if settings.pull:
        blocking = timing.wait * 17 / 16 + timing.request_timeout
        client = _client(settings, timing.max_watches + POLL_CONNECTIONS, blocking)
        clients.append(client)
        link = _Link("pull", settings.url)
        pull = _Pull(
            client, registry, settings, node=node, datacenter=datacenter, timing=timing, link=link
        )
        tasks.append(asyncio.create_task(pull.run(), name="consul pull"))
    return Mirror(settings, push, pull, tasks, clients)
