"""The master polls real simulated workers over gRPC and writes what they report: status, cache index, hand-over of
reservations, liveness. Everything runs as real processes: redis-server, `flexlb master`, `flexlb serve`,
`flexlb sim-worker`."""

from __future__ import annotations

import itertools
import signal
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from conftest import eventually

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.domain import Role, WorkerSpec
from flexlb.state.store import FleetStore

KV_BLOCKS = 256
BLOCK = 64
PROMPT = " ".join(f"w{i}" for i in range(BLOCK * 6))  # exactly 6 full blocks
_ids = itertools.count(1_000)


async def status_of(redis: aioredis.Redis, store: FleetStore, worker_id: str) -> dict[str, str]:
    return await redis.hgetall(store.keys.worker(worker_id))


async def complete(http: aiohttp.ClientSession, url: str, request_id: int, prompt: str = PROMPT) -> dict[str, Any]:
    body = {"model": "flexlb-sim", "prompt": prompt, "max_tokens": 4, "request_id": request_id}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def register(store: FleetStore, *workers: Any) -> None:
    for w in workers:
        await store.register_worker(WorkerSpec("127.0.0.1", w.port, Role.PDFUSION))


async def test_the_master_writes_status_cache_and_hands_reservations_over(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any
) -> None:
    worker = start_sim_worker(args=("--kv-blocks", str(KV_BLOCKS)))
    await register(real_store, worker)
    master = start_master()

    async def polled() -> dict[str, str] | None:
        s = await status_of(real_redis, real_store, worker.worker_id)
        return s if s.get("kv_total") == str(KV_BLOCKS * BLOCK) else None

    status = await eventually(polled, "the master's first status write")
    assert status["alive"] == "1" and status["available"] == "1" and status["running"] == "0"

    # a router reserved request R on the worker; the worker then reports R: the reservation is handed over
    rid = next(_ids)
    assert (await real_store.reserve(rid, [(worker.worker_id, 500)], ttl_ms=60_000)).ok
    async with aiohttp.ClientSession() as http:
        reply = await complete(http, worker.url, rid)
    assert reply["usage"]["prompt_tokens"] == BLOCK * 6

    async def handed_over() -> bool:
        s = await status_of(real_redis, real_store, worker.worker_id)
        gone = await real_redis.zscore(real_store.keys.reservations(worker.worker_id), str(rid)) is None
        return gone and s["pending_count"] == "0" and s["pending_tokens"] == "0"

    await eventually(handed_over, "reservation dropped once the worker reported the request")
    assert await real_store.release(rid) == 0  # the router's late release finds nothing left: exactly once

    expected = {int(k) for k in block_cache_keys(tokenize(PROMPT), BLOCK)}
    assert len(expected) == 6

    async def indexed() -> bool:
        return expected <= await real_store.cache_blocks(worker.worker_id)

    await eventually(indexed, "the prompt's block keys in the worker's cache index")

    async with aiohttp.ClientSession() as http, http.get(f"{master.url}/health") as resp:
        health = await resp.json()
    assert health["is_master"] is True and health["master_lock_holder"] == master.holder
    assert health["epoch"] == health["master_epoch"] >= 1
    assert master.stop() == 0
    assert "Traceback" not in master.log()


async def test_a_killed_worker_is_marked_down_skipped_and_chosen_again_after_restart(
    real_redis: aioredis.Redis,
    real_store: FleetStore,
    start_sim_worker: Any,
    start_master: Any,
    start_router: Any,
) -> None:
    a = start_sim_worker(args=("--kv-blocks", str(KV_BLOCKS)))
    b = start_sim_worker(args=("--kv-blocks", str(KV_BLOCKS)))
    await register(real_store, a, b)
    start_master({"workerDownAfterFailedPolls": 2}, env={"WORKER_TIMEOUT_US": "1000000"})
    router = start_router({"loadBalanceStrategy": "ROUND_ROBIN"})

    async def alive(worker: Any, value: str) -> bool:
        return (await status_of(real_redis, real_store, worker.worker_id)).get("alive") == value

    async def schedule_once(http: aiohttp.ClientSession) -> str:
        rid = next(_ids)
        body = {"request_id": rid, "model": real_store.keys.service, "seq_len": 100}
        async with http.post(f"{router.url}/rtp_llm/schedule", json=body) as resp:
            result = await resp.json()
        assert resp.status == 200, result
        async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as resp:
            assert resp.status == 200
        (server,) = result["server_status"]
        return f"{server['server_ip']}:{server['http_port']}"

    async with aiohttp.ClientSession() as http:
        await eventually(lambda: alive(b, "1"), "worker b polled")
        await complete(http, b.url, next(_ids))  # b caches a prompt
        await eventually(lambda: real_store.cache_blocks(b.worker_id), "b's cache index")

        b.stop(signal.SIGKILL)
        await eventually(lambda: alive(b, "0"), "worker b marked not alive after it was killed")
        chosen = {await schedule_once(http) for _ in range(10)}
        assert chosen == {a.worker_id}

        # silent past WORKER_TIMEOUT: its cache index is forgotten (a restarted engine starts cold)
        async def forgotten() -> bool:
            return not await real_store.cache_blocks(b.worker_id)

        await eventually(forgotten, "b's cache index dropped after the worker timeout")

        start_sim_worker(port=b.port, args=("--kv-blocks", str(KV_BLOCKS)))
        await eventually(lambda: alive(b, "1"), "restarted worker b marked alive again")
        chosen = {await schedule_once(http) for _ in range(4)}
        assert chosen == {a.worker_id, b.worker_id}


async def test_a_router_that_contends_becomes_master_and_reports_it(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    worker = start_sim_worker()
    await register(real_store, worker)
    router = start_router({"contendForMaster": True})

    async def info() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as http, http.post(f"{router.url}/rtp_llm/master/info") as resp:
            body = await resp.json()
        return body if body["this_process_is_master"] else None

    body = await eventually(info, "the only router elected master")
    assert body["master_lock_holder"].endswith(":router") and body["master_epoch"] >= 1
    assert body["real_master_host"] == f"127.0.0.1:{router.port}"

    async def polled() -> bool:
        s = await status_of(real_redis, real_store, worker.worker_id)
        return s.get("kv_total", "0") != "0"

    await eventually(polled, "the router, as master, polls the worker")
