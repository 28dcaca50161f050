"""The jobs the agent runs and their allocations.  State: the one owner of jobs.

:class:`JobRunner` turns a :class:`~discovery.jobs.JobSpec` into allocations:
for each one netsetup (through the :class:`NetworkPort` seam; netsetup's
NetworkManager satisfies it) reserves the ports and, in bridge mode, builds
the namespace; then the services of every allocation are registered in ONE
registry batch (source "job"; DNS and the HTTP API see them together).
Tasks are not run: a user runs them with each allocation's NOMAD_* env.

    run(spec)      all or nothing: a failing setup tears down the allocations
                   already set up and registers nothing.  The same job id with
                   the same spec is a no-op; a changed spec is replaced new
                   first: the new allocations are set up and registered (their
                   instances replace the old ones in the same batch), then the
                   old ones are torn down.  So a failing replacement leaves the
                   running version as it was, and a static port the running
                   version holds cannot move to the new one (stop the job first).
    stop(job_id)   deregister, forget the job, then tear down every allocation
                   (past errors; they are returned, and logged).
    start()        at agent start: the persisted jobs come back; allocations
                   netsetup still has are registered again (their check statuses
                   kept), missing ones are set up again, and the allocations a
                   replacement left behind are torn down.  A document that cannot
                   be read is logged and skipped: the job is *dead* (`dead`, with
                   the reason), its services are not served, its allocations stay
                   in netsetup's state (`waypost net list`); the other jobs start.
                   A run of that id replaces it, a stop forgets it.

Persistence: one document per job in the store (:meth:`Store.put_job`):
``{"Job": <render_job>, "Allocs": [{ID, Name, TaskGroup, Index}], "Retiring": [ids]}``,
written before the registry batch of a run and deleted before a stop's teardown,
so a crash never brings back a stopped job.  A crash in the middle of a run's
setups leaves their reservations in netsetup's state (`waypost net list`).

The document is what makes a job durable: `start()` rebuilds its instances and
allocations from it.  So a run or stop commits at its document write; a store
failure after that (the registry batch not written: :meth:`Store.durable`, or
the rewrite after retiring) does not undo it: the job runs (or is stopped) as
answered, the failure is logged and returned as a warning (`RunningJob.warnings`,
stop's list), the store retries the batch on its own and reports itself unhealthy
until it succeeds.  A document write that fails leaves nothing of the run or
stop applied.

Concurrency: runs and stops are serialized by one lock; reads (`jobs`, `allocs`)
take the current dict and never wait.  `close()` waits for the run or stop in
progress and refuses later ones, so the agent can close netsetup after it.

Cancellation (a client gone, the agent stopping): a run cancelled before its
registry batch undoes itself (its setups torn down, the job's document put back
as it was: a store write that was under way still lands); a teardown sequence
(stop, undo, retiring) is never cut short, it finishes and then the cancellation
is raised.  A stop is never cut short once it has begun: its document delete
lands even when the caller is gone, so the rest (deregistration, teardown) runs too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from discovery.errors import NotFoundError, StateError, ValidationError, WaypostError
from discovery.jobs import (
    SOURCE,
    JobSpec,
    PlannedAlloc,
    alloc_addresses,
    parse_job,
    plan_allocs,
    plan_instances,
    render_job,
)
from discovery.model import Instance, worst_health
from discovery.registry import Alloc, Registry
from netsetup.errors import AllocExists, NetsetupError
from netsetup.spec import AllocNetwork, NetworkSpec

log = logging.getLogger(__name__)


class NetworkPort(Protocol):
    """What the runner needs of netsetup's NetworkManager."""

    async def setup(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork: ...
    async def teardown(self, alloc_id: str) -> bool: ...
    async def get(self, alloc_id: str) -> AllocNetwork | None: ...


class JobStore(Protocol):
    """What the runner needs of the store (discovery.store.Store)."""

    def load_jobs(self) -> dict[str, str]: ...
    async def put_job(self, ident: str, data: str | None) -> None: ...
    async def durable(self, index: int) -> None: ...


NetworkOpener = Callable[[], Awaitable[NetworkPort]]


class JobFailed(WaypostError):
    """A run could not set up its allocations; nothing of it is left.

    `cause` is netsetup's error (PortError, NotRoot...), for the API's status code.
    """

    def __init__(self, job_id: str, cause: Exception) -> None:
        super().__init__(f"job {job_id!r}: {cause}")
        self.job_id = job_id
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RunningAlloc:
    plan: PlannedAlloc
    network: AllocNetwork
    instances: tuple[Instance, ...]


@dataclass(frozen=True, slots=True)
class RunningJob:
    spec: JobSpec
    allocs: tuple[RunningAlloc, ...]
    modify_index: int = 0  # the registry index of its last run
    warnings: tuple[str, ...] = ()  # store failures after its last run committed

    @property
    def instance_ids(self) -> list[str]:
        return [i.id for a in self.allocs for i in a.instances]


def render_doc(job: RunningJob, retiring: Sequence[str] = ()) -> str:
    """The persisted document of `job` (see the module docstring)."""
    allocs = [
        {"ID": a.plan.id, "Name": a.plan.name, "TaskGroup": a.plan.group, "Index": a.plan.index}
        for a in job.allocs
    ]
    doc = {"Job": render_job(job.spec), "Allocs": allocs, "Retiring": list(retiring)}
    return json.dumps(doc, sort_keys=True)


def parse_doc(text: str) -> tuple[JobSpec, tuple[PlannedAlloc, ...], tuple[str, ...]]:
    """A persisted document back: the spec, its allocations, the ids left to tear down.

    Error handling: StateError when it does not parse (a damaged or foreign row).
    """
    try:
        doc = json.loads(text)
        spec = parse_job(doc["Job"])
        plans = tuple(
            PlannedAlloc(
                id=str(a["ID"]),
                name=str(a["Name"]),
                job_id=spec.id,
                group=str(a["TaskGroup"]),
                index=int(a["Index"]),
                network=spec.group(str(a["TaskGroup"])).network,
            )
            for a in doc["Allocs"]
        )
        return spec, plans, tuple(str(i) for i in doc.get("Retiring", ()))
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise StateError(f"a persisted job cannot be read: {exc!r}") from exc


def keep_check_state(fresh: Instance, old: Instance | None) -> Instance:
    """`fresh` with the statuses and outputs of `old`'s checks of the same ids (a restart)."""
    if old is None or not fresh.checks:
        return fresh
    before = {c.id: c for c in old.checks}
    checks = tuple(
        replace(c, status=b.status, output=b.output) if (b := before.get(c.id)) else c
        for c in fresh.checks
    )
    return replace(fresh, checks=checks, health=worst_health(checks))


class JobRunner:
    """The agent's jobs.  `await start()` once; then run / stop / read."""

    def __init__(
        self,
        registry: Registry,
        store: JobStore,
        open_network: NetworkOpener,
        node: str,
        *,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        """`new_id` makes allocation ids (default uuid4; root tests give them their prefix)."""
        self._new_id = new_id
        self._registry = registry
        self._store = store
        self._open_network = open_network
        self._network: NetworkPort | None = None
        self._node = node
        self._jobs: dict[str, RunningJob] = {}
        self._dead: dict[str, str] = {}  # job id -> why its document could not be read
        self._lock = asyncio.Lock()
        self._closed = False
        self.last_index = 0  # the registry index of the last run, stop or start

    # -- reads ----------------------------------------------------------------------

    @property
    def jobs(self) -> Mapping[str, RunningJob]:
        return self._jobs

    def alloc(self, alloc_id: str) -> tuple[RunningJob, RunningAlloc] | None:
        for job in self._jobs.values():
            for alloc in job.allocs:
                if alloc.plan.id == alloc_id:
                    return job, alloc
        return None

    # -- changes --------------------------------------------------------------------

    async def _net(self) -> NetworkPort:
        if self._network is None:
            self._network = await self._open_network()
        return self._network

    async def run(self, spec: JobSpec) -> tuple[RunningJob, bool]:
        """Run `spec` (see the module docstring); the job and whether anything changed.

        Error handling: JobFailed (netsetup refused: ports, root...), ValidationError
        (a service cannot be placed), StateError (the store); nothing is left of the
        new version then, and a running old version is untouched.
        """
        async with self._lock:
            self._check_open()
            old = self._jobs.get(spec.id)
            if old is not None and old.spec == spec:
                return old, False
            network = await self._net()
            plans = plan_allocs(spec) if self._new_id is None else plan_allocs(spec, self._new_id)
            allocs = await self._setup_all(network, spec, plans)
            job = RunningJob(spec, allocs)
            retiring = [a.plan.id for a in old.allocs] if old is not None else []
            try:
                await self._store.put_job(spec.id, render_doc(job, retiring))
            except BaseException as exc:
                await self._undo_run(network, spec.id, old, allocs, exc)
                raise
            snap = self._registry.apply(
                upserts=[i for a in allocs for i in a.instances],
                removals=old.instance_ids if old is not None else (),
                allocs=[Alloc(a.plan.id, alloc_addresses(a.network), a.plan.name) for a in allocs],
                drop_allocs=retiring,
            )
            self.last_index = snap.index
            self._jobs[spec.id] = job = replace(job, modify_index=snap.index)
            if self._dead.pop(spec.id, None) is not None:
                log.warning("dead job %s replaced; its old allocations are left", spec.id)
            warnings: list[str] = []
            try:
                await self._after_commit(spec.id, snap.index, warnings)
            finally:  # committed: the old version goes, even when this is cancelled
                if retiring and not await self._teardown_all(network, retiring):
                    await self._after_commit(spec.id, None, warnings, render_doc(job))
                if warnings:
                    self._jobs[spec.id] = job = replace(job, warnings=tuple(warnings))
            return job, True

    async def _after_commit(
        self, job_id: str, index: int | None, warnings: list[str], doc: str | None = None
    ) -> None:
        """A store write after the commit (`index` durable, else `doc` written).

        Error handling: a StateError does not undo what is committed: it is logged
        and added to `warnings` (see the module docstring).
        """
        try:
            if index is not None:
                await self._store.durable(index)
            else:
                await self._store.put_job(job_id, doc)
        except StateError as err:
            what = "registry changes" if index is not None else "document"
            log.error("job %s: applied, but its %s are not on disk yet: %s", job_id, what, err)
            warnings.append(f"applied, but its {what} are not on disk yet: {err}")

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the job runner is closed (the agent is stopping)")

    async def _undo_run(
        self,
        network: NetworkPort,
        job_id: str,
        old: RunningJob | None,
        allocs: Sequence[RunningAlloc],
        exc: BaseException,
    ) -> None:
        """A run failed at its document: tear its setups down, put the document back.

        The write may have landed anyway (a cancelled caller does not stop the
        store's thread); the document must then not name allocations that are gone.
        The put-back is shielded: cancelled again, it still lands.
        """
        for error in await self._teardown_all(network, [a.plan.id for a in allocs]):
            exc.add_note(f"undo failed: {error}")
        try:
            await asyncio.shield(
                self._store.put_job(job_id, None if old is None else render_doc(old))
            )
        except StateError as err:
            log.error("job %s: its document could not be put back: %s", job_id, err)
            exc.add_note(f"document not put back: {err!r}")

    async def close(self) -> None:
        """Wait for the run or stop in progress; later ones raise StateError."""
        async with self._lock:
            self._closed = True

    async def _setup_all(
        self, network: NetworkPort, spec: JobSpec, plans: Sequence[PlannedAlloc]
    ) -> tuple[RunningAlloc, ...]:
        """Set up every allocation and place its services; on any failure undo them all."""
        done: list[RunningAlloc] = []
        try:
            for plan in plans:
                net = await network.setup(plan.id, plan.network)
                # Recorded at once: a placement error below must tear this one down too.
                done.append(RunningAlloc(plan, net, ()))
                instances = plan_instances(plan, spec.group(plan.group), net, self._node)
                done[-1] = RunningAlloc(plan, net, instances)
        except BaseException as exc:
            errors = await self._teardown_all(network, [a.plan.id for a in done])
            for error in errors:
                exc.add_note(f"undo failed: {error}")
            if isinstance(exc, NetsetupError):
                raise JobFailed(spec.id, exc) from exc
            raise
        return tuple(done)

    async def _teardown_all(self, network: NetworkPort, ids: Iterable[str]) -> list[str]:
        """Tear down every allocation in `ids`, past errors; the errors, logged.

        A cancelled caller does not cut it short: it finishes, then CancelledError
        is raised (half a stop would leave allocations no job claims).
        """
        work = asyncio.ensure_future(self._teardown_each(network, list(ids)))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    async def _teardown_each(self, network: NetworkPort, ids: Sequence[str]) -> list[str]:
        errors = []
        for alloc_id in ids:
            try:
                await network.teardown(alloc_id)
            except Exception as exc:  # past every error: the rest still goes
                log.error("teardown of allocation %s failed: %s", alloc_id, exc)
                errors.append(f"{alloc_id}: {exc}")
        return errors

    async def stop(self, job_id: str) -> list[str]:
        """Deregister job `job_id`, forget it, tear down its allocations; the problems.

        The problems are the teardown errors and a store failure after the document
        delete (see the module docstring).  A dead job's document is deleted; its
        allocations, unknown, stay in netsetup's state.  Cancelled, a stop finishes,
        then raises CancelledError.  Error handling: NotFoundError for an unknown
        job; StateError when the document cannot be deleted (nothing is changed).
        """
        async with self._lock:
            self._check_open()
            job = self._jobs.get(job_id)
            if job is None and job_id not in self._dead:
                raise NotFoundError(f"job {job_id!r} not found")
            network = await self._net()
            steps = self._forget_dead(job_id) if job is None else self._stop(job, network)
            work = asyncio.ensure_future(steps)
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])
                raise

    async def _stop(self, job: RunningJob, network: NetworkPort) -> list[str]:
        job_id, ids = job.spec.id, [a.plan.id for a in job.allocs]
        await self._store.put_job(job_id, None)
        del self._jobs[job_id]
        snap = self._registry.apply(removals=job.instance_ids, drop_allocs=ids)
        self.last_index = snap.index
        problems: list[str] = []
        await self._after_commit(job_id, snap.index, problems)
        return problems + await self._teardown_each(network, ids)

    async def _forget_dead(self, job_id: str) -> list[str]:
        await self._store.put_job(job_id, None)
        reason = self._dead.pop(job_id)
        log.warning("dead job %s forgotten (%s); its allocations are left", job_id, reason)
        return [
            f"{job_id}: its document could not be read, so its allocations (if any) are"
            " left in netsetup's state (`waypost net list`)"
        ]

    @property
    def dead(self) -> Mapping[str, str]:
        """The jobs whose document could not be read at start, with the reason."""
        return self._dead

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the persisted jobs back (see the module docstring).

        The network is opened only when there are jobs.  Error handling: an
        unreadable document makes its job dead (logged, in `dead`); an allocation
        that cannot be set up again is logged and left out (the job runs without it).
        """
        docs = await asyncio.to_thread(self._store.load_jobs)
        async with self._lock:
            restored: dict[str, RunningJob] = {}
            for ident, text in sorted(docs.items()):
                try:
                    spec, plans, retiring = parse_doc(text)
                except StateError as err:
                    log.error(
                        "job %s is dead, not started (its allocations stay in netsetup's"
                        " state, `waypost net list`): %s",
                        ident,
                        err,
                    )
                    self._dead[ident] = str(err)
                    continue
                network = await self._net()
                restored[ident] = await self._restore(network, spec, plans)
                if retiring and not await self._teardown_all(network, retiring):
                    warnings: list[str] = []
                    await self._after_commit(ident, None, warnings, render_doc(restored[ident]))
            self._register_restored(restored)

    async def _restore(
        self, network: NetworkPort, spec: JobSpec, plans: Sequence[PlannedAlloc]
    ) -> RunningJob:
        allocs = []
        for plan in plans:
            try:
                net = await network.get(plan.id)
                if net is None:
                    log.warning("allocation %s (%s) is gone; setting it up", plan.id, plan.name)
                    net = await self._setup_again(network, plan)
                instances = plan_instances(plan, spec.group(plan.group), net, self._node)
            except (NetsetupError, ValidationError) as exc:
                log.error("allocation %s (%s) cannot be restored: %s", plan.id, plan.name, exc)
                continue
            allocs.append(RunningAlloc(plan, net, instances))
        return RunningJob(spec, tuple(allocs))

    async def _setup_again(self, network: NetworkPort, plan: PlannedAlloc) -> AllocNetwork:
        """Set `plan` up; a reservation a crash left half done is torn down first (once)."""
        try:
            return await network.setup(plan.id, plan.network)
        except AllocExists:
            log.warning("allocation %s: a setup was interrupted; redoing it", plan.id)
            await network.teardown(plan.id)
            return await network.setup(plan.id, plan.network)

    def _register_restored(self, restored: dict[str, RunningJob]) -> None:
        """One batch: the jobs' instances (check states kept) and allocs; stale ones out."""
        snap = self._registry.snapshot
        fresh = [
            keep_check_state(i, snap.instances.get(i.id))
            for job in restored.values()
            for a in job.allocs
            for i in a.instances
        ]
        wanted = {i.id for i in fresh}
        stale = [i.id for i in snap.instances.values() if i.source == SOURCE and i.id not in wanted]
        allocs = [
            Alloc(a.plan.id, alloc_addresses(a.network), a.plan.name)
            for job in restored.values()
            for a in job.allocs
        ]
        kept = {a.id for a in allocs}
        new = self._registry.apply(
            upserts=fresh,
            removals=stale,
            allocs=allocs,
            drop_allocs=[ident for ident in snap.allocs if ident not in kept],
        )
        self._jobs = {k: replace(v, modify_index=new.index) for k, v in restored.items()}
        self.last_index = new.index
