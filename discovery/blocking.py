"""Blocking queries: who waits on which registry keys, and waking them.  State.

A blocking read (`?index=N&wait=D`) waits until the index of what it watches
passes N.  :class:`Waiters` keeps one future per waiting request, in a set per
watched key (a lower-case service name, or ``WATCH_ALL``).  The registry calls
it after each change with the keys that changed; it pops the sets of exactly
those keys (and of ``WATCH_ALL``) and resolves every future in them in one
pass: 10,000 watchers of one service cost one set walk, and a change to
another service touches none of them.

The index a read reports is :func:`watch_index`: the last change of the
watched services (``snapshot.index`` for ``WATCH_ALL`` and for services never
seen, so that the index never goes backwards, even across restarts), and
never 0 (Consul's clients treat 0 as "no index").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable

from discovery.api import WATCH_ALL
from discovery.registry import Registry, Snapshot

MIN_INDEX = 1  # Consul: an index is at least 1; 0 means "not blocking"


def watch_index(snapshot: Snapshot, keys: Iterable[str]) -> int:
    """The index of `keys` in `snapshot`: the last change of any of them, at least 1."""
    index = 0
    for key in keys:
        if key == WATCH_ALL:
            found = snapshot.index
        else:
            found = snapshot.service_index.get(key, snapshot.index)
        index = max(index, found)
    return max(MIN_INDEX, index)


class Waiters:
    """Blocked requests by watched key.  Lives on the event loop; not thread-safe."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[asyncio.Future[None]]] = {}
        self._registry: Registry | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._count = 0
        self._woken = 0
        self._closed = False

    @property
    def count(self) -> int:
        """How many requests are blocked right now (a metrics gauge)."""
        return self._count

    @property
    def woken(self) -> int:
        """How many waits registry changes have woken so far (each wake-up costs a read)."""
        return self._woken

    def attach(self, registry: Registry) -> None:
        """Watch `registry`: its changes wake the waiters of the changed keys."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._registry = registry
        self._unsubscribe = registry.subscribe(self._changed)

    def close(self) -> None:
        """Wake every waiter (they answer with what they have) and stop blocking."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        by_key, self._by_key = self._by_key, {}
        for futures in by_key.values():
            _wake(futures)

    async def wait(self, keys: Collection[str], index: int, seconds: float) -> Snapshot:
        """The current snapshot once the index of `keys` is above `index`, or after `seconds`.

        Returns at once when it already is, and when the waiters are closed.
        A wake-up that does not move the watched index (a change to a service
        this request does not watch, seen through ``WATCH_ALL``) waits again
        for the rest of the time.
        """
        registry = self._registry
        if registry is None:
            raise RuntimeError("Waiters.wait before attach()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            snapshot = registry.snapshot
            left = deadline - loop.time()
            if self._closed or left <= 0 or watch_index(snapshot, keys) > index:
                return snapshot
            await self._park(keys, left)

    async def _park(self, keys: Collection[str], seconds: float) -> None:
        """Sleep until one of `keys` changes or `seconds` pass."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        for key in keys:
            self._by_key.setdefault(key, set()).add(future)
        timer = loop.call_later(seconds, _resolve, future)
        self._count += 1
        try:
            await future
        finally:
            self._count -= 1
            timer.cancel()
            for key in keys:
                waiting = self._by_key.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._by_key[key]

    def _changed(self, _snapshot: Snapshot, keys: frozenset[str]) -> None:
        for key in (*keys, WATCH_ALL):
            futures = self._by_key.pop(key, None)
            if futures:
                self._woken += len(futures)
                _wake(futures)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        _resolve(future)
