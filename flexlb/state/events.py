"""FleetEvents: a router's subscription to the fleet's change notifications (Redis pub/sub on ``keys.events``).

The master publishes ``status <worker> <version>`` on every status write and release.lua publishes
``released <worker,...>`` when capacity comes back, so a router that waits for capacity (queue mode) is woken by the
fleet instead of reading Redis in a loop. Pub/sub is fire-and-forget: a message lost while the subscription
reconnects is covered by the waiters' own periodic re-check, never relied on for correctness. Woken at once, the
routers' queues keep the fleet's arrival order through ``waiting`` (flexlb.state.waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from flexlb.state.keys import ServiceKeys
from flexlb.state.waiting import WaitingBoard
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.events")

RECONNECT_DELAY_S = 0.5


class FleetEvents:
    def __init__(self, redis: Redis, keys: ServiceKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._changed = asyncio.Condition()
        self._generation = 0
        self.received = 0  # messages since start (tests and /schedule_snapshot)
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.waiting = WaitingBoard(redis, keys)  # the fleet-wide order of queued requests (flexlb.queueing)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet events")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_until_done(self._task)
            self._task = None
        await self.waiting.stop()

    @property
    def generation(self) -> int:
        """Grows by one per event: a waiter that notes it before its work and passes it to :meth:`wait` misses no
        event that came meanwhile."""
        return self._generation

    async def wait(self, timeout_s: float, since: int | None = None) -> bool:
        """Wait for the next event (at once if one came after generation ``since``); False when ``timeout_s``
        passed without one."""
        async with self._changed:
            if since is not None and self._generation != since:
                return True
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                return False
        return True

    async def notify_local(self) -> None:
        """Wake this process's waiters without a round trip (a release made here)."""
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    async def _run(self) -> None:
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.events)
                self.connected.set()
                if failing:
                    log.info("fleet events: subscribed again to %s", self._keys.events)
                    failing = False
                    await self.notify_local()  # events may have been missed: let waiters re-check
                while True:
                    # a bounded wait, not timeout=None: a blocking read would hit the client's socket timeout
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.received += 1
                        await self.notify_local()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: waiters fall back to their periodic re-check
                self.connected.clear()
                if not failing:
                    log.warning("fleet events: subscription to %s lost (%r); retrying", self._keys.events, exc)
                    failing = True
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
