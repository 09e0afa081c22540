"""PD with simulated workers that hand the KV over as SGLang's do: the decode worker waits, through the bootstrap
server its bootstrap fields name, until its prefill peer computed the prompt's KV, so the client's TTFT includes
where (and how slowly) the prefill ran; a decode whose prefill never delivers fails naming the room and the prefill.

Times are compared only with what the simulators report (their own counters) or with each other, never with
constants."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import ChildProcess, eventually

from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import free_port
from flexlb.state.store import FleetStore

MODEL = "flexlb-sim"
PROMPT_TOKENS = 2000
# A slow prefill worker: 2,000 uncached tokens take ~1 s of its time, a cached prompt a few ms.
PREFILL_ARGS = ("--prefill-tokens-per-ms", "2", "--kv-wait-timeout", "30")
DECODE_ARGS = ("--kv-wait-timeout", "30")


def prompt(tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(PROMPT_TOKENS))


class BootstrapProcess(ChildProcess):
    """``python -m flexlb.sim.bootstrap`` on a free port."""

    what = "bootstrap server"

    def __init__(self, log_path: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "flexlb.sim.bootstrap", "--port", str(self.port)]
        self._spawn(command, {**os.environ, "PYTHONUNBUFFERED": "1"}, log_path)


@pytest.fixture
def bootstrap(tmp_path: Any) -> Iterator[BootstrapProcess]:
    server = BootstrapProcess(str(tmp_path / "bootstrap.log"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


async def counters(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/get_server_info") as resp:
        return (await resp.json())["internal_states"][0]["counters"]


async def router_sees(url: str, *ports: int) -> None:
    """Until the router's view holds the workers on these ports (registered through Redis a moment ago: the view
    follows the change stream, and a request decided before would be given to the roles it knew then)."""
    wanted = {f"127.0.0.1:{port}" for port in ports}

    async def sees() -> bool:
        async with aiohttp.ClientSession() as http, http.post(f"{url}/rtp_llm/schedule_snapshot") as resp:
            snapshot = orjson.loads(await resp.read())
        return wanted <= {w["worker_id"] for w in snapshot["workers"]}

    await eventually(sees, f"the router's view holds {sorted(wanted)}")


async def streamed_ttft_s(http: aiohttp.ClientSession, url: str, text: str) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from sending a streamed completion until its first content event, and every event."""
    body = {"model": MODEL, "prompt": text, "max_tokens": 4, "stream": True}
    started = time.monotonic()
    first: float | None = None
    events = []
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                event = orjson.loads(line[6:])
                events.append(event)
                if first is None and event.get("choices") and event["choices"][0]["text"]:
                    first = time.monotonic()
    assert first is not None, events
    return first - started, events


async def test_client_ttft_includes_the_prefill_the_prefill_worker_reports(
    real_redis: aioredis.Redis,
    real_store: FleetStore,
    bootstrap: BootstrapProcess,
    start_sim_worker: Any,
    start_router: Any,
) -> None:
    procs = [
        start_sim_worker(role="prefill", args=PREFILL_ARGS, time_scale=1.0, wait=False),
        start_sim_worker(role="decode", args=DECODE_ARGS, time_scale=1.0, wait=False),
        start_router({"servedModelName": MODEL, "bootstrapPort": bootstrap.port}, wait=False),
    ]
    prefill, decode, router = (p.wait_ready() for p in procs)
    for worker in (prefill, decode):
        await real_store.register_worker(WorkerSpec("127.0.0.1", worker.port, Role.parse(worker.role)))
    await router_sees(router.url, prefill.port, decode.port)
    async with aiohttp.ClientSession() as http:
        text = prompt("p")
        cold_s, events = await streamed_ttft_s(http, router.url, text)
        assert len("".join(e["choices"][0]["text"] for e in events if e.get("choices")).split()) == 4
        cold = await counters(http, prefill.url)
        assert cold["prefill_tokens"] == PROMPT_TOKENS and cold["cached_tokens"] == 0
        # The prefill worker's own time for it (time_scale 1: model ms are real ms): the client waited at least that.
        assert cold_s * 1000 >= cold["queue_time_ms"] + cold["prefill_time_ms"], (cold_s, cold)
        after_cold = await counters(http, decode.url)
        assert after_cold["prefill_tokens"] == 0 and after_cold["kv_failures"] == 0
        assert after_cold["kv_transfer_ms"] > 0  # the decode worker paid for the tokens it did not hold

        # The same prompt again: cached on the prefill worker (and on the decode one), so it comes much sooner.
        warm_s, _ = await streamed_ttft_s(http, router.url, text)
        warm = await counters(http, prefill.url)
        assert warm["cached_tokens"] - cold["cached_tokens"] >= PROMPT_TOKENS - 64  # all but the last partial block
        assert warm["prefill_time_ms"] - cold["prefill_time_ms"] < cold["prefill_time_ms"] / 10
        assert warm_s < cold_s, (warm_s, cold_s)
    assert "Traceback" not in router.log() + prefill.log() + decode.log()


@pytest.mark.parametrize("engine", ["rtp_llm", "sglang"])
async def test_a_decode_whose_prefill_never_delivers_fails_naming_the_room_and_the_prefill(
    bootstrap: BootstrapProcess, start_sim_worker: Any, engine: str
) -> None:
    decode = start_sim_worker(role="decode", args=("--kv-wait-timeout", "1", "--engine", engine))
    room = 1234567890123
    gone = free_port()  # a bootstrap port nothing listens on
    async with aiohttp.ClientSession() as http:
        for port, why in ((bootstrap.port, "the room is still pending"), (gone, "Connect")):
            body = {
                "text": prompt("q"),
                "sampling_params": {"max_new_tokens": 4},
                "bootstrap_host": "127.0.0.1",
                "bootstrap_port": port,
                "bootstrap_room": room,
            }
            async with asyncio.timeout(20):  # never hangs: 1 s of waiting, then the error
                async with http.post(f"{decode.url}/generate", json=body) as resp:
                    error = (await resp.json())["error"]
            assert resp.status == 504 and error["code"] == "kv_transfer_failed", error
            message = error["message"]
            assert f"bootstrap room {room}" in message and f"bootstrap server 127.0.0.1:{port}" in message, message
            assert "prefill worker at 127.0.0.1" in message and "within 1 s" in message and why in message, message
        state = await counters(http, decode.url)
    assert state["kv_failures"] == 2 and state["generated_tokens"] == 0
    async with aiohttp.ClientSession() as http, http.get(f"{decode.url}/get_load") as resp:
        assert (await resp.json())[0]["num_tokens"] == 0  # the failed requests hold no KV
    assert "Traceback" not in decode.log()


async def test_a_prefill_that_refuses_the_request_fails_its_decode_at_once(
    bootstrap: BootstrapProcess, start_sim_worker: Any
) -> None:
    prefill = start_sim_worker(role="prefill", args=("--kv-wait-timeout", "30", "--kv-blocks", "8"))
    decode = start_sim_worker(role="decode", args=("--kv-wait-timeout", "30"))
    body = {
        "text": prompt("r"),  # more KV than the prefill worker has: it answers 400
        "sampling_params": {"max_new_tokens": 4},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap.port,
        "bootstrap_room": 42,
    }
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(20):  # well before the decode's 30 s: the prefill's refusal reaches it
            (p_resp, d_resp) = await asyncio.gather(
                http.post(f"{prefill.url}/generate", json=body), http.post(f"{decode.url}/generate", json=body)
            )
        assert p_resp.status == 400
        error = (await d_resp.json())["error"]
        assert d_resp.status == 504 and "bootstrap room 42" in error["message"], error
        assert f"127.0.0.1:{prefill.port}" in error["message"] and "KV blocks" in error["message"], error
        p_resp.release()

    async def decode_holds_nothing() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{decode.url}/get_load") as resp:
            return (await resp.json())[0]["num_reqs"] == 0

    await eventually(decode_holds_nothing, "the decode request ended")


async def test_through_the_proxy_a_prefill_that_never_answers_fails_the_request_naming_the_room(
    real_store: FleetStore, bootstrap: BootstrapProcess, start_sim_worker: Any, start_router: Any
) -> None:
    hung = asyncio.Event()

    async def never_answers(request: web.Request) -> web.Response:
        hung.set()
        await asyncio.Event().wait()  # a prefill worker that took the request and never computes it
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/{path:.*}", never_answers)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    prefill_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", prefill_port).start()
    try:
        decode = start_sim_worker(role="decode", args=("--kv-wait-timeout", "1"))
        router = start_router({"servedModelName": MODEL, "bootstrapPort": bootstrap.port, "proxyRetries": 0})
        for port, role in ((prefill_port, Role.PREFILL), (decode.port, Role.DECODE)):
            await real_store.register_worker(WorkerSpec("127.0.0.1", port, role))
        await router_sees(router.url, prefill_port, decode.port)
        body = {"model": MODEL, "prompt": prompt("s"), "max_tokens": 4}
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):  # never hangs: the decode gives up after 1 s
                async with http.post(f"{router.url}/v1/completions", json=body) as resp:
                    error = (await resp.json())["error"]
        assert hung.is_set() and resp.status >= 500, (resp.status, error)
        message = error["message"]
        assert "bootstrap room " in message and f"bootstrap server 127.0.0.1:{bootstrap.port}" in message, message
        assert "no KV from the prefill worker at 127.0.0.1" in message and "within 1 s" in message, message
    finally:
        await runner.cleanup()
