"""Issue 13: the queue honours the original frontend's ``request_priority`` (the original FlexLB's levels: 1-100,
higher first, 50 when not given), then arrival, with aging so a low priority is not starved; across routers the
fleet's waiting board keeps the same order. A real redis-server; one worker with one slot, so each release lets
exactly one waiter in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from test_queueing import W, started_queue, stop_router

from flexlb.app import make_redis
from flexlb.domain import ScheduleRequest
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.queueing import RequestQueue, queue_priority
from flexlb.state.events import FleetEvents
from flexlb.state.store import FleetStore
from flexlb.state.waiting import RANK_SCALE, Waiter, WaitingBoard

HOLDER = 100  # the request that holds the only slot while the queue fills


@pytest.fixture
async def other_router(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[FleetStore]:
    client = make_redis(redis_server.url, 1000)
    yield FleetStore(client, service)
    await client.aclose()


@pytest.fixture
async def make_queue(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[Callable[..., Awaitable]]:
    """Factory: a router's queue (its own Redis client, fleet events and board: another router each call)."""
    made: list[tuple[RequestQueue, FleetEvents]] = []
    clients = []

    async def make(**options: object) -> RequestQueue:
        client = make_redis(redis_server.url, 1000)
        clients.append(client)
        queue, events = await started_queue(client, service, **options)
        made.append((queue, events))
        return queue

    yield make
    for queue, events in made:
        await stop_router(queue, events)
    for client in clients:
        await client.aclose()


def req(rid: int, priority: int = 0) -> ScheduleRequest:
    return ScheduleRequest(request_id=rid, seq_len=10, generate_timeout_ms=60_000, priority=priority)


def queued(queue: RequestQueue) -> list[int]:
    return [e["request_id"] for e in queue.snapshot()["entries"]]


async def until_queued(queue: RequestQueue, n: int) -> None:
    async with asyncio.timeout(5):
        while len(queue) < n:
            await asyncio.sleep(0.005)


async def serve_one_by_one(other_router: FleetStore, waiting: dict[asyncio.Task, int]) -> list[int]:
    """Release the only slot once per waiter (the holder's first, then each placed request's): the order placed."""
    placed, holder = [], HOLDER
    while waiting:
        assert await other_router.release(holder) == 1  # frees the only slot: exactly one waiter gets it
        done, _ = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, f"{len(done)} placed by one release (placed so far: {placed})"
        (task,) = done
        assert task.result().success, task.result().message
        holder = waiting.pop(task)
        placed.append(holder)
    await other_router.release(holder)
    return placed


async def fill(queue: RequestQueue, requests: list[ScheduleRequest], waiting: dict[asyncio.Task, int]) -> None:
    for request in requests:
        n = len(queue)
        waiting[asyncio.create_task(queue.schedule(request))] = request.request_id
        await until_queued(queue, n + 1)


def test_queue_priority_follows_the_original_levels() -> None:
    assert [queue_priority(p) for p in (1, 50, 100)] == [1, 50, 100]
    assert [queue_priority(p) for p in (0, -5, 101, 1 << 31)] == [50, 50, 50, 50]  # not given or invalid: default


def test_a_waiter_rank_orders_priority_first_then_arrival() -> None:
    urgent_late, urgent_early, normal_early = Waiter("a|1|9", 2_000, 9, 90), Waiter("a|2|9", 1_000, 9, 90), None
    normal_early = Waiter("b|3|9", 500, 9, 50)
    assert urgent_early.rank < urgent_late.rank < normal_early.rank
    back = Waiter.from_score("b|3|9", normal_early.rank)
    assert (back.priority, back.arrival_ms, back.size) == (50, 500, 9)
    assert Waiter.from_score("old|4|7", 1_700_000_000_000).priority == 100  # written before priorities: band 0
    assert normal_early.rank == 50 * RANK_SCALE + 500


async def test_three_waiters_are_placed_by_priority(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue()
    assert (await other_router.reserve(HOLDER, [(W.worker_id, 10)], 60_000)).ok  # the only slot, taken elsewhere
    waiting: dict[asyncio.Task, int] = {}
    await fill(queue, [req(1, priority=10), req(2, priority=50), req(3, priority=90)], waiting)
    assert queued(queue) == [3, 2, 1]
    assert [e["priority"] for e in queue.snapshot()["entries"]] == [90, 50, 10]
    assert await serve_one_by_one(other_router, waiting) == [3, 2, 1]


async def test_equal_priorities_keep_arrival_order(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    queue = await make_queue()
    assert (await other_router.reserve(HOLDER, [(W.worker_id, 10)], 60_000)).ok
    waiting: dict[asyncio.Task, int] = {}
    # 0 (not given) and 50 are the same level; 70 goes ahead of both, and 11, 12 keep their order behind 10
    await fill(queue, [req(10, 70), req(11), req(12, 50), req(13, 70), req(14)], waiting)
    assert queued(queue) == [10, 13, 11, 12, 14]
    assert await serve_one_by_one(other_router, waiting) == [10, 13, 11, 12, 14]


async def test_an_old_low_priority_request_is_not_starved(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    """Aging: a waiter passed over max_overtakes times by more urgent arrivals is not overtaken again; later urgent
    ones queue behind it."""
    queue = await make_queue(max_overtakes=2)
    assert (await other_router.reserve(HOLDER, [(W.worker_id, 10)], 60_000)).ok
    waiting: dict[asyncio.Task, int] = {}
    await fill(queue, [req(1, priority=1), req(2, priority=100), req(3, priority=100)], waiting)
    assert queued(queue) == [2, 3, 1]  # two overtakes: request 1 is aged
    await fill(queue, [req(4, priority=100), req(5, priority=100)], waiting)
    assert queued(queue) == [2, 3, 1, 4, 5]
    assert await serve_one_by_one(other_router, waiting) == [2, 3, 1, 4, 5]


async def test_a_more_urgent_waiter_of_another_router_goes_first(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    """The fleet's board orders by priority too: router A's waiters came first but at a low priority, router B's
    later at a high one; both queues wake on every release and B's are placed first."""
    a, b = await make_queue(), await make_queue()
    assert (await other_router.reserve(HOLDER, [(W.worker_id, 10)], 60_000)).ok
    waiting: dict[asyncio.Task, int] = {}
    await fill(a, [req(1, priority=10), req(2, priority=10)], waiting)
    await fill(b, [req(3, priority=90), req(4, priority=90)], waiting)
    assert await serve_one_by_one(other_router, waiting) == [3, 4, 1, 2]


async def test_across_routers_an_old_low_priority_waiter_is_not_starved(make_queue, other_router: FleetStore) -> None:  # type: ignore[no-untyped-def]
    """Router A's low-priority waiter yields to router B's more urgent later ones; each placed while it yielded
    counts as an overtake, and once aged it yields only to earlier arrivals: B's later urgent waiters go after it."""
    a, b = await make_queue(max_overtakes=2), await make_queue()
    assert (await other_router.reserve(HOLDER, [(W.worker_id, 10)], 60_000)).ok
    waiting: dict[asyncio.Task, int] = {}
    await fill(a, [req(1, priority=1)], waiting)
    await fill(b, [req(2, priority=100), req(3, priority=100), req(4, priority=100), req(5, priority=100)], waiting)
    placed = await serve_one_by_one(other_router, waiting)
    assert placed.index(1) <= 3, placed  # at most two of B's (max_overtakes) and the one it saw placed last
    assert placed[:2] == [2, 3]


async def test_the_board_returns_waiters_that_rank_before(redis_server: EmbeddedRedis, service: str) -> None:
    client = make_redis(redis_server.url, 1000)
    try:
        keys = FleetStore(client, service).keys
        mine, theirs = WaitingBoard(client, keys, "mine"), WaitingBoard(client, keys, "theirs")
        low = await theirs.enter(1, 10, priority=10)
        me = await mine.enter(2, 10, priority=50)
        high = await theirs.enter(3, 10, priority=90)
        assert low is not None and me is not None and high is not None
        assert low.arrival_ms <= me.arrival_ms <= high.arrival_ms
        before = await mine.earlier_elsewhere(me.rank)
        assert [(w.member, w.priority, w.arrival_ms) for w in before] == [(high.member, 90, high.arrival_ms)]
        assert [w.member for w in await mine.earlier_elsewhere(low.rank + 1)] == [high.member, low.member]
        with pytest.raises(ValueError):
            await mine.enter(4, 10, priority=0)
        for board, waiter in ((theirs, low), (mine, me), (theirs, high)):
            await board.leave(waiter)
        await mine.stop()
        await theirs.stop()
    finally:
        await client.aclose()
