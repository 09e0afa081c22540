"""Issue 11: the router's predicted cache hit is compared with the cached tokens the engine reports for the same
request, in /metrics. A real router, master and simulated worker: first the index agrees with the worker; then the
index is made stale (it claims blocks the worker never computed) and the gap shows in the metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from conftest import eventually
from test_proxy import MODEL, proxy_metric, register, start_all

from flexlb.blocks import block_cache_keys
from flexlb.proxy.parse import Route, parse_request
from flexlb.state.store import FleetStore

PROMPT = " ".join(f"w{i}" for i in range(200))


async def _chat(http: aiohttp.ClientSession, router: Any, stream: bool) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{router.url}/v1/chat/completions", data=orjson.dumps(body)) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def test_predicted_and_reported_cached_tokens_are_compared(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any, start_master: Any
) -> None:
    worker, _, router = start_all(
        lambda: start_sim_worker(wait=False),
        lambda: start_master(wait=False),
        lambda: start_router({"servedModelName": MODEL, "inflightPrefixTtlMs": 0}, wait=False),
    )
    await register(real_store, worker)
    predicted = "flexlb_proxy_predicted_hit_tokens_total"
    reported = "flexlb_proxy_reported_cached_tokens_total"
    async with aiohttp.ClientSession() as http:
        await _chat(http, router, stream=False)  # cold: nothing predicted, nothing cached
        assert await proxy_metric(http, router, predicted) == 0

        async def cache_indexed() -> bool:  # the master's cache poll indexes what the worker now holds
            return bool(await real_store.cache_blocks(worker.worker_id))

        await eventually(cache_indexed, "the worker's cache in the index")
        await _chat(http, router, stream=True)  # warm: the index predicts what the worker reports
        agreed_predicted = await proxy_metric(http, router, predicted)
        agreed_reported = await proxy_metric(http, router, reported)
        assert agreed_predicted > 0 and agreed_predicted == agreed_reported

        # stale: the index says the worker holds a prompt it never computed (a lost eviction report, say)
        other = " ".join(f"x{i}" for i in range(200))
        body = {"model": MODEL, "messages": [{"role": "user", "content": other}], "max_tokens": 2}
        await _stale_claim(real_store, worker.worker_id, body)
        async with http.post(f"{router.url}/v1/chat/completions", data=orjson.dumps(body)) as resp:
            assert resp.status == 200
        gap = await proxy_metric(http, router, predicted) - agreed_predicted
        reported_gap = await proxy_metric(http, router, reported) - agreed_reported
        assert gap > reported_gap, (gap, reported_gap)
        over = await proxy_metric(http, router, 'flexlb_proxy_hit_prediction_error_tokens_bucket{le="0.0"')
        total = await proxy_metric(http, router, "flexlb_proxy_hit_prediction_error_tokens_count")
        assert total > over  # one request was predicted above what the worker had


async def _stale_claim(store: FleetStore, worker_id: str, body: dict[str, Any]) -> None:
    """Put the blocks of ``body``'s prompt, as the proxy tokenises it, into the worker's index entry."""
    parsed = parse_request(Route.CHAT, orjson.dumps(body))
    (view,) = [v for v in await store.list_workers() if v.worker_id == worker_id]
    keys = block_cache_keys(parsed.tokens, view.status.block_size)
    await store.set_cache_blocks(worker_id, [*await store.cache_blocks(worker_id), *keys])
