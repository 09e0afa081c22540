"""What one schedule request may carry is bounded, and refused before the router builds Python objects for it: a
real router process's RSS stays flat under requests with a million block keys."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

RSS_GROWTH_BOUND_MB = 10  # refused at the headers, it grows by ~1 MB; unbounded, by 24 to 45 MB here


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


@pytest.fixture
async def fleet(real_store: FleetStore) -> FleetStore:
    """A prefill worker that holds block 1, so a prompt of key 1 repeated matches all the way (a lookup per 128)."""
    for spec in (WorkerSpec("10.8.0.1", 8000, Role.PREFILL), WorkerSpec("10.8.0.2", 8000, Role.DECODE)):
        await real_store.register_worker(spec, WorkerStatus(kv_total=10**9, block_size=16))
    await real_store.set_cache_blocks("10.8.0.1:8000", [1, 2, 3])
    return real_store


async def test_a_million_block_keys_are_refused_before_they_are_parsed_and_rss_stays_flat(
    start_router: Any, fleet: FleetStore
) -> None:
    router = start_router()
    pid = router.process.pid
    async with aiohttp.ClientSession() as http:

        async def schedule(rid: int) -> tuple[int, dict[str, Any]]:
            body = orjson.dumps({"request_id": rid, "seq_len": 10**7, "block_cache_keys": [1] * 1_000_000})
            async with http.post(f"{router.url}/rtp_llm/schedule", data=body) as resp:
                return resp.status, await resp.json()

        await schedule(1)  # the first request's imports and buffers are not growth
        before = rss_mb(pid)
        answers = []
        for rnd in range(3):
            answers += await asyncio.gather(*(schedule(100 + 10 * rnd + i) for i in range(8)))
        growth = rss_mb(pid) - before
    assert growth < RSS_GROWTH_BOUND_MB, f"router RSS grew by {growth:.0f} MB"
    for status, body in answers:
        assert status == 413, body
        assert "maxBlockCacheKeys" in body["error_message"]


async def test_more_keys_than_the_limit_or_than_tokens_are_a_400_naming_the_limit(
    start_router: Any, fleet: FleetStore
) -> None:
    router = start_router({"maxBlockCacheKeys": 1000})
    cases = [
        ({"request_id": 7, "seq_len": 10**6, "block_cache_keys": [1] * 1001}, "more than the limit of 1000"),
        ({"request_id": 7, "seq_len": 3, "block_cache_keys": [1, 2, 3, 4]}, "4 keys for seq_len 3"),
    ]
    async with aiohttp.ClientSession() as http:
        for body, message in cases:
            async with http.post(f"{router.url}/rtp_llm/schedule", json=body) as resp:
                answer = await resp.json()
                assert resp.status == 400 and message in answer["error_message"], answer
        ok = {"request_id": 8, "seq_len": 16_000, "block_cache_keys": [1] * 1000}
        async with http.post(f"{router.url}/rtp_llm/schedule", json=ok) as resp:
            assert resp.status == 200, await resp.text()
