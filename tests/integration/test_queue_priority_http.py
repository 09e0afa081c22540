"""Issue 13: ``request_priority`` of ``POST /rtp_llm/schedule`` (as the original frontend sends it) orders a real
router's queue: three waiters of different priorities are placed most urgent first, one slot at a time."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

W = WorkerSpec("10.9.0.7", 8000, Role.PDFUSION, max_concurrency=1)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def snapshot(http: aiohttp.ClientSession, router: Any) -> list[tuple[int, int]]:
    async with http.get(f"{router.url}/rtp_llm/queue_snapshot") as resp:
        return [(e["request_id"], e["priority"]) for e in (await resp.json())["entries"]]


async def test_request_priority_orders_the_queue(real_store: FleetStore, start_router: Any) -> None:
    await real_store.register_worker(W, WorkerStatus(kv_total=100_000))
    router = start_router({"enableQueueing": True})
    async with aiohttp.ClientSession() as http:
        status, _ = await post(http, f"{router.url}/rtp_llm/schedule", {"request_id": 1, "seq_len": 10})
        assert status == 200  # holds the only slot
        waiting = {}
        for rid, priority in ((2, 10), (3, 50), (4, 90)):
            body = {"request_id": rid, "seq_len": 10, "request_priority": priority}
            waiting[rid] = asyncio.create_task(post(http, f"{router.url}/rtp_llm/schedule", body))
            await eventually(lambda rid=rid: _has(snapshot(http, router), rid), f"request {rid} queued")
        assert await snapshot(http, router) == [(4, 90), (3, 50), (2, 10)]
        placed, holder = [], 1
        for _ in range(3):
            await post(http, f"{router.url}/rtp_llm/release", {"request_id": holder})
            done, _ = await asyncio.wait(waiting.values(), timeout=10, return_when=asyncio.FIRST_COMPLETED)
            (task,) = done
            holder = next(rid for rid, t in waiting.items() if t is task)
            status, body = task.result()
            assert status == 200 and body["success"], body
            del waiting[holder]
            placed.append(holder)
        await post(http, f"{router.url}/rtp_llm/release", {"request_id": holder})
    assert placed == [4, 3, 2]


async def _has(entries: Any, rid: int) -> bool:
    return any(r == rid for r, _ in await entries)
