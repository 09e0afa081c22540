"""A router killed with SIGKILL while holding reservations: after their TTL the fleet gets the load back."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import redis.asyncio as aioredis

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

TTL_MS = 1500


async def test_reservations_of_a_killed_router_expire_and_their_load_comes_back(
    start_router, real_redis: aioredis.Redis, service: str
) -> None:
    store = FleetStore(real_redis, service)
    prefill = WorkerSpec("10.3.0.1", 8000, Role.PREFILL, max_concurrency=3)
    decode = WorkerSpec("10.3.0.2", 8000, Role.DECODE, max_concurrency=3)
    for spec in (prefill, decode):
        await store.register_worker(spec, WorkerStatus(kv_total=100_000))
    doomed = start_router({"reservationTtlMs": TTL_MS})
    survivor = start_router({"reservationTtlMs": TTL_MS})

    async with aiohttp.ClientSession() as session:
        for rid in (1, 2, 3):
            async with session.post(f"{doomed.url}/rtp_llm/schedule", json={"request_id": rid, "seq_len": 64}) as r:
                assert (await r.json())["success"]
        # the fleet is full: the survivor must refuse while the dead router's reservations hold
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        async with session.post(f"{survivor.url}/rtp_llm/schedule", json={"request_id": 4, "seq_len": 64}) as r:
            assert r.status == 503 and (await r.json())["code"] in (8402, 8403)
    assert await real_redis.hget(store.keys.worker(prefill.worker_id), "pending_count") == "3"

    # nobody schedules now: the survivor's periodic sweep alone must give the load back
    deadline = time.monotonic() + TTL_MS / 1000 + 10
    while time.monotonic() < deadline:
        counts = [await real_redis.hget(store.keys.worker(w.worker_id), "pending_count") for w in (prefill, decode)]
        if counts == ["0", "0"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"reservations of the killed router still counted: {counts}")
    for spec in (prefill, decode):
        assert await real_redis.hget(store.keys.worker(spec.worker_id), "pending_tokens") == "0"
        assert await real_redis.zcard(store.keys.reservations(spec.worker_id)) == 0

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{survivor.url}/rtp_llm/schedule", json={"request_id": 5, "seq_len": 64}) as r:
            assert (await r.json())["success"]
