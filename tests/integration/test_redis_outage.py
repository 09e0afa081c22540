"""Redis stops and comes back under a running router: degraded mode, then STATE_UNAVAILABLE, then recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore

STALENESS_MS = 1500


@pytest.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of this test alone, with an append-only file so a restart keeps the fleet's state."""
    server = EmbeddedRedis(persist=True).start()
    yield server
    server.close()


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


async def test_router_degrades_then_refuses_then_recovers(start_router, own_redis: EmbeddedRedis, service: str) -> None:
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    store = FleetStore(client, service)
    for spec in (WorkerSpec("10.4.0.1", 8000, Role.PREFILL, max_concurrency=2),
                 WorkerSpec("10.4.0.2", 8000, Role.DECODE, max_concurrency=2)):  # fmt: skip
        await store.register_worker(spec, WorkerStatus(kv_total=100_000))
    await client.aclose()
    router = start_router(
        {"degradedMaxStalenessMs": STALENESS_MS, "redisTimeoutMs": 300, "reservationTtlMs": 600_000},
        redis_url=own_redis.url,
    )

    async with aiohttp.ClientSession() as http:

        async def schedule(rid: int) -> tuple[int, dict]:
            async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": rid, "seq_len": 32}) as r:
                return r.status, await r.json()

        async def release(rid: int) -> dict:
            async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as r:
                assert r.status == 200
                return await r.json()

        async def metric(name: str) -> float:
            async with http.get(f"{router.url}/metrics") as r:
                text = await r.text()
            return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

        # phase 1, shared: request 1 holds one of each worker's two slots in Redis
        status, body = await schedule(1)
        assert status == 200 and body["degraded"] is False
        assert {s["debug_info"]["degraded"] for s in body["server_status"]} == {False}

        # phase 2, Redis down: scheduled from the last snapshot plus the router's own in-flight load
        own_redis.stop()
        status, body = await schedule(2)
        assert status == 200 and body["degraded"] is True, body
        assert {s["debug_info"]["degraded"] for s in body["server_status"]} == {True}
        status, body = await schedule(3)  # request 1 (in the snapshot) + request 2 (local) fill both slots
        assert status == 503 and body["code"] in (8402, 8403), body
        assert "at their concurrency or KV limit" in body["error_message"]
        assert await metric("flexlb_degraded_schedules_total") == 1
        assert await metric("flexlb_redis_up") == 0
        assert "degraded mode" in router.log()
        assert (await release(1))["released"] == 0  # not written yet: Redis is away, retried later
        assert (await release(2))["released"] == 2  # local reservations: one prefill, one decode

        # phase 3: the snapshot grows older than the bound: refuse clearly, and /health says so
        async def unavailable() -> dict | None:
            status, body = await schedule(4)
            if status == 200:  # still inside the bound: give it back and ask again
                await release(4)
            return body if status == 503 and body["code"] == 8600 else None

        body = await poll(unavailable, "STATE_UNAVAILABLE after the staleness bound")
        assert "Redis is unreachable" in body["error_message"] and "old" in body["error_message"]
        async with http.get(f"{router.url}/health") as r:
            assert r.status == 503 and (await r.json())["redis_up"] is False

        # phase 4: Redis back on the same port with its data: shared scheduling resumes by itself, and the
        # release of request 1 that Redis missed is written, so both slots are free again
        own_redis.start()

        async def shared_again() -> dict | None:
            status, body = await schedule(5)
            return body if status == 200 and body["degraded"] is False else None

        await poll(shared_again, "shared scheduling after Redis restarted")
        status, body = await schedule(6)
        async with http.get(f"{router.url}/health") as r:
            assert r.status == 200 and (await r.json())["redis_up"] is True
        assert await metric("flexlb_redis_up") == 1
        assert "shared scheduling resumed" in router.log()
