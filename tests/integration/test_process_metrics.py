"""A router's /metrics carries its own process and garbage-collector figures, and gcYoungThreshold reaches the
process (flexlb/gc_policy.py)."""

from __future__ import annotations

from typing import Any

import aiohttp


def sample(text: str, name: str, labels: str = "") -> float:
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == wanted:
            return float(value)
    raise AssertionError(f"{wanted} not in /metrics")


async def young_collections_over(http: aiohttp.ClientSession, url: str, requests: int) -> float:
    """How many young collections the router ran while answering ``requests`` requests."""

    async def count() -> float:
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 200
            return sample(await resp.text(), "python_gc_collections_total", 'generation="0"')

    before = await count()
    for _ in range(requests):
        async with http.get(url + "/health") as resp:
            await resp.read()
    return await count() - before


async def test_metrics_show_the_processs_collections_and_the_threshold_applies(start_router: Any) -> None:
    never = start_router(env={"GC_YOUNG_THRESHOLD": str(10**9)})
    eager = start_router(env={"GC_YOUNG_THRESHOLD": "1"})
    async with aiohttp.ClientSession() as http:
        async with http.get(never.url + "/metrics") as resp:
            text = await resp.text()
        assert sample(text, "process_resident_memory_bytes") > 0
        assert sample(text, "process_cpu_seconds_total") > 0
        assert await young_collections_over(http, never.url, 200) == 0  # 10^9 new objects never came
        assert await young_collections_over(http, eager.url, 200) > 20  # one about every new object
