"""FleetEvents on a real redis-server: a router's waiters wake when its tail of the change stream sees capacity
come back (a release or an expiry by any router, a master status write, a registration), not on a reservation."""

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
from flexlb.state.view import FleetView
from flexlb.state.view_sync import ViewSync

W = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION)
QUIET_S = 0.3  # no event expected: how long the tests wait to be sure


@pytest.fixture
async def events(redis_server: EmbeddedRedis, service: str) -> AsyncIterator[FleetEvents]:
    # a router's own client (1 s socket timeout) and tail; the tests write through another client (another router)
    client = make_redis(redis_server.url, 1000)
    view_sync = ViewSync(FleetStore(client, service), FleetView())
    fleet_events = FleetEvents(client, view_sync.store.keys)
    fleet_events.follow(view_sync)
    view_sync.start()
    await asyncio.wait_for(view_sync.connected.wait(), 5)
    yield fleet_events
    await fleet_events.stop()
    await view_sync.stop()
    await client.aclose()


async def settled(events: FleetEvents) -> int:
    """The generation once the entries written so far have been applied (their wake-ups, if any, are over)."""
    while await events.wait(QUIET_S):
        pass
    return events.generation


async def test_a_release_wakes_waiters_and_a_reservation_does_not(events: FleetEvents, real_store: FleetStore) -> None:
    await real_store.register_worker(W)
    await settled(events)
    assert (await real_store.reserve(1, [(W.worker_id, 10)], 60_000)).ok
    assert not await events.wait(QUIET_S)  # reserving frees nothing
    since = events.generation
    assert await real_store.release(1) == 1
    assert await events.wait(5, since)
    since = await settled(events)
    assert await real_store.release(1) == 0  # nothing freed: no entry, no wake-up
    assert not await events.wait(QUIET_S, since)


async def test_a_master_status_write_and_a_registration_wake_waiters(
    events: FleetEvents, real_store: FleetStore, real_redis: aioredis.Redis
) -> None:
    since = events.generation
    await real_store.register_worker(W)
    assert await events.wait(5, since)
    since = await settled(events)
    await real_redis.set(real_store.keys.master_epoch, 3)
    await real_store.write_worker_status(3, W.worker_id, {"running": "0"})
    assert await events.wait(5, since)


async def test_an_expiry_found_by_a_reservation_wakes_waiters(events: FleetEvents, real_store: FleetStore) -> None:
    other = WorkerSpec("10.0.0.2", 8000, Role.PDFUSION)
    await real_store.register_worker(W)
    await real_store.register_worker(other)
    assert (await real_store.reserve(1, [(W.worker_id, 10)], ttl_ms=1)).ok
    since = await settled(events)
    # request 2 on W finds request 1 overdue (its check is due: the TTL of 1 ms made it so) and gives its load back
    assert (await real_store.reserve(2, [(W.worker_id, 5)], 60_000)).ok
    assert await events.wait(5, since)


async def test_waiters_wake_after_idle_periods_longer_than_the_socket_timeout(
    events: FleetEvents, real_store: FleetStore
) -> None:
    await real_store.register_worker(W)
    await settled(events)
    assert (await real_store.reserve(2, [(W.worker_id, 10)], 60_000)).ok
    await asyncio.sleep(1.5)  # idle past the client's 1 s socket timeout (the duration is the point, not a sync)
    since = events.generation
    await real_store.release(2)
    assert await events.wait(5, since)
