"""ViewSync on a real redis-server: the view follows the change stream, and reads the fleet again after a gap
(trimmed stream) or a Redis restart that lost everything."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from conftest import eventually
from prometheus_client import CollectorRegistry

from flexlb.app import make_redis
from flexlb.domain import Role, ScheduleRequest, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.metrics import SchedulerMetrics
from flexlb.routing import ChoiceMemory, StrategyName
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.state.store import FleetStore
from flexlb.state.view import FleetView
from flexlb.state.view_sync import ViewSync

P1 = WorkerSpec("10.0.0.1", 8000, Role.PREFILL, max_concurrency=4)
P2 = WorkerSpec("10.0.0.2", 8000, Role.PREFILL)
D1 = WorkerSpec("10.0.0.3", 8000, Role.DECODE)


def pending(view: FleetView, spec: WorkerSpec) -> tuple[int, int] | None:
    v = view.get(spec.worker_id)
    return None if v is None else (v.pending_count, v.pending_tokens)


async def test_the_view_follows_registrations_status_reservations_and_removals(real_store: FleetStore) -> None:
    await real_store.register_worker(P1, WorkerStatus(kv_total=1000))
    view = FleetView()
    sync = ViewSync(real_store, view, block_ms=100)
    sync.start()
    try:
        await asyncio.wait_for(sync.connected.wait(), 5)
        assert view.ids(Role.PREFILL) == [P1.worker_id]
        other = FleetStore(real_store.redis, real_store.keys.service)  # another router / the admin API
        await other.register_worker(D1, WorkerStatus(kv_total=1000))
        await other.update_status(P1.worker_id, {"running": 2})
        assert (await other.reserve(7, [(P1.worker_id, 100), (D1.worker_id, 30)], 60_000)).ok
        await eventually(lambda: _async(pending(view, D1) == (1, 30)), "D1's reservation in the view")
        p1 = view.get(P1.worker_id)
        assert p1 is not None and p1.status.running == 2 and (p1.pending_count, p1.pending_tokens) == (1, 100)
        assert await other.release(7) == 2
        await eventually(lambda: _async(pending(view, P1) == (0, 0)), "the release in the view")
        assert await other.remove_worker(D1.worker_id)
        await eventually(lambda: _async(view.get(D1.worker_id) is None), "D1's removal in the view")
        assert sync.resyncs == 1  # one full read at start; everything else came from the stream
    finally:
        await sync.stop()


async def test_a_trimmed_stream_makes_the_reader_read_the_fleet_again(real_store: FleetStore) -> None:
    await real_store.register_worker(P1, WorkerStatus())
    view = FleetView()
    sync = ViewSync(real_store, view)
    await sync.catch_up()
    assert sync.resyncs == 1 and view.ids(Role.PREFILL) == [P1.worker_id]
    # the reader falls behind: changes are made and trimmed away before it reads them
    await real_store.register_worker(P2, WorkerStatus())
    await real_store.update_status(P1.worker_id, {"waiting": 5})
    await real_store.redis.xtrim(real_store.keys.changes, maxlen=1, approximate=False)
    await sync.catch_up()
    assert sync.resyncs == 2
    assert view.ids(Role.PREFILL) == [P1.worker_id, P2.worker_id]
    p1 = view.get(P1.worker_id)
    assert p1 is not None and p1.status.waiting == 5
    # and it follows the stream again from there
    await real_store.update_status(P2.worker_id, {"running": 3})
    assert await sync.catch_up() == 1
    p2 = view.get(P2.worker_id)
    assert p2 is not None and p2.status.running == 3 and sync.resyncs == 2


@pytest.fixture
async def restartable() -> AsyncIterator[tuple[EmbeddedRedis, aioredis.Redis]]:
    server = EmbeddedRedis(port=free_port()).start()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    yield server, client
    await client.aclose()
    server.close()


async def test_after_redis_restarts_empty_the_tail_reads_the_fleet_again(
    restartable: tuple[EmbeddedRedis, aioredis.Redis], service: str
) -> None:
    server, client = restartable
    store = FleetStore(client, service)
    await store.register_worker(P1, WorkerStatus())
    await store.register_worker(P2, WorkerStatus())
    view = FleetView()
    sync = ViewSync(store, view, block_ms=100)
    sync.start()
    try:
        await asyncio.wait_for(sync.connected.wait(), 5)
        assert len(view) == 2
        server.stop()
        await eventually(lambda: _async(not sync.connected.is_set()), "the tail noticing Redis is gone")
        assert len(view) == 2  # the view is kept (degraded mode decides from it) while Redis is away
        server.start()
        # Redis came back empty, and one worker registers again (a static one, say): the view shows it, and the
        # workers Redis lost are registered again from the view (issue 10: API registrations exist nowhere else)
        await store.register_worker(D1, WorkerStatus())
        await eventually(lambda: _async(view.ids(Role.DECODE) == [D1.worker_id]), "D1 after the restart")
        await eventually(lambda: _async(len(view) == 3), "the lost workers back in the view")
        assert sorted(v.worker_id for v in await store.list_workers()) == sorted(w.worker_id for w in (P1, P2, D1)), (
            "registered again in Redis"
        )
        assert sync.resyncs >= 2
    finally:
        await sync.stop()


async def _async(value: object) -> object:
    return value


async def test_while_redis_is_away_degraded_decisions_keep_the_cache_hits_the_block_mirror_held(
    restartable: tuple[EmbeddedRedis, aioredis.Redis], service: str
) -> None:
    server, _ = restartable
    client = make_redis(server.url, 300)  # fails fast, as a router's does
    store = FleetStore(client, service)
    busy, idle = WorkerSpec("10.0.0.8", 8000, Role.PREFILL), WorkerSpec("10.0.0.9", 8000, Role.PREFILL)
    prefix = list(range(1, 41))  # 40 blocks of 64 tokens: the hit saves far more than one running request costs
    await store.register_worker(busy, WorkerStatus(kv_total=100_000, running=1))
    await store.register_worker(idle, WorkerStatus(kv_total=100_000))
    await store.set_cache_blocks(busy.worker_id, prefix)
    scheduler = Scheduler(
        store,
        SchedulerOptions(strategies=dict.fromkeys(Role, StrategyName.SHORTEST_TTFT), roles=(Role.PREFILL,)),
        ChoiceMemory(rng=random.Random(1)),
        SchedulerMetrics(CollectorRegistry()),
    )
    request = ScheduleRequest(request_id=1, seq_len=len(prefix) * 64 + 10, block_cache_keys=prefix)
    try:
        shared = await scheduler.schedule(request)
        assert (
            shared.success and not shared.degraded and shared.choices[Role.PREFILL].worker.worker_id == busy.worker_id
        )
        await scheduler.release(1)
        server.stop()
        degraded = await scheduler.schedule(dataclasses.replace(request, request_id=2))
        assert degraded.success and degraded.degraded, degraded.message
        # without the mirror's hits the idle worker would win: nothing else tells them apart
        assert degraded.choices[Role.PREFILL].worker.worker_id == busy.worker_id
    finally:
        await client.aclose()
