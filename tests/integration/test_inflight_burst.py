"""Issue 11: a burst of one new prefix, sent at once through 2 real router processes onto 4 equal prefill workers,
lands on one worker: the first reservation puts the prompt's blocks in flight there and the others find them (or are
told their new prefix moved and decide again). The control run, with in-flight prefixes off, spreads the burst."""

from __future__ import annotations

import asyncio
import random
import uuid

import aiohttp
import orjson
import redis.asyncio as aioredis
from conftest import RouterProcess

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore

WORKERS = [WorkerSpec(f"10.11.0.{i}", 8000, Role.PREFILL) for i in range(1, 5)]
SEQ_LEN, BLOCK = 8192, 64  # a long prompt: its prefill dwarfs the per-request overhead of waiting behind it
STATUS = WorkerStatus(kv_total=10_000_000, block_size=BLOCK, prefill_tokens_per_ms=10.0)
# statuses written once by the test, no engine behind them: no freshness bound, no health checks
BASE_CONFIG = {"workerStatusMaxAgeMs": 0, "healthCheckIntervalMs": 600_000}


async def burst_targets(redis_url: str, real_redis: aioredis.Redis, inflight_ttl_ms: int) -> list[str]:
    service = f"burst{uuid.uuid4().hex[:10]}"
    store = FleetStore(real_redis, service)
    for spec in WORKERS:
        await store.register_worker(spec, STATUS)
    config = {**BASE_CONFIG, "inflightPrefixTtlMs": inflight_ttl_ms}
    routers = [RouterProcess(redis_url, service, config) for _ in range(2)]
    try:
        for router in routers:
            router.wait_ready()
        rng = random.Random(inflight_ttl_ms)
        blocks = [rng.getrandbits(62) for _ in range(SEQ_LEN // BLOCK)]  # a prefix no worker has seen
        async with aiohttp.ClientSession() as http:

            async def schedule(i: int) -> dict:
                body = {"request_id": 100 + i, "seq_len": SEQ_LEN, "block_cache_keys": blocks}
                url = f"{routers[i % 2].url}/rtp_llm/schedule"
                async with http.post(url, data=orjson.dumps(body)) as resp:
                    return orjson.loads(await resp.read())

            answers = await asyncio.gather(*(schedule(i) for i in range(8)))
        assert all(a["success"] for a in answers), answers
        return [f"{a['server_status'][0]['server_ip']}:{a['server_status'][0]['http_port']}" for a in answers]
    finally:
        for router in routers:
            router.stop()


async def test_a_burst_of_one_new_prefix_through_two_routers_lands_on_one_worker(
    redis_server: EmbeddedRedis, real_redis: aioredis.Redis
) -> None:
    targets = await burst_targets(redis_server.url, real_redis, inflight_ttl_ms=10_000)
    assert len(set(targets)) == 1, f"the burst spread over {sorted(set(targets))}"
    control = await burst_targets(redis_server.url, real_redis, inflight_ttl_ms=0)
    assert len(set(control)) > 1, "without in-flight prefixes the burst should spread (the test could not fail)"
