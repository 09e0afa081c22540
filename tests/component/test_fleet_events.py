"""FleetEvents on a real redis-server: releases and master status writes wake a router's waiters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from flexlb.app import make_redis
from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.events import FleetEvents
from flexlb.state.store import FleetStore

W = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION)


@pytest.fixture
async def events(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[FleetEvents]:
    # the router's own client, with its 1 s socket timeout: the subscription must not trip over it
    client = make_redis(redis_server.url, 1000)
    fleet_events = FleetEvents(client, FleetStore(client, service).keys)
    fleet_events.start()
    await asyncio.wait_for(fleet_events.connected.wait(), 5)
    yield fleet_events
    await fleet_events.stop()
    await client.aclose()


async def test_a_release_wakes_waiters_and_a_reservation_does_not(events: FleetEvents, real_store: FleetStore) -> None:
    await real_store.register_worker(W)
    assert (await real_store.reserve(1, [(W.worker_id, 10)], 60_000)).ok
    assert not await events.wait(0.3)  # reserving frees nothing
    waiter = asyncio.create_task(events.wait(5))
    await asyncio.sleep(0)  # let the waiter start waiting before the release
    assert await real_store.release(1) == 1
    assert await waiter
    received = events.received
    assert await real_store.release(1) == 0  # nothing freed: nothing published
    assert not await events.wait(0.3) and events.received == received


async def test_a_master_status_write_wakes_waiters(
    events: FleetEvents, real_store: FleetStore, real_redis: aioredis.Redis
) -> None:
    await real_store.register_worker(W)
    await real_redis.set(real_store.keys.master_epoch, 3)
    waiter = asyncio.create_task(events.wait(5))
    await asyncio.sleep(0)
    await real_store.write_worker_status(3, W.worker_id, {"running": "0"})
    assert await waiter


async def test_the_subscription_outlives_idle_periods_longer_than_the_socket_timeout(
    events: FleetEvents, real_store: FleetStore
) -> None:
    await real_store.register_worker(W)
    assert not await events.wait(1.5)  # idle past the client's 1 s socket timeout
    assert events.connected.is_set()
    assert (await real_store.reserve(2, [(W.worker_id, 10)], 60_000)).ok
    waiter = asyncio.create_task(events.wait(5))
    await asyncio.sleep(0)
    await real_store.release(2)
    assert await waiter
