"""Health checks by the routers while no master runs (``contendForMaster: false`` on every router, no ``flexlb
master``): then no one polls the workers, and a worker nothing answers for would stay ``alive`` for good.

Each such router checks every worker's ``GET /health`` every ``healthCheckIntervalMs`` while the master lock has no
holder, and writes ``alive`` when its verdict (failure / success thresholds) differs from what the fleet view says.
The routers judge alike, so they write the same thing; a worker only some routers reach makes them write in turn
(run a master to have one judge). A master taking the lock stops the checks at once (the next round): it then
decides, over gRPC for RTP-LLM workers and over HTTP for vLLM and SGLang ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from flexlb.domain import WorkerView
from flexlb.master.health import HealthOptions, HealthTracker, HttpGetter
from flexlb.scheduler import REDIS_UNAVAILABLE
from flexlb.state.store import FleetStore, WorkerNotFound

log = logging.getLogger("flexlb.master.router_health")

MasterHeld = Callable[[], Awaitable[bool]]  # whether some process holds the master lock now
MAX_CHECKS_IN_FLIGHT = 64


class RouterHealthChecks:
    def __init__(
        self,
        store: FleetStore,
        workers: Callable[[], Iterable[WorkerView]],
        master_held: MasterHeld,
        http: HttpGetter,
        options: HealthOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.workers = workers
        self.master_held = master_held
        self.http = http
        self.options = options
        self.clock = clock
        self.trackers: dict[str, HealthTracker] = {}
        self._gate = asyncio.Semaphore(MAX_CHECKS_IN_FLIGHT)
        self._active = False

    async def run(self) -> None:
        """Until cancelled: a round every interval (nothing while a master holds the lock)."""
        try:
            while True:
                started = self.clock()
                try:
                    await self.round()
                except REDIS_UNAVAILABLE as exc:
                    log.debug("health checks: Redis unreachable: %r", exc)
                except Exception:
                    log.exception("health checks failed; trying again next round")
                await asyncio.sleep(max(0.0, self.options.interval_s - (self.clock() - started)))
        finally:
            await self.http.close()

    async def round(self) -> None:
        if await self.master_held():
            if self._active:
                log.info("a master holds the lock: it checks the workers; this router stops")
                self._active = False
            self.trackers.clear()  # a later round without master starts from what the view says then
            return
        if not self._active:
            log.info("no master: this router checks the workers' health (every %.2fs)", self.options.interval_s)
            self._active = True
        views = list(self.workers())
        known = {v.worker_id for v in views}
        for wid in [w for w in self.trackers if w not in known]:
            del self.trackers[wid]
        await asyncio.gather(*(self._check(v) for v in views))

    async def _check(self, view: WorkerView) -> None:
        spec = view.spec
        tracker = self.trackers.get(spec.worker_id)
        if tracker is None:
            o = self.options
            tracker = HealthTracker(o.failure_threshold, o.success_threshold, up=view.status.alive)
            self.trackers[spec.worker_id] = tracker
        async with self._gate:
            ok, why = await self.http.healthy(spec.ip, spec.http_port)
        moved = tracker.record(ok)
        name = f"{spec.role.value} worker {spec.worker_id} ({spec.engine.value})"
        if moved and not tracker.up:
            log.warning("%s marked not alive after %d failed health checks: %s", name, tracker.failures, why)
        elif moved:
            log.info("%s is healthy again after %d passed checks", name, tracker.successes)
        # written when the verdict differs from the view: also after another router (or Redis) said otherwise
        if tracker.settled and tracker.up != view.status.alive:
            try:
                await self.store.update_status(spec.worker_id, {"alive": tracker.up})
            except WorkerNotFound:
                self.trackers.pop(spec.worker_id, None)
