"""Issue 11: queue order across router processes. Two real routers (queue mode) share one simulated worker with a
running limit of 1 through a real redis-server. Router A's requests queue first, router B's after them; each
request served runs on the worker and is released, which wakes both routers' queues at once. Service follows
arrival across the routers: every one of A's requests before any of B's (without the fleet's age order, the two
queues raced on every release and B's later arrivals were served in between)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from conftest import eventually
from test_proxy import start_all

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

WAITING = 6  # per router


async def queued(http: aiohttp.ClientSession, router: Any) -> int:
    async with http.get(f"{router.url}/rtp_llm/queue_snapshot") as resp:
        return (await resp.json())["queue_length"]


async def _at_least(http: aiohttp.ClientSession, router: Any, n: int) -> bool:
    return await queued(http, router) >= n


async def test_waiters_are_served_in_arrival_order_across_routers(
    real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    config = {"enableQueueing": True}
    worker, a, b = start_all(
        lambda: start_sim_worker(wait=False, args=("--max-concurrency", "1")),
        lambda: start_router(config, wait=False),
        lambda: start_router(config, wait=False),
    )
    spec = WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION, max_concurrency=1)
    await real_store.register_worker(spec, WorkerStatus(kv_total=100_000))
    served: list[int] = []

    async with aiohttp.ClientSession() as http:

        async def serve(router: Any, rid: int) -> None:
            """Schedule through ``router``, run on the worker it chose, release: one client's whole request."""
            async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": rid, "seq_len": 8}) as resp:
                answer = await resp.json()
            assert answer["success"], answer
            served.append(rid)
            target = answer["server_status"][0]
            body = {"model": "flexlb-sim", "prompt": "hello", "max_tokens": 2}
            url = f"http://{target['server_ip']}:{target['http_port']}/v1/completions"
            async with http.post(url, data=orjson.dumps(body)) as resp:
                assert resp.status == 200, await resp.text()
            async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid}) as resp:
                assert resp.status == 200

        async with http.post(f"{a.url}/rtp_llm/schedule", json={"request_id": 1, "seq_len": 8}) as resp:
            assert (await resp.json())["success"]  # holds the only slot while the queues fill
        first = [asyncio.create_task(serve(a, 100 + i)) for i in range(WAITING)]
        await eventually(lambda: _at_least(http, a, WAITING), f"{WAITING} requests in router A's queue")
        later = [asyncio.create_task(serve(b, 200 + i)) for i in range(WAITING)]
        await eventually(lambda: _at_least(http, b, WAITING), f"{WAITING} requests in router B's queue")

        async with http.post(f"{a.url}/rtp_llm/release", json={"request_id": 1}) as resp:
            assert resp.status == 200
        await asyncio.wait_for(asyncio.gather(*first, *later), 60)

    assert sorted(served) == [*range(100, 100 + WAITING), *range(200, 200 + WAITING)]
    from_a = [rid for rid in served[:WAITING] if rid < 200]
    assert len(from_a) == WAITING, f"service order {served}: B's later arrivals went before A's waiters"
