"""discovery.allocations.JobRunner: all-or-nothing runs, replacement, stop, restart.

FAKES: `FakeNetwork` stands in for netsetup's NetworkManager (its kernel side
cannot run in a unit test, and failures must be injected at a chosen setup);
`MemoryJobs` for the store's job table (the real one is tested through the
agent in tests/integration/test_jobs_agent.py).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from discovery.allocations import JobFailed, JobRunner, keep_check_state, parse_doc
from discovery.errors import NotFoundError, StateError
from discovery.jobs import SOURCE, JobSpec, parse_job
from discovery.model import Health, Node
from discovery.registry import Registry
from netsetup.errors import AllocExists, PortError
from netsetup.spec import AllocNetwork, NetworkSpec, PortMapping

NODE = Node("agent", "127.0.0.1")


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


class MemoryJobs:
    """The store's job table and durability, in memory."""

    def __init__(self) -> None:
        self.docs: dict[str, str] = {}
        self.writes = 0

    def load_jobs(self) -> dict[str, str]:
        return dict(self.docs)

    async def put_job(self, ident: str, data: str | None) -> None:
        self.writes += 1
        if data is None:
            self.docs.pop(ident, None)
        else:
            self.docs[ident] = data

    async def durable(self, index: int) -> None:
        return None


def spec(
    job_id: str = "web", count: int = 3, tag: str = "v1", static: int | None = None
) -> JobSpec:
    ports: dict[str, Any] = {"DynamicPorts": [{"Label": "http"}]}
    if static is not None:
        ports = {"ReservedPorts": [{"Label": "http", "Value": static}]}
    return parse_job(
        {
            "Job": {
                "ID": job_id,
                "TaskGroups": [
                    {
                        "Name": "g",
                        "Count": count,
                        "Networks": [ports],
                        "Services": [
                            {
                                "Name": job_id,
                                "PortLabel": "http",
                                "Tags": [tag],
                                "Checks": [{"Type": "ttl", "TTL": "10s"}],
                            }
                        ],
                    }
                ],
            }
        }
    )


def runner(
    net: FakeNetwork | None = None,
    store: MemoryJobs | None = None,
    registry: Registry | None = None,
) -> tuple[JobRunner, FakeNetwork, MemoryJobs, Registry]:
    net = net or FakeNetwork()
    store = store or MemoryJobs()
    registry = registry or Registry(NODE, index=1)

    async def opener() -> FakeNetwork:
        return net

    return JobRunner(registry, store, opener, NODE.name), net, store, registry


def job_instances(registry: Registry) -> list[str]:
    return sorted(i.id for i in registry.snapshot.instances.values() if i.source == SOURCE)


async def test_run_sets_up_every_allocation_and_registers_in_one_batch() -> None:
    jobs, net, store, registry = runner()
    published: list[int] = []
    registry.subscribe(lambda snap, _keys: published.append(snap.index))
    job, changed = await jobs.run(spec())
    assert changed
    assert len(job.allocs) == 3 and len(net.allocs) == 3
    assert len(published) == 1  # one batch: every instance at once
    snap = registry.snapshot
    ports = sorted(i.port for i in snap.service("web"))
    assert ports == sorted(a.network.port("http").host_port for a in job.allocs)
    assert set(snap.allocs) == {a.plan.id for a in job.allocs}
    assert json.loads(store.docs["web"])["Retiring"] == []


async def test_a_failing_setup_tears_down_the_others_and_registers_nothing() -> None:
    jobs, net, store, registry = runner()
    net.fail_setups = {3}
    with pytest.raises(JobFailed) as caught:
        await jobs.run(spec())
    assert isinstance(caught.value.cause, PortError)
    assert net.allocs == {}
    assert [c[0] for c in net.calls] == ["setup", "setup", "setup", "teardown", "teardown"]
    assert job_instances(registry) == [] and registry.snapshot.allocs == {}
    assert store.docs == {} and "web" not in jobs.jobs


async def test_the_same_spec_again_is_a_no_op() -> None:
    jobs, net, store, _ = runner()
    first, _ = await jobs.run(spec())
    calls, writes = len(net.calls), store.writes
    again, changed = await jobs.run(spec())
    assert not changed and again == first
    assert (len(net.calls), store.writes) == (calls, writes)


async def test_a_changed_spec_replaces_new_first_then_old_down() -> None:
    jobs, net, store, registry = runner()
    old, _ = await jobs.run(spec(tag="v1"))
    new, changed = await jobs.run(spec(tag="v2", count=2))
    assert changed
    old_ids = {a.plan.id for a in old.allocs}
    assert set(net.allocs) == {a.plan.id for a in new.allocs}
    first_teardown = next(i for i, c in enumerate(net.calls) if c[0] == "teardown")
    assert all(c[0] == "setup" for c in net.calls[:first_teardown])  # up before down
    assert {c[1] for c in net.calls if c[0] == "teardown"} == old_ids
    assert [i.tags for i in registry.snapshot.service("web")] == [("v2",), ("v2",)]
    assert not old_ids & set(registry.snapshot.allocs)
    assert json.loads(store.docs["web"])["Retiring"] == []


async def test_a_failing_replacement_leaves_the_running_version() -> None:
    jobs, net, _, registry = runner()
    old, _ = await jobs.run(spec(tag="v1"))
    before = registry.snapshot.instances
    net.fail_setups = {5}  # the second setup of the new version
    with pytest.raises(JobFailed):
        await jobs.run(spec(tag="v2"))
    assert jobs.jobs["web"] == old
    assert registry.snapshot.instances == before
    assert set(net.allocs) == {a.plan.id for a in old.allocs}


async def test_stop_deregisters_then_tears_down_and_reports_errors() -> None:
    jobs, net, store, registry = runner()
    job, _ = await jobs.run(spec())
    broken = job.allocs[0].plan.id
    net.fail_teardowns = {broken}
    errors = await jobs.stop("web")
    assert len(errors) == 1 and broken in errors[0]
    assert job_instances(registry) == [] and registry.snapshot.allocs == {}
    assert store.docs == {} and jobs.jobs == {}
    assert set(net.allocs) == {broken}  # the others are gone: teardown went past the error
    with pytest.raises(NotFoundError):
        await jobs.stop("web")


async def test_a_restart_brings_jobs_back_with_their_check_states() -> None:
    jobs, net, store, registry = runner()
    job, _ = await jobs.run(spec())
    check_id = job.allocs[0].instances[0].checks[0].id
    registry.update_check(check_id, Health.PASSING, output="ok")
    lost = job.allocs[1].plan.id
    del net.allocs[lost]  # gone meanwhile (`waypost net down`): set up again
    # A new runner over the restored registry (the store's instances) and the same store.
    restored = Registry(NODE, index=registry.snapshot.index + 1)
    restored.apply(
        upserts=registry.snapshot.instances.values(), allocs=registry.snapshot.allocs.values()
    )
    again, _, _, _ = runner(net, store, restored)
    await again.start()
    back = again.jobs["web"]
    assert back.spec == job.spec
    assert [a.plan for a in back.allocs] == [a.plan for a in job.allocs]
    assert lost in net.allocs
    inst = restored.snapshot.instances[job.allocs[0].instances[0].id]
    assert (inst.health, inst.checks[0].output) == (Health.PASSING, "ok")
    assert len(job_instances(restored)) == 3


async def test_start_drops_stale_job_instances_and_finishes_retiring() -> None:
    jobs, net, store, registry = runner()
    job, _ = await jobs.run(spec())
    # A crash right after a replacement committed: an old allocation still retiring.
    old_alloc = "00000000-0000-4000-8000-000000000000"
    await net.setup(old_alloc, NetworkSpec())
    doc = json.loads(store.docs["web"])
    doc["Retiring"] = [old_alloc]
    store.docs["web"] = json.dumps(doc)
    stale = replace(job.allocs[0].instances[0], id="_nomad-task-gone", alloc_id="gone")
    registry.upsert(stale)
    again, _, _, _ = runner(net, store, registry)
    await again.start()
    assert old_alloc not in net.allocs
    assert json.loads(store.docs["web"])["Retiring"] == []
    assert "_nomad-task-gone" not in registry.snapshot.instances


async def test_runs_are_serialized() -> None:
    jobs, net, _, registry = runner()
    await asyncio.gather(jobs.run(spec("a", count=2)), jobs.run(spec("b", count=2)))
    owners = [jobs.alloc(c[1]) for c in net.calls]
    order = [found[0].spec.id for found in owners if found is not None]
    assert order in (["a", "a", "b", "b"], ["b", "b", "a", "a"])
    assert len(job_instances(registry)) == 4


async def test_documents_round_trip() -> None:
    jobs, _, store, _ = runner()
    job, _ = await jobs.run(spec())
    parsed, plans, retiring = parse_doc(store.docs["web"])
    assert parsed == job.spec and plans == tuple(a.plan for a in job.allocs) and retiring == ()


def test_keep_check_state_only_touches_checks_of_the_same_id() -> None:
    from discovery.model import CheckKind, make_check, make_instance

    check = make_check(id="c1", name="c", kind=CheckKind.TTL, ttl=5)
    fresh = make_instance(service="s", id="i", node="n", address="127.0.0.1", checks=[check])
    old = replace(fresh, checks=(replace(check, status=Health.WARNING, output="slow"),))
    kept = keep_check_state(fresh, old)
    assert (kept.health, kept.checks[0].output) == (Health.WARNING, "slow")
    other = replace(fresh, checks=(replace(check, id="c2", status=Health.PASSING),))
    assert keep_check_state(fresh, other) == fresh
    assert keep_check_state(fresh, None) == fresh


class CancelledWrite(MemoryJobs):
    """The store when its caller is cancelled mid-write: the write lands all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel_next = False

    async def put_job(self, ident: str, data: str | None) -> None:
        await super().put_job(ident, data)
        if self.cancel_next:
            self.cancel_next = False
            raise asyncio.CancelledError


async def until(condition: Any, what: str) -> None:
    """Yield to the loop until `condition()` (bounded)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def test_a_run_cancelled_at_its_document_leaves_neither_document_nor_allocations() -> None:
    store = CancelledWrite()
    jobs, net, _, registry = runner(store=store)
    store.cancel_next = True
    with pytest.raises(asyncio.CancelledError):
        await jobs.run(spec())
    assert store.docs == {} and net.allocs == {} and job_instances(registry) == []


async def test_a_replacement_cancelled_at_its_document_puts_the_old_one_back() -> None:
    store = CancelledWrite()
    jobs, net, _, _ = runner(store=store)
    old, _ = await jobs.run(spec(tag="v1"))
    store.cancel_next = True
    with pytest.raises(asyncio.CancelledError):
        await jobs.run(spec(tag="v2"))
    parsed, plans, retiring = parse_doc(store.docs["web"])
    assert parsed == old.spec and plans == tuple(a.plan for a in old.allocs) and retiring == ()
    assert set(net.allocs) == {a.plan.id for a in old.allocs} and jobs.jobs["web"] == old


async def test_a_cancelled_stop_still_tears_down_every_allocation() -> None:
    jobs, net, store, _ = runner()
    await jobs.run(spec())
    net.gate = asyncio.Event()
    stopping = asyncio.create_task(jobs.stop("web"))
    await until(lambda: any(c[0] == "teardown" for c in net.calls), "a teardown started")
    stopping.cancel()
    net.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert net.allocs == {} and store.docs == {} and jobs.jobs == {}


async def test_stop_goes_past_errors_netsetup_did_not_name() -> None:
    jobs, net, _, _ = runner()
    job, _ = await jobs.run(spec())
    first = job.allocs[0].plan.id

    async def broken(alloc_id: str) -> bool:
        if alloc_id == first:
            raise RuntimeError("the netsetup loop is gone")
        return net.allocs.pop(alloc_id, None) is not None

    net.teardown = broken  # type: ignore[method-assign]
    errors = await jobs.stop("web")
    assert len(errors) == 1 and first in errors[0]
    assert set(net.allocs) == {first}


async def test_close_waits_for_the_run_in_progress_and_refuses_later_ones() -> None:
    jobs, net, _, registry = runner()
    net.gate = asyncio.Event()
    running = asyncio.create_task(jobs.run(spec()))
    await until(lambda: net.calls, "a setup started")
    closing = asyncio.create_task(jobs.close())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not closing.done()
    net.gate.set()
    job, _ = await running
    await closing
    assert len(job.allocs) == len(job_instances(registry)) == 3
    with pytest.raises(StateError):
        await jobs.run(spec("other"))
    with pytest.raises(StateError):
        await jobs.stop("web")


async def test_start_redoes_a_setup_a_crash_left_half_done() -> None:
    jobs, net, store, registry = runner()
    job, _ = await jobs.run(spec())
    broken = job.allocs[1].plan.id
    del net.allocs[broken]
    net.half.add(broken)  # reserved, never completed: netsetup's get() says None
    again, _, _, _ = runner(net, store, registry)
    await again.start()
    assert [a.plan.id for a in again.jobs["web"].allocs] == [a.plan.id for a in job.allocs]
    assert broken in net.allocs and broken not in net.half


class FailingDisk(MemoryJobs):
    """The store when its registry batches fail (durable raises) and, on request, writes."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_durable = False
        self.fail_writes = False

    async def put_job(self, ident: str, data: str | None) -> None:
        if self.fail_writes:
            raise StateError("jobs.db: cannot write job (injected)")
        await super().put_job(ident, data)

    async def durable(self, index: int) -> None:
        if self.fail_durable:
            raise StateError(f"jobs.db: cannot commit up to index {index} (injected)")


async def test_a_registry_batch_not_written_after_the_document_is_a_warning() -> None:
    store = FailingDisk()
    jobs, net, _, registry = runner(store=store)
    store.fail_durable = True
    job, changed = await jobs.run(spec())
    assert changed and len(job.warnings) == 1 and "index" in job.warnings[0]
    assert jobs.jobs["web"] == job and len(job_instances(registry)) == 3
    assert parse_doc(store.docs["web"])[1] == tuple(a.plan for a in job.allocs)
    problems = await jobs.stop("web")
    assert len(problems) == 1 and "not on disk" in problems[0]
    assert net.allocs == {} and store.docs == {} and job_instances(registry) == []


async def test_a_replacement_whose_last_rewrite_fails_keeps_the_retiring_ids() -> None:
    store = FailingDisk()
    jobs, net, _, _ = runner(store=store)
    old, _ = await jobs.run(spec(tag="v1"))

    async def fail_after_teardown(alloc_id: str) -> bool:
        store.fail_writes = True  # the document is written; its rewrite after retiring fails
        return net.allocs.pop(alloc_id, None) is not None

    net.teardown = fail_after_teardown  # type: ignore[method-assign]
    new, _ = await jobs.run(spec(tag="v2"))
    assert len(new.warnings) == 1 and "document" in new.warnings[0]
    assert set(net.allocs) == {a.plan.id for a in new.allocs}
    retiring = parse_doc(store.docs["web"])[2]
    assert set(retiring) == {a.plan.id for a in old.allocs}  # the next start retries them


async def test_a_document_delete_that_fails_stops_nothing() -> None:
    store = FailingDisk()
    jobs, net, _, registry = runner(store=store)
    job, _ = await jobs.run(spec())
    store.fail_writes = True
    with pytest.raises(StateError):
        await jobs.stop("web")
    assert jobs.jobs["web"] == job and len(net.allocs) == len(job_instances(registry)) == 3


class SlowWrite(MemoryJobs):
    """The store's executor: a write, once begun, lands even when its caller is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.waiting = False

    async def put_job(self, ident: str, data: str | None) -> None:
        await asyncio.shield(self._write(ident, data))

    async def _write(self, ident: str, data: str | None) -> None:
        if self.gate is not None:
            self.waiting = True
            await self.gate.wait()
        await super().put_job(ident, data)


async def test_a_stop_cancelled_during_its_document_delete_still_stops() -> None:
    store = SlowWrite()
    jobs, net, _, registry = runner(store=store)
    await jobs.run(spec())
    store.gate = asyncio.Event()
    stopping = asyncio.create_task(jobs.stop("web"))
    await until(lambda: store.waiting, "the delete started")
    stopping.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert store.docs == {} and jobs.jobs == {}
    assert net.allocs == {} and job_instances(registry) == [] and registry.snapshot.allocs == {}


async def test_an_unreadable_document_makes_its_job_dead_and_the_rest_start() -> None:
    jobs, net, store, registry = runner()
    await jobs.run(spec("good"))
    bad, _ = await jobs.run(spec("bad", count=1))
    held = bad.allocs[0].plan.id
    store.docs["bad"] = '{"Job": {"ID": "bad", "TaskGroups": "not a list"}}'
    again, _, _, _ = runner(net, store, registry)
    await again.start()
    assert set(again.jobs) == {"good"} and "cannot be read" in again.dead["bad"]
    assert [i.service for i in registry.snapshot.instances.values()] == ["good"] * 3
    assert held in net.allocs  # left to netsetup's state: nothing knows what it was
    problems = await again.stop("bad")
    assert len(problems) == 1 and "waypost net list" in problems[0]
    assert "bad" not in store.docs and again.dead == {}
    with pytest.raises(NotFoundError):
        await again.stop("bad")


async def test_a_run_replaces_a_dead_job() -> None:
    jobs, _, store, _ = runner()
    store.docs["web"] = "not json"
    await jobs.start()
    assert set(jobs.dead) == {"web"}
    job, changed = await jobs.run(spec())
    assert changed and jobs.dead == {} and parse_doc(store.docs["web"])[0] == job.spec
