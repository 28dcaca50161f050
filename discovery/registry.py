"""The registry of service instances.  State: the single owner that mutates it.

Writers call :class:`Registry` methods from the event loop; each call that
changes something publishes a new immutable :class:`Snapshot` with a higher
index.  Readers (DNS, HTTP) take ``registry.snapshot`` and never lock: a
snapshot and everything reachable from it never changes.

Subscribers are called synchronously after each publish with the new
snapshot and the set of keys that changed: the lower-case names of the
services whose instances changed, and the watch keys of the jobs and
allocations that changed (discovery.workload: they start with NUL), so caches
and blocking queries can wake only what is affected.  `service_index` holds
the index of the last change of each of those keys.

Jobs and allocations (:mod:`discovery.workload`) are written by their one
owner (discovery.allocations) through :meth:`Registry.apply` and published in
the same snapshots, so one index orders every change, as Nomad's Raft index
does.  `allocs` (the addresses `<alloc-id>.alloc.<domain>` answers) follows
the allocations: an allocation with a network that is not terminal has one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeVar

import immutables

from discovery.errors import NotFoundError
from discovery.jobs import alloc_addresses
from discovery.model import Health, Instance, Node, worst_health
from discovery.workload import ALLOCS_KEY, JOBS_KEY, Allocation, Job, alloc_key, job_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Alloc:
    """An allocation's addresses, for `<alloc-id-prefix>.alloc.<domain>`."""

    id: str
    addresses: tuple[str, ...]
    name: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the registry at one index."""

    index: int
    instances: Mapping[str, Instance]  # by instance id
    services: Mapping[str, tuple[Instance, ...]]  # by lower-case service name, ordered by id
    nodes: Mapping[str, Node]  # by lower-case node name
    allocs: Mapping[str, Alloc] = field(default_factory=lambda: MappingProxyType({}))
    service_index: Mapping[str, int] = field(default_factory=immutables.Map)
    local_node: str = ""
    # Ids of the instances added, changed or removed by the change that made this snapshot,
    # so subscribers can follow a change in O(its size) rather than O(the services it touched).
    changed_ids: frozenset[str] = frozenset()
    jobs: Mapping[str, Job] = field(default_factory=immutables.Map)  # by job id
    allocations: Mapping[str, Allocation] = field(default_factory=immutables.Map)  # by alloc id

    def service(self, name: str) -> tuple[Instance, ...]:
        """Instances of service `name` (case-insensitive), any health."""
        return self.services.get(name.lower(), ())


Subscriber = Callable[[Snapshot, frozenset[str]], None]
K = TypeVar("K")
V = TypeVar("V")


def _as_map(mapping: Mapping[K, V]) -> immutables.Map[K, V]:
    """The persistent map behind a snapshot field (every snapshot the registry makes has one)."""
    if isinstance(mapping, immutables.Map):
        return mapping
    return immutables.Map(mapping)


class Registry:
    """Owns the instances, nodes and allocations; publishes snapshots."""

    def __init__(self, local_node: Node, *, index: int = 0) -> None:
        self._local = local_node
        self._subscribers: list[Subscriber] = []
        self._check_owner: dict[str, str] = {}  # check id -> instance id
        nodes = {local_node.name.lower(): local_node}
        self._snapshot = Snapshot(
            index=index,
            instances=immutables.Map(),
            services=immutables.Map(),
            nodes=MappingProxyType(nodes),
            local_node=local_node.name,
        )

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot.  Never changes once returned."""
        return self._snapshot

    @property
    def local_node(self) -> Node:
        return self._local

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(snapshot, changed_keys)` after each change; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    # -- changes ---------------------------------------------------------------

    def upsert(self, *instances: Instance) -> Snapshot:
        """Add or replace instances by id."""
        return self.apply(upserts=instances)

    def remove(self, *ids: str) -> Snapshot:
        """Remove instances by id; unknown ids raise NotFoundError and nothing changes."""
        missing = [i for i in ids if i not in self._snapshot.instances]
        if missing:
            raise NotFoundError(f"unknown service instance {missing[0]!r}")
        return self.apply(removals=ids)

    def set_health(self, instance_id: str, health: Health) -> Snapshot:
        """Change one instance's health."""
        current = self._snapshot.instances.get(instance_id)
        if current is None:
            raise NotFoundError(f"unknown service instance {instance_id!r}")
        if current.health is health:
            return self._snapshot
        return self.apply(upserts=[replace(current, health=health)])

    def replace_source(
        self, source: str, instances: Iterable[Instance], nodes: Iterable[Node] = ()
    ) -> Snapshot:
        """Make `instances` the whole set owned by `source` (config reload, Consul pull)."""
        wanted = {i.id: i for i in instances}
        stale = [
            i.id
            for i in self._snapshot.instances.values()
            if i.source == source and i.id not in wanted
        ]
        return self.apply(upserts=wanted.values(), removals=stale, nodes=nodes)

    def check_owner(self, check_id: str) -> Instance | None:
        """The instance that has check `check_id`, if any."""
        owner = self._check_owner.get(check_id)
        return None if owner is None else self._snapshot.instances.get(owner)

    def update_check(self, check_id: str, status: Health, *, output: str | None = None) -> Snapshot:
        """Set a check's status (and output); the instance's health follows (worst check).

        Nothing is published when status and output are unchanged (a TTL check
        refreshed with the same result does not wake anyone).
        """
        if check_id not in self._check_owner:
            raise NotFoundError(f"unknown check {check_id!r}")
        return self.update_checks({check_id: (status, output)})

    def update_checks(
        self,
        results: Mapping[str, tuple[Health, str | None]],
        *,
        allocations: Iterable[Allocation] = (),
    ) -> Snapshot:
        """Set several checks' (status, output or None to keep it) in one change.

        Unknown check ids are skipped (their instance went away meanwhile).
        `allocations` go in the same change (a task's state with its task checks).
        """
        by_instance: dict[str, dict[str, tuple[Health, str | None]]] = {}
        for check_id, result in results.items():
            owner = self._check_owner.get(check_id)
            if owner is not None:
                by_instance.setdefault(owner, {})[check_id] = result
        upserts: list[Instance] = []
        for ident, outcomes in by_instance.items():
            inst = self._snapshot.instances[ident]
            checks = tuple(
                c
                if (r := outcomes.get(c.id)) is None
                else replace(c, status=r[0], output=c.output if r[1] is None else r[1])
                for c in inst.checks
            )
            if checks != inst.checks:
                upserts.append(replace(inst, checks=checks, health=worst_health(checks)))
        return self.apply(upserts=upserts, allocations=allocations)

    def put_alloc(self, alloc: Alloc) -> Snapshot:
        return self.apply(allocs=[alloc])

    def drop_alloc(self, alloc_id: str) -> Snapshot:
        return self.apply(drop_allocs=[alloc_id])

    def apply(
        self,
        *,
        upserts: Iterable[Instance] = (),
        removals: Iterable[str] = (),
        nodes: Iterable[Node] = (),
        allocs: Iterable[Alloc] = (),
        drop_allocs: Iterable[str] = (),
        jobs: Iterable[Job] = (),
        drop_jobs: Iterable[str] = (),
        allocations: Iterable[Allocation] = (),
        drop_allocations: Iterable[str] = (),
    ) -> Snapshot:
        """Apply a batch of changes atomically and publish one snapshot if anything changed.

        Unknown ids in `removals`, `drop_jobs` and `drop_allocations` are ignored
        (removing is idempotent here; :meth:`remove` is the strict variant).
        """
        old = self._snapshot
        # Persistent maps (HAMT): a change copies O(log n) nodes, not the registry.
        instances = _as_map(old.instances).mutate()
        # Per touched service key: its members by id, edited in place, so a
        # change costs O(size of the services it touches), not O(registry).
        members: dict[str, dict[str, Instance]] = {}

        def bucket(key: str) -> dict[str, Instance]:
            found = members.get(key)
            if found is None:
                found = members[key] = {i.id: i for i in old.services.get(key, ())}
            return found

        owners = self._check_owner
        changed_ids: set[str] = set()
        index = old.index + 1
        for inst in upserts:
            prev = instances.get(inst.id)
            if prev == inst:
                continue
            created = index if prev is None or prev.key != inst.key else prev.create_index
            inst = replace(inst, create_index=created, modify_index=index)
            if prev is not None:
                bucket(prev.key).pop(prev.id, None)
                for check in prev.checks:
                    owners.pop(check.id, None)
            instances[inst.id] = inst
            changed_ids.add(inst.id)
            bucket(inst.key)[inst.id] = inst
            for check in inst.checks:
                owners[check.id] = inst.id
        for ident in removals:
            prev = instances.get(ident)
            if prev is not None:
                del instances[ident]
                changed_ids.add(ident)
                bucket(prev.key).pop(prev.id, None)
                for check in prev.checks:
                    if owners.get(check.id) == ident:
                        del owners[check.id]
        node_map = dict(old.nodes)
        nodes_changed = False
        for node in nodes:
            if node_map.get(node.name.lower()) != node:
                node_map[node.name.lower()] = node
                nodes_changed = True
        alloc_map = dict(old.allocs)
        allocs_changed = False
        for alloc in allocs:
            if alloc_map.get(alloc.id) != alloc:
                alloc_map[alloc.id] = alloc
                allocs_changed = True
        for alloc_id in drop_allocs:
            allocs_changed |= alloc_map.pop(alloc_id, None) is not None
        work_keys: set[str] = set()
        jobs, drop_jobs = list(jobs), list(drop_jobs)
        allocations, drop_allocations = list(allocations), list(drop_allocations)
        job_map = old.jobs
        if jobs or drop_jobs:
            job_map = _apply_jobs(old.jobs, jobs, drop_jobs, index, work_keys)
        allocation_map = old.allocations
        if allocations or drop_allocations:
            allocation_map = _apply_allocations(
                old.allocations, allocations, drop_allocations, index, work_keys
            )
        for alloc_id in work_keys_allocs(work_keys):
            allocs_changed |= _follow_allocation(alloc_map, allocation_map.get(alloc_id), alloc_id)
        if not members and not nodes_changed and not allocs_changed and not work_keys:
            return old
        services = _as_map(old.services).mutate()
        service_index = _as_map(old.service_index).mutate()
        for key, group in members.items():
            service_index[key] = index
            if group:
                services[key] = tuple(group[i] for i in sorted(group))
            elif key in services:
                del services[key]
        for key in work_keys:
            if key.startswith(_ALLOC_PREFIX) and key[len(_ALLOC_PREFIX) :] not in allocation_map:
                service_index.pop(key, None)  # a dropped allocation: its key goes with it
            else:
                service_index[key] = index
        snap = Snapshot(
            index=index,
            instances=instances.finish(),
            services=services.finish(),
            nodes=MappingProxyType(node_map) if nodes_changed else old.nodes,
            allocs=MappingProxyType(alloc_map) if allocs_changed else old.allocs,
            service_index=service_index.finish(),
            local_node=old.local_node,
            changed_ids=frozenset(changed_ids),
            jobs=job_map,
            allocations=allocation_map,
        )
        self._snapshot = snap
        changed = frozenset(members) | work_keys if work_keys else frozenset(members)
        for callback in list(self._subscribers):
            try:
                callback(snap, changed)
            except Exception:  # a subscriber must not break the writer
                log.exception("registry subscriber %r failed", callback)
        return snap


_ALLOC_PREFIX = alloc_key("")
_JOB_PREFIX = job_key("")


def work_keys_allocs(keys: Iterable[str]) -> list[str]:
    """The allocation ids among changed watch keys."""
    n = len(_ALLOC_PREFIX)
    return [k[n:] for k in keys if k.startswith(_ALLOC_PREFIX)]


def work_keys_jobs(keys: Iterable[str]) -> list[str]:
    """The job ids among changed watch keys."""
    n = len(_JOB_PREFIX)
    return [k[n:] for k in keys if k.startswith(_JOB_PREFIX)]


def _apply_jobs(
    old: Mapping[str, Job], jobs: Iterable[Job], drop: Iterable[str], index: int, keys: set[str]
) -> Mapping[str, Job]:
    """`old` with `jobs` upserted (indexes set) and `drop` removed; changed keys into `keys`."""
    out = _as_map(old).mutate()
    for job in jobs:
        prev = out.get(job.id)
        if prev == job:
            continue
        if prev is None:  # new, or restored (its stored indexes kept)
            created, job_index = job.create_index or index, job.job_modify_index or index
        elif prev.version != job.version:  # a register that changed the job
            created, job_index = prev.create_index, index
        else:
            created, job_index = prev.create_index, prev.job_modify_index
        out[job.id] = replace(
            job, create_index=created, modify_index=index, job_modify_index=job_index
        )
        keys.update((JOBS_KEY, job_key(job.id)))
    for ident in drop:
        if ident in out:
            del out[ident]
            keys.update((JOBS_KEY, job_key(ident)))
    return out.finish()


def _apply_allocations(
    old: Mapping[str, Allocation],
    allocations: Iterable[Allocation],
    drop: Iterable[str],
    index: int,
    keys: set[str],
) -> Mapping[str, Allocation]:
    out = _as_map(old).mutate()
    for alloc in allocations:
        prev = out.get(alloc.id)
        if prev == alloc:
            continue
        created = prev.create_index if prev is not None else (alloc.create_index or index)
        out[alloc.id] = replace(alloc, create_index=created, modify_index=index)
        keys.update((ALLOCS_KEY, alloc_key(alloc.id), job_key(alloc.job_id)))
    for ident in drop:
        prev = out.get(ident)
        if prev is not None:
            del out[ident]
            keys.update((ALLOCS_KEY, alloc_key(ident), job_key(prev.job_id)))
    return out.finish()


def _follow_allocation(allocs: dict[str, Alloc], alloc: Allocation | None, ident: str) -> bool:
    """Keep `allocs[ident]` (what DNS answers) in step with the allocation; True if changed."""
    if alloc is None or alloc.network is None or alloc.terminal:
        return allocs.pop(ident, None) is not None
    wanted = Alloc(alloc.id, alloc_addresses(alloc.network), alloc.name)
    if allocs.get(ident) == wanted:
        return False
    allocs[ident] = wanted
    return True
