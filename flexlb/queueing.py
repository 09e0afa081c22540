"""The router's queue: a request that finds no capacity waits here instead of failing at once. Schedule API
requests wait in queue mode (FLEXLB_CONFIG ``enableQueueing``); the proxy's wait whenever admission by estimated TTFT
holds them (``proxyAdmissionTtftMs``).

The queue is ordered by priority, then arrival: a request's ``request_priority`` (the original FlexLB's levels, see
queue_priority: 1-100, higher first; not given, 50) puts it behind every waiter of its level or above and ahead of
those below. One dispatcher task places requests in that order, trying the head first; when the head cannot be
placed it tries up to ``skip_ahead`` smaller requests behind it (a request no worker can take now, say one whose
prompt only the busiest worker has room for, does not hold back smaller ones that fit; requests of the same size keep
their order). Aging: a request passed over ``max_overtakes`` times (by a later request of higher priority queued
ahead of it, or by a smaller one placed before it) is not overtaken again until it is placed: later arrivals of any
priority queue behind it, so a low priority waits behind at most ``max_overtakes`` others and nothing starves. A
waiting crowd costs a few attempts per fleet change, not one per waiter: the dispatcher tries again when the fleet
announces freed capacity (FleetEvents: a release anywhere, a master status write) and at least every ``recheck_s``
in case a message was missed. Answers: QUEUE_FULL at once when the queue holds ``maxQueueSize``; QUEUE_TIMEOUT when
its ``generate_timeout`` passes while queued; a client that goes away is taken out of the queue (and a reservation
made for it meanwhile is released). A request that waited carries its QueueStay (wait, position at entry, depth
when it left) in its result: the schedule API's ``debug_info``.

Across router processes every queue wakes on the same fleet event; the fleet's waiting board
(flexlb.state.waiting) keeps one order for all of them, the same as each queue's (priority, then arrival): a waiter
leaves freed capacity to other routers' live waiters that rank before it, no larger than itself, for at most
``max_defers`` fleet events each. A more urgent waiter elsewhere that arrived after it and leaves the board (placed)
while it yields counts as an overtake; once aged (``max_overtakes``) it yields only to waiters elsewhere that arrived
before it, as in its own queue. A request arriving at a router whose queue is empty still tries once at once (no
board round trip on the common path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flexlb.admission import AdmissionControl
from flexlb.domain import ErrorCode, QueueStay, ScheduleRequest, ScheduleResult
from flexlb.metrics import Children
from flexlb.scheduler import Scheduler
from flexlb.state.events import FleetEvents
from flexlb.state.waiting import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, Waiter, WaitingBoard
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.queue")

Clock = Callable[[], float]


def queue_priority(request_priority: int) -> int:
    """The level the queue orders ``request_priority`` by, as the original FlexLB (its PriorityNormalizer): 1 to 100,
    higher goes first; 0 (not given) and any value outside 1-100 count as the default, 50."""
    if PRIORITY_MIN <= request_priority <= PRIORITY_MAX:
        return request_priority
    return PRIORITY_DEFAULT


@dataclass(frozen=True, slots=True)
class QueueOptions:
    enabled: bool = False
    max_size: int = 1_000_000
    max_retries: int = 0  # retryable failures before giving up; 0 = until the request's timeout
    recheck_s: float = 0.2  # longest wait between two attempts for the head without a fleet event
    admission_interval_s: float = 0.01  # how often permits follow the water level (resourceCheckIntervalMs)
    skip_ahead: int = 8  # requests behind a head that cannot be placed that are tried in the same round
    max_overtakes: int = 16  # a request overtaken this often (by priority or size) is not overtaken again: aging
    max_defers: int = 16  # rounds a waiter of another router that is not placed holds this router's back


@dataclass(eq=False, slots=True)
class _Entry:
    request: ScheduleRequest
    deadline: float
    enqueued: float
    future: asyncio.Future[ScheduleResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    attempts: int = 0
    answered: bool = False
    overtaken: int = 0  # requests placed (or queued) before it that came after it: its age (_pass_over)
    busy_only: bool = False  # waits only while the fleet's workers are busy; answered at once when none could take it
    position: int = 1  # requests ahead of it when it entered, plus one
    waiter: Waiter | None = None  # its place in the fleet's order (None: not on the board)
    priority: int = PRIORITY_DEFAULT  # queue_priority of its request_priority: higher goes first
    # waiters of other routers that arrived after it and it left capacity to (they rank first by priority): each
    # that leaves the board meanwhile was, most likely, placed before it, and counts as an overtake
    yielded: set[str] = field(default_factory=set)


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
        self.wait_by = Children(self.wait)  # (outcome): looked up once
        self.position = Histogram(
            "flexlb_queue_position",
            "Where requests entered the queue (1 = at its head): the requests ahead of them, plus one.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000, 10_000),
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
        self._board: WaitingBoard | None = events.waiting if events is not None else None
        self._held_back: dict[str, int] = {}  # other routers' waiters -> fleet events they held this router's back
        self._held_at = -1  # the events generation of the last check
        self._board_writes: set[asyncio.Task[None]] = set()  # leaves and promotions on their way to Redis

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        # always: the proxy's admission by estimated TTFT queues requests whatever queue mode says
        self._task = asyncio.create_task(self._dispatch(), name="request queue")

    async def stop(self) -> None:
        """Stop dispatching; queued requests are answered REQUEST_CANCELLED (the router is going away), and so are
        later ones that find no capacity, at once."""
        self._stopped = True
        if self._task is not None:  # until done: a cancellation lost in a Redis read would leave it waiting
            await cancel_until_done(self._task)
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
        if self._board_writes:  # off the fleet's order before the Redis client closes
            await asyncio.wait(set(self._board_writes))

    async def schedule(
        self, request: ScheduleRequest, *, hold: bool | None = None, busy_only: bool = False
    ) -> ScheduleResult:
        """Schedule ``request``; when it finds no capacity and ``hold`` (default: queue mode), wait in the queue.
        ``busy_only``: wait only while workers that could take it are busy (ScheduleResult.busy): a fleet with no
        such worker (none registered, alive or fresh) is answered at once, as the peers' routers do."""
        hold = self.options.enabled if hold is None else hold
        attempts = 0
        last = "none yet: queued behind earlier requests"
        if hold and not self._queue and not self._admits():
            last = f"none yet: {self.scheduler.in_flight} requests in flight, {self._permits()} admitted at once"
        elif not (hold and self._queue):  # never overtake requests already waiting
            result = await self.scheduler.schedule(request)
            if result.success or not hold or not result.code.retryable or (busy_only and not result.busy):
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
        entry = _Entry(
            request,
            deadline=now + request.generate_timeout_ms / 1000,
            enqueued=now,
            attempts=attempts,
            busy_only=busy_only,
            priority=queue_priority(request.priority),
        )
        try:
            if self._board is not None:  # before it joins the queue: it is ordered from its first attempt on
                entry.waiter = await self._board.enter(request.request_id, _size(entry), entry.priority)
            self._enqueue(entry)
            self.metrics.size.set(len(self._queue))
            self.metrics.position.observe(entry.position)
            self._kick.set()
            return await entry.future
        finally:
            if not entry.answered:  # the client went away (this task was cancelled): leave the queue
                entry.answered = True
                self._leave_board(entry)
                self._remove(entry)
                self._kick.set()  # those behind it may go now
                self.metrics.rejected.labels(reason="cancelled").inc()
                self.metrics.wait_by("cancelled").observe(self._clock() - entry.enqueued)
                log.info("request %s left the queue: client went away", request.request_id)

    def _enqueue(self, entry: _Entry) -> None:
        """Queue ``entry`` behind every waiter of its priority or above and behind every aged one (overtaken
        ``max_overtakes`` times: nothing goes ahead of it any more); those it goes ahead of are overtaken once more.
        Equal priorities (the common case) append at once."""
        queue = self._queue
        at = len(queue)
        while at > 0:
            ahead = queue[at - 1]
            if ahead.priority >= entry.priority or ahead.overtaken >= self.options.max_overtakes:
                break
            at -= 1
        for k in range(at, len(queue)):
            self._pass_over(queue[k])
        queue.insert(at, entry)
        entry.position = at + 1

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
                    "priority": e.priority,
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
        generation = self.events.generation if self.events is not None else 0  # events from here on wake us
        self._kick.clear()  # and so do arrivals from here on
        passed: list[_Entry] = []
        window = self._window()
        earlier, seen = await self._earlier_elsewhere(window)
        for entry in window:
            if (
                entry.yielded and seen is not None
            ):  # more urgent waiters elsewhere it yielded to: those gone were placed
                self._pass_over(entry, len(entry.yielded - seen))
                entry.yielded &= seen
            if passed and _size(entry) >= min(_size(e) for e in passed):
                continue  # no smaller than one that found no room: it would not fit either, and the order holds
            holders = _held_back(entry, earlier, aged=entry.overtaken >= self.options.max_overtakes)
            if holders:  # another router's waiter ranks first: it is woken by the same event
                entry.yielded |= _later(entry, holders)
                continue
            attempt = asyncio.ensure_future(self.scheduler.schedule(entry.request))
            self._attempt = (entry, attempt)
            # Shielded: stop() cancels the dispatcher, not a reservation Redis may be making; it settles the attempt.
            result = await asyncio.shield(attempt)
            self._attempt = None
            if await self._settle(entry, result):
                for skipped in passed:  # placed before them: they age toward not being overtaken again
                    self._pass_over(skipped)
                return  # the head may fit now: start again from it
            passed.append(entry)
        await self._wait_for_change(generation)

    async def _earlier_elsewhere(self, window: list[_Entry]) -> tuple[list[Waiter], set[str] | None]:
        """Other routers' waiters that rank before some of ``window`` (priority, then arrival) and may hold them
        back: not those that stayed there through ``max_defers`` fleet events (capacity came and they were not
        placed: stuck, say behind their router's admission), so nothing waits on another router for ever. Also the
        members of all of them read (held back or not); None when the board was not read."""
        ranks = [e.waiter.rank for e in window if e.waiter is not None]
        if self._board is None or not ranks:
            return [], None
        generation = self.events.generation if self.events is not None else 0
        step = int(generation != self._held_at)  # rounds woken by an arrival or the re-check do not count
        self._held_at = generation
        earlier = await self._board.earlier_elsewhere(max(ranks))
        if earlier is None:  # Redis did not answer: this router orders alone this round
            return [], None
        held = {w.member: self._held_back.get(w.member, 0) + step for w in earlier}
        self._held_back = held  # those placed or gone are forgotten
        return [w for w in earlier if held[w.member] <= self.options.max_defers], set(held)

    def _leave_board(self, entry: _Entry) -> None:
        """Take ``entry`` off the fleet's order, in the background (its answer does not wait for Redis)."""
        if self._board is None or entry.waiter is None:
            return
        task = asyncio.ensure_future(self._board.leave(entry.waiter))
        entry.waiter = None
        self._board_writes.add(task)
        task.add_done_callback(self._board_writes.discard)

    def _pass_over(self, entry: _Entry, times: int = 1) -> None:
        """``entry`` was overtaken ``times`` more. Reaching ``max_overtakes`` it is aged: nothing of this queue goes
        ahead of it any more, and on the fleet's board it ranks by its arrival alone from then on (with the most
        urgent level), so the waiters of other routers let it go first too (in the background)."""
        if times <= 0:
            return
        aged = entry.overtaken >= self.options.max_overtakes
        entry.overtaken += times
        if aged or entry.overtaken < self.options.max_overtakes or self._board is None or entry.waiter is None:
            return
        entry.waiter = replace(entry.waiter, priority=PRIORITY_MAX)
        task = asyncio.ensure_future(self._board.promote(entry.waiter))
        self._board_writes.add(task)
        task.add_done_callback(self._board_writes.discard)

    def _window(self) -> list[_Entry]:
        """The requests tried in one round: the head and up to ``skip_ahead`` behind it, ending at the first one that
        was overtaken ``max_overtakes`` times (nothing behind it goes first until it is placed)."""
        window = []
        for entry in islice(self._queue, self.options.skip_ahead + 1):
            window.append(entry)
            if entry.overtaken >= self.options.max_overtakes:
                break
        return window

    async def _settle(self, head: _Entry, result: ScheduleResult) -> bool:
        """Answer ``head`` with the result of an attempt when it is final; False leaves it in place to retry."""
        head.attempts += 1
        retries_left = not self.options.max_retries or head.attempts <= self.options.max_retries
        final = result.success or not result.code.retryable or not retries_left or (head.busy_only and not result.busy)
        if not final:
            return False
        self._remove(head)
        if head.future.cancelled():  # the client left while we scheduled: give the capacity back
            if result.success:
                await self.scheduler.release(head.request.request_id)
            return True
        self._answer(head, result, "scheduled" if result.success else "failed")
        return True  # the next head may fit too: try it at once

    async def _wait_for_change(self, since: int | None = None) -> None:
        """Until the fleet changes (after events generation ``since``), a request arrives or leaves (a smaller one
        may fit where those waiting do not), the next deadline or ``recheck_s``."""
        timeout = self.options.recheck_s
        if self._queue:
            timeout = max(0.0, min(timeout, min(e.deadline for e in self._queue) - self._clock()))
        if self.events is not None:
            change = asyncio.ensure_future(self.events.wait(timeout, since))
        else:
            change = asyncio.ensure_future(asyncio.sleep(timeout))
        arrival = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait((change, arrival), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (change, arrival):
                waiter.cancel()

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
        """Answer ``entry``, taken out of the queue already."""
        self.metrics.size.set(len(self._queue))
        waited = self._clock() - entry.enqueued
        self.metrics.wait_by(outcome).observe(waited)
        result.attempts = entry.attempts
        result.queue = QueueStay(waited * 1000, entry.position, len(self._queue) + 1)
        entry.answered = True
        self._leave_board(entry)
        if not entry.future.done():
            entry.future.set_result(result)

    def _remove(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(entry)
        self.metrics.size.set(len(self._queue))


def _held_back(entry: _Entry, earlier: list[Waiter], aged: bool) -> list[Waiter]:
    """The waiters elsewhere that go before ``entry``: those that rank before it (a higher priority, or the same and
    an earlier arrival) and are no larger (a larger one that finds no room holds back no smaller one, as in this
    router's own queue). An aged entry yields only to those of them that also arrived before it."""
    mine = entry.waiter
    if mine is None:
        return []
    size = _size(entry)
    return [
        w for w in earlier if w.rank < mine.rank and w.size <= size and (not aged or w.arrival_ms < mine.arrival_ms)
    ]


def _later(entry: _Entry, holders: list[Waiter]) -> set[str]:
    """The members of ``holders`` that go before ``entry`` by priority alone: they arrived after it."""
    mine = entry.waiter
    return {w.member for w in holders if mine is not None and w.arrival_ms >= mine.arrival_ms}


def _size(entry: _Entry) -> int:
    return entry.request.seq_len + entry.request.output_tokens


def _failure(code: ErrorCode, message: str) -> ScheduleResult:
    return ScheduleResult(success=False, code=code, message=f"{code.name}: {message}")
