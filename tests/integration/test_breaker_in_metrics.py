"""The per-worker circuit breaker in a real router's /metrics: a worker answering 5xx (a tiny aiohttp stub whose
health checks pass, so only the breaker can tell) trips it - ``flexlb_proxy_breaker_state`` 2 (open) and one trip in
``flexlb_proxy_breaker_trips_total`` -; after the cool-down the probe request makes it 1 (half open) while it is out,
and its answer closes it (0)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
from aiohttp import web
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import free_port
from flexlb.state.store import FleetStore

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "flexlb-sim",
              "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}  # fmt: skip


async def scrape(http: aiohttp.ClientSession, router: Any, name: str, worker: str) -> float | None:
    async with http.get(f"{router.url}/metrics") as resp:
        text = await resp.text()
    match = re.search(rf'^{name}\{{worker="{re.escape(worker)}"\}} (\S+)$', text, re.MULTILINE)
    return float(match[1]) if match else None


async def test_a_5xx_worker_trips_its_breaker_and_the_probe_closes_it_in_metrics(
    real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    hits = 0
    mode = "broken"
    release = asyncio.Event()

    async def completions(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        if mode == "broken":
            return web.json_response({"error": {"message": "engine core died"}}, status=500)
        await release.wait()  # the probe: its answer's headers only once the test has looked
        return web.json_response(COMPLETION)

    async def healthy(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", healthy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stub = f"127.0.0.1:{port}"
    try:
        good = start_sim_worker()
        await real_store.register_worker(WorkerSpec("127.0.0.1", port, Role.PDFUSION), WorkerStatus())
        await real_store.register_worker(WorkerSpec("127.0.0.1", good.port, Role.PDFUSION), WorkerStatus())
        router = start_router({"loadBalanceStrategy": "ROUND_ROBIN", "breakerFailureThreshold": 3,
                               "breakerCooldownMs": 1000, "servedModelName": "flexlb-sim"})  # fmt: skip
        body = {"model": "flexlb-sim", "prompt": "hello there", "max_tokens": 1}
        async with aiohttp.ClientSession() as http:

            async def send() -> None:
                async with http.post(f"{router.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()  # a failure is retried on the good worker
                    await resp.read()

            while hits < 3:
                await send()
            assert await scrape(http, router, "flexlb_proxy_breaker_state", stub) == 2.0  # open
            assert await scrape(http, router, "flexlb_proxy_breaker_trips_total", stub) == 1.0
            assert await scrape(http, router, "flexlb_proxy_breaker_state", good.worker_id) is None  # never failed

            mode = "answering"
            await asyncio.sleep(1.2)  # the cool-down: the next request chosen for it is its probe

            async def until_probed() -> None:
                while hits < 4:
                    await send()

            sender = asyncio.create_task(until_probed())
            await eventually(lambda: _true(hits >= 4), "a request probes the stub")
            await eventually(
                lambda: _is(scrape(http, router, "flexlb_proxy_breaker_state", stub), 1.0), "half open, probe out"
            )
            release.set()
            await sender
            await eventually(lambda: _is(scrape(http, router, "flexlb_proxy_breaker_state", stub), 0.0), "closed")
            assert await scrape(http, router, "flexlb_proxy_breaker_trips_total", stub) == 1.0
    finally:
        release.set()
        await runner.cleanup()


async def _true(value: bool) -> bool:
    return value


async def _is(value: Any, want: float) -> bool:
    return await value == want
