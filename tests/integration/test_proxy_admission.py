"""Issue 11: the proxy never refuses work the fleet can take in time. A burst of 200 chat requests at once through 2
real routers onto 4 simulated workers with running limits of 2: the workers queue what they cannot run yet, so with
admission by estimated wait (the default) every request is served; the control run with the limits hard
(proxyAdmissionTtftMs 0) refuses some with 503, as before. An oversize prompt is refused at once with 400
context_length_exceeded and touches nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from test_proxy import MODEL, assert_no_reservation_left, start_all

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

LIMIT = 2  # each worker runs 2 requests at once and queues the rest
KV_BLOCKS = 64  # x 64-token blocks: 4096 tokens of KV per worker


async def _burst(routers: list[Any], count: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as http:

        async def chat(i: int) -> tuple[int, dict]:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"request {i} " + " ".join(f"w{j}" for j in range(40))}],
                "max_tokens": 4,
            }
            async with http.post(f"{routers[i % 2].url}/v1/chat/completions", data=orjson.dumps(body)) as resp:
                return resp.status, orjson.loads(await resp.read())

        return await asyncio.gather(*(chat(i) for i in range(count)))


async def _fleet(
    start_sim_worker: Any, start_master: Any, start_router: Any, store: FleetStore, admission: int | None
) -> Any:
    args = ("--max-concurrency", str(LIMIT), "--kv-blocks", str(KV_BLOCKS))
    config: dict[str, Any] = {"servedModelName": MODEL}
    if admission is not None:
        config["proxyAdmissionTtftMs"] = admission
    *workers, _, r1, r2 = start_all(
        *(lambda: start_sim_worker(wait=False, args=args) for _ in range(4)),
        lambda: start_master(wait=False),
        lambda: start_router(config, wait=False),
        lambda: start_router(config, wait=False),
    )
    for w in workers:
        spec = WorkerSpec("127.0.0.1", w.port, Role.PDFUSION, max_concurrency=LIMIT)
        await store.register_worker(spec, WorkerStatus(kv_total=KV_BLOCKS * 64, block_size=64))
    return workers, [r1, r2]


async def test_a_burst_beyond_the_running_limits_is_served_whole(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any, start_router: Any
) -> None:
    # the default admission bound
    workers, routers = await _fleet(start_sim_worker, start_master, start_router, real_store, admission=None)
    answers = await _burst(routers, 200)
    refused = [(status, body) for status, body in answers if status != 200]
    assert not refused, f"{len(refused)} of 200 refused, e.g. {refused[:2]}"
    assert all(body["usage"]["completion_tokens"] == 4 for _, body in answers)
    await assert_no_reservation_left(real_redis, real_store, *workers)

    # a prompt larger than any worker's KV: 400 at once, in OpenAI's shape, nothing reserved or queued
    huge = {"model": MODEL, "messages": [{"role": "user", "content": " ".join(["w"] * 5000)}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{routers[0].url}/v1/chat/completions", data=orjson.dumps(huge)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        async with http.get(f"{routers[0].url}/rtp_llm/queue_snapshot") as resp:
            assert (await resp.json())["queue_length"] == 0
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "holds 4096" in error["message"], error
    await assert_no_reservation_left(real_redis, real_store, *workers)


async def test_control_with_hard_limits_the_same_burst_is_partly_refused(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any, start_router: Any
) -> None:
    """Shows the test above can fail: the limits as hard caps refuse what the workers would have queued."""
    _, routers = await _fleet(start_sim_worker, start_master, start_router, real_store, admission=0)
    answers = await _burst(routers, 200)
    assert any(status == 503 for status, _ in answers)


async def test_with_no_worker_that_could_take_it_the_answer_is_at_once(start_router: Any) -> None:
    """Admission holds a request only while workers that could take it are busy: with none registered the proxy
    answers 503 at once (within the client's 10 s here, far below the 60 s queue timeout), as the peers do."""
    router = start_router({"servedModelName": MODEL})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(f"{router.url}/v1/chat/completions", data=orjson.dumps(body)) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
    assert error["code"] == "no_available_worker", error
