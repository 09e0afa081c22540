"""What a router does at shutdown, piece by piece on a real redis-server: the queue answers what waits and settles an
attempt under way, a release outlives its cancelled caller, and the HTTP drain cancels only what outlives the
deadline."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from flexlb.app import make_redis
from flexlb.domain import ErrorCode, Role, ScheduleRequest, ScheduleResult, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.http.drain import InFlightRequests
from flexlb.metrics import SchedulerMetrics
from flexlb.queueing import QueueMetrics, QueueOptions, RequestQueue
from flexlb.routing import ChoiceMemory, StrategyName
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.state.events import FleetEvents
from flexlb.state.store import FleetStore

W = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION, max_concurrency=1)


class GatedScheduler(Scheduler):
    """A scheduler whose attempts wait at a gate once it is closed, to stop the queue in the middle of one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def schedule(self, request: ScheduleRequest) -> ScheduleResult:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await super().schedule(request)


@pytest.fixture
async def fleet(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[tuple[FleetStore, FleetStore]]:
    """This router's store and another router's (its own client), with one worker of one slot registered."""
    mine, other = make_redis(redis_server.url, 1000), make_redis(redis_server.url, 1000)
    store = FleetStore(mine, service)
    await store.register_worker(W, WorkerStatus(kv_total=100_000))
    yield store, FleetStore(other, service)
    await mine.aclose()
    await other.aclose()


def scheduler_on(store: FleetStore) -> GatedScheduler:
    return GatedScheduler(
        store,
        SchedulerOptions(strategies=dict.fromkeys(Role, StrategyName.LOWEST_CONCURRENCY), retries=0),
        ChoiceMemory(rng=random.Random(1)),
        SchedulerMetrics(CollectorRegistry()),
    )


def req(rid: int) -> ScheduleRequest:
    return ScheduleRequest(request_id=rid, seq_len=10, generate_timeout_ms=60_000)


async def until(check: Any, what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"{what}: not within 5s") from None


async def test_stop_answers_the_queue_and_then_refuses_to_queue(fleet: tuple[FleetStore, FleetStore]) -> None:
    store, other = fleet
    queue = RequestQueue(scheduler_on(store), None, QueueOptions(enabled=True), QueueMetrics(CollectorRegistry()))
    queue.start()
    assert (await other.reserve(100, [(W.worker_id, 10)], 60_000)).ok  # the only slot, taken elsewhere
    waiting = asyncio.create_task(queue.schedule(req(1)))
    await until(lambda: len(queue) == 1, "queued")
    await queue.stop()
    assert (await waiting).code is ErrorCode.REQUEST_CANCELLED
    late = await queue.schedule(req(2))  # finds no capacity: nothing would ever try it again
    assert late.code is ErrorCode.REQUEST_CANCELLED and "shutting down" in late.message and len(queue) == 0
    await other.release(100)


async def test_stop_in_the_middle_of_an_attempt_answers_its_reservation(fleet: tuple[FleetStore, FleetStore]) -> None:
    store, other = fleet
    scheduler = scheduler_on(store)
    events = FleetEvents(store.redis, store.keys)
    events.follow(scheduler.view_sync)
    scheduler.view_sync.start()
    await asyncio.wait_for(scheduler.view_sync.connected.wait(), 5)
    queue = RequestQueue(scheduler, events, QueueOptions(enabled=True), QueueMetrics(CollectorRegistry()))
    queue.start()
    assert (await other.reserve(100, [(W.worker_id, 10)], 60_000)).ok
    waiting = asyncio.create_task(queue.schedule(req(1)))
    await until(lambda: len(queue) == 1, "queued")
    scheduler.gate.clear()
    assert await other.release(100) == 1  # wakes the dispatcher, whose attempt then waits at the gate
    await asyncio.wait_for(scheduler.waiting.wait(), 5)
    stopping = asyncio.create_task(queue.stop())
    await until(lambda: queue._task is None, "dispatcher cancelled")
    scheduler.gate.set()  # the attempt goes on and reserves: stop() must hand that to the request, not drop it
    await stopping
    result = await waiting
    assert result.success and result.choices[Role.PDFUSION].worker.worker_id == W.worker_id
    assert await scheduler.release(1) == 1
    await events.stop()
    await scheduler.view_sync.stop()


async def test_a_release_whose_caller_is_cancelled_still_reaches_redis(fleet: tuple[FleetStore, FleetStore]) -> None:
    store, _ = fleet
    scheduler = scheduler_on(store)
    assert (await scheduler.schedule(req(7))).success
    caller = asyncio.create_task(scheduler.release(7))
    await asyncio.sleep(0)  # let the caller start its release
    caller.cancel()  # a client gone, or a handler cancelled at shutdown
    with pytest.raises(asyncio.CancelledError):
        await caller
    await scheduler.finish_releases()  # what the router does before it closes its Redis client
    assert await store.redis.zcard(store.keys.reservations(W.worker_id)) == 0
    assert await store.release(7) == 0  # nothing left to release


async def test_drain_waits_for_requests_up_to_the_deadline_then_cancels_the_rest() -> None:
    in_flight = InFlightRequests()
    assert await in_flight.drain(30.0) == 0  # nothing in flight: at once
    quick_done, unwound = asyncio.Event(), []

    async def quick(request: Any) -> web.StreamResponse:
        await quick_done.wait()
        return web.Response(text="quick")

    async def slow(request: Any) -> web.StreamResponse:
        try:
            await asyncio.Event().wait()
        finally:
            unwound.append("slow")  # a handler's finally block (the proxy releases its reservation there)
        raise AssertionError("unreachable")

    handlers = [asyncio.create_task(in_flight.middleware(None, h)) for h in (quick, slow)]  # type: ignore[arg-type]
    await until(lambda: len(in_flight) == 2, "both in flight")
    draining = asyncio.create_task(in_flight.drain(0.5))
    quick_done.set()  # finishes within the deadline: answered, not cancelled
    assert (await handlers[0]).text == "quick"
    assert await draining == 1
    assert handlers[1].cancelled() and unwound == ["slow"] and len(in_flight) == 0
