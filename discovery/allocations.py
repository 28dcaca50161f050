"""The agent's jobs and allocations.  State: their one owner.

:class:`JobRunner` is the only writer of jobs and allocations.  Their records
(discovery.workload) live in the registry's snapshots, so one index orders them
with the services, every read is a snapshot read and blocking queries work as
for the catalog; the store persists them like the rest.  The live side of each
allocation is an :class:`~discovery.allocrunner.AllocRunner` (network, tasks and
services hooks).

    run(spec)      all or nothing: every allocation's network and task directories
                   are set up (a failing setup undoes the others and leaves
                   nothing), the records are written to disk, then one registry
                   batch publishes the job, its allocations and their service
                   instances (each critical until its task runs), then the tasks
                   start.  The same spec again is a no-op; a changed spec is a new
                   version, new first: its allocations are set up and started, then
                   the old ones are stopped (services out, tasks killed, network
                   down) and kept as `complete`.
    stop(id)       services out, the job marked stopped (Nomad's Stop: Status "dead",
                   still listed) and its allocations `stop`, then every allocation torn
                   down (past errors, returned); `purge` forgets the job and its
                   allocations, and their directories go.
    start()        at agent start: the stored jobs and allocations come back;
                   allocations to run are restored (netsetup's network or a new one;
                   each task adopted by pid and start time, started when it is not
                   running, or restarted by its policy when it died meanwhile); what
                   no job owns is torn down: a crash in the middle of a run or stop
                   leaves nothing behind for long.
    close(stop_tasks)  the agent stopping: in --dev every allocation is stopped
                   (its tasks come back at the next start); otherwise the tasks run on
                   and the next agent adopts them.

A task that fails for good (its restart policy says no more) fails its
allocation, Nomad's way: the other tasks are killed, the services leave, the
network goes; the allocation stays listed as failed with its events and logs.

Persistence: a run or stop writes its job and allocation records to disk first
(:meth:`Store.write_ahead`) and publishes them after, so a write that fails
changes nothing; later changes (task states) are written by the store's group
commit like any registry change.  A store failure after the records are written
(the registry batch not durable yet) does not undo the run or stop: it is logged
and returned as a warning; the store retries on its own.

Concurrency: runs, stops, failures and start are serialized by one lock; reads
take the current snapshot and never wait.  `close()` waits for the one in
progress and refuses later ones.  Cancellation: a run cancelled before its
records are written undoes itself; teardowns (stop, undo, retiring, failing)
are never cut short; a stop, once begun, finishes even when its caller is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from discovery.allocrunner import AllocRunner, NetworkPort, RunnerContext, initial_states
from discovery.errors import NotFoundError, StateError, ValidationError, WaypostError
from discovery.jobplan import DESTRUCTIVE, IN_PLACE, Running, UpdatePlan, plan_update
from discovery.jobplan import STOP as STOP_ACTION
from discovery.jobs import SOURCE, JobSpec, PlannedAlloc, alloc_name, plan_instances
from discovery.model import Instance, worst_health
from discovery.registry import Registry, Snapshot
from discovery.tasks import cgroups
from discovery.tasks import process as proc
from discovery.tasks.logs import LogNotifier
from discovery.tasks.state import DEAD, SETUP_FAILURE, TaskEvent, with_event
from discovery.workload import (
    RUN,
    STOP,
    Allocation,
    Job,
    parse_alloc_record,
    parse_job_record,
)
from netsetup.errors import NetsetupError

log = logging.getLogger(__name__)

NetworkOpener = Callable[[], Awaitable[NetworkPort]]
UPDATED = "alloc is being updated due to job update"
STOPPED = "alloc is being stopped"
SHUTDOWN = "the agent is shutting down (-dev)"
NETSETUP_DB = "netsetup.db"  # netsetup's state, in the data dir next to the alloc dir


class JobStore(Protocol):
    """What the runner needs of the store (discovery.store.Store)."""

    def load_workload(self) -> tuple[dict[str, str], dict[str, str]]: ...
    async def write_ahead(
        self, jobs: Mapping[str, Job | None], allocations: Mapping[str, Allocation | None]
    ) -> None: ...
    async def durable(self, index: int) -> None: ...


class JobFailed(WaypostError):
    """A run could not set up its allocations; nothing of it is left.

    `cause` is netsetup's error (PortError, NotRoot...), for the API's status code.
    """

    def __init__(self, job_id: str, cause: Exception) -> None:
        super().__init__(f"job {job_id!r}: {cause}")
        self.job_id = job_id
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RunResult:
    job: Job
    changed: bool
    index: int
    warnings: tuple[str, ...] = ()
    plan: UpdatePlan | None = None  # what it did to the allocations (None: unchanged)


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
    """The agent's jobs.  `await start()` once; then run / stop / read the snapshot."""

    def __init__(
        self,
        registry: Registry,
        store: JobStore,
        open_network: NetworkOpener,
        node: str,
        *,
        alloc_root: str | Path,
        datacenter: str = "dc1",
        new_id: Callable[[], str] | None = None,
        host_env: Mapping[str, str] | None = None,
        is_root: bool | None = None,
        use_cgroups: bool | None = None,
    ) -> None:
        """`new_id` makes allocation ids (default uuid4; root tests give them their prefix)."""
        self._registry = registry
        self._store = store
        self._open_network = open_network
        self._network: NetworkPort | None = None
        self._new_id = new_id
        self._runners: dict[str, AllocRunner] = {}
        self._dead: dict[str, str] = {}  # job id -> why its record could not be read
        self._lock = asyncio.Lock()
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self.last_index = 0
        root = os.geteuid() == 0 if is_root is None else is_root
        if use_cgroups is None:
            reason = cgroups.unavailable()
            use_cgroups = not reason
            if reason:
                log.info(
                    "tasks get no cgroup of their own (%s): memory limits not enforced", reason
                )
        self._ctx = RunnerContext(
            network=self._net,
            node=node,
            datacenter=datacenter,
            alloc_root=Path(alloc_root).absolute(),
            host_env=dict(os.environ if host_env is None else host_env),
            boot=proc.boot_id(),
            publish=self._publish,
            deregister=self._deregister,
            failed=self._failed,
            use_cgroups=use_cgroups,
            is_root=root,
        )

    # -- reads ------------------------------------------------------------------------

    @property
    def dead(self) -> Mapping[str, str]:
        """The jobs whose record could not be read at start, with the reason."""
        return self._dead

    @property
    def alloc_root(self) -> Path:
        return self._ctx.alloc_root

    def notifier(self, alloc_id: str, task: str, kind: str) -> LogNotifier | None:
        """What wakes a reader following `task`'s `kind` log (None: nothing writes it now)."""
        runner = self._runners.get(alloc_id)
        sup = runner.supervisors.get(task) if runner is not None else None
        return sup.notifier(kind) if sup is not None else None

    def runner(self, alloc_id: str) -> AllocRunner | None:
        return self._runners.get(alloc_id)

    # -- publishing (the runners' callbacks) --------------------------------------------

    def _publish(self, runner: AllocRunner) -> None:
        """A task state changed: the allocation and its task checks in one registry change."""
        snap = self._registry.snapshot
        if runner.id not in snap.allocations:  # purged meanwhile: nothing to show
            return
        changed = self._registry.update_checks(runner.task_checks(), allocations=[runner.alloc])
        self.last_index = changed.index

    def _deregister(self, ids: list[str]) -> None:
        if ids:
            self._registry.apply(removals=ids)

    def _failed(self, runner: AllocRunner) -> None:
        self._in_background(self._fail(runner), f"fail {runner.id}")

    def _in_background(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(_run_logged(work), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail(self, runner: AllocRunner) -> None:
        async with self._lock:
            if self._closed or self._runners.get(runner.id) is not runner:
                return
            log.warning("allocation %s (%s) failed; stopping it", runner.id, runner.alloc.name)
            await self._retire([runner], "a task of the allocation failed")

    # -- changes ----------------------------------------------------------------------

    async def _net(self) -> NetworkPort:
        if self._network is None:
            self._network = await self._open_network()
        return self._network

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the job runner is closed (the agent is stopping)")

    def plan(self, spec: JobSpec) -> tuple[UpdatePlan, Job | None]:
        """What `run(spec)` would do to the job's allocations, and the job it would replace."""
        old = self._registry.snapshot.jobs.get(spec.id)
        current = old if old is not None and not old.stop else None
        live = [r for r in self._runners.values() if r.alloc.job_id == spec.id]
        running = [Running(r.id, r.alloc.group, r.alloc.index) for r in live]
        if current is None:
            running = []  # a stopped job's allocations are gone: everything is placed
        return plan_update(current.spec if current else None, running, spec), old

    async def run(self, spec: JobSpec) -> RunResult:
        """Run `spec` (see the module docstring).

        Error handling: JobFailed (netsetup refused: ports, root...), ValidationError
        (a task's user, a service that cannot be placed), StateError (the store);
        nothing is left of the new version then, and a running old version is untouched.
        """
        async with self._lock:
            self._check_open()
            snap = self._registry.snapshot
            old = snap.jobs.get(spec.id)
            if old is not None and not old.stop and old.spec == spec:
                return RunResult(old, False, old.modify_index)
            plan, _ = self.plan(spec)
            version = 0 if old is None else old.version + 1
            live = {r.id: r for r in self._runners.values() if r.alloc.job_id == spec.id}
            going = {c.id for c in plan.actions(DESTRUCTIVE) + plan.actions(STOP_ACTION)}
            old_runners = [r for ident, r in live.items() if ident in going]
            kept = [live[c.id] for c in plan.actions(IN_PLACE) if c.id in live]
            # Before anything is set up: a service that cannot be placed changes nothing.
            updated = {r.id: _updated_in_place(r, spec, version, snap) for r in kept}
            runners = await self._setup_all(spec, version, plan)
            job = Job(spec, version, submit_time=time.time_ns())
            for r in old_runners:
                r.alloc = replace(r.alloc, desired=STOP, desired_description=UPDATED)
            dropped = [
                a.id
                for a in snap.allocations.values()
                if a.job_id == spec.id and a.terminal and a.job_version < version - 1
            ]
            allocations: dict[str, Allocation | None] = {r.id: r.alloc for r in runners}
            allocations.update((r.id, r.alloc) for r in old_runners)
            allocations.update((ident, u.alloc) for ident, u in updated.items())
            allocations.update((ident, None) for ident in dropped)
            try:
                await self._store.write_ahead({spec.id: job}, allocations)
            except BaseException as exc:
                for r in old_runners:
                    r.alloc = replace(r.alloc, desired=RUN, desired_description="")
                for error in await _destroy_all(runners, ""):
                    exc.add_note(f"undo failed: {error}")
                raise
            removals: list[str] = []
            for r in kept:  # committed: the kept runners take their new version
                u = updated[r.id]
                removals += [i.id for i in r.instances if i.id not in u.instance_ids]
                r.job, r.group, r.alloc, r.instances = (
                    spec,
                    spec.group(r.alloc.group),
                    u.alloc,
                    u.instances,
                )
            published = self._registry.apply(
                jobs=[job],
                allocations=[a for a in allocations.values() if a is not None],
                drop_allocations=dropped,
                upserts=[i for r in runners + kept for i in r.instances],
                removals=removals,
            )
            if kept:
                checks = {k: v for r in kept for k, v in r.task_checks().items()}
                published = self._registry.update_checks(checks)
            self.last_index = published.index
            if self._dead.pop(spec.id, None) is not None:
                log.warning("dead job %s replaced", spec.id)
            for r in runners:
                self._runners[r.id] = r
                r.start()
            warnings: list[str] = []
            try:
                await self._after_commit(spec.id, published.index, warnings)
            finally:  # committed: the old version goes, even when this is cancelled
                if old_runners:
                    warnings += await self._retire(old_runners, UPDATED)
                self._remove_dirs(dropped)
            current = self._registry.snapshot.jobs[spec.id]
            return RunResult(current, True, published.index, tuple(warnings), plan)

    async def _setup_all(self, spec: JobSpec, version: int, plan: UpdatePlan) -> list[AllocRunner]:
        """A runner per new allocation of `plan`, set up; on any failure every one is undone."""
        now = time.time_ns()
        new_id = self._new_id or (lambda: str(uuid.uuid4()))
        done: list[AllocRunner] = []
        try:
            for group in spec.groups:
                group_plan = plan.of(group.name)
                for index in group_plan.new_indexes if group_plan else ():
                    alloc = Allocation(
                        id=new_id(),
                        name=alloc_name(spec.id, group.name, index),
                        job_id=spec.id,
                        group=group.name,
                        index=index,
                        job_version=version,
                        tasks=initial_states(group, now),
                        create_time=now,
                        modify_time=now,
                    )
                    runner = AllocRunner(self._ctx, spec, alloc)
                    await runner.setup()  # undoes its own hooks when it fails
                    done.append(runner)
        except BaseException as exc:
            for error in await _destroy_all(done, ""):
                exc.add_note(f"undo failed: {error}")
            if isinstance(exc, NetsetupError):
                raise JobFailed(spec.id, exc) from exc
            raise
        return done

    async def _after_commit(self, job_id: str, index: int, warnings: list[str]) -> None:
        """Wait for the registry batch on disk.  A StateError is a warning (see above)."""
        try:
            await self._store.durable(index)
        except StateError as err:
            log.error(
                "job %s: applied, but its registry changes are not on disk yet: %s", job_id, err
            )
            warnings.append(f"applied, but its registry changes are not on disk yet: {err}")

    async def _retire(self, runners: Sequence[AllocRunner], reason: str) -> list[str]:
        """Services out in one batch, then each allocation torn down (never cut short)."""
        ids = [i.id for r in runners for i in r.instances]
        current = self._registry.snapshot.allocations
        records = [r.alloc for r in runners if r.id in current]
        changed = self._registry.apply(removals=ids, allocations=records)
        self.last_index = changed.index
        errors = await _destroy_all(runners, reason)
        for r in runners:
            if self._runners.get(r.id) is r:
                del self._runners[r.id]
        return errors

    async def stop(self, job_id: str, *, purge: bool = False) -> list[str]:
        """Stop job `job_id` (see the module docstring); the problems met on the way.

        Error handling: NotFoundError for an unknown job; StateError when the
        records cannot be written (nothing is changed then).  Cancelled, a stop
        that has begun finishes, then raises CancelledError.
        """
        async with self._lock:
            self._check_open()
            job = self._registry.snapshot.jobs.get(job_id)
            if job is None and job_id not in self._dead:
                raise NotFoundError(f"job {job_id!r} not found")
            work = asyncio.ensure_future(self._stop(job_id, job, purge=purge))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])
                raise

    async def _stop(self, job_id: str, job: Job | None, *, purge: bool) -> list[str]:
        snap = self._registry.snapshot
        runners = [r for r in self._runners.values() if r.alloc.job_id == job_id]
        every = [a.id for a in snap.allocations.values() if a.job_id == job_id]
        for r in runners:
            r.alloc = replace(r.alloc, desired=STOP, desired_description=STOPPED)
        allocations: dict[str, Allocation | None] = {}
        if purge or job is None:
            allocations.update((ident, None) for ident in every)
            jobs: dict[str, Job | None] = {job_id: None}
        else:
            allocations.update((r.id, r.alloc) for r in runners)
            jobs = {job_id: replace(job, stop=True)}
        try:
            await self._store.write_ahead(jobs, allocations)
        except BaseException:
            for r in runners:
                r.alloc = replace(r.alloc, desired=RUN, desired_description="")
            raise
        gone = [ident for ident, a in allocations.items() if a is None]
        kept = jobs[job_id]
        changed = self._registry.apply(
            jobs=[kept] if kept is not None else [],
            drop_jobs=[] if kept is not None else [job_id],
            allocations=[a for a in allocations.values() if a is not None],
            drop_allocations=gone,
            removals=[i.id for r in runners for i in r.instances],
        )
        self.last_index = changed.index
        if self._dead.pop(job_id, None) is not None:
            log.warning("dead job %s forgotten", job_id)
        problems: list[str] = []
        await self._after_commit(job_id, changed.index, problems)
        problems += await self._retire(runners, STOPPED)
        self._remove_dirs(gone)
        return problems

    def _remove_dirs(self, alloc_ids: Iterable[str]) -> None:
        """The directories of allocations that are gone, in the background."""
        paths = [self._ctx.alloc_root / ident for ident in alloc_ids]
        if paths:
            self._in_background(asyncio.to_thread(_rmtrees, paths), "remove alloc dirs")

    async def close(self, *, stop_tasks: bool = False) -> None:
        """The agent stops (see the module docstring); later runs and stops raise StateError."""
        async with self._lock:
            self._closed = True
            runners = list(self._runners.values())
            if stop_tasks:
                ids = [i.id for r in runners for i in r.instances]
                self._registry.apply(removals=ids)
                await _destroy_all(runners, SHUTDOWN)
                self._runners.clear()
            else:
                await asyncio.gather(*(r.detach() for r in runners))
            background = list(self._background)
        await asyncio.gather(*background, return_exceptions=True)

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the stored jobs and allocations back (see the module docstring).

        The network is opened only when there is an allocation.  Error handling:
        an unreadable job record makes the job dead (logged, in `dead`); an
        allocation that cannot be restored is logged and marked failed.
        """
        job_rows, alloc_rows = await asyncio.to_thread(self._store.load_workload)
        async with self._lock:
            jobs = self._parse_jobs(job_rows)
            allocs = _parse_allocs(alloc_rows)
            self._registry.apply(jobs=jobs.values(), allocations=allocs.values())
            keep = {
                a.id: a
                for a in allocs.values()
                if not a.terminal and (j := jobs.get(a.job_id)) is not None and not j.stop
            }
            # netsetup is loaded only when there can be something of ours in it: our
            # records, or its own state (a lost waypost.db, a crash before the first
            # record: allocations no job owns, torn down by the sweep)
            netsetup_state = (self._ctx.alloc_root.parent / NETSETUP_DB).exists()
            if job_rows or alloc_rows or netsetup_state:
                claimed = await self._restore(jobs, keep)
                await self._sweep(claimed)

    def _parse_jobs(self, rows: Mapping[str, str]) -> dict[str, Job]:
        jobs = {}
        for ident, text in sorted(rows.items()):
            try:
                jobs[ident] = parse_job_record(text)
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                reason = f"its stored record cannot be read: {exc!r}"
                log.error("job %s is dead, not started: %s", ident, reason)
                self._dead[ident] = reason
        return jobs

    async def _restore(self, jobs: Mapping[str, Job], keep: Mapping[str, Allocation]) -> set[str]:
        """Restore the allocations in `keep`; the ids of those that run again."""
        runners = []
        for alloc in sorted(keep.values(), key=lambda a: (a.job_id, a.group, a.index)):
            runner = AllocRunner(self._ctx, jobs[alloc.job_id].spec, alloc)
            try:
                await runner.restore()
            except (NetsetupError, ValidationError, OSError, KeyError) as exc:
                log.error("allocation %s (%s) cannot be restored: %s", alloc.id, alloc.name, exc)
                self._registry.apply(allocations=[_failed_record(alloc, exc)])
                continue
            runners.append(runner)
        snap = self._registry.snapshot
        fresh = [
            keep_check_state(i, snap.instances.get(i.id)) for r in runners for i in r.instances
        ]
        wanted = {i.id for i in fresh}
        stale = [i.id for i in snap.instances.values() if i.source == SOURCE and i.id not in wanted]
        self._registry.apply(upserts=fresh, removals=stale, allocations=[r.alloc for r in runners])
        for r in runners:
            self._runners[r.id] = r
            r.start()
        checks = {k: v for r in runners for k, v in r.task_checks().items()}
        changed = self._registry.update_checks(checks, allocations=[r.alloc for r in runners])
        self.last_index = changed.index
        return {r.id for r in runners}

    async def _sweep(self, claimed: set[str]) -> None:
        """Tear down what netsetup holds and no allocation to run claims, and its processes."""
        network = await self._net()
        for net in await network.list():
            if net.alloc_id in claimed:
                continue
            log.warning("allocation %s belongs to no job: tearing it down", net.alloc_id)
            killed = await asyncio.to_thread(proc.kill_marked, net.alloc_id, "", self._ctx.boot)
            if killed:
                log.warning("allocation %s: killed its processes %s", net.alloc_id, killed)
            try:
                await network.teardown(net.alloc_id)
            except NetsetupError as exc:
                log.error("allocation %s could not be torn down: %s", net.alloc_id, exc)


@dataclass(frozen=True, slots=True)
class _InPlace:
    """A running allocation's record and instances under the job's new version."""

    alloc: Allocation
    instances: tuple[Instance, ...]

    @property
    def instance_ids(self) -> set[str]:
        return {i.id for i in self.instances}


def _updated_in_place(runner: AllocRunner, spec: JobSpec, version: int, snap: Snapshot) -> _InPlace:
    """`runner`'s allocation under `spec` (same id, ports, network and processes).

    Error handling: ValidationError when a service of the new version cannot be
    placed on the allocation (nothing is changed then: this is computed first).
    """
    group = spec.group(runner.alloc.group)
    network = runner.alloc.network
    if network is None:
        raise ValidationError("Job", f"allocation {runner.id} has no network")
    a = runner.alloc
    planned = PlannedAlloc(a.id, a.name, a.job_id, a.group, a.index, group.network)
    fresh = plan_instances(planned, group, network, runner.ctx.node)
    kept = tuple(keep_check_state(i, snap.instances.get(i.id)) for i in fresh)
    alloc = replace(a, job_version=version, modify_time=time.time_ns())
    return _InPlace(alloc, kept)


def _failed_record(alloc: Allocation, exc: Exception) -> Allocation:
    """`alloc` with every task dead and failed: it could not be brought back."""
    event = TaskEvent(
        SETUP_FAILURE, time.time_ns(), f"could not be restored: {exc}", fails_task=True
    )
    tasks = tuple(
        (name, with_event(state, event, state=DEAD, failed=True, process=None))
        for name, state in alloc.tasks
    )
    return replace(alloc, tasks=tasks)


def _parse_allocs(rows: Mapping[str, str]) -> dict[str, Allocation]:
    allocs = {}
    for ident, text in sorted(rows.items()):
        try:
            allocs[ident] = parse_alloc_record(text)
        except (ValueError, KeyError, TypeError, WaypostError, NetsetupError) as exc:
            log.error("allocation %s: its stored record cannot be read (%r); torn down", ident, exc)
    return allocs


async def _destroy_all(runners: Sequence[AllocRunner], reason: str) -> list[str]:
    """Destroy every runner at once, past errors; the errors.  Never cut short."""
    work = asyncio.ensure_future(asyncio.gather(*(r.destroy(reason) for r in runners)))
    try:
        results = await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise
    return [e for errors in results for e in errors]


def _rmtrees(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


async def _run_logged(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception:
        log.exception("background job work failed")
