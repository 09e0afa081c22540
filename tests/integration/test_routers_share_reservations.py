"""Two router processes on one Redis see each other's reservations through their fleet views (the change stream),
without reading every worker per request."""

from __future__ import annotations

from typing import Any

import aiohttp
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

A = WorkerSpec("10.3.0.1", 8000, Role.PDFUSION, max_concurrency=10)
B = WorkerSpec("10.3.0.2", 8000, Role.PDFUSION, max_concurrency=10)


async def view_of(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(f"{url}/rtp_llm/schedule_snapshot", data=b"") as resp:
        return await resp.json()


async def schedule(http: aiohttp.ClientSession, url: str, request_id: int) -> str:
    async with http.post(f"{url}/rtp_llm/schedule", json={"request_id": request_id, "seq_len": 100}) as resp:
        answer = await resp.json()
    assert answer["success"], answer
    (chosen,) = answer["server_status"]
    return f"{chosen['server_ip']}:{chosen['http_port']}"


async def test_two_routers_see_each_others_reservations(start_router: Any, real_store: FleetStore) -> None:
    for spec in (A, B):
        await real_store.register_worker(spec, WorkerStatus(kv_total=100_000))
    config = {"loadBalanceStrategy": "LOWEST_CONCURRENCY", "contendForMaster": False}
    first, second = start_router(config), start_router(config)
    async with aiohttp.ClientSession() as http:

        async def pending_in(url: str) -> dict[str, int]:
            return {w["worker_id"]: w["pending_count"] for w in (await view_of(http, url))["workers"]}

        taken = await schedule(http, first.url, 1)
        free = B.worker_id if taken == A.worker_id else A.worker_id
        # the other router's view shows the reservation: it came on the stream, not from a read of the fleet
        await eventually(
            lambda: _check(pending_in(second.url), {taken: 1, free: 0}), "the second router seeing the reservation"
        )
        # and its next decision counts it: the least loaded worker is the other one
        assert await schedule(http, second.url, 2) == free
        await eventually(lambda: _check(pending_in(first.url), {taken: 1, free: 1}), "and the other way round")
        for url, rid in ((second.url, 1), (first.url, 2)):  # release through the router that did not reserve
            async with http.post(f"{url}/rtp_llm/release", json={"request_id": rid}) as resp:
                assert (await resp.json())["released"] == 1
        for url in (first.url, second.url):
            await eventually(lambda u=url: _check(pending_in(u), {taken: 0, free: 0}), "the releases in every view")
            snapshot = await view_of(http, url)
            assert snapshot["source"] == "view" and snapshot["view_resyncs"] == 1, snapshot


async def _check(got: Any, want: dict[str, int]) -> bool:
    return await got == want
