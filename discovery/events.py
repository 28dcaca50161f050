"""Registry change events for the event stream (`GET /v1/event/stream`).  State.

:class:`EventLog` subscribes to the registry and turns each change into
events, one per instance that changed, by diffing the old and new instances
of each changed service key.  Events are in Nomad's event-stream shape
(nomad/structs/event.go): topic "Service", the instance as a
ServiceRegistration payload (:func:`discovery.api_nomad.render_registration`),
Key = its ID, FilterKeys = [JobID, ServiceName].  Types:

    ServiceRegistration    a new instance, or a changed one (Nomad's upsert)
    ServiceDeregistration  an instance removed (payload: what it was)
    HealthChanged          only its health changed (waypost's; Nomad has no health)

The log keeps the last :data:`MAX_EVENTS` events, grouped by registry index,
so a consumer can resume: :meth:`EventLog.since` gives what happened after an
index, or None when that is older than the log (the consumer then needs a
full snapshot: :meth:`EventLog.snapshot_line`).

A :class:`Subscription` collects the events that match its topics; its
:meth:`~Subscription.next` waits for the next line: every event that arrived
within `debounce` of the first one, coalesced into one ``{"Index", "Events"}``
line (template-like consumers re-render once per storm, not per change), or
a ``{}`` heartbeat after `heartbeat` seconds without any.  A subscriber that
falls more than :data:`MAX_PENDING` events behind (its client does not read)
is resynchronised with a snapshot line instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from discovery.api_nomad import NAMESPACE, render_registration
from discovery.model import Instance
from discovery.registry import Registry, Snapshot

Json = dict[str, Any]
TOPIC = "Service"  # Nomad's structs.TopicService
REGISTRATION = "ServiceRegistration"  # Nomad's structs.TypeServiceRegistration
DEREGISTRATION = "ServiceDeregistration"  # Nomad's structs.TypeServiceDeregistration
HEALTH_CHANGED = "HealthChanged"  # waypost's: Nomad services carry no health
MAX_EVENTS = 10_000  # events kept for consumers resuming from an index
MAX_PENDING = 10_000  # events queued for one subscriber before it is resynchronised
DEFAULT_DEBOUNCE = 0.1  # seconds
HEARTBEAT = 10.0  # seconds without events before a `{}` line (Nomad's heartbeat)


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one instance, at registry index `index`."""

    index: int
    type: str
    service: str  # as registered
    instance_id: str
    json: Json  # Nomad's Event object; shared, never modified


@dataclass(frozen=True, slots=True)
class Topics:
    """Nomad's `?topic=Topic:Key` filters (repeatable); none means everything."""

    keys: frozenset[str] | None = None  # None: every event; else IDs or service names (lower)
    nothing: bool = False  # only topics other than ours were asked for

    def allows(self, event: Event) -> bool:
        if self.nothing:
            return False
        if self.keys is None:
            return True
        return event.instance_id.lower() in self.keys or event.service.lower() in self.keys


def parse_topics(values: Sequence[str]) -> Topics:
    """`Service`, `Service:*`, `*`, `*:*` (all); `Service:web` (ID or service name web)."""
    if not values:
        return Topics()
    keys: set[str] = set()
    for value in values:
        topic, _, key = value.partition(":")
        if topic not in (TOPIC, "*"):
            continue  # Nomad's other topics (Job, Node...) have no events here
        if key in ("", "*"):
            return Topics()
        keys.add(key.lower())
    return Topics(frozenset(keys)) if keys else Topics(nothing=True)


def render_event(kind: str, inst: Instance, index: int, datacenter: str) -> Event:
    reg = render_registration(inst, datacenter, index)
    body = {
        "Topic": TOPIC,
        "Type": kind,
        "Key": inst.id,
        "Namespace": NAMESPACE,
        "FilterKeys": [reg["JobID"], inst.service],
        "Index": index,
        "Payload": {"Service": reg},
    }
    return Event(index, kind, inst.service, inst.id, body)


def diff_service(
    old: Iterable[Instance], new: Iterable[Instance], index: int, datacenter: str
) -> list[Event]:
    """The events that turn instances `old` into `new` (one service key), ordered by id."""
    before = {inst.id: inst for inst in old}
    after = {inst.id: inst for inst in new}
    pairs = [(before.get(i), after.get(i)) for i in sorted(before.keys() | after.keys())]
    return diff_instances(pairs, index, datacenter)


def diff_instances(
    pairs: Iterable[tuple[Instance | None, Instance | None]], index: int, datacenter: str
) -> list[Event]:
    """The events of (before, after) pairs of one instance id each (None: absent)."""
    events = []
    for was, now in pairs:
        if was is now:
            continue
        if now is None:
            assert was is not None
            events.append(render_event(DEREGISTRATION, was, index, datacenter))
        elif was is None:
            events.append(render_event(REGISTRATION, now, index, datacenter))
        elif was.key != now.key:  # moved to another service: gone from one, new in the other
            events.append(render_event(DEREGISTRATION, was, index, datacenter))
            events.append(render_event(REGISTRATION, now, index, datacenter))
        else:
            kind = _change_kind(was, now)
            if kind:
                events.append(render_event(kind, now, index, datacenter))
    return events


def _change_kind(was: Instance, now: Instance) -> str:
    """REGISTRATION, HEALTH_CHANGED, or "" for a change the payload does not show (check output)."""
    if replace(was, health=now.health, checks=now.checks) != now:
        return REGISTRATION
    return HEALTH_CHANGED if was.health is not now.health else ""


def line(events: Sequence[Event]) -> Json:
    """One stream line: Nomad's `{"Index": n, "Events": [...]}`."""
    return {"Index": max(e.index for e in events), "Events": [e.json for e in events]}


class EventLog:
    """The recent events of a registry, and the live subscriptions to them."""

    def __init__(
        self,
        registry: Registry,
        *,
        datacenter: str = "dc1",
        capacity: int = MAX_EVENTS,
    ) -> None:
        self.registry = registry
        self.datacenter = datacenter
        self._capacity = capacity
        self._batches: deque[tuple[int, list[Event]]] = deque()
        self._size = 0
        self._last = registry.snapshot
        self._floor = self._last.index  # events after this index are all in the log
        self._subscriptions: set[Subscription] = set()
        self._unsubscribe: Callable[[], None] | None = registry.subscribe(self._changed)

    @property
    def floor(self) -> int:
        """The oldest index the log can resume from (every event after it is kept)."""
        return self._floor

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        """Stop following the registry; every subscription ends."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for sub in list(self._subscriptions):
            sub.close()

    def since(self, index: int) -> list[Event] | None:
        """The events after `index`, or None when the log no longer reaches back that far.

        An index ahead of the registry's (a consumer from before a restart
        that lost state) is None too: the consumer must resynchronise.
        """
        if index < self._floor or index > self._last.index:
            return None
        out: list[Event] = []
        for batch_index, events in reversed(self._batches):
            if batch_index <= index:
                break
            out[:0] = events
        return out

    def snapshot_line(self, topics: Topics = Topics()) -> Json:
        """Every current instance as a registration event, in one line marked `"Snapshot": true`."""
        snap = self.registry.snapshot
        events = [
            render_event(
                REGISTRATION, inst, snap.service_index.get(key, snap.index), self.datacenter
            )
            for key in sorted(snap.services)
            for inst in snap.services[key]
        ]
        chosen = [e for e in events if topics.allows(e)]
        return {"Index": snap.index, "Events": [e.json for e in chosen], "Snapshot": True}

    def subscribe(self, index: int | None = None, topics: Topics = Topics()) -> Subscription:
        """Events from now on; with `index`, also those after it (or a snapshot line first)."""
        sub = Subscription(self, topics)
        if index is not None:
            history = self.since(index)
            if history is None:
                sub.resync()
            else:
                sub.push(history)
        self._subscriptions.add(sub)
        return sub

    def _forget(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def _changed(self, snap: Snapshot, keys: frozenset[str]) -> None:
        old, self._last = self._last, snap
        pairs = [(old.instances.get(i), snap.instances.get(i)) for i in sorted(snap.changed_ids)]
        events = diff_instances(pairs, snap.index, self.datacenter)
        if not events:
            return
        self._batches.append((snap.index, events))
        self._size += len(events)
        while self._size > self._capacity and len(self._batches) > 1:
            dropped, batch = self._batches.popleft()
            self._size -= len(batch)
            self._floor = dropped
        for sub in list(self._subscriptions):
            sub.push(events)


class Subscription:
    """One consumer's queue of events.  Use :meth:`next` in a loop; :meth:`close` at the end."""

    def __init__(self, log: EventLog, topics: Topics) -> None:
        self._log = log
        self._topics = topics
        self._pending: list[Event] = []
        self._resync = False
        self._closed = False
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, events: Iterable[Event]) -> None:
        if self._closed:
            return
        self._pending += (e for e in events if self._topics.allows(e))
        if len(self._pending) > MAX_PENDING:
            self.resync()
        self._wake()

    def resync(self) -> None:
        """Drop what is queued; the next line is a full snapshot."""
        self._pending = []
        self._resync = True
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._log._forget(self)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _ready(self) -> bool:
        return self._closed or self._resync or bool(self._pending)

    async def next(
        self, *, debounce: float = DEFAULT_DEBOUNCE, heartbeat: float = HEARTBEAT
    ) -> Json | None:
        """The next line: events (coalesced over `debounce`), a snapshot, `{}`; None once closed."""
        if not self._ready():
            self._wakeup = wakeup = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait((wakeup,), timeout=heartbeat)
            finally:
                self._wakeup = None
                wakeup.cancel()
            if not self._ready():
                return {}
        if debounce > 0 and not self._closed and not self._resync:
            await asyncio.sleep(debounce)  # let the rest of the storm arrive
        if self._closed:
            return None
        if self._resync:
            self._resync = False
            self._pending = []
            return self._log.snapshot_line(self._topics)
        events, self._pending = self._pending, []
        return line(events)
