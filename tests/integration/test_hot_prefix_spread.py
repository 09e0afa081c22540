"""Issue 11: a hot prefix spreads by cost. One real router (SHORTEST_TTFT) over a real redis-server and 3 equal
prefill workers, the first of which holds a long hot prefix. Requests of that prefix sent one at a time (each
released before the next) all go to the worker that holds it; sent at once, faster than that worker can serve, its
queue (the fleet's reservations on it) makes recomputing the prefix on another worker faster, and a second worker
gets some of them (the cached worker still takes the most)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from conftest import RouterProcess

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore

WORKERS = [WorkerSpec(f"10.12.0.{i}", 8000, Role.PDFUSION) for i in range(1, 4)]
HOT = WORKERS[0].worker_id
BLOCK, PREFIX_BLOCKS = 64, 32  # a 2048-token hot prefix: 205 ms to recompute at 10 tokens/ms
STATUS = WorkerStatus(kv_total=10_000_000, block_size=BLOCK, prefill_tokens_per_ms=10.0)
# statuses written once by the test, no engine behind them: no freshness bound, no health checks
CONFIG = {"workerStatusMaxAgeMs": 0, "healthCheckIntervalMs": 600_000}
BURST = 60


async def test_a_hot_prefix_stays_on_its_worker_at_a_low_rate_and_spreads_at_a_high_one(
    redis_server: EmbeddedRedis, real_redis: aioredis.Redis
) -> None:
    store = FleetStore(real_redis, f"hot{uuid.uuid4().hex[:10]}")
    for spec in WORKERS:
        await store.register_worker(spec, STATUS)
    rng = random.Random(11)
    prefix = [rng.getrandbits(62) for _ in range(PREFIX_BLOCKS)]
    await store.set_cache_blocks(HOT, prefix)
    router = RouterProcess(redis_server.url, store.keys.service, CONFIG).wait_ready()
    try:
        async with aiohttp.ClientSession() as http:

            async def schedule(rid: int) -> str:
                keys = [*prefix, rng.getrandbits(62)]  # the hot prefix and a block of its own
                body = {"request_id": rid, "seq_len": len(keys) * BLOCK, "block_cache_keys": keys}
                async with http.post(f"{router.url}/rtp_llm/schedule", data=orjson.dumps(body)) as resp:
                    answer: dict[str, Any] = orjson.loads(await resp.read())
                assert answer["success"], answer
                chosen = answer["server_status"][0]
                return f"{chosen['server_ip']}:{chosen['http_port']}"

            async def release(rid: int) -> None:
                async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as resp:
                    assert resp.status == 200

            slow = []
            for rid in range(1, 13):  # one at a time: each is done before the next arrives
                slow.append(await schedule(rid))
                await release(rid)
            assert set(slow) == {HOT}, f"at a low rate the hot prefix left its worker: {Counter(slow)}"

            fast = Counter(await asyncio.gather(*(schedule(100 + i) for i in range(BURST))))
            await asyncio.gather(*(release(100 + i) for i in range(BURST)))
    finally:
        router.stop()
    assert len(fast) >= 2, f"a burst of {BURST} stayed on the hot prefix's worker: {fast}"
    assert fast.most_common(1)[0][0] == HOT, fast  # recomputing is the exception, not the rule
