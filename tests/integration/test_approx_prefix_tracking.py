"""Issue 12, approximate tracking: a prefill worker that reports no cache of its own (vLLM / SGLang without KV events)
keeps the blocks the fleet routed there for approxPrefixTtlMs, shared by every router process; a worker that reports
its cache (RTP-LLM status, KV events) only for inflightPrefixTtlMs, until its report confirms them. Real router
processes on a real redis-server; statuses written by the test (no engine behind them)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from conftest import RouterProcess

from flexlb.domain import EngineKind, Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.state.store import FleetStore

SEQ_LEN, BLOCK = 4096, 64
STATUS = WorkerStatus(kv_total=10_000_000, block_size=BLOCK, prefill_tokens_per_ms=10.0)
SHORT_MS, LONG_MS = 500, 120_000
CONFIG = {
    "workerStatusMaxAgeMs": 0,
    "healthCheckIntervalMs": 600_000,
    "inflightPrefixTtlMs": SHORT_MS,
    "approxPrefixTtlMs": LONG_MS,
}


def vllm(i: int, **kw: Any) -> WorkerSpec:
    return WorkerSpec(f"10.12.0.{i}", 8000, Role.PDFUSION, engine=EngineKind.VLLM, **kw)


async def redis_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def until_redis_time(redis: aioredis.Redis, target_ms: int) -> None:
    """Poll Redis' clock (the one the expiries use) until it passes ``target_ms``."""
    deadline = time.monotonic() + 10
    while await redis_ms(redis) <= target_ms:
        assert time.monotonic() < deadline, "Redis' clock did not move"
        await asyncio.sleep(0.05)


async def schedule(http: aiohttp.ClientSession, router: RouterProcess, rid: int, blocks: list[int]) -> str:
    body = {"request_id": rid, "seq_len": SEQ_LEN, "block_cache_keys": blocks}
    async with http.post(f"{router.url}/rtp_llm/schedule", data=orjson.dumps(body)) as resp:
        answer = orjson.loads(await resp.read())
    assert answer["success"], answer
    status = answer["server_status"][0]
    async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as resp:
        assert resp.status == 200
    return f"{status['server_ip']}:{status['http_port']}"


async def test_the_fleet_remembers_where_it_sent_a_prefix_on_workers_without_cache_reports(
    redis_server: EmbeddedRedis, real_redis: aioredis.Redis
) -> None:
    service = f"approx{uuid.uuid4().hex[:10]}"
    store = FleetStore(real_redis, service)
    for i in range(1, 5):
        await store.register_worker(vllm(i), STATUS)
    routers = [RouterProcess(redis_server.url, service, CONFIG) for _ in range(2)]
    rng = random.Random(7)
    try:
        for router in routers:
            router.wait_ready()
        async with aiohttp.ClientSession() as http:
            for n in range(3):  # a prefix placed through one router is found through the other, past the short TTL
                prefix = [rng.getrandbits(62) for _ in range(SEQ_LEN // BLOCK - 4)]
                first = await schedule(http, routers[0], 100 + n, [*prefix, *(rng.getrandbits(62) for _ in range(4))])
                await until_redis_time(real_redis, await redis_ms(real_redis) + SHORT_MS)
                assert (await store.lookup_prefix(prefix)).get(first) == len(prefix)
                again = await schedule(http, routers[1], 200 + n, [*prefix, *(rng.getrandbits(62) for _ in range(4))])
                assert again == first, f"prefix {n}: placed on {first}, then sent to {again}"
    finally:
        for router in routers:
            router.stop()


async def test_workers_that_report_their_cache_keep_routed_blocks_only_until_the_short_ttl(
    redis_server: EmbeddedRedis, real_redis: aioredis.Redis
) -> None:
    service = f"exact{uuid.uuid4().hex[:10]}"
    store = FleetStore(real_redis, service)
    exact = [
        WorkerSpec("10.13.0.1", 8000, Role.PDFUSION),  # RTP-LLM: its status reports its cache
        vllm(2, kv_events=KvEventsEndpoint("tcp://10.12.0.2:5557")),  # vLLM publishing KV events
    ]
    router = RouterProcess(redis_server.url, service, CONFIG).wait_ready()
    rng = random.Random(11)
    try:
        async with aiohttp.ClientSession() as http:
            for spec in exact:
                for other in exact:
                    await store.remove_worker(other.worker_id)
                await store.register_worker(spec, STATUS)
                blocks = [rng.getrandbits(62) for _ in range(SEQ_LEN // BLOCK)]
                placed = await schedule(http, router, rng.randrange(1, 1 << 40), blocks)
                assert placed == spec.worker_id
                expiries = await store.inflight_blocks(spec.worker_id)
                now = await redis_ms(real_redis)
                assert expiries and max(expiries.values()) <= now + SHORT_MS, spec
    finally:
        router.stop()
