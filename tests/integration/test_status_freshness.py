"""Issue 10: with no master polling, a worker's status is not refreshed; a real router stops choosing it once the
status is older than workerStatusMaxAgeMs, says so in the refusal, and takes it again when a status write comes."""

from __future__ import annotations

import aiohttp
import orjson
from conftest import eventually

from flexlb.domain import ErrorCode, Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

PREFILL = WorkerSpec("10.7.0.1", 8000, Role.PREFILL, grpc_port=8001)


async def test_a_worker_with_an_old_status_is_refused_then_taken_again(start_router, real_store: FleetStore) -> None:
    # the routers' own health checks (no master) would mark this address down too: kept out of the way here
    router = start_router(config={"workerStatusMaxAgeMs": 2000, "healthCheckIntervalMs": 600_000})
    await real_store.register_worker(PREFILL, WorkerStatus(kv_total=100_000))  # after the router's start-up
    request_ids = iter(range(1, 1_000_000))

    async with aiohttp.ClientSession() as http:

        async def schedule() -> dict:
            body = {"request_id": next(request_ids), "seq_len": 10}
            async with http.post(f"{router.url}/rtp_llm/schedule", data=orjson.dumps(body)) as resp:
                answer = orjson.loads(await resp.read())
            if answer["success"]:
                await http.post(f"{router.url}/rtp_llm/release", data=orjson.dumps({"request_id": body["request_id"]}))
            return answer

        first = await schedule()
        assert first["success"] and first["server_status"][0]["server_ip"] == PREFILL.ip, first

        async def refused() -> dict | None:
            answer = await schedule()
            return None if answer["success"] else answer

        refusal = await eventually(refused, "a refusal once the status is older than the bound", timeout_s=15)
        assert refusal["code"] == int(ErrorCode.NO_PREFILL_WORKER)
        assert "status of all 1 alive PREFILL workers is too old" in refusal["error_message"], refusal

        await real_store.register_worker(PREFILL, WorkerStatus(kv_total=100_000))  # a fresh status write

        async def served() -> dict | None:
            answer = await schedule()
            return answer if answer["success"] else None

        await eventually(served, "the worker chosen again after a status write", timeout_s=15)
