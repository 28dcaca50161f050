"""discovery.allocations.JobRunner with real task processes: runs, replacement, stop,
restart and adoption, task exits and restarts, failures, crash windows.

The tasks are real processes (`sleep`, `sh -c ...`) started by the real driver, in
host mode.  FAKES: `FakeNetwork` stands in for netsetup's NetworkManager (failures
must be injected at a chosen setup or teardown; the real one is tested through the
agent in test_jobs_agent.py and in tests/netns); `MemoryStore` for the store's
records (write-ahead failures and cancellations injected at a chosen write; it
follows the registry as the real store's group commit does; the real store is
tested in test_jobs_store.py).  Every test ends with no process of its allocations
left, checked by their NOMAD_ALLOC_ID in /proc.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from discovery.allocations import JobFailed, JobRunner, keep_check_state
from discovery.errors import NotFoundError, StateError
from discovery.jobs import SOURCE, JobSpec, parse_job, task_check_id
from discovery.model import CheckKind, Health, Node
from discovery.registry import Registry, Snapshot, work_keys_allocs, work_keys_jobs
from discovery.tasks.process import find_marked
from discovery.workload import (
    Allocation,
    Job,
    render_alloc_record,
    render_job_record,
)
from netsetup.errors import AllocExists, PortError
from netsetup.spec import AllocNetwork, NetworkSpec, PortMapping

NODE = Node("agent", "127.0.0.1")
SLEEP = ["sleep", "300"]
WAIT = 20.0  # seconds any condition below may take on a busy machine


class FakeNetwork:
    """netsetup's NetworkManager in memory: ports from a counter, failures on request."""

    def __init__(self) -> None:
        self.allocs: dict[str, AllocNetwork] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_setups: set[int] = set()  # 1-based numbers of setup calls that fail
        self.fail_teardowns: set[str] = set()
        self.half: set[str] = set()  # reservations a crash left without a result
        self.gate: asyncio.Event | None = None  # setups and teardowns wait for it when set
        self._setups = 0
        self._next_port = 20000

    async def setup(self, alloc_id: str, spec: NetworkSpec) -> AllocNetwork:
        await asyncio.sleep(0)  # a real setup yields; concurrent runs must not interleave
        self._setups += 1
        self.calls.append(("setup", alloc_id))
        if self.gate is not None:
            await self.gate.wait()
        if alloc_id in self.half:
            raise AllocExists(alloc_id)
        if self._setups in self.fail_setups:
            raise PortError("dynamic port selection failed (injected)")
        ports = []
        for port in spec.ports:
            self._next_port += 1
            host = port.static or self._next_port
            ports.append(PortMapping(port.label, "127.0.0.1", host, port.to or host))
        net = AllocNetwork(alloc_id, spec.mode, "127.0.0.1", tuple(ports))
        self.allocs[alloc_id] = net
        return net

    async def teardown(self, alloc_id: str) -> bool:
        await asyncio.sleep(0)
        self.calls.append(("teardown", alloc_id))
        if self.gate is not None:
            await self.gate.wait()
        if alloc_id in self.fail_teardowns:
            raise PortError(f"teardown of {alloc_id} failed (injected)")
        half = alloc_id in self.half
        self.half.discard(alloc_id)
        return self.allocs.pop(alloc_id, None) is not None or half

    async def get(self, alloc_id: str) -> AllocNetwork | None:
        return self.allocs.get(alloc_id)

    async def list(self) -> tuple[AllocNetwork, ...]:
        return tuple(self.allocs.values())


class MemoryStore:
    """The store's job and allocation records, in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}
        self.allocations: dict[str, str] = {}
        self.writes = 0
        self.fail_writes = False
        self.fail_durable = False
        self.cancel_next = False  # the caller is cancelled after the write landed
        self.gate: asyncio.Event | None = None
        self.waiting = False

    def follow(self, registry: Registry) -> None:
        """Keep the records of `registry`'s snapshots, as the store's group commit does."""

        def changed(snap: Snapshot, keys: frozenset[str]) -> None:
            for ident in work_keys_jobs(keys):
                _put(self.jobs, ident, snap.jobs.get(ident), render_job_record)
            for ident in work_keys_allocs(keys):
                _put(self.allocations, ident, snap.allocations.get(ident), render_alloc_record)

        registry.subscribe(changed)

    def load_workload(self) -> tuple[dict[str, str], dict[str, str]]:
        return dict(self.jobs), dict(self.allocations)

    async def write_ahead(
        self, jobs: Mapping[str, Job | None], allocations: Mapping[str, Allocation | None]
    ) -> None:
        await asyncio.shield(self._write(jobs, allocations))
        if self.cancel_next:
            self.cancel_next = False
            raise asyncio.CancelledError

    async def _write(
        self, jobs: Mapping[str, Job | None], allocations: Mapping[str, Allocation | None]
    ) -> None:
        if self.gate is not None:
            self.waiting = True
            await self.gate.wait()
        if self.fail_writes:
            raise StateError("waypost.db: cannot write (injected)")
        self.writes += 1
        for ident, job in jobs.items():
            _put(self.jobs, ident, job, render_job_record)
        for ident, alloc in allocations.items():
            _put(self.allocations, ident, alloc, render_alloc_record)

    async def durable(self, index: int) -> None:
        if self.fail_durable:
            raise StateError(f"waypost.db: cannot commit up to index {index} (injected)")


def _put(table: dict[str, str], ident: str, value: Any, render: Callable[[Any], str]) -> None:
    if value is None:
        table.pop(ident, None)
    else:
        table[ident] = render(value)


def spec(
    job_id: str = "web",
    count: int = 3,
    tag: str = "v1",
    command: list[str] | None = None,
    restart: dict[str, Any] | None = None,
    tasks: int = 1,
) -> JobSpec:
    argv = command or SLEEP
    return parse_job(
        {
            "Job": {
                "ID": job_id,
                "TaskGroups": [
                    {
                        "Name": "g",
                        "Count": count,
                        "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
                        "RestartPolicy": restart or {"Attempts": 2, "Delay": "50ms"},
                        "Services": [{"Name": job_id, "PortLabel": "http", "Tags": [tag]}],
                        "Tasks": [
                            {
                                "Name": "main" if n == 0 else f"side{n}",
                                "Driver": "raw_exec",
                                "KillTimeout": "2s",
                                "Config": {"command": argv[0], "args": argv[1:]},
                            }
                            for n in range(tasks)
                        ],
                    }
                ],
            }
        }
    )


@dataclass
class World:
    """One test's network, store, registry and the runners made over them."""

    net: FakeNetwork
    store: MemoryStore
    registry: Registry
    root: Path
    ids: list[str]
    runners: list[JobRunner]

    def runner(self, registry: Registry | None = None) -> JobRunner:
        registry = registry or self.registry
        counter = itertools.count()

        def new_id() -> str:
            ident = f"{uuid.uuid4().hex[:8]}-t{next(counter)}"
            self.ids.append(ident)
            return ident

        jobs = JobRunner(
            registry,
            self.store,
            self._opener,
            NODE.name,
            alloc_root=self.root,
            new_id=new_id,
            is_root=False,
            use_cgroups=False,
        )
        self.runners.append(jobs)
        return jobs

    async def _opener(self) -> FakeNetwork:
        return self.net

    def restarted_registry(self) -> Registry:
        """The registry a restarted agent builds from the store (its persisted instances)."""
        old = self.registry.snapshot
        registry = Registry(NODE, index=old.index + 1)
        registry.apply(upserts=[i for i in old.instances.values() if i.source == SOURCE])
        self.store.follow(registry)
        return registry


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = MemoryStore()
    registry = Registry(NODE, index=1)
    store.follow(registry)
    w = World(FakeNetwork(), store, registry, tmp_path / "alloc", [], [])
    try:
        yield w
    finally:
        for jobs in w.runners:
            await jobs.close(stop_tasks=True)
        left = {ident: find_marked(ident) for ident in w.ids}
        left = {k: v for k, v in left.items() if v}
        for pids in left.values():
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        assert not left, f"task processes left behind: {left}"


async def until(condition: Callable[[], object], what: str, within: float = WAIT) -> None:
    """Wait (bounded, generously) until `condition()`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


def job_instances(registry: Registry) -> list[str]:
    return sorted(i.id for i in registry.snapshot.instances.values() if i.source == SOURCE)


def allocs(registry: Registry, job_id: str = "web") -> list[Allocation]:
    found = [a for a in registry.snapshot.allocations.values() if a.job_id == job_id]
    return sorted(found, key=lambda a: (a.job_version, a.index))


def pids(registry: Registry, job_id: str = "web") -> list[int]:
    out = []
    for alloc in allocs(registry, job_id):
        for _, state in alloc.tasks:
            if state.running and state.process is not None:
                out.append(state.process.pid)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def running(registry: Registry, job_id: str = "web", count: int = 3) -> list[int]:
    """Wait until `count` allocations of the job run; their task pids."""
    await until(
        lambda: sum(a.client_status == "running" for a in allocs(registry, job_id)) == count,
        f"{count} allocations of {job_id} running",
    )
    return pids(registry, job_id)


def task_health(registry: Registry, inst_id: str) -> Health:
    inst = registry.snapshot.instances[inst_id]
    (check,) = [c for c in inst.checks if c.kind is CheckKind.TASK]
    assert check.id == task_check_id(inst_id)
    return check.status


# -- running --------------------------------------------------------------------------


async def test_run_sets_up_every_allocation_registers_in_one_batch_then_starts_tasks(
    world: World,
) -> None:
    jobs = world.runner()
    published: list[Snapshot] = []
    world.registry.subscribe(lambda snap, _keys: published.append(snap))
    result = await jobs.run(spec())
    assert result.changed and result.job.version == 0
    assert len(world.net.allocs) == 3
    first = next(s for s in published if s.index == result.index)
    assert len(first.service("web")) == 3  # one batch: every instance at once
    assert all(i.health is Health.CRITICAL for i in first.service("web"))  # not running yet
    task_pids = await running(world.registry)
    assert len(set(task_pids)) == 3 and all(alive(p) for p in task_pids)
    snap = world.registry.snapshot
    assert all(i.health is Health.PASSING for i in snap.service("web"))
    ports = sorted(i.port for i in snap.service("web"))
    assert ports == sorted(n.port("http").host_port for n in world.net.allocs.values())
    assert set(snap.allocs) == set(world.net.allocs)
    for alloc in allocs(world.registry):
        env = alloc.task_env("main")
        assert env["NOMAD_ALLOC_ID"] == alloc.id and env["NOMAD_TASK_NAME"] == "main"
        assert env["NOMAD_PORT_http"] == str(alloc.network.port("http").host_port)  # type: ignore[union-attr]
        assert await asyncio.to_thread(os.path.isdir, env["NOMAD_TASK_DIR"])
        assert await asyncio.to_thread(os.path.isdir, os.path.join(env["NOMAD_ALLOC_DIR"], "logs"))


async def test_a_failing_setup_tears_down_the_others_and_starts_nothing(world: World) -> None:
    jobs = world.runner()
    world.net.fail_setups = {3}
    with pytest.raises(JobFailed) as caught:
        await jobs.run(spec())
    assert isinstance(caught.value.cause, PortError)
    assert world.net.allocs == {}
    assert [c[0] for c in world.net.calls] == ["setup", "setup", "setup", "teardown", "teardown"]
    snap = world.registry.snapshot
    assert job_instances(world.registry) == [] and not snap.allocs and not snap.jobs
    assert world.store.jobs == {} and world.store.allocations == {}
    assert all(find_marked(i) == [] for i in world.ids)


async def test_the_same_spec_again_is_a_no_op(world: World) -> None:
    jobs = world.runner()
    first = await jobs.run(spec())
    task_pids = await running(world.registry)
    calls, writes = len(world.net.calls), world.store.writes
    again = await jobs.run(spec())
    assert not again.changed and again.job == first.job
    assert (len(world.net.calls), world.store.writes) == (calls, writes)
    assert pids(world.registry) == task_pids


async def test_a_destructive_change_replaces_new_first_then_old_down(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(tag="v1"))
    old_pids = await running(world.registry)
    old_ids = {a.id for a in allocs(world.registry)}
    # Another command: destructive (the running processes were started with the old one).
    result = await jobs.run(spec(tag="v2", count=2, command=["sleep", "301"]))
    assert result.changed and result.job.version == 1
    assert result.plan is not None and len(result.plan.actions("destructive update")) == 2
    assert len(result.plan.actions("stop")) == 1  # index 2: past the new count
    new = [a for a in allocs(world.registry) if a.job_version == 1]
    assert sorted(a.index for a in new) == [0, 1]
    assert set(world.net.allocs) == {a.id for a in new}
    first_teardown = next(i for i, c in enumerate(world.net.calls) if c[0] == "teardown")
    assert all(c[0] == "setup" for c in world.net.calls[:first_teardown])  # up before down
    assert {c[1] for c in world.net.calls if c[0] == "teardown"} == old_ids
    assert [i.tags for i in world.registry.snapshot.service("web")] == [("v2",), ("v2",)]
    assert not any(alive(p) for p in old_pids)
    old = [a for a in allocs(world.registry) if a.id in old_ids]
    assert {(a.desired, a.client_status) for a in old} == {("stop", "complete")}
    assert all(a.task("main").events[-1].type == "Killed" for a in old)
    await running(world.registry, count=2)


async def test_a_service_change_is_applied_in_place(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(tag="v1"))
    task_pids = await running(world.registry)
    before = {a.id: a for a in allocs(world.registry)}
    ports = {i.id: i.port for i in world.registry.snapshot.service("web")}
    calls = len(world.net.calls)
    result = await jobs.run(spec(tag="v2"))
    assert result.changed and result.job.version == 1
    assert result.plan is not None and len(result.plan.actions("in-place update")) == 3
    assert len(world.net.calls) == calls  # no network set up or torn down
    after = {a.id: a for a in allocs(world.registry)}
    assert set(after) == set(before)  # the same allocations
    assert {a.job_version for a in after.values()} == {1}
    assert pids(world.registry) == task_pids and all(alive(p) for p in task_pids)
    served = world.registry.snapshot.service("web")
    assert {i.id: i.port for i in served} == ports
    assert [i.tags for i in served] == [("v2",)] * 3
    assert all(i.health.value == "passing" for i in served)  # the task checks kept


async def test_count_up_adds_and_count_down_stops_the_highest_indexes(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(count=2))
    first = await running(world.registry, count=2)
    ids = {a.index: a.id for a in allocs(world.registry)}
    up = await jobs.run(spec(count=4))
    assert up.plan is not None and [g.place for g in up.plan.groups] == [(2, 3)]
    await running(world.registry, count=4)
    live = {a.index: a.id for a in allocs(world.registry) if a.desired == "run"}
    assert sorted(live) == [0, 1, 2, 3] and {live[0], live[1]} == {ids[0], ids[1]}
    assert all(alive(p) for p in first)
    down = await jobs.run(spec(count=1))
    assert down.plan is not None
    assert sorted(c.index for c in down.plan.actions("stop")) == [1, 2, 3]
    live = {a.index: a.id for a in allocs(world.registry) if a.desired == "run"}
    assert live == {0: ids[0]}
    assert len(world.registry.snapshot.service("web")) == 1
    await running(world.registry, count=1)


async def test_a_failing_replacement_leaves_the_running_version(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(tag="v1"))
    old_pids = await running(world.registry)
    before = world.registry.snapshot.instances
    world.net.fail_setups = {5}  # the second setup of the new version
    with pytest.raises(JobFailed):
        await jobs.run(spec(tag="v2", command=["sleep", "301"]))
    assert world.registry.snapshot.jobs["web"].version == 0
    assert world.registry.snapshot.instances == before
    assert len(world.net.allocs) == 3 and pids(world.registry) == old_pids
    assert all(alive(p) for p in old_pids)


async def test_stop_deregisters_kills_tears_down_and_reports_errors(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec())
    task_pids = await running(world.registry)
    broken = allocs(world.registry)[0].id
    world.net.fail_teardowns = {broken}
    errors = await jobs.stop("web")
    assert len(errors) == 1 and broken in errors[0]
    assert job_instances(world.registry) == [] and world.registry.snapshot.allocs == {}
    assert not any(alive(p) for p in task_pids)
    assert set(world.net.allocs) == {broken}  # the others are gone: teardown went past the error
    job = world.registry.snapshot.jobs["web"]
    assert job.stop  # Nomad: stopped, listed as dead until purged
    assert {a.client_status for a in allocs(world.registry)} == {"complete"}
    assert (world.root / broken / "alloc" / "logs").is_dir()  # logs stay until purged
    assert await jobs.stop("web", purge=True) == []
    assert not world.registry.snapshot.jobs and not world.registry.snapshot.allocations
    assert world.store.jobs == {} and world.store.allocations == {}
    await until(lambda: not (world.root / broken).exists(), "the purged directories removed")
    with pytest.raises(NotFoundError):
        await jobs.stop("web")


# -- tasks ------------------------------------------------------------------------------


async def test_a_task_that_exits_leaves_dns_in_that_change_and_comes_back(
    world: World,
) -> None:
    jobs = world.runner()
    await jobs.run(spec(count=1))
    (pid,) = await running(world.registry, count=1)
    (inst_id,) = job_instances(world.registry)
    changes: list[tuple[str, Health]] = []

    def seen(snap: Snapshot, _keys: frozenset[str]) -> None:
        alloc = next(iter(snap.allocations.values()))
        changes.append((alloc.task("main").state, snap.instances[inst_id].health))

    world.registry.subscribe(seen)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: pids(world.registry) not in ([], [pid]), "the task restarted")
    # The change that records the exit is the one that takes the instance out.
    assert changes[0] == ("pending", Health.CRITICAL)
    assert ("running", Health.PASSING) in changes
    state = allocs(world.registry)[0].task("main")
    assert state.restarts == 1
    types = [e.type for e in state.events]
    assert types[-3:] == ["Terminated", "Restarting", "Started"]
    terminated = state.events[-3]
    assert (terminated.exit_code, terminated.signal) == (128 + 9, 9)
    assert task_health(world.registry, inst_id) is Health.PASSING


async def test_a_task_beyond_its_restart_policy_fails_its_allocation(world: World) -> None:
    jobs = world.runner()
    failing = spec(count=1, command=["sh", "-c", "echo boom >&2; exit 3"], tasks=2)
    group = failing.groups[0]
    sleeper = replace(group.tasks[1], command="sleep", args=("300",))
    failing = replace(failing, groups=(replace(group, tasks=(group.tasks[0], sleeper)),))
    await jobs.run(failing)
    await until(lambda: allocs(world.registry)[0].client_status == "failed", "the alloc failed")
    alloc = allocs(world.registry)[0]
    main = alloc.task("main")
    assert main.failed and main.restarts == 2 and main.state == "dead"
    assert main.events[-1].type == "Not Restarting"
    assert 'Exceeded allowed attempts 2 in interval 30m0s and mode is "fail"' in (
        main.events[-1].message
    )
    await until(lambda: not world.net.allocs, "the failed allocation's network torn down")
    await until(lambda: alloc.id not in world.registry.snapshot.allocs, "out of alloc DNS")
    assert job_instances(world.registry) == []  # its services left
    await until(lambda: allocs(world.registry)[0].task("side1").state == "dead", "sibling killed")
    assert not find_marked(alloc.id)
    log = (world.root / alloc.id / "alloc" / "logs" / "main.stderr.0").read_text()
    assert log == "boom\n" * 3


async def test_a_command_that_cannot_start_is_a_driver_failure(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(count=1, command=["/nonexistent/waypost-test-binary"]))
    await until(lambda: allocs(world.registry)[0].client_status == "failed", "the alloc failed")
    events = allocs(world.registry)[0].task("main").events
    failures = [e for e in events if e.type == "Driver Failure"]
    assert len(failures) == 3 and "/nonexistent/waypost-test-binary" in failures[0].message


# -- restarts of the agent ----------------------------------------------------------------


async def test_a_restarted_agent_adopts_running_tasks_and_keeps_check_states(
    world: World,
) -> None:
    jobs = world.runner()
    await jobs.run(spec())
    task_pids = await running(world.registry)
    await jobs.close()  # outside --dev: the tasks run on
    assert all(alive(p) for p in task_pids)
    lost = allocs(world.registry)[1].id
    del world.net.allocs[lost]  # gone meanwhile (`waypost net down`): set up again
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    assert sorted(pids(registry)) == sorted(task_pids)  # adopted, none started twice
    assert lost in world.net.allocs
    assert all(i.health is Health.PASSING for i in registry.snapshot.service("web"))
    assert all(a.task("main").events[-1].type == "Started" for a in allocs(registry))
    for pid in task_pids:  # an adopted task's exit is seen too
        os.kill(pid, signal.SIGTERM)
    await until(
        lambda: len(pids(registry)) == 3 and not set(pids(registry)) & set(task_pids),
        "the adopted tasks restarted",
    )


async def test_a_task_that_died_while_the_agent_was_away_follows_its_policy(
    world: World,
) -> None:
    jobs = world.runner()
    await jobs.run(spec(count=1))
    (pid,) = await running(world.registry, count=1)
    await jobs.close()
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not alive(pid), "the task gone")
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    await until(lambda: pids(registry) not in ([], [pid]), "restarted by its policy")
    state = allocs(registry)[0].task("main")
    assert state.restarts == 1
    assert "exit status unknown" in next(e for e in state.events if e.type == "Terminated").message


async def test_a_task_started_but_not_recorded_is_found_by_its_marker(world: World) -> None:
    """A crash between a start and its record: the next agent adopts it, never a second."""
    jobs = world.runner()
    await jobs.run(spec(count=1))
    (pid,) = await running(world.registry, count=1)
    await jobs.close()
    alloc = allocs(world.registry)[0]
    unrecorded = replace(
        alloc, tasks=(("main", replace(alloc.task("main"), state="pending", process=None)),)
    )
    world.store.allocations[alloc.id] = render_alloc_record(unrecorded)
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    assert pids(registry) == [pid] and find_marked(alloc.id) == [pid]


async def test_dev_shutdown_stops_every_task_and_the_next_start_runs_them(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec())
    task_pids = await running(world.registry)
    await jobs.close(stop_tasks=True)
    assert not any(alive(p) for p in task_pids)
    assert world.net.allocs == {} and job_instances(world.registry) == []
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    fresh = await running(registry)
    assert not set(fresh) & set(task_pids) and len(world.net.allocs) == 3


async def test_start_sweeps_what_no_job_owns(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec(count=1))
    await running(world.registry, count=1)
    await jobs.close()
    orphan = "00000000-0000-4000-8000-000000000000"
    await world.net.setup(orphan, NetworkSpec())  # a crash in the middle of a run's setups
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    assert orphan not in world.net.allocs and len(world.net.allocs) == 1


async def test_start_redoes_a_setup_a_crash_left_half_done(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec())
    await running(world.registry)
    await jobs.close()
    broken = allocs(world.registry)[1].id
    del world.net.allocs[broken]
    world.net.half.add(broken)  # reserved, never completed: netsetup's get() says None
    again = world.runner(world.restarted_registry())
    await again.start()
    assert broken in world.net.allocs and broken not in world.net.half


async def test_an_unreadable_job_record_makes_its_job_dead_and_the_rest_start(
    world: World,
) -> None:
    jobs = world.runner()
    await jobs.run(spec("good", count=1))
    await jobs.run(spec("bad", count=1))
    await running(world.registry, "good", 1)
    bad_pid = (await running(world.registry, "bad", 1))[0]
    await jobs.close()
    world.store.jobs["bad"] = '{"Job": {"ID": "bad", "TaskGroups": "not a list"}}'
    registry = world.restarted_registry()
    again = world.runner(registry)
    await again.start()
    assert set(registry.snapshot.jobs) == {"good"} and "cannot be read" in again.dead["bad"]
    assert [i.service for i in registry.snapshot.service("good")] == ["good"]
    assert registry.snapshot.service("bad") == ()
    await until(lambda: not alive(bad_pid), "the dead job's task killed (nothing owns it)")
    assert len(world.net.allocs) == 1
    assert await again.stop("bad") == []
    assert "bad" not in world.store.jobs and again.dead == {}
    with pytest.raises(NotFoundError):
        await again.stop("bad")


async def test_a_run_replaces_a_dead_job(world: World) -> None:
    jobs = world.runner()
    world.store.jobs["web"] = "not json"
    await jobs.start()
    assert set(jobs.dead) == {"web"}
    result = await jobs.run(spec(count=1))
    assert result.changed and jobs.dead == {}
    await running(world.registry, count=1)


# -- the store ----------------------------------------------------------------------------


async def test_a_record_write_that_fails_is_nothing_applied(world: World) -> None:
    jobs = world.runner()
    world.store.fail_writes = True
    with pytest.raises(StateError):
        await jobs.run(spec())
    assert world.net.allocs == {} and not world.registry.snapshot.jobs
    assert all(find_marked(i) == [] for i in world.ids)
    world.store.fail_writes = False
    await jobs.run(spec())
    task_pids = await running(world.registry)
    world.store.fail_writes = True
    with pytest.raises(StateError):
        await jobs.stop("web")
    assert not world.registry.snapshot.jobs["web"].stop and all(alive(p) for p in task_pids)
    assert len(job_instances(world.registry)) == 3


async def test_a_registry_batch_not_durable_after_the_records_is_a_warning(
    world: World,
) -> None:
    jobs = world.runner()
    world.store.fail_durable = True
    result = await jobs.run(spec())
    assert result.changed and len(result.warnings) == 1 and "not on disk" in result.warnings[0]
    await running(world.registry)
    problems = await jobs.stop("web")
    assert len(problems) == 1 and "not on disk" in problems[0]
    assert world.net.allocs == {} and job_instances(world.registry) == []


async def test_a_run_cancelled_at_its_records_leaves_nothing(world: World) -> None:
    jobs = world.runner()
    world.store.fail_writes = True
    world.store.gate = asyncio.Event()
    running_job = asyncio.create_task(jobs.run(spec()))
    await until(lambda: world.store.waiting, "the write started")
    running_job.cancel()
    world.store.gate.set()
    with pytest.raises((asyncio.CancelledError, StateError)):
        await running_job
    assert world.net.allocs == {} and job_instances(world.registry) == []


async def test_a_cancelled_stop_still_tears_down_every_allocation(world: World) -> None:
    jobs = world.runner()
    await jobs.run(spec())
    task_pids = await running(world.registry)
    world.net.gate = asyncio.Event()
    stopping = asyncio.create_task(jobs.stop("web"))
    await until(lambda: any(c[0] == "teardown" for c in world.net.calls), "a teardown started")
    stopping.cancel()
    world.net.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert world.net.allocs == {} and world.registry.snapshot.jobs["web"].stop
    assert not any(alive(p) for p in task_pids)


async def test_runs_are_serialized(world: World) -> None:
    jobs = world.runner()
    await asyncio.gather(jobs.run(spec("a", count=2)), jobs.run(spec("b", count=2)))
    owner = {a.id: a.job_id for a in world.registry.snapshot.allocations.values()}
    order = [owner[c[1]] for c in world.net.calls if c[0] == "setup"]
    assert order in (["a", "a", "b", "b"], ["b", "b", "a", "a"])
    assert len(job_instances(world.registry)) == 4
    await running(world.registry, "a", 2)
    await running(world.registry, "b", 2)


async def test_close_waits_for_the_run_in_progress_and_refuses_later_ones(
    world: World,
) -> None:
    jobs = world.runner()
    world.net.gate = asyncio.Event()
    running_job = asyncio.create_task(jobs.run(spec()))
    await until(lambda: world.net.calls, "a setup started")
    closing = asyncio.create_task(jobs.close(stop_tasks=True))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not closing.done()
    world.net.gate.set()
    result = await running_job
    await closing
    assert result.changed
    with pytest.raises(StateError):
        await jobs.run(spec("other"))
    with pytest.raises(StateError):
        await jobs.stop("web")


def test_keep_check_state_only_touches_checks_of_the_same_id() -> None:
    from discovery.model import make_check, make_instance

    check = make_check(id="c1", name="c", kind=CheckKind.TTL, ttl=5)
    fresh = make_instance(service="s", id="i", node="n", address="127.0.0.1", checks=[check])
    old = replace(fresh, checks=(replace(check, status=Health.WARNING, output="slow"),))
    kept = keep_check_state(fresh, old)
    assert (kept.health, kept.checks[0].output) == (Health.WARNING, "slow")
    other = replace(fresh, checks=(replace(check, id="c2", status=Health.PASSING),))
    assert keep_check_state(fresh, other) == fresh
    assert keep_check_state(fresh, None) == fresh
