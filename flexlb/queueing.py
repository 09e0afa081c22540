"""Queue mode (FLEXLB_CONFIG ``enableQueueing``): a request that finds no capacity waits in this router's FIFO queue
instead of failing at once.

One dispatcher task schedules the head of the queue only, so requests are placed in arrival order and a waiting
crowd costs one schedule attempt per fleet change, not one per waiter. It retries when the fleet announces freed
capacity (FleetEvents: a release anywhere, a master status write) and at least every ``recheck_s`` in case a message
was missed. A retryable failure leaves the request at the head. Answers: QUEUE_FULL at once when the queue holds
``maxQueueSize``; QUEUE_TIMEOUT when its ``generate_timeout`` passes while queued; a client that goes away is taken
out of the queue (and a reservation made for it meanwhile is released).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flexlb.admission import AdmissionControl
from flexlb.domain import ErrorCode, ScheduleRequest, ScheduleResult
from flexlb.scheduler import Scheduler
from flexlb.state.events import FleetEvents

log = logging.getLogger("flexlb.queue")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class QueueOptions:
    enabled: bool = False
    max_size: int = 1_000_000
    max_retries: int = 0  # retryable failures before giving up; 0 = until the request's timeout
    recheck_s: float = 0.2  # longest wait between two attempts for the head without a fleet event
    admission_interval_s: float = 0.01  # how often permits follow the water level (resourceCheckIntervalMs)


@dataclass(eq=False, slots=True)
class _Entry:
    request: ScheduleRequest
    deadline: float
    enqueued: float
    future: asyncio.Future[ScheduleResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attempts: int = 0
    answered: bool = False


class QueueMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.size = Gauge(
            "flexlb_queue_size",
            "Requests waiting in this router's queue.",
            registry=registry,
            multiprocess_mode="livesum",  # several processes: the router's queue is all of theirs
        )
        self.wait = Histogram(
            "flexlb_queue_wait_seconds",
            "Time requests spent in the queue, by outcome.",
            ["outcome"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.rejected = Counter(
            "flexlb_queue_rejected_total", "Requests not queued or dropped, by reason.", ["reason"], registry=registry
        )
        self.permits = Gauge(
            "flexlb_admission_permits",
            "Queue mode: requests this router lets into scheduling at once (follows the fleet's water level).",
            registry=registry,
            multiprocess_mode="livesum",
        )


class RequestQueue:
    """Schedules through ``scheduler``; with queueing enabled, waits for capacity instead of failing."""

    def __init__(
        self,
        scheduler: Scheduler,
        events: FleetEvents | None,
        options: QueueOptions,
        metrics: QueueMetrics,
        admission: AdmissionControl | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.scheduler = scheduler
        self.events = events
        self.options = options
        self.metrics = metrics
        self.admission = admission if options.enabled else None
        self._clock = clock
        self._admission_at = 0.0
        if self.admission is not None:
            metrics.permits.set(self.admission.permits)
        self._queue: deque[_Entry] = deque()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempt: tuple[_Entry, asyncio.Future[ScheduleResult]] | None = None  # the head's schedule under way
        self._stopped = False

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self.options.enabled:
            self._task = asyncio.create_task(self._dispatch(), name="request queue")

    async def stop(self) -> None:
        """Stop dispatching; queued requests are answered REQUEST_CANCELLED (the router is going away), and so are
        later ones that find no capacity, at once."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._attempt is not None:  # the head's attempt ran on: answer it, or give its reservation back
            head, attempt = self._attempt
            self._attempt = None
            await asyncio.wait([attempt])
            if attempt.exception() is None:  # a failed attempt reserved nothing (the dispatcher logs failures)
                await self._settle(head, attempt.result())
        while self._queue:
            entry = self._queue.popleft()
            self._answer(entry, _failure(ErrorCode.REQUEST_CANCELLED, "the router is shutting down"), "cancelled")

    async def schedule(self, request: ScheduleRequest) -> ScheduleResult:
        attempts = 0
        last = "none yet: queued behind earlier requests"
        if self.options.enabled and not self._queue and not self._admits():
            last = f"none yet: {self.scheduler.in_flight} requests in flight, {self._permits()} admitted at once"
        elif not (self.options.enabled and self._queue):  # never overtake requests already waiting
            result = await self.scheduler.schedule(request)
            if result.success or not self.options.enabled or not result.code.retryable:
                return result
            attempts, last = 1, result.message
        if self._stopped:  # no dispatcher would try it again
            return _failure(ErrorCode.REQUEST_CANCELLED, f"the router is shutting down; last attempt: {last}")
        if len(self._queue) >= self.options.max_size:
            self.metrics.rejected.labels(reason="full").inc()
            return _failure(
                ErrorCode.QUEUE_FULL, f"queue full ({self.options.max_size} requests waiting); last attempt: {last}"
            )
        now = self._clock()
        entry = _Entry(request, deadline=now + request.generate_timeout_ms / 1000, enqueued=now, attempts=attempts)
        self._queue.append(entry)
        self.metrics.size.set(len(self._queue))
        self._kick.set()
        try:
            return await entry.future
        finally:
            if not entry.answered:  # the client went away (this task was cancelled): leave the queue
                entry.answered = True
                self._remove(entry)
                self.metrics.rejected.labels(reason="cancelled").inc()
                self.metrics.wait.labels(outcome="cancelled").observe(self._clock() - entry.enqueued)
                log.info("request %s left the queue: client went away", request.request_id)

    def _admits(self) -> bool:
        """Dynamic capacity: fewer requests in flight than the permits of the fleet's current water level."""
        if self.admission is None:
            return True
        now = self._clock()
        view = self.scheduler.view
        if view.synced and now - self._admission_at >= self.options.admission_interval_s:
            self._admission_at = now
            self.metrics.permits.set(self.admission.update(view.by_role()))
        return self.admission.admits(self.scheduler.in_flight)

    def _permits(self) -> int | None:
        return None if self.admission is None else self.admission.permits

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "enabled": self.options.enabled,
            "queue_length": len(self._queue),
            "max_queue_size": self.options.max_size,
            "in_flight": self.scheduler.in_flight,
            "permits": self._permits(),
            "water_levels": None if self.admission is None else self.admission.levels,
            "entries": [
                {
                    "request_id": e.request.request_id,
                    "waited_ms": round((now - e.enqueued) * 1000, 1),
                    "timeout_in_ms": round((e.deadline - now) * 1000, 1),
                    "attempts": e.attempts,
                }
                for e in self._queue
            ],
        }

    # ---- the dispatcher ----

    async def _dispatch(self) -> None:
        while True:
            try:
                await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue dispatcher failed; carrying on")
                await asyncio.sleep(self.options.recheck_s)

    async def _dispatch_once(self) -> None:
        self._expire()
        if not self._queue:
            self._kick.clear()
            await self._kick.wait()
            return
        if not self._admits():  # the fleet is full: wait for releases before even trying
            await self._wait_for_change()
            return
        head = self._queue[0]
        attempt = asyncio.ensure_future(self.scheduler.schedule(head.request))
        self._attempt = (head, attempt)
        # Shielded: stop() cancels the dispatcher, not a reservation Redis may be making; it settles the attempt.
        result = await asyncio.shield(attempt)
        self._attempt = None
        if not await self._settle(head, result):
            await self._wait_for_change()

    async def _settle(self, head: _Entry, result: ScheduleResult) -> bool:
        """Answer ``head`` with the result of an attempt when it is final; False leaves it at the head to retry."""
        head.attempts += 1
        retries_left = not self.options.max_retries or head.attempts <= self.options.max_retries
        final = result.success or not result.code.retryable or not retries_left
        if not final:
            return False
        if self._queue and self._queue[0] is head:
            self._queue.popleft()
        if head.future.cancelled():  # the client left while we scheduled: give the capacity back
            if result.success:
                await self.scheduler.release(head.request.request_id)
            return True
        self._answer(head, result, "scheduled" if result.success else "failed")
        return True  # the next head may fit too: try it at once

    async def _wait_for_change(self) -> None:
        timeout = self.options.recheck_s
        if self._queue:
            timeout = max(0.0, min(timeout, min(e.deadline for e in self._queue) - self._clock()))
        if self.events is not None:
            await self.events.wait(timeout)
        else:
            await asyncio.sleep(timeout)

    def _expire(self) -> None:
        now = self._clock()
        for entry in [e for e in self._queue if e.deadline <= now]:
            self._remove(entry)
            waited = now - entry.enqueued
            self.metrics.rejected.labels(reason="timeout").inc()
            self._answer(
                entry,
                _failure(
                    ErrorCode.QUEUE_TIMEOUT,
                    f"no capacity within the request's timeout ({waited:.1f}s in the queue, {entry.attempts} attempts)",
                ),
                "timeout",
            )

    def _answer(self, entry: _Entry, result: ScheduleResult, outcome: str) -> None:
        self.metrics.size.set(len(self._queue))
        self.metrics.wait.labels(outcome=outcome).observe(self._clock() - entry.enqueued)
        result.attempts = entry.attempts
        entry.answered = True
        if not entry.future.done():
            entry.future.set_result(result)

    def _remove(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(entry)
        self.metrics.size.set(len(self._queue))


def _failure(code: ErrorCode, message: str) -> ScheduleResult:
    return ScheduleResult(success=False, code=code, message=f"{code.name}: {message}")
