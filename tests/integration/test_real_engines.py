"""vLLM and SGLang workers (simulated with ``--engine vllm|sglang``: their metric names, no status RPC) as real
processes with redis-server, ``flexlb master`` and ``flexlb serve``: scheduled by their live load, out when killed and
back after the success threshold (with a master, and with none), and a 5xx worker tripping the proxy's breaker."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from conftest import eventually

from flexlb.domain import EngineKind, Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import free_port
from flexlb.state.store import FleetStore

FAST = {  # checks every 100 ms: out after 3 failures (< 1 s), back after 2 passes
    "engineMetricsIntervalMs": 50,
    "healthCheckIntervalMs": 100,
    "healthCheckTimeoutMs": 300,
    "healthFailureThreshold": 3,
    "healthSuccessThreshold": 2,
}
SLOW_DECODE = ("--decode-step-ms-base", "200", "--max-concurrency", "16")
_ids = itertools.count(50_000)


async def register(store: FleetStore, worker: Any, engine: EngineKind) -> None:
    await store.register_worker(WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION, engine=engine), WorkerStatus())


async def status(redis: aioredis.Redis, store: FleetStore, worker: Any) -> dict[str, str]:
    return await redis.hgetall(store.keys.worker(worker.worker_id))


async def schedule(http: aiohttp.ClientSession, router: Any) -> str:
    rid = next(_ids)
    body = {"request_id": rid, "seq_len": 100, "block_cache_keys": []}
    async with http.post(f"{router.url}/rtp_llm/schedule", json=body) as resp:
        reply = await resp.json()
    assert reply["success"], reply
    async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as resp:
        assert resp.status == 200
    chosen = reply["server_status"][0]
    return f"{chosen['server_ip']}:{chosen['http_port']}"


async def load_up(http: aiohttp.ClientSession, worker: Any, n: int) -> list[asyncio.Task[Any]]:
    """``n`` long requests sent straight to ``worker`` (bypassing flexlb): only its own metrics can tell."""

    async def one() -> None:
        body = {"model": "flexlb-sim", "prompt": "a b c d", "max_tokens": 100}
        async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
            await resp.read()

    return [asyncio.create_task(one()) for _ in range(n)]


async def test_vllm_and_sglang_workers_are_scheduled_by_their_live_load(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any, start_router: Any
) -> None:
    vllm = start_sim_worker(args=("--engine", "vllm", *SLOW_DECODE), time_scale=1.0, wait=False)
    sglang = start_sim_worker(args=("--engine", "sglang", *SLOW_DECODE), time_scale=1.0, wait=False)
    vllm.wait_ready(), sglang.wait_ready()
    await register(real_store, vllm, EngineKind.VLLM)
    await register(real_store, sglang, EngineKind.SGLANG)
    start_master(FAST)
    router = start_router({"loadBalanceStrategy": "LOWEST_CONCURRENCY"})

    async def kv_known(worker: Any) -> bool:  # the master's first read of the engine's own metrics
        return (await status(real_redis, real_store, worker)).get("kv_total") == str(2048 * 64)

    await eventually(lambda: kv_known(vllm), "the vLLM worker's KV pool from vllm:cache_config_info")
    await eventually(lambda: kv_known(sglang), "the SGLang worker's KV pool from sglang:max_total_num_tokens")
    async with aiohttp.ClientSession() as http:
        for busy, idle in ((vllm, sglang), (sglang, vllm)):
            tasks = await load_up(http, busy, 4)

            async def running(worker: Any = busy) -> bool:
                s = await status(real_redis, real_store, worker)
                return int(s.get("running", 0)) >= 4 and int(s.get("kv_used", 0)) > 0

            await eventually(running, f"running and KV of the busy {busy.worker_id} read from its engine API")
            assert {await schedule(http, router) for _ in range(6)} == {idle.worker_id}
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

            async def drained(worker: Any = busy) -> bool:
                return (await status(real_redis, real_store, worker)).get("running") == "0"

            await eventually(drained, f"{busy.worker_id} idle again")
        # no status RPC in these modes, as the real engines: nothing listens on HTTP port + 1
        for worker in (vllm, sglang):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", worker.port + 1)
            except OSError:
                continue
            writer.close()
            raise AssertionError(f"{worker.worker_id} serves something on its gRPC port")


async def kill_and_restart(
    redis: aioredis.Redis, store: FleetStore, worker: Any, start_sim_worker: Any, args: tuple[str, ...], out_s: float
) -> None:
    """SIGKILL the worker: alive 0 within ``out_s``; start it again on its port: alive 1."""
    killed_at = time.monotonic()
    worker.stop(signal.SIGKILL)

    async def down() -> bool:
        return (await status(redis, store, worker)).get("alive") == "0"

    await eventually(down, f"{worker.worker_id} marked not alive", timeout_s=out_s)
    assert time.monotonic() - killed_at < out_s
    start_sim_worker(port=worker.port, args=args)

    async def up() -> bool:
        return (await status(redis, store, worker)).get("alive") == "1"

    await eventually(up, f"{worker.worker_id} alive again after the success threshold")


async def test_a_killed_vllm_worker_is_out_within_the_threshold_and_back_after_the_success_threshold(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any
) -> None:
    args = ("--engine", "vllm")
    worker = start_sim_worker(args=args)
    await register(real_store, worker, EngineKind.VLLM)
    master = start_master(FAST)

    async def polled() -> bool:
        return "kv_total" in await status(real_redis, real_store, worker) and (
            (await status(real_redis, real_store, worker))["kv_total"] != "0"
        )

    await eventually(polled, "the master's first load read")
    # 3 failed checks of (100 ms interval + at most 300 ms timeout), plus a Redis write and slack
    await kill_and_restart(real_redis, real_store, worker, start_sim_worker, args, out_s=2.5)
    log = master.log()
    assert "marked not alive after 3 failed health checks" in log and worker.worker_id in log
    assert "is healthy again after 2 passed checks" in log


async def test_without_a_master_the_routers_check_health(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    args = ("--engine", "sglang")
    worker = start_sim_worker(args=args)
    await register(real_store, worker, EngineKind.SGLANG)
    router = start_router(FAST)  # contendForMaster false, and no `flexlb master`: no one polls
    await kill_and_restart(real_redis, real_store, worker, start_sim_worker, args, out_s=2.5)
    assert "no master: this router checks the workers' health" in router.log()


async def test_a_worker_answering_5xx_trips_the_breaker(
    real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    hits = 0

    async def broken(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"error": {"message": "engine core died"}}, status=500)

    async def healthy(request: web.Request) -> web.Response:  # its health checks pass: only the breaker can tell
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", broken)
    app.router.add_get("/health", healthy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        good = start_sim_worker()
        await real_store.register_worker(WorkerSpec("127.0.0.1", port, Role.PDFUSION), WorkerStatus())
        await real_store.register_worker(WorkerSpec("127.0.0.1", good.port, Role.PDFUSION), WorkerStatus())
        router = start_router(
            {
                "loadBalanceStrategy": "ROUND_ROBIN",
                "breakerFailureThreshold": 3,
                "breakerCooldownMs": 60_000,
                "servedModelName": "flexlb-sim",
            }
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                body = {"model": "flexlb-sim", "prompt": "hello there", "max_tokens": 2}
                async with http.post(f"{router.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()  # retried on the good worker
        assert hits == 3, f"the 5xx worker got {hits} requests; its breaker should open after 3"
        assert f"PDFUSION worker 127.0.0.1:{port}: circuit breaker open" in router.log()
    finally:
        await runner.cleanup()
