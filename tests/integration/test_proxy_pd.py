"""Proxy mode with disaggregated prefill / decode: both workers get the same bootstrap fields, the client gets the
decode worker's answer, a failing prefill worker fails the request by name, a decode worker dying mid-stream ends the
stream with an error event. No master runs here: the proxy's own release is the only thing that frees a reservation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import eventually
from openai import AsyncOpenAI

from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import free_port
from flexlb.state.store import FleetStore

MODEL = "flexlb-sim"
BOOTSTRAP_PORT = 9123
PROMPT = " ".join(f"w{i}" for i in range(100))


async def no_reservation_left(redis: aioredis.Redis, store: FleetStore, *worker_ids: str) -> bool:
    for wid in worker_ids:
        pending = await redis.hget(store.keys.worker(wid), "pending_count")
        if pending != "0" or await redis.zcard(store.keys.reservations(wid)):
            return False
    return True


@dataclass
class Recorder:
    """Stand-in prefill and decode workers on real sockets that record what they receive."""

    prefill_port: int
    decode_port: int
    received: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (side, body, X-Request-Id)
    abandoned: list[str] = field(default_factory=list)  # sides whose client went away before the answer
    decode_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    die: asyncio.Event = field(default_factory=asyncio.Event)  # a decode worker asked to die mid-stream does now

    def bodies(self, side: str) -> list[dict[str, Any]]:
        return [body for s, body, _ in self.received if s == side]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        side = "prefill" if request.url.port == self.prefill_port else "decode"
        body = await request.json()
        self.received.append((side, body, request.headers.get("X-Request-Id", "")))
        if side == "decode":
            self.decode_arrived.set()
        failing = "fail-prefill" in orjson.dumps(body).decode()
        if side == "prefill" and "refuse-prefill" in orjson.dumps(body).decode():
            return web.json_response({"error": {"message": "prompt too long for prefill"}}, status=400)
        if side == "prefill" and failing:
            await asyncio.wait_for(self.decode_arrived.wait(), 5)  # fail while the decode side waits for it
            return web.json_response({"error": {"message": "prefill exploded"}}, status=500)
        if failing:  # a real decode worker waits for KV from the prefill side, which never comes
            try:
                await asyncio.Event().wait()
            finally:
                self.abandoned.append(side)
        if not body.get("stream"):
            return web.json_response({"from": side, "choices": [{"message": {"content": f"{side} says hi"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("one", "two", "three"):
            await response.write(b"data: " + orjson.dumps({"from": side, "text": word}) + b"\n\n")
            if side == "decode" and "die-mid-stream" in orjson.dumps(body).decode():
                await self.die.wait()  # until the client has the first event: it must not arrive with the reset
                assert request.transport is not None
                request.transport.abort()
                return response
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder(free_port(), free_port())
    app = web.Application()
    app.router.add_post("/{path:.*}", rec.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    for port in (rec.prefill_port, rec.decode_port):
        await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rec
    await runner.cleanup()


async def test_both_sides_get_the_same_bootstrap_fields_and_the_client_gets_decode(
    real_redis: aioredis.Redis, real_store: FleetStore, recorder: Recorder, start_router: Any
) -> None:
    prefill = WorkerSpec("127.0.0.1", recorder.prefill_port, Role.PREFILL)
    decode = WorkerSpec("127.0.0.1", recorder.decode_port, Role.DECODE)
    for spec in (prefill, decode):
        await real_store.register_worker(spec)
    router = start_router({"servedModelName": MODEL, "bootstrapPort": BOOTSTRAP_PORT})
    chat = {"model": real_store.keys.service, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/chat/completions", json=chat) as resp:
            answer = await resp.json()
            request_id = int(resp.headers["X-Request-Id"])
        assert resp.status == 200 and answer["from"] == "decode", answer

        (p_body,), (d_body,) = recorder.bodies("prefill"), recorder.bodies("decode")
        for body in (p_body, d_body):
            assert body["bootstrap_host"] == "127.0.0.1" and body["bootstrap_port"] == BOOTSTRAP_PORT
            assert body["request_id"] == request_id and body["model"] == MODEL  # the workers' name, not the service
            assert body["messages"] == chat["messages"] and body["max_tokens"] == 3
        assert p_body["bootstrap_room"] == d_body["bootstrap_room"] and 0 <= p_body["bootstrap_room"] < 1 << 63
        assert {header for _, _, header in recorder.received} == {str(request_id)}

        generate = {"text": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": 3}}
        async with http.post(f"{router.url}/generate", json=generate) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            events = [line async for line in resp.content if line.startswith(b"data: {")]
        assert [orjson.loads(e[6:]) for e in events] == [{"from": "decode", "text": w} for w in ("one", "two", "three")]
        p_body, d_body = recorder.bodies("prefill")[-1], recorder.bodies("decode")[-1]
        assert p_body["bootstrap_room"] == d_body["bootstrap_room"] != recorder.bodies("prefill")[0]["bootstrap_room"]
        assert "model" not in p_body  # SGLang's /generate has no model field

    await eventually(
        lambda: no_reservation_left(real_redis, real_store, prefill.worker_id, decode.worker_id),
        "reservations released",
    )


async def test_a_failing_prefill_worker_fails_the_request_by_name_and_abandons_decode(
    real_redis: aioredis.Redis, real_store: FleetStore, recorder: Recorder, start_router: Any
) -> None:
    prefill = WorkerSpec("127.0.0.1", recorder.prefill_port, Role.PREFILL)
    decode = WorkerSpec("127.0.0.1", recorder.decode_port, Role.DECODE)
    for spec in (prefill, decode):
        await real_store.register_worker(spec)
    router = start_router({"proxyRetries": 1})
    body = {"prompt": "fail-prefill " + PROMPT, "max_tokens": 3}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/completions", json=body) as resp:
            error = (await resp.json())["error"]
        assert resp.status == 502 and error["code"] == "upstream_failed", error
        assert f"PREFILL worker {prefill.worker_id} failed (HTTP 500: " in error["message"]
        assert "prefill exploded" in error["message"] and "NO_PREFILL_WORKER" in error["message"]
        assert len(recorder.bodies("prefill")) == 1  # the retry found no other prefill worker

        # a 4xx is the engine refusing the request itself: the client gets it as it is, without retries
        body = {"prompt": "refuse-prefill " + PROMPT, "max_tokens": 3}
        async with http.post(f"{router.url}/v1/completions", json=body) as resp:
            refused = await resp.json()
        assert resp.status == 400 and refused == {"error": {"message": "prompt too long for prefill"}}
        assert len(recorder.bodies("prefill")) == 2

    async def abandoned() -> bool:
        return recorder.abandoned == ["decode"]

    await eventually(abandoned, "the decode request abandoned (connection closed)")
    await eventually(
        lambda: no_reservation_left(real_redis, real_store, prefill.worker_id, decode.worker_id),
        "reservations released",
    )


async def test_simulated_prefill_and_decode_workers_stream_the_decode_answer(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    procs = [
        start_sim_worker(role="prefill", wait=False),
        start_sim_worker(role="decode", wait=False),
        start_router({"servedModelName": MODEL}, wait=False),
    ]
    prefill, decode, router = (p.wait_ready() for p in procs)
    for worker in (prefill, decode):
        await real_store.register_worker(WorkerSpec("127.0.0.1", worker.port, Role.parse(worker.role)))
    client = AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content.split()) == 12  # a prefill worker makes one token: these twelve came from decode
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    async with aiohttp.ClientSession() as http:
        for worker in (prefill, decode):
            async with http.get(f"{worker.url}/get_server_info") as resp:
                state = (await resp.json())["internal_states"][0]
            assert state["counters"]["requests"] == 1, (worker.role, state)
    await eventually(
        lambda: no_reservation_left(real_redis, real_store, prefill.worker_id, decode.worker_id),
        "reservations released",
    )
    assert "Traceback" not in router.log()


async def test_a_decode_worker_dying_mid_stream_ends_the_stream_with_an_error_event(
    real_redis: aioredis.Redis, real_store: FleetStore, recorder: Recorder, start_router: Any
) -> None:
    prefill = WorkerSpec("127.0.0.1", recorder.prefill_port, Role.PREFILL)
    decode = WorkerSpec("127.0.0.1", recorder.decode_port, Role.DECODE)
    for spec in (prefill, decode):
        await real_store.register_worker(spec)
    router = start_router()
    body = {"prompt": "die-mid-stream " + PROMPT, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            recorder.die.set()
            rest = [orjson.loads(line[6:]) async for line in resp.content if line.startswith(b"data: ")]
        assert orjson.loads(first[6:]) == {"from": "decode", "text": "one"}
        assert len(rest) == 1, rest  # no retry after the first byte: the error event ends the stream
        error = rest[0]["error"]
        assert (
            error["code"] == "upstream_failed"
            and f"DECODE worker {decode.worker_id} failed mid-stream" in error["message"]
        )
        async with http.get(f"{router.url}/metrics") as metrics:
            text = await metrics.text()
        assert 'flexlb_proxy_upstream_failures_total{reason="mid_stream",role="DECODE"} 1.0' in text
    assert len(recorder.bodies("decode")) == 1
    await eventually(
        lambda: no_reservation_left(real_redis, real_store, prefill.worker_id, decode.worker_id),
        "reservations released",
    )
