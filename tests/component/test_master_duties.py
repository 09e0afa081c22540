"""MasterDuties on real Redis against a simulated engine's real gRPC status service (in-process, over a socket):
a corrupt worker entry does not stop the polling of the others, and a newer epoch stops the term's duties."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from conftest import eventually
from prometheus_client import CollectorRegistry

from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import free_port
from flexlb.master.poller import MasterDuties, PollOptions
from flexlb.metrics import MasterMetrics
from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.grpc_service import start_grpc_server
from flexlb.state.store import FleetStore

EPOCH = 7
KV_BLOCKS = 32


@pytest.fixture
async def worker_spec() -> AsyncIterator[WorkerSpec]:
    """A simulated engine's status gRPC on a real port; the spec's grpc_port points at it."""
    engine = SimEngine(EngineConfig(role=Role.PDFUSION, kv_blocks=KV_BLOCKS))
    port = free_port()
    server = await start_grpc_server(engine, "127.0.0.1", port)
    yield WorkerSpec("127.0.0.1", port - 1, Role.PDFUSION, grpc_port=port)
    await server.stop(None)


async def start_duties(store: FleetStore) -> asyncio.Task[None]:
    await store.redis.set(store.keys.master_epoch, EPOCH)
    duties = MasterDuties(store, PollOptions(membership_interval_s=0.05), MasterMetrics(CollectorRegistry()))
    return asyncio.create_task(duties.run(EPOCH))


async def test_a_corrupt_worker_entry_does_not_stop_polling_the_others(
    real_redis: aioredis.Redis, real_store: FleetStore, worker_spec: WorkerSpec
) -> None:
    await real_store.register_worker(worker_spec)
    bad = "127.0.0.1:1"  # written by hand with a role flexlb does not know
    await real_redis.hset(real_store.keys.worker(bad), mapping={"role": "BOGUS", "alive": "1"})
    await real_redis.sadd(real_store.keys.role_set(Role.PREFILL), bad)
    await real_redis.incr(real_store.keys.members_version)
    task = await start_duties(real_store)
    try:

        async def polled() -> bool:
            h = await real_redis.hgetall(real_store.keys.worker(worker_spec.worker_id))
            return h.get("kv_total") == str(KV_BLOCKS * 64)

        await eventually(polled, "the good worker polled despite the corrupt entry")
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_newer_master_epoch_ends_the_duties(
    real_redis: aioredis.Redis, real_store: FleetStore, worker_spec: WorkerSpec
) -> None:
    await real_store.register_worker(worker_spec)
    task = await start_duties(real_store)

    async def polled() -> bool:
        return await real_redis.hget(real_store.keys.worker(worker_spec.worker_id), "kv_total") == str(KV_BLOCKS * 64)

    await eventually(polled, "first status write")
    await real_redis.incr(real_store.keys.master_epoch)  # another process won the lock meanwhile
    await real_store.update_status(worker_spec.worker_id, {"running": 5})  # the next poll's write differs: refused
    await asyncio.wait_for(task, timeout=10)  # returns by itself: no cancellation needed
    assert (await real_redis.hget(real_store.keys.worker(worker_spec.worker_id), "running")) == "5"
