"""Queue mode on a real redis-server: full, timeout, cancel, FIFO order, and wake-up by a release made through
another Redis client (another router), with the periodic re-check set far beyond the test so only the event can
wake the queue."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from flexlb.admission import AdmissionControl, AdmissionOptions
from flexlb.app import make_redis
from flexlb.domain import ErrorCode, Role, ScheduleRequest, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.metrics import SchedulerMetrics
from flexlb.queueing import QueueMetrics, QueueOptions, RequestQueue
from flexlb.routing import ChoiceMemory, StrategyName
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.state.events import FleetEvents
from flexlb.state.store import FleetStore
from flexlb.state.waiting import Waiter, WaitingBoard

W = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION, max_concurrency=1)
NEVER_S = 3600.0  # periodic re-check: longer than any test, so a wake-up can only come from an event


@pytest.fixture
async def other_router(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[FleetStore]:
    """The store of another router process: its own client, its own connection."""
    client = make_redis(redis_server.url, 1000)
    yield FleetStore(client, service)
    await client.aclose()


async def started_queue(
    client: Redis,
    service: str,
    admission: AdmissionControl | None = None,
    board: type[WaitingBoard] = WaitingBoard,
    **options: object,
) -> tuple[RequestQueue, FleetEvents]:
    """A started queue (and its fleet events, whose waiting board is a ``board``) of one router over worker W, with a
    one-slot scheduler whose view follows the change stream; the caller stops the three (:func:`stop_router`)."""
    store = FleetStore(client, service)
    await store.register_worker(W, WorkerStatus(kv_total=100_000))
    scheduler = Scheduler(
        store,
        SchedulerOptions(strategies=dict.fromkeys(Role, StrategyName.LOWEST_CONCURRENCY), retries=0),
        ChoiceMemory(rng=random.Random(1)),
        SchedulerMetrics(CollectorRegistry()),
    )
    events = FleetEvents(client, store.keys)
    events.waiting = board(client, store.keys)
    events.follow(scheduler.view_sync)  # as a router: woken by its tail of the change stream
    scheduler.view_sync.start()
    await asyncio.wait_for(scheduler.view_sync.connected.wait(), 5)
    queue = RequestQueue(
        scheduler,
        events,
        QueueOptions(**{"enabled": True, "recheck_s": NEVER_S, **options}),  # type: ignore[arg-type]
        QueueMetrics(CollectorRegistry()),
        admission,
    )
    queue.start()
    return queue, events


@pytest.fixture
async def make_queue(redis_server: EmbeddedRedis, service: str) -> AsyncIterator:
    made: list[tuple[RequestQueue, FleetEvents]] = []
    client = make_redis(redis_server.url, 1000)

    async def make(
        admission: AdmissionControl | None = None, board: type[WaitingBoard] = WaitingBoard, **options: object
    ) -> RequestQueue:
        queue, events = await started_queue(client, service, admission, board, **options)
        made.append((queue, events))
        return queue

    yield make
    for queue, events in made:
        await stop_router(queue, events)
    await client.aclose()


async def stop_router(queue: RequestQueue, events: FleetEvents) -> None:
    await queue.stop()
    await events.stop()
    await queue.scheduler.view_sync.stop()


def req(rid: int, timeout_ms: int = 60_000) -> ScheduleRequest:
    return ScheduleRequest(request_id=rid, seq_len=10, generate_timeout_ms=timeout_ms)


async def until_queued(queue: RequestQueue, n: int) -> None:
    async with asyncio.timeout(5):
        while len(queue) < n:
            await asyncio.sleep(0.005)


async def test_a_release_by_another_router_wakes_the_queue(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue()
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok  # the only slot, taken elsewhere
    waiting = asyncio.create_task(queue.schedule(req(1)))
    await until_queued(queue, 1)
    assert queue.snapshot()["entries"][0]["request_id"] == 1
    assert await other_router.release(100) == 1
    result = await asyncio.wait_for(waiting, 5)
    assert result.success and result.choices[Role.PDFUSION].worker.worker_id == W.worker_id
    assert len(queue) == 0


async def test_queued_requests_are_placed_in_arrival_order(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue()
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    waiting: dict[asyncio.Task, int] = {}
    for rid in (1, 2, 3):
        waiting[asyncio.create_task(queue.schedule(req(rid)))] = rid
        await until_queued(queue, rid)
    placed = []
    holder = 100
    while waiting:
        assert await other_router.release(holder) == 1  # frees the only slot: exactly one waiter gets it
        done, _ = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        (task,) = done
        assert task.result().success
        holder = waiting.pop(task)
        placed.append(holder)
    assert placed == [1, 2, 3]
    await other_router.release(holder)


async def test_a_full_queue_answers_queue_full_at_once(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue(max_size=1)
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    first = asyncio.create_task(queue.schedule(req(1)))
    await until_queued(queue, 1)
    result = await queue.schedule(req(2))
    assert result.code is ErrorCode.QUEUE_FULL and "queue full (1 requests waiting)" in result.message
    first.cancel()


class LosesOneCancellation(WaitingBoard):
    """A board whose first read of other routers' waiters blocks, then swallows the cancellation sent to it, as a
    redis-py read completing at the moment it is cancelled does on Python 3.11 (asyncio.timeout)."""

    reading = asyncio.Event()

    async def earlier_elsewhere(self, before_rank: int) -> list[Waiter] | None:
        if not self.reading.is_set():
            self.reading.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return []
        return await super().earlier_elsewhere(before_rank)


async def test_stop_ends_even_when_the_dispatcher_loses_a_cancellation(  # type: ignore[no-untyped-def]
    make_queue, other_router: FleetStore
) -> None:
    LosesOneCancellation.reading = asyncio.Event()
    queue = await make_queue(board=LosesOneCancellation)
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    waiting = asyncio.create_task(queue.schedule(req(1)))
    await asyncio.wait_for(LosesOneCancellation.reading.wait(), 5)  # the dispatcher is in the board's read
    stopping = asyncio.create_task(queue.stop())
    # not wait_for: cancelling a stop() that waits on the dispatcher would end it through the same suppress
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, "stop() waits for a dispatcher that lost its cancellation"
    assert (await asyncio.wait_for(waiting, 5)).code is ErrorCode.REQUEST_CANCELLED


async def test_a_request_times_out_in_the_queue(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue()
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    result = await asyncio.wait_for(queue.schedule(req(1, timeout_ms=300)), 5)
    assert result.code is ErrorCode.QUEUE_TIMEOUT and "in the queue" in result.message
    assert len(queue) == 0


async def test_a_cancelled_request_leaves_the_queue_and_the_next_one_gets_the_slot(  # type: ignore[no-untyped-def]
    make_queue, other_router: FleetStore
) -> None:
    queue = await make_queue()
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    gone = asyncio.create_task(queue.schedule(req(1)))
    await until_queued(queue, 1)
    stays = asyncio.create_task(queue.schedule(req(2)))
    await until_queued(queue, 2)
    gone.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert [e["request_id"] for e in queue.snapshot()["entries"]] == [2]
    await other_router.release(100)
    result = await asyncio.wait_for(stays, 5)
    assert result.success
    assert await other_router.request_workers(1) == []  # nothing was reserved for the request that left


async def test_without_queueing_a_full_fleet_fails_at_once(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue(enabled=False)
    assert (await other_router.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    result = await queue.schedule(req(1))
    assert result.code is ErrorCode.NO_PDFUSION_WORKER


async def test_admission_holds_requests_while_the_fleet_is_full_and_lets_one_in_per_release(make_queue) -> None:  # type: ignore[no-untyped-def]
    control = AdmissionControl(AdmissionOptions(min_permits=1, max_permits=2))
    queue = await make_queue(admission=control, admission_interval_s=0.0)
    unlimited = WorkerSpec(W.ip, W.http_port, W.role)  # no max_concurrency: only admission holds requests back
    await queue.scheduler.store.register_worker(unlimited, WorkerStatus(kv_total=100_000, kv_used=90_000))
    first = await queue.schedule(req(1))  # no water level known yet: admitted
    assert first.success
    second = asyncio.create_task(queue.schedule(req(2)))  # KV 90 % used: permits step down to 1, 1 in flight
    await until_queued(queue, 1)
    snapshot = queue.snapshot()
    assert snapshot["permits"] == 1 and snapshot["in_flight"] == 1 and snapshot["water_levels"]["decode"] == 100
    assert await queue.scheduler.release(1) == 1  # capacity back: the queued request gets in
    result = await asyncio.wait_for(second, 5)
    assert result.success
    await queue.scheduler.release(2)


def soft(rid: int, seq_len: int) -> ScheduleRequest:
    """A request admitted by estimated wait (the proxy's): its TTFT estimate must be within 1 s."""
    return ScheduleRequest(request_id=rid, seq_len=seq_len, ttft_bound_ms=1_000)


async def test_a_request_no_worker_can_take_now_does_not_hold_back_smaller_ones(make_queue) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: no head-of-line blocking. The head's prompt takes ~9 s to prefill anywhere (above the bound): it
    waits; a small request behind it is placed at once; then, overtaken max_overtakes times, the head is not
    overtaken again."""
    queue = await make_queue(max_overtakes=2)
    big = asyncio.create_task(queue.schedule(soft(1, 90_000), hold=True))
    await until_queued(queue, 1)
    for rid in (2, 3):
        small = await asyncio.wait_for(queue.schedule(soft(rid, 10), hold=True), 5)
        assert small.success, small.message
        await queue.scheduler.release(rid)
    assert not big.done() and [e["request_id"] for e in queue.snapshot()["entries"]] == [1]
    third = asyncio.create_task(queue.schedule(soft(4, 10), hold=True))
    await until_queued(queue, 2)
    await asyncio.sleep(0)  # a dispatcher round could run now: it must stop at the aged head
    assert not third.done() and [e["request_id"] for e in queue.snapshot()["entries"]] == [1, 4]
    big.cancel()
    result = await asyncio.wait_for(third, 5)  # the head left: the next one goes
    assert result.success
    assert len(queue) == 0
