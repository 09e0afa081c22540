"""Proxy mode end to end, as real processes: redis-server, `flexlb serve` (the proxy), `flexlb sim-worker`s and, where
the workers' own reports should hand reservations over, `flexlb master`. Clients are the official `openai` package
and plain aiohttp."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import eventually
from openai import APIStatusError, AsyncOpenAI

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

MODEL = "flexlb-sim"  # what the simulated workers serve; the routers' servedModelName
PROMPT = " ".join(f"w{i}" for i in range(150))  # two full blocks and a partial one


def start_all(*starters: Callable[[], Any]) -> list[Any]:
    """Start processes at once, then wait for each: their start-ups overlap."""
    procs = [start() for start in starters]
    return [p.wait_ready() for p in procs]


async def register(store: FleetStore, *workers: Any, role: Role = Role.PDFUSION, **status: Any) -> None:
    for w in workers:
        await store.register_worker(WorkerSpec("127.0.0.1", w.port, role), WorkerStatus(**status))


async def reservations(redis: aioredis.Redis, store: FleetStore, worker_id: str) -> tuple[str | None, int]:
    """(pending_count in the worker's status, members of its reservations zset)."""
    pending = await redis.hget(store.keys.worker(worker_id), "pending_count")
    return pending, await redis.zcard(store.keys.reservations(worker_id))


async def assert_no_reservation_left(redis: aioredis.Redis, store: FleetStore, *workers: Any) -> None:
    async def none_left() -> bool:
        return all([await reservations(redis, store, w.worker_id) == ("0", 0) for w in workers])

    await eventually(none_left, "every reservation released")


async def sim_state(http: aiohttp.ClientSession, worker: Any) -> dict[str, Any]:
    async with http.get(f"{worker.url}/get_server_info") as resp:
        return (await resp.json())["internal_states"][0]


async def proxy_metric(http: aiohttp.ClientSession, router: Any, line_start: str) -> float:
    async with http.get(f"{router.url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


async def test_the_openai_client_through_the_proxy_in_front_of_two_workers(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any, start_master: Any
) -> None:
    a, b, master, router = start_all(
        lambda: start_sim_worker(wait=False),
        lambda: start_sim_worker(wait=False),
        lambda: start_master(wait=False),
        lambda: start_router({"servedModelName": MODEL}, wait=False),
    )
    await register(real_store, a, b)
    client = AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    try:
        assert [m.id async for m in client.models.list()] == [MODEL]

        chat = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        assert chat.choices[0].message.content and chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 6

        text = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
        assert text.choices[0].text and text.usage is not None and text.usage.prompt_tokens == 150

        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 8 and content.strip()
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

        # the service id is a name of the model too; the proxy sends the workers' name on
        stream = await client.completions.create(
            model=real_store.keys.service, prompt=PROMPT, max_tokens=4, stream=True
        )
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        assert len(pieces) >= 4 and "".join(pieces).strip()

        with pytest.raises(APIStatusError) as info:
            await client.completions.create(model="other-model", prompt=PROMPT, max_tokens=1)
        assert info.value.status_code == 404 and "other-model" in info.value.message
    finally:
        await client.close()

    await assert_no_reservation_left(real_redis, real_store, a, b)
    async with aiohttp.ClientSession() as http:
        served = [(await sim_state(http, w))["counters"]["requests"] for w in (a, b)]
        assert sum(served) == 4
        # streams sent whole count as 200 even when the client hangs up at once after them
        for route, answered in (("/v1/chat/completions", 2), ("/v1/completions", 2), ("/v1/models", 1)):
            assert (
                await proxy_metric(http, router, f'flexlb_proxy_requests_total{{route="{route}",status="200"}}')
                == answered
            )
        assert (
            await proxy_metric(http, router, 'flexlb_proxy_requests_total{route="/v1/completions",status="404"}') == 1
        )
    assert "Traceback" not in router.log() and master.process.poll() is None


async def test_a_client_that_goes_away_cancels_its_worker_request_and_releases(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    # real time (time scale 1): 5000 tokens take about a minute, so the request is surely live when the client leaves.
    # No master: the proxy's release is the only thing that can free the reservation.
    worker, router = start_all(
        lambda: start_sim_worker(wait=False, time_scale=1.0),
        lambda: start_router({"servedModelName": MODEL}, wait=False),
    )
    await register(real_store, worker)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000}

    async def released_and_cancelled() -> bool:
        idle = (await sim_state(http, worker))["running"] == 0
        return idle and await reservations(real_redis, real_store, worker.worker_id) == ("0", 0)

    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{router.url}/v1/completions", json={**body, "stream": True})
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        assert (await sim_state(http, worker))["running"] == 1
        assert await reservations(real_redis, real_store, worker.worker_id) == ("1", 1)
        resp.close()  # the client goes away mid-stream
        await eventually(released_and_cancelled, "stream: worker request cancelled and reservation released")

        # not streamed: nothing is written until the end, so only the server's handler cancellation can notice
        with pytest.raises(TimeoutError):
            await http.post(f"{router.url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.5))
        await eventually(released_and_cancelled, "not streamed: worker request cancelled and reservation released")
        assert (await sim_state(http, worker))["counters"]["cancelled"] == 2
        assert (
            await proxy_metric(http, router, 'flexlb_proxy_requests_total{route="/v1/completions",status="499"}') == 2
        )


async def test_a_dead_worker_is_retried_elsewhere_and_all_dead_is_a_502(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    # No master polls: the router believes both workers alive. LOWEST_CONCURRENCY picks `dead` first (load 0).
    dead, alive, router = start_all(
        lambda: start_sim_worker(wait=False),
        lambda: start_sim_worker(wait=False),
        lambda: start_router({"servedModelName": MODEL, "loadBalanceStrategy": "LOWEST_CONCURRENCY"}, wait=False),
    )
    await register(real_store, dead)
    await register(real_store, alive, running=3)
    dead.stop(signal.SIGKILL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
            answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["choices"][0]["message"]["content"]
        assert (await sim_state(http, alive))["counters"]["requests"] == 1
        failures = 'flexlb_proxy_upstream_failures_total{reason="connect",role="PDFUSION"}'
        assert await proxy_metric(http, router, failures) == 1
        assert await proxy_metric(http, router, 'flexlb_proxy_retries_total{role="PDFUSION"}') == 1

        alive.stop(signal.SIGKILL)
        async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
            error = await resp.json()
        assert resp.status == 502, error
        message = error["error"]["message"]
        assert error["error"]["code"] == "upstream_failed" and error["error"]["type"] == "server_error"
        assert f"PDFUSION worker {dead.worker_id} failed" in message and f"{alive.worker_id} failed" in message
        assert "already failed this request" in message  # the scheduler's word on the third attempt
    await assert_no_reservation_left(real_redis, real_store, dead, alive)
    log = router.log()
    assert f"PDFUSION worker {dead.worker_id} failed before its first byte" in log and "Traceback" not in log


BAD_REQUESTS: list[tuple[str, str, bytes, int, str | None, str]] = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None, "malformed JSON"),
    ("empty body", "/v1/completions", b"", 400, None, "empty body"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, "expected a JSON object"),
    ("messages not a list", "/v1/chat/completions", b'{"messages": "hi"}', 400, "messages", "got string"),
    ("message without role", "/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400, "messages", "role"),
    ("max_tokens a string", "/v1/completions", b'{"prompt": "hi", "max_tokens": "5"}', 400, "max_tokens", "integer"),
    ("stream not a boolean", "/v1/completions", b'{"prompt": "hi", "stream": "yes"}', 400, "stream", "boolean"),
    ("missing prompt", "/v1/completions", b'{"max_tokens": 3}', 400, "prompt", "required"),
    ("empty prompt", "/v1/completions", b'{"prompt": "   "}', 400, "prompt", "empty"),
    ("generate without text", "/generate", b'{"sampling_params": {}}', 400, "text", "required"),
    ("bad max_new_tokens", "/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": 0}}', 400,
     "sampling_params.max_new_tokens", "at least 1"),
    ("unknown model", "/v1/chat/completions", b'{"model": "gpt-x", "messages": [{"role": "user", "content": "x"}]}',
     404, "model", "unknown model 'gpt-x'"),
]  # fmt: skip


async def test_bad_input_is_refused_as_openai_json_and_the_router_keeps_serving(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any
) -> None:
    worker, router = start_all(
        lambda: start_sim_worker(wait=False), lambda: start_router({"servedModelName": MODEL}, wait=False)
    )
    await register(real_store, worker)
    async with aiohttp.ClientSession() as http:
        for name, path, raw, status, param, words in BAD_REQUESTS:
            async with http.post(f"{router.url}{path}", data=raw) as resp:
                body = await resp.json()
            assert resp.status == status, (name, body)
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
            assert words in error["message"], (name, error)
        assert (await sim_state(http, worker))["counters"]["requests"] == 0  # nothing reached the worker

        good = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
        async with http.post(f"{router.url}/generate", json=good) as resp:
            answer = await resp.json()
        assert resp.status == 200 and answer["meta_info"]["prompt_tokens"] == 150, answer
    await assert_no_reservation_left(real_redis, real_store, worker)
    assert "Traceback" not in router.log()
