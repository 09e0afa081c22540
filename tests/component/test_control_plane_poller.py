"""A WorkerPoller polling a real simulated engine (the fleet's light gRPC server, over a socket) and writing to real
Redis: an idle worker is polled less and not written to, its first change brings the fast interval and a write back.
The poller's clock is a manual one and polls are driven one by one, so nothing here depends on timing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from flexlb.blocks import tokenize
from flexlb.domain import Role, WorkerSpec
from flexlb.master.poller import PollOptions, WorkerPoller
from flexlb.master.worker_client import WorkerStatusClient
from flexlb.metrics import MasterMetrics
from flexlb.ports import free_ports
from flexlb.sim.engine import EngineConfig
from flexlb.sim.fleet import SimFleet
from flexlb.state.store import FleetStore

EPOCH = 11
OPTIONS = PollOptions(status_interval_s=0.02, idle_interval_s=0.1, heartbeat_s=5.0)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    fleet = SimFleet(EngineConfig(role=Role.PDFUSION, kv_blocks=64), port=free_ports(2), count=1)
    await fleet.start()
    yield fleet
    await fleet.stop()


async def version(redis: aioredis.Redis, store: FleetStore, wid: str) -> int:
    return int(await redis.hget(store.keys.worker(wid), "status_version") or 0)


async def test_idle_worker_backs_off_without_writes_and_snaps_back_on_change(
    real_redis: aioredis.Redis, real_store: FleetStore, fleet: SimFleet
) -> None:
    w = fleet.workers[0]
    spec = WorkerSpec("127.0.0.1", w.http_port, Role.PDFUSION)
    await real_store.register_worker(spec)
    await real_redis.set(real_store.keys.master_epoch, EPOCH)
    clock = ManualClock()
    client = WorkerStatusClient.for_worker(spec)
    poller = WorkerPoller(spec, client, real_store, EPOCH, OPTIONS, MasterMetrics(CollectorRegistry()), clock)
    wid = spec.worker_id
    try:
        assert await poller.poll_once() is True  # the first reply is news
        assert poller.interval_s == OPTIONS.status_interval_s
        written = await version(real_redis, real_store, wid)

        intervals = []
        for _ in range(5):
            clock.now += poller.interval_s
            assert await poller.poll_once() is False
            intervals.append(poller.interval_s)
        assert intervals == [0.04, 0.08, 0.1, 0.1, 0.1]  # doubling up to idle_interval_s
        assert await version(real_redis, real_store, wid) == written  # nothing changed: nothing written

        clock.now += OPTIONS.heartbeat_s  # still idle, but a heartbeat is due: one write, interval unchanged
        assert await poller.poll_once() is False
        assert await version(real_redis, real_store, wid) == written + 1
        assert poller.interval_s == OPTIONS.idle_interval_s

        request = w.engine.submit(tokenize("a b c d"), 200)  # the worker's state changes
        clock.now += poller.interval_s
        assert await poller.poll_once() is True
        assert poller.interval_s == OPTIONS.status_interval_s
        assert await real_redis.hget(real_store.keys.worker(wid), "running") == "1"
        w.engine.cancel(request)
        clock.now += poller.interval_s
        assert await poller.poll_once() is True  # the end of the request is a change too
        assert await real_redis.hget(real_store.keys.worker(wid), "running") == "0"
    finally:
        await client.close()


async def test_failed_polls_back_off_and_mark_the_worker_down(
    real_redis: aioredis.Redis, real_store: FleetStore
) -> None:
    port = free_ports(2)  # nothing listens there
    spec = WorkerSpec("127.0.0.1", port, Role.DECODE)
    await real_store.register_worker(spec)
    await real_redis.set(real_store.keys.master_epoch, EPOCH)
    clock = ManualClock()
    client = WorkerStatusClient.for_worker(spec)
    poller = WorkerPoller(spec, client, real_store, EPOCH, OPTIONS, MasterMetrics(CollectorRegistry()), clock)
    try:
        intervals = []
        for _ in range(3):
            assert await poller.poll_once() is False
            intervals.append(poller.interval_s)
            clock.now += poller.interval_s
        assert intervals == [0.04, 0.08, 0.1]
        assert await real_redis.hget(real_store.keys.worker(spec.worker_id), "alive") == "0"
    finally:
        await client.close()
