"""Workers listed in MODEL_SERVICE_CONFIG are registered by the routers, also when Redis comes up after them."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import redis.asyncio as aioredis

from flexlb.embedded_redis import EmbeddedRedis, free_port

SERVICE_CONFIG = {
    "service_id": "ignored-because-FLEXLB_SERVICE_ID-wins",
    "role_endpoints": [
        {
            "group": "g1",
            "prefill_endpoint": {"address": '["10.6.0.1:8000"]', "type": "SpecifiedIpPortList"},
            "decode_endpoint": {"address": '["10.6.0.2:8000", "10.6.0.3:8000"]', "type": "SpecifiedIpPortList"},
        }
    ],
}


async def test_router_started_before_redis_registers_its_static_workers_when_redis_appears(start_router) -> None:
    port = free_port()
    router = start_router(
        redis_url=f"redis://127.0.0.1:{port}/0",
        env={"MODEL_SERVICE_CONFIG": orjson.dumps(SERVICE_CONFIG).decode()},
        wait=False,
    )
    async with aiohttp.ClientSession() as http:

        async def schedule() -> tuple[int, dict] | None:
            try:
                async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": 1, "seq_len": 8}) as r:
                    return r.status, await r.json()
            except aiohttp.ClientConnectionError:
                return None  # not listening yet

        deadline = time.monotonic() + 20
        while (answer := await schedule()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert answer is not None, router.log()
        status, body = answer
        assert status == 503 and body["code"] == 8600 and "no fleet view yet" in body["error_message"]

        async def schedulable() -> dict:
            while time.monotonic() < deadline:
                status, body = await schedule() or (0, {})
                if status == 200:
                    await http.post(f"{router.url}/rtp_llm/release", json={"request_id": 1})
                    return body
                await asyncio.sleep(0.05)
            raise AssertionError(f"not schedulable: {body}\n{router.log()}")

        with EmbeddedRedis(port=port) as redis_server:
            body = await schedulable()
            chosen = {s["role"]: f"{s['server_ip']}:{s['http_port']}" for s in body["server_status"]}
            assert chosen["PREFILL"] == "10.6.0.1:8000"
            assert chosen["DECODE"] in ("10.6.0.2:8000", "10.6.0.3:8000")
            assert {s["group"] for s in body["server_status"]} == {"g1"}

            # Redis loses everything (a restart without persistence): the router registers its workers again, and
            # the new membership version differs from the one it cached, so it reads the new member lists
            client = aioredis.Redis.from_url(redis_server.url)
            await client.flushall()
            await client.aclose()
            deadline = time.monotonic() + 20
            body = await schedulable()
            assert {s["role"] for s in body["server_status"]} == {"PREFILL", "DECODE"}
