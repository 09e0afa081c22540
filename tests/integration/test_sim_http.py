"""A simulated worker on a real socket: OpenAI and SGLang APIs, incremental SSE, clear errors, metrics, and a client
that goes away gives its slot and KV back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.http_api import create_sim_app

MODEL = "sim-model"
LONG_PROMPT = " ".join(f"word{i}" for i in range(300))  # 18 full blocks of 16

Worker = tuple[str, SimEngine]
Serve = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start simulated workers on free ports; each returns (base_url, engine)."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Worker:
        config = EngineConfig(**{"block_size": 16, "kv_blocks": 1024, "time_scale": 0.05, **overrides})
        engine = SimEngine(config)
        runner = web.AppRunner(create_sim_app(engine, MODEL))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}", engine

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def worker(serve: Serve) -> Worker:
    return await serve()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """Decoded ``data:`` payloads as they arrive; ``"[DONE]"`` for the end marker."""
    async for line in response.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            yield "[DONE]" if payload == b"[DONE]" else orjson.loads(payload)


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def test_completions_usage_and_cached_tokens_on_a_repeat(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, _ = worker
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 5, "temperature": 0.7, "logit_bias": {}}
    status, first = await post(http, f"{base}/v1/completions", body)
    assert status == 200, first
    assert first["object"] == "text_completion" and first["model"] == MODEL
    assert len(first["choices"][0]["text"].split()) == 5 and first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {
        "prompt_tokens": 300,
        "completion_tokens": 5,
        "total_tokens": 305,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    _, second = await post(http, f"{base}/v1/completions", body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 18 * 16
    assert second["choices"][0]["text"] == first["choices"][0]["text"]  # deterministic output


async def test_chat_usage_and_cached_tokens_on_a_repeat(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, _ = worker
    messages = [{"role": "system", "content": LONG_PROMPT}, {"role": "user", "content": "hello"}]
    status, first = await post(http, f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200, first
    assert first["object"] == "chat.completion"
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"].split()) == 4
    assert first["usage"]["prompt_tokens"] == 300 + 4  # <|system|>, <|user|>, hello, <|assistant|>
    body = {"messages": messages, "max_completion_tokens": 4}
    _, second = await post(http, f"{base}/v1/chat/completions", body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 19 * 16


async def test_completion_stream_is_incremental(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, engine = worker
    max_tokens = 60
    body = {"prompt": "stream me", "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        events = sse_events(resp)
        first = await anext(events)
        # The first token reached us while the engine is still generating this request.
        status = engine.status()
        assert status.running_query_len == 1
        assert status.running_task_info[0].iterate_count < max_tokens
        rest = [event async for event in events]
    assert rest[-1] == "[DONE]"
    chunks = [first, *rest[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len([t for t in texts if t]) == max_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens
    _, whole = await post(http, f"{base}/v1/completions", {**body, "stream": False})
    assert "".join(texts) == whole["choices"][0]["text"]


async def test_chat_stream_deltas(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, _ = worker
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
        events = [event async for event in sse_events(resp)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(contents) == 6 and all(contents)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    _, whole = await post(http, f"{base}/v1/chat/completions", {**body, "stream": False})
    assert "".join(contents) == whole["choices"][0]["message"]["content"]


async def test_sglang_generate(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, _ = worker
    body = {"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 3, "top_p": 0.9}}
    status, first = await post(http, f"{base}/generate", body)
    assert status == 200, first
    assert len(first["text"].split()) == 3
    meta = first["meta_info"]
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (300, 3, 0)
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    async with http.post(f"{base}/generate", json={**body, "stream": True}) as resp:
        events = [event async for event in sse_events(resp)]
    assert events[-1] == "[DONE]" and len(events) == 4
    assert [e["meta_info"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3]
    assert events[-2]["text"] == first["text"] and events[-2]["meta_info"]["cached_tokens"] == 18 * 16


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", b"", 400, "empty body"),
        ("/v1/completions", b'{"max_tokens": 5}', 400, "prompt: required"),
        ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "batched"),
        ("/v1/completions", b'{"prompt": ""}', 400, "empty"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n:"),
        ("/v1/completions", b'{"prompt": "x", "model": "other"}', 404, "does not exist"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000000}', 400, "KV blocks"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400, "role"),
        ("/v1/chat/completions", b'{"prompt": "x"}', 400, "messages"),
        ("/generate", b'{"sampling_params": {}}', 400, "text or input_ids"),
        ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": -1}}', 400, "max_new_tokens"),
        ("/generate", b'{"text": ["a", "b"]}', 400, "text"),
    ],
)
async def test_bad_input_is_refused_clearly(
    worker: Worker, http: aiohttp.ClientSession, path: str, body: bytes, status: int, fragment: str
) -> None:
    base, engine = worker
    async with http.post(f"{base}{path}", data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert engine.counters.requests == 0


async def test_unknown_route_and_method_are_json(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, _ = worker
    async with http.get(f"{base}/v1/nothing") as resp:
        assert resp.status == 404 and "error" in await resp.json()
    async with http.get(f"{base}/v1/completions") as resp:
        assert resp.status == 405 and "error" in await resp.json()


async def test_full_queue_answers_503(serve: Serve, http: aiohttp.ClientSession) -> None:
    base, engine = await serve(max_concurrency=1, max_queue=0)
    body = {"prompt": "occupy", "max_tokens": 5000, "stream": True}
    async with http.post(f"{base}/v1/completions", json=body) as hog:
        await anext(sse_events(hog))
        status, error = await post(http, f"{base}/v1/completions", {"prompt": "x"})
        assert status == 503
        assert error["error"]["code"] == "queue_full" and "queue full" in error["error"]["message"]
    assert engine.counters.rejected == 1


async def test_disconnect_mid_stream_frees_the_slot_and_kv(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, engine = worker
    body = {"prompt": LONG_PROMPT, "max_tokens": 5000, "stream": True}
    resp = await http.post(f"{base}/v1/completions", json=body)
    await anext(sse_events(resp))
    assert engine.running_count == 1 and engine.cache.reserved_blocks > 0
    resp.close()  # the client goes away mid-stream
    await wait_until(lambda: engine.running_count == 0)
    assert engine.counters.cancelled == 1
    assert engine.cache.reserved_blocks == 0 and engine.cache.pinned_blocks == 0
    assert engine.status().available_kv_cache == engine.config.total_kv_tokens


async def test_disconnect_while_queued_cancels_the_request(serve: Serve, http: aiohttp.ClientSession) -> None:
    base, engine = await serve(max_concurrency=1)
    async with http.post(f"{base}/v1/completions", json={"prompt": "hog", "max_tokens": 5000, "stream": True}) as hog:
        await anext(sse_events(hog))
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.2)
            await http.post(f"{base}/v1/completions", json={"prompt": "queued"}, timeout=timeout)
        await wait_until(lambda: engine.waiting_count == 0)
        assert engine.running_count == 1 and engine.counters.cancelled == 1


async def test_metrics_reflect_the_engine_counters(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, engine = worker
    for _ in range(2):
        await post(http, f"{base}/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 3})
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    label = f'{{model_name="{MODEL}"}}'
    for line in (
        f"flexlb_sim_requests_total{label} 2.0",
        f"flexlb_sim_prompt_tokens_total{label} 600.0",
        f"flexlb_sim_cached_prompt_tokens_total{label} 288.0",
        f"flexlb_sim_generation_tokens_total{label} 6.0",
        f"flexlb_sim_requests_running{label} 0.0",
        f"flexlb_sim_requests_waiting{label} 0.0",
        f"flexlb_sim_prefix_cache_hit_rate{label} 0.48",
        f"flexlb_sim_kv_cache_usage_ratio{label} 0.0",
    ):
        assert line in text.splitlines(), line
    assert engine.counters.cached_tokens == 288


async def test_info_and_health_endpoints(worker: Worker, http: aiohttp.ClientSession) -> None:
    base, engine = worker
    async with http.get(f"{base}/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    for path in ("/health", "/health_generate"):
        async with http.get(f"{base}{path}") as resp:
            assert resp.status == 200, path
    async with http.get(f"{base}/get_server_info") as resp:
        info = await resp.json()
    assert info["page_size"] == 16 and info["engine_config"]["role"] == "PDFUSION"
    assert info["internal_states"][0]["counters"]["finished"] == 1  # the health generation
    async with http.get(f"{base}/get_model_info") as resp:
        assert (await resp.json())["is_generation"] is True
    await engine.stop()
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 503
    async with http.get(f"{base}/health_generate") as resp:
        assert resp.status == 503
