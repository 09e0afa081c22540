"""FleetEvents: wakes a router's waiters (queue mode) when the fleet may have capacity again.

The router's change-stream tail (:class:`~flexlb.state.view_sync.ViewSync`, which every router runs anyway) calls
:meth:`FleetEvents.changed` after a batch of entries that can free capacity: a release or an expiry anywhere (a
``p`` entry with a lower pending load), a master status write (``s``), a worker registered (``a``), a full read;
the router's own releases too, once their entry comes back (one round trip). Routers used to subscribe to a pub/sub
channel for this as well; the stream already carries the same news, and dropping the ``PUBLISH`` saves every
release a redis.call and every router a message per release. A change missed while the tail reconnects is covered
by its full read (which counts as a change) and by the waiters' own periodic re-check, never relied on for
correctness. Woken at once, the routers' queues keep the fleet's arrival order through ``waiting``
(flexlb.state.waiting).
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from flexlb.state.keys import ServiceKeys
from flexlb.state.view_sync import ViewSync
from flexlb.state.waiting import WaitingBoard


class FleetEvents:
    def __init__(self, redis: Redis, keys: ServiceKeys) -> None:
        self._changed = asyncio.Event()
        self._waiters = 0  # tasks in wait(): with none, a change only moves the generation (one per release)
        self._generation = 0
        self.waiting = WaitingBoard(redis, keys)  # the fleet-wide order of queued requests (flexlb.queueing)

    def follow(self, view_sync: ViewSync) -> None:
        """Be woken by ``view_sync``'s tail of the change stream (the router's own; it runs it)."""
        view_sync.on_freed = self.changed

    async def stop(self) -> None:
        await self.waiting.stop()

    @property
    def generation(self) -> int:
        """Grows by one per event: a waiter that notes it before its work and passes it to :meth:`wait` misses no
        event that came meanwhile."""
        return self._generation

    def changed(self) -> None:
        """The fleet may have capacity again: wake every waiter."""
        self._generation += 1
        if self._waiters:
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def wait(self, timeout_s: float, since: int | None = None) -> bool:
        """Wait for the next event (at once if one came after generation ``since``); False when ``timeout_s``
        passed without one."""
        if since is not None and self._generation != since:
            return True
        self._waiters += 1
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1
        return True
