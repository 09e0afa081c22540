"""The benchmark's streaming client and driver against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from flexlb.bench.client import RequestRecord, StreamingClient, base_url, payload
from flexlb.bench.run import RunOptions, run_requests
from flexlb.bench.worker_metrics import read_workers, worker_deltas
from flexlb.bench.workloads import Arrivals, RequestSpec

USAGE = {"prompt_tokens": 130, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}}


class Script:
    """What the fake server answers, per path prefix; it records every request body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hang_started = asyncio.Event()
        self.info_calls = 0
        self.metrics_calls = 0


async def _sse(request: web.Request, events: list[Any], done: bool = True) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
    if done:
        await resp.write(b"data: [DONE]\n\n")
    return resp


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def make_app(script: Script) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script.bodies.append(body)
        mode = request.match_info["mode"]
        if mode == "ok":
            if "messages" in body:
                events = [_delta({"role": "assistant", "content": ""}), _delta({"content": "a"})]
                events += [_delta({"content": " b"}), _delta({"content": " c"}), _delta({}, "length")]
            else:
                events = [_chunk("a"), _chunk(" b"), _chunk(" c"), _chunk("", "length")]
            return await _sse(request, [*events, {"choices": [], "usage": USAGE}])
        if mode == "nousage":
            return await _sse(request, [_chunk("a"), _chunk(" b"), _chunk("", "stop")])
        if mode == "busy":
            error = {"error": {"message": "queue full", "type": "server_error"}}
            return web.json_response(error, status=503)
        if mode == "broken":
            return await _sse(request, [_chunk("a"), {"error": {"message": "engine stopped"}}])
        if mode == "cut":
            return await _sse(request, [_chunk("a")], done=False)
        if mode == "json":
            return web.json_response({"choices": [{"text": "abc"}]})
        if mode == "hang":
            script.hang_started.set()
            await asyncio.Event().wait()
        raise web.HTTPNotFound()

    async def server_info(request: web.Request) -> web.Response:
        script.info_calls += 1
        n = script.info_calls
        counters = {"requests": 10 * n, "prompt_tokens": 1000 * n, "cached_tokens": 400 * n, "queue_time_ms": 5 * n}
        return web.json_response({"internal_states": [{"counters": {**counters, "generated_tokens": 0}}]})

    async def metrics(request: web.Request) -> web.Response:
        n = script.metrics_calls = script.metrics_calls + 1
        text = (
            "# TYPE vllm:prompt_tokens counter\n"
            f'vllm:prompt_tokens_total{{model_name="m"}} {100.0 * n}\n'
            "# TYPE vllm:prefix_cache_hits counter\n"
            f'vllm:prefix_cache_hits_total{{model_name="m"}} {50.0 * n}\n'
            "# TYPE vllm:request_success counter\n"
            f'vllm:request_success_total{{finished_reason="length"}} {2.0 * n}\n'
            f'vllm:request_success_total{{finished_reason="stop"}} {1.0 * n}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/{mode}/v1/completions", handle)
    app.router.add_post("/{mode}/v1/chat/completions", handle)
    app.router.add_get("/sim/get_server_info", server_info)
    app.router.add_get("/prom/metrics", metrics)
    return app


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    runner = web.AppRunner(make_app(script), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", script
    await runner.cleanup()


async def send(url: str, spec: RequestSpec) -> RequestRecord:
    async with aiohttp.ClientSession() as session:
        client = StreamingClient(session, url, model="m")
        return await client.send(spec, RequestRecord(0, spec.tag, spec.api, spec.max_tokens), 0.0)


PROMPT = RequestSpec(prompt="one two three", max_tokens=3)
CHAT = RequestSpec(messages=[{"role": "user", "content": "hi"}], max_tokens=3)


async def test_completion_stream_is_timed_and_reads_usage(server: tuple[str, Script]) -> None:
    url, script = server
    record = await send(f"{url}/ok", PROMPT)
    assert record.ok, record.error
    assert record.status == 200 and record.output_tokens == 3
    assert record.prompt_tokens == 130 and record.cached_tokens == 64
    assert record.ttft_ms is not None and record.e2e_ms is not None and 0 < record.ttft_ms <= record.e2e_ms
    body = script.bodies[-1]
    assert body["prompt"] == "one two three" and body["max_tokens"] == 3 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "m" and body["ignore_eos"]


async def test_chat_stream_counts_content_not_the_role_chunk(server: tuple[str, Script]) -> None:
    url, script = server
    record = await send(f"{url}/ok/v1/", CHAT)
    assert record.ok and record.output_tokens == 3 and record.api == "chat"
    assert script.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


async def test_without_usage_output_tokens_are_content_chunks(server: tuple[str, Script]) -> None:
    url, _ = server
    record = await send(f"{url}/nousage", PROMPT)
    assert record.ok and record.output_tokens == 2 and record.prompt_tokens is None


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("busy", "HTTP 503: queue full"),
        ("broken", "error in stream: engine stopped"),
        ("cut", "the stream ended before [DONE] or a finish_reason"),
        ("json", "not a stream: the answer's Content-Type is application/json"),
        ("nothing", "HTTP 404"),
    ],
)
async def test_errors_carry_their_reason(server: tuple[str, Script], mode: str, reason: str) -> None:
    url, _ = server
    record = await send(f"{url}/{mode}", PROMPT)
    assert not record.ok and record.error is not None and record.error.startswith(reason)


async def test_connection_refused_is_an_error_not_an_exception() -> None:
    record = await send("http://127.0.0.1:1", PROMPT)
    assert record.error is not None and "Cannot connect" in record.error


def test_base_url_and_payload() -> None:
    assert base_url("127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert base_url("http://h:1/v1") == "http://h:1"
    assert "model" not in payload(PROMPT, None, ignore_eos=False)
    assert "ignore_eos" not in payload(PROMPT, None, ignore_eos=False)


async def test_driver_sends_every_request_and_waits_for_previous_turns(server: tuple[str, Script]) -> None:
    url, _ = server
    specs = [
        RequestSpec(prompt="a", max_tokens=3, tag="s0t0"),
        RequestSpec(prompt="b", max_tokens=3, tag="s1t0"),
        RequestSpec(prompt="a x", max_tokens=3, depends_on=0, tag="s0t1"),
        RequestSpec(prompt="a x y", max_tokens=3, depends_on=2, tag="s0t2"),
    ]
    lines: list[str] = []
    for arrivals in (Arrivals("closed", concurrency=3), Arrivals("trace")):
        options = RunOptions(target=f"{url}/ok", arrivals=arrivals, progress_interval_s=0.05)
        outcome = await run_requests(specs, options, out=lines.append)
        assert not outcome.interrupted and [r.tag for r in outcome.records] == ["s0t0", "s1t0", "s0t1", "s0t2"]
        assert all(r.ok for r in outcome.records)
        by_tag = {r.tag: r for r in outcome.records}
        assert by_tag["s0t1"].start_s >= by_tag["s0t0"].end_s
        assert by_tag["s0t2"].start_s >= by_tag["s0t1"].end_s
        assert outcome.elapsed_s == max(r.end_s for r in outcome.records)
        assert outcome.workers is None
    assert "sent 4/4" in lines[-1]


async def test_stop_cancels_requests_in_flight(server: tuple[str, Script]) -> None:
    url, script = server
    stop = asyncio.Event()

    async def stop_when_the_server_has_it() -> None:
        await script.hang_started.wait()
        stop.set()

    helper = asyncio.create_task(stop_when_the_server_has_it())
    options = RunOptions(target=f"{url}/hang", arrivals=Arrivals("closed", concurrency=1))
    outcome = await run_requests([PROMPT, PROMPT], options, out=lambda _: None, stop=stop)
    await helper
    assert outcome.interrupted
    assert len(outcome.records) == 1
    assert outcome.records[0].error == "cancelled: the run was interrupted"


async def test_worker_counters_before_and_after(server: tuple[str, Script]) -> None:
    url, _ = server
    urls = [f"{url}/sim", f"{url}/prom", "http://127.0.0.1:1"]
    async with aiohttp.ClientSession() as session:
        before = await read_workers(session, urls)
        after = await read_workers(session, urls)
    rows = worker_deltas(urls, before, after)
    sim, prom, down = rows
    assert sim["source"] == "get_server_info"
    assert (sim["requests"], sim["prompt_tokens"], sim["cached_tokens"]) == (10, 1000, 400)
    assert sim["hit_ratio"] == 0.4 and sim["mean_queue_ms"] == 0.5
    assert prom["source"] == "metrics"
    assert (prom["requests"], prom["prompt_tokens"], prom["cached_tokens"]) == (3, 100, 50)
    assert prom["mean_queue_ms"] is None
    assert sim["share"] == pytest.approx(10 / 13) and prom["share"] == pytest.approx(3 / 13)
    assert down["url"] == "http://127.0.0.1:1" and "Cannot connect" in down["error"] and down["share"] is None
