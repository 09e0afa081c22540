"""Issue 10 bug 2: a worker registered through the admin API exists only in Redis; when Redis restarts empty, a
real router registers it again from its fleet view, while a worker removed before the restart stays removed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import RouterProcess, eventually

from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone, restarted empty (no persistence) by the test."""
    server = EmbeddedRedis(directory=str(tmp_path)).start()
    yield server
    server.close()


async def test_api_registrations_come_back_after_redis_restarts_empty(own_redis: EmbeddedRedis, service: str) -> None:
    # no master and no health checks here: the workers are addresses nothing serves
    config = {"workerStatusMaxAgeMs": 0, "healthCheckIntervalMs": 600_000}
    router = RouterProcess(own_redis.url, service, config=config).wait_ready()
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    store = FleetStore(client, service)
    try:
        async with aiohttp.ClientSession() as http:
            for port in (9100, 9200):
                body = {"ip": "127.0.0.1", "http_port": port, "role": "PREFILL", "status": {"kv_total": 5000}}
                async with http.post(f"{router.url}/rtp_llm/workers", data=orjson.dumps(body)) as resp:
                    assert resp.status == 201, await resp.text()
            async with http.delete(f"{router.url}/rtp_llm/workers/127.0.0.1:9200") as resp:
                assert resp.status == 200, await resp.text()

            async def router_sees_one() -> bool:
                async with http.post(f"{router.url}/rtp_llm/schedule_snapshot") as resp:
                    snapshot = orjson.loads(await resp.read())
                return [w["worker_id"] for w in snapshot["workers"]] == ["127.0.0.1:9100"]

            await eventually(router_sees_one, "the router's view holds the registered worker only")

            own_redis.stop()
            own_redis.start()  # empty: nothing was persisted
            assert await store.list_workers() == []

            async def registered_again() -> list[str]:
                return [v.worker_id for v in await store.list_workers()]

            assert await eventually(registered_again, "the worker registered again", timeout_s=20) == ["127.0.0.1:9100"]
            view = (await store.list_workers())[0]
            assert view.status.kv_total == 5000 and view.spec.http_port == 9100

            body = {"request_id": 5, "seq_len": 10}
            async with http.post(f"{router.url}/rtp_llm/schedule", data=orjson.dumps(body)) as resp:
                answer = orjson.loads(await resp.read())
            assert answer["success"] and answer["server_status"][0]["http_port"] == 9100, answer
    finally:
        await client.aclose()
        router.stop()
