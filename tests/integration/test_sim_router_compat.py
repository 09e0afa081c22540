"""Real simulated workers (`flexlb sim-worker`) serve what sglang-router and vllm-router call on real engines: health,
server and model info without a tokenizer to download, /get_load in both shapes with live numbers, /tokenize and
/render with the simulator's own tokenisation, the extra fields those routers add, and the vLLM-style PD hand-over.

``RouterStandIn`` calls each endpoint the way those routers do and reads the answers as they parse them."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import SimWorkerProcess
from conftest import eventually as poll

from flexlb.blocks import block_cache_keys, render_chat, tokenize
from flexlb.sim.protocol import ROUTER_EXTRA_FIELDS

MODEL = "sim-model"
BLOCK = 16
PROMPT = " ".join(f"word{i}" for i in range(100))  # 6 full blocks of 16 and a partial one
MESSAGES = [{"role": "system", "content": PROMPT}, {"role": "user", "content": "hello there"}]

StartWorker = Callable[..., SimWorkerProcess]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def worker_args(*extra: str) -> tuple[str, ...]:
    return ("--model", MODEL, "--block-size", str(BLOCK), "--kv-blocks", "512", *extra)


async def first_event(resp: aiohttp.ClientResponse) -> bytes:
    """The first ``data:`` line of a stream: the request is admitted (or at least queued) once headers arrive."""
    assert resp.status == 200, await resp.text()
    async for line in resp.content:
        if line.startswith(b"data: "):
            return line
    raise AssertionError("the stream ended without an event")


class RouterStandIn:
    """What sglang-router / vllm-router do with a worker URL, reduced to the calls and the parsing."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def get(self, url: str) -> tuple[int, Any]:
        async with self.http.get(url) as resp:
            return resp.status, await resp.json(content_type=None)

    async def post(self, url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def healthy(self, worker: str) -> bool:
        async with self.http.get(f"{worker}/health") as resp:
            return resp.status == 200

    async def server_info(self, worker: str, path: str = "/get_server_info") -> dict[str, Any]:
        """As sgl-router's worker registration: optional fields, each of a fixed type; the model id from model_path."""
        status, info = await self.get(f"{worker}{path}")
        assert status == 200, info
        typed = {
            "model_path": str,
            "version": str,
            "dp_size": int,
            "max_running_requests": int,
            "max_prefill_tokens": int,
            "max_total_num_tokens": int,
        }
        for key, kind in typed.items():
            assert isinstance(info[key], kind) and not isinstance(info[key], bool), (key, info[key])
        for key in ("max_total_tokens", "max_batch_size", "max_num_reqs"):  # absent or an integer
            assert info.get(key) is None or isinstance(info[key], int), key
        return info

    async def sglang_load(self, worker: str) -> list[dict[str, int]]:
        """SGLang form: a list of per-rank objects; the cache-aware policy sums ``num_tokens`` over ranks."""
        status, load = await self.get(f"{worker}/get_load")
        assert status == 200 and isinstance(load, list) and load, load
        for rank in load:
            for key in ("dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"):
                assert isinstance(rank[key], int) and rank[key] >= 0, (key, rank)
        return load

    async def vllm_load(self, worker: str, query: str = "?format=vllm") -> int:
        """vllm-router: ``data.get("load").as_i64()``."""
        status, load = await self.get(f"{worker}/get_load{query}")
        assert status == 200 and isinstance(load, dict) and isinstance(load["load"], int), load
        return load["load"]

    async def vllm_pd(
        self, prefill: str, decode: str, path: str, request: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """vllm-router's two stages: prefill with max_tokens 1, not streamed, asking for a remote decode; then the
        original request to the decode worker with the prefill answer's kv_transfer_params."""
        rid = f"___prefill_addr_{prefill}___decode_addr_{decode}_{uuid.uuid4().hex}"
        stage1 = {**request, "max_tokens": 1, "stream": False}
        if "max_completion_tokens" in stage1:
            stage1["max_completion_tokens"] = 1
        stage1.pop("stream_options", None)
        stage1["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        status, first = await self.post(f"{prefill}{path}", stage1, {"X-Request-Id": rid})
        assert status == 200, first
        stage2 = dict(request)
        if "kv_transfer_params" in first:
            stage2["kv_transfer_params"] = first["kv_transfer_params"]
        status, second = await self.post(f"{decode}{path}", stage2, {"X-Request-Id": rid})
        assert status == 200, second
        return first, second


@pytest.fixture
def router(http: aiohttp.ClientSession) -> RouterStandIn:
    return RouterStandIn(http)


async def test_health_server_and_model_info_name_the_model_and_no_tokenizer(
    start_sim_worker: StartWorker, router: RouterStandIn
) -> None:
    worker = start_sim_worker(role="pdfusion", args=worker_args())
    assert await router.healthy(worker.url)
    info = await router.server_info(worker.url)
    alias = await router.server_info(worker.url, "/server_info")
    assert alias.keys() == info.keys()
    assert info["model_path"] == MODEL and info["served_model_name"] == MODEL
    assert info["tokenizer_path"] is None  # a router has nothing to download
    assert (info["dp_size"], info["tp_size"], info["page_size"]) == (1, 1, BLOCK)
    assert info["disaggregation_mode"] == "null"
    for path in ("/get_model_info", "/model_info"):
        status, model = await router.get(f"{worker.url}{path}")
        assert status == 200
        assert model["model_path"] == MODEL and model["tokenizer_path"] is None and model["is_generation"] is True


async def test_get_load_follows_running_and_waiting_requests(
    start_sim_worker: StartWorker, router: RouterStandIn, http: aiohttp.ClientSession
) -> None:
    worker = start_sim_worker(role="pdfusion", args=worker_args("--max-concurrency", "1", "--kv-blocks", "4096"))
    assert await router.sglang_load(worker.url) == [
        {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0, "num_pages": 0}
    ]
    assert await router.vllm_load(worker.url) == 0

    max_tokens = 20_000  # far longer than the test: the stream is closed below
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    held = math.ceil((100 + max_tokens) / BLOCK) * BLOCK  # KV for the whole sequence is reserved at admission
    running = await http.post(f"{worker.url}/v1/completions", json=body)
    try:
        await first_event(running)

        async def one_running() -> list[dict[str, int]] | None:
            load = await router.sglang_load(worker.url)
            return load if load[0]["num_reqs"] == 1 else None

        (rank,) = await poll(one_running, "the stream shows in /get_load")
        assert (rank["num_waiting_reqs"], rank["num_tokens"], rank["num_pages"]) == (0, held, held // BLOCK)
        assert await router.vllm_load(worker.url) == 1

        # Its response does not start before it is admitted: sent from a task, on a session of its own whose close
        # (below) surely closes the connection, so the worker cancels it.
        other = aiohttp.ClientSession()
        queued = asyncio.create_task(other.post(f"{worker.url}/v1/completions", json={**body, "prompt": "queued"}))
        try:

            async def one_waiting() -> list[dict[str, int]] | None:
                load = await router.sglang_load(worker.url)
                return load if load[0]["num_waiting_reqs"] == 1 else None

            (rank,) = await poll(one_waiting, "the queued request shows in /get_load")
            assert rank["num_reqs"] == 2 and rank["num_tokens"] == held  # a waiting request holds no KV
            assert await router.vllm_load(worker.url) == 2
        finally:
            queued.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queued
            await other.close()
    finally:
        running.close()

    async def idle() -> bool:
        load = await router.sglang_load(worker.url)
        return load[0]["num_reqs"] == 0 and load[0]["num_tokens"] == 0

    await poll(idle, "/get_load back to idle once the clients went away")
    assert await router.vllm_load(worker.url) == 0


async def test_load_format_option_makes_vllm_the_default(start_sim_worker: StartWorker, router: RouterStandIn) -> None:
    worker = start_sim_worker(role="decode", args=worker_args("--load-format", "vllm"))
    assert await router.vllm_load(worker.url, query="") == 0
    status, sglang = await router.get(f"{worker.url}/get_load?format=sglang")
    assert status == 200 and isinstance(sglang, list) and sglang[0]["num_reqs"] == 0
    status, error = await router.get(f"{worker.url}/get_load?format=other")
    assert status == 400 and error["error"]["param"] == "format"


async def test_tokenize_and_render_match_the_simulators_tokenisation(
    start_sim_worker: StartWorker, router: RouterStandIn
) -> None:
    worker = start_sim_worker(role="pdfusion", args=worker_args())
    url = worker.url
    tokens = tokenize(PROMPT)
    chat_tokens = tokenize(render_chat(MESSAGES))
    _, models = await router.get(f"{url}/v1/models")
    max_model_len = models["data"][0]["max_model_len"]

    # vLLM /tokenize: a prompt, or chat messages rendered with the chat template.
    status, tok = await router.post(f"{url}/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert status == 200, tok
    assert tok == {"tokens": tokens, "count": 100, "max_model_len": max_model_len, "token_strs": None}
    _, tok = await router.post(f"{url}/tokenize", {"messages": MESSAGES, "return_token_strs": True})
    assert tok["tokens"] == chat_tokens and tok["count"] == len(chat_tokens)
    assert tok["token_strs"] == render_chat(MESSAGES).split()
    # SGLang /tokenize: {"text"}, and a batch of prompts.
    _, tok = await router.post(f"{url}/tokenize", {"text": PROMPT})
    assert tok["tokens"] == tokens
    _, tok = await router.post(f"{url}/tokenize", {"prompt": [PROMPT, "two words"]})
    assert tok["tokens"] == [tokens, tokenize("two words")] and tok["count"] == [100, 2]
    status, error = await router.post(f"{url}/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404 and error["error"]["code"] == "model_not_found"

    # vLLM render: chat -> one object; completions -> a list, one per prompt.
    status, chat = await router.post(f"{url}/v1/chat/completions/render", {"model": MODEL, "messages": MESSAGES})
    assert status == 200, chat
    assert chat["token_ids"] == chat_tokens and chat["model"] == MODEL
    assert isinstance(chat["request_id"], str) and chat["request_id"].startswith("chatcmpl-")
    status, rendered = await router.post(f"{url}/v1/completions/render", {"prompt": PROMPT, "max_tokens": 3})
    assert status == 200 and isinstance(rendered, list) and len(rendered) == 1, rendered
    assert rendered[0]["token_ids"] == tokens and rendered[0]["sampling_params"]["max_tokens"] == 3
    assert rendered[0]["request_id"].startswith("cmpl-")
    _, batch = await router.post(f"{url}/v1/completions/render", {"prompt": [PROMPT, [7, 8, 9]]})
    assert [r["token_ids"] for r in batch] == [tokens, [7, 8, 9]]

    # The real requests are tokenised the same way.
    _, done = await router.post(f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
    assert done["usage"]["prompt_tokens"] == len(tokens)
    _, done = await router.post(f"{url}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert done["usage"]["prompt_tokens"] == len(chat_tokens)


# Values of the types real routers send, and wrong types: none may fail a request or the worker.
EXTRA_FIELDS = {
    "no_stop_trim": False,
    "ignore_eos": True,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "bootstrap_host": "127.0.0.1",
    "bootstrap_port": 8998,
    "bootstrap_room": (1 << 64) - 1,
    "kv_transfer_params": None,
}
ODD_EXTRA_FIELDS = {
    **{name: {"unexpected": [1, "two"]} for name in ROUTER_EXTRA_FIELDS},
    "bootstrap_port": "not a port",
    "kv_transfer_params": "not an object",
}


@pytest.mark.parametrize("extra", [EXTRA_FIELDS, ODD_EXTRA_FIELDS], ids=["router-values", "odd-types"])
async def test_requests_with_the_fields_routers_add_succeed(
    start_sim_worker: StartWorker, router: RouterStandIn, http: aiohttp.ClientSession, extra: dict[str, Any]
) -> None:
    assert set(EXTRA_FIELDS) == set(ROUTER_EXTRA_FIELDS)
    worker = start_sim_worker(role="pdfusion", args=worker_args())
    url = worker.url
    # max_completion_tokens acts as max_tokens when max_tokens is absent, on both OpenAI routes.
    status, done = await router.post(f"{url}/v1/completions", {"prompt": PROMPT, "max_completion_tokens": 3, **extra})
    assert status == 200, done
    assert done["usage"]["completion_tokens"] == 3
    status, done = await router.post(
        f"{url}/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 2, **extra}
    )
    assert status == 200, done
    assert done["usage"]["completion_tokens"] == 2
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True, **extra}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        lines = [line async for line in resp.content if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]\n"
    sampling = {"max_new_tokens": 2, **{k: v for k, v in extra.items() if not k.startswith("bootstrap")}}
    status, done = await router.post(f"{url}/generate", {"text": PROMPT, "sampling_params": sampling, **extra})
    assert status == 200, done
    assert done["meta_info"]["completion_tokens"] == 2
    assert await router.healthy(url)
    assert "Traceback" not in worker.log()


async def counters(router: RouterStandIn, worker: SimWorkerProcess) -> dict[str, Any]:
    return (await router.server_info(worker.url))["internal_states"][0]["counters"]


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6}),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 6}),
    ],
)
async def test_vllm_style_pd_hands_kv_transfer_params_from_prefill_to_decode(
    start_sim_worker: StartWorker, router: RouterStandIn, path: str, request_body: dict[str, Any]
) -> None:
    prefill = start_sim_worker(role="prefill", args=worker_args())
    decode = start_sim_worker(role="decode", args=worker_args())
    tokens = tokenize(PROMPT) if "prompt" in request_body else tokenize(render_chat(MESSAGES))

    first, second = await router.vllm_pd(prefill.url, decode.url, path, request_body)
    kv = first["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    assert isinstance(kv["remote_engine_id"], str) and kv["remote_engine_id"]
    assert kv["remote_block_ids"] == block_cache_keys(tokens, BLOCK)  # the prompt's full blocks, by cache key
    assert (kv["remote_host"], kv["remote_port"]) == ("127.0.0.1", prefill.port)
    assert first["usage"]["completion_tokens"] == 1  # a prefill worker hands over after the first token

    assert "kv_transfer_params" not in second
    assert second["usage"]["prompt_tokens"] == len(tokens) and second["usage"]["completion_tokens"] == 6
    decoded = await counters(router, decode)
    assert decoded["prompt_tokens"] == len(tokens) and decoded["prefill_tokens"] == 0  # no prefill compute
    assert (await counters(router, prefill))["prefill_tokens"] == len(tokens)

    again, _ = await router.vllm_pd(prefill.url, decode.url, path, request_body)
    assert again["kv_transfer_params"]["remote_engine_id"] == kv["remote_engine_id"]  # one id per worker process


async def test_sglang_style_pd_sends_both_workers_the_bootstrap_fields(
    start_sim_worker: StartWorker, router: RouterStandIn
) -> None:
    prefill = start_sim_worker(role="prefill", args=worker_args())
    decode = start_sim_worker(role="decode", args=worker_args())
    # sglang-router sends the same request to both at once, with where the decode worker fetches the KV from.
    body = {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": 4, "ignore_eos": True},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": None,
        "bootstrap_room": 1234567890123,
    }
    (p_status, p_done), (d_status, d_done) = await asyncio.gather(
        router.post(f"{prefill.url}/generate", body), router.post(f"{decode.url}/generate", body)
    )
    assert (p_status, d_status) == (200, 200), (p_done, d_done)
    assert p_done["meta_info"]["completion_tokens"] == 1 and d_done["meta_info"]["completion_tokens"] == 4
