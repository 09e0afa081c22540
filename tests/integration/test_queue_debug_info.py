"""Issue 11: a request that waited in a real router's queue says in its ``debug_info`` (schedule API, ``debug: true``)
how long it waited, where it entered the queue and how deep the queue was when it left; the position is a metric."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from conftest import eventually
from prometheus_client.parser import text_string_to_metric_families

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

W = WorkerSpec("10.9.1.1", 8000, Role.PDFUSION, max_concurrency=1)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        return answer


async def queued(http: aiohttp.ClientSession, router: Any) -> list[int]:
    async with http.get(f"{router.url}/rtp_llm/queue_snapshot") as resp:
        return [e["request_id"] for e in (await resp.json())["entries"]]


def debug_info(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["success"], answer
    return answer["server_status"][0]["debug_info"]


async def position_counts(http: aiohttp.ClientSession, router: Any) -> dict[str, float]:
    """flexlb_queue_position's cumulative bucket counts by upper bound."""
    async with http.get(f"{router.url}/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "flexlb_queue_position"
        for s in family.samples
        if s.name.endswith("_bucket")
    }


async def test_a_queued_request_reports_its_wait_position_and_depth(real_store: FleetStore, start_router: Any) -> None:
    await real_store.register_worker(W, WorkerStatus(kv_total=100_000))
    router = start_router({"enableQueueing": True})
    schedule = f"{router.url}/rtp_llm/schedule"
    async with aiohttp.ClientSession() as http:
        first = debug_info(await post(http, schedule, {"request_id": 1, "seq_len": 10, "debug": True}))
        assert first["waiting_time_ms"] == 0 and "queue" not in first  # placed at once: it never waited

        second = asyncio.create_task(post(http, schedule, {"request_id": 2, "seq_len": 10, "debug": True}))
        await eventually(lambda: queued(http, router), "request 2 queued")
        third = asyncio.create_task(post(http, schedule, {"request_id": 3, "seq_len": 10, "debug": True}))
        await eventually(lambda: _is(queued(http, router), [2, 3]), "request 3 queued behind 2")

        await post(http, f"{router.url}/rtp_llm/release", {"request_id": 1})
        info = debug_info(await asyncio.wait_for(second, 10))
        assert info["queue"]["position"] == 1  # it entered at the head
        assert info["queue"]["depth"] == 2  # itself and request 3 when it left
        assert info["queue"]["waited_ms"] > 0
        assert info["waiting_time_ms"] == round(info["queue"]["waited_ms"])  # the original's field says it too

        await post(http, f"{router.url}/rtp_llm/release", {"request_id": 2})
        info = debug_info(await asyncio.wait_for(third, 10))
        assert (info["queue"]["position"], info["queue"]["depth"]) == (2, 1)
        await post(http, f"{router.url}/rtp_llm/release", {"request_id": 3})

        counts = await position_counts(http, router)
        assert (counts["1.0"], counts["2.0"]) == (1, 2), counts  # one entered first, one second


async def _is(awaitable: Any, expected: list[int]) -> bool:
    return await awaitable == expected
