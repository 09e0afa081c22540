"""Queue mode across real router processes: a request queued on router A is placed when router B releases the only
slot; a client that disconnects leaves A's queue; QUEUE_FULL and QUEUE_TIMEOUT come back as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import aiohttp
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

W = WorkerSpec("10.9.0.1", 8000, Role.PDFUSION, max_concurrency=1)
QUEUEING = {"enableQueueing": True, "maxQueueSize": 2}


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def queued(http: aiohttp.ClientSession, router: Any) -> list[int]:
    async with http.get(f"{router.url}/rtp_llm/queue_snapshot") as resp:
        return [e["request_id"] for e in (await resp.json())["entries"]]


async def test_a_queued_request_is_placed_when_another_router_releases(
    real_store: FleetStore, start_router: Any
) -> None:
    await real_store.register_worker(W, WorkerStatus(kv_total=100_000))
    a, b = start_router(QUEUEING), start_router()
    async with aiohttp.ClientSession() as http:
        status, _ = await post(http, f"{b.url}/rtp_llm/schedule", {"request_id": 1, "seq_len": 10})
        assert status == 200  # b holds the only slot
        waiting = asyncio.create_task(post(http, f"{a.url}/rtp_llm/schedule", {"request_id": 2, "seq_len": 10}))
        await eventually(lambda: queued(http, a), "request 2 in a's queue")
        status, body = await post(http, f"{a.url}/rtp_llm/master/info", {})
        assert body["queue_length"] == 1

        # the queue is bounded: 2 waiting is the limit, a third is refused at once
        third = asyncio.create_task(post(http, f"{a.url}/rtp_llm/schedule", {"request_id": 3, "seq_len": 10}))
        await eventually(lambda: _has_len(queued(http, a), 2), "request 3 queued")
        status, body = await post(http, f"{a.url}/rtp_llm/schedule", {"request_id": 4, "seq_len": 10})
        assert (status, body["code"]) == (429, 8502), body
        assert "queue full" in body["error_message"]

        status, _ = await post(http, f"{b.url}/rtp_llm/release", {"request_id": 1})
        assert status == 200
        status, body = await asyncio.wait_for(waiting, 10)
        assert status == 200 and body["success"], body
        assert await queued(http, a) == [3]  # arrival order: 2 before 3

        await post(http, f"{a.url}/rtp_llm/release", {"request_id": 2})
        status, body = await asyncio.wait_for(third, 10)
        assert status == 200 and body["success"], body
        await post(http, f"{a.url}/rtp_llm/release", {"request_id": 3})
    assert await real_store.request_workers(3) == []


async def _has_len(awaitable: Awaitable[list[int]], n: int) -> bool:
    return len(await awaitable) == n


async def test_a_client_that_disconnects_leaves_the_queue_and_timeouts_are_answered(
    real_store: FleetStore, start_router: Any
) -> None:
    await real_store.register_worker(W, WorkerStatus(kv_total=100_000))
    a = start_router(QUEUEING)
    async with aiohttp.ClientSession() as http:
        status, _ = await post(http, f"{a.url}/rtp_llm/schedule", {"request_id": 1, "seq_len": 10})
        assert status == 200
        async with aiohttp.ClientSession() as leaving:
            gone = asyncio.create_task(post(leaving, f"{a.url}/rtp_llm/schedule", {"request_id": 2, "seq_len": 10}))
            await eventually(lambda: queued(http, a), "request 2 queued")
            gone.cancel()
        await eventually(lambda: _has_len(queued(http, a), 0), "request 2 out of the queue after its client left")

        body = {"request_id": 3, "seq_len": 10, "generate_timeout": 300}
        status, answer = await post(http, f"{a.url}/rtp_llm/schedule", body)
        assert (status, answer["code"]) == (503, 8503), answer
        await post(http, f"{a.url}/rtp_llm/release", {"request_id": 1})
        status, answer = await post(http, f"{a.url}/rtp_llm/schedule", {"request_id": 4, "seq_len": 10})
        assert status == 200, answer  # still serving
    assert await real_store.request_workers(2) == []
