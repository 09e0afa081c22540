"""Tokenisation that matches the engine, through real processes: the proxy's block keys for a chat (observed as the
request's in-flight blocks, written by reserve.lua) equal those of the model's own tokenizer, with ``tokenizerPath``
and through the engine's ``/tokenize`` (a vLLM-mode sim worker tokenising with that same tokenizer); a missing
tokenizer stops the router at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import eventually
from hf_tokenizer import build_tokenizer, expected_chat_ids

from flexlb.blocks import block_cache_keys, render_chat, tokenize
from flexlb.domain import EngineKind, Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

BLOCK = 4  # a small block: the test tokenizer's short chats still span several
PROXY = {"proxyAdmissionTtftMs": 0, "servedModelName": "flexlb-sim"}


def chat(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "you are a helpful assistant; answer briefly and exactly"},
        {"role": "user", "content": question},
    ]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return build_tokenizer(tmp_path / "model")


async def _register(store: FleetStore, worker: Any) -> None:
    spec = WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION, engine=EngineKind.VLLM)
    status = WorkerStatus(alive=True, kv_total=1 << 20, block_size=BLOCK)
    await store.register_worker(spec, status)


async def _chat_through(http: aiohttp.ClientSession, router: Any, messages: list[dict[str, str]]) -> None:
    body = {"model": "flexlb-sim", "messages": messages, "max_tokens": 1}
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def _inflight(store: FleetStore, worker: Any) -> set[int]:
    return set(await store.inflight_blocks(worker.worker_id))


async def test_the_proxys_block_keys_are_the_models_tokenizers(
    real_store: FleetStore, start_sim_worker: Any, start_router: Any, model_dir: Path
) -> None:
    worker = start_sim_worker(args=("--engine", "vllm", "--block-size", str(BLOCK), "--tokenizer", str(model_dir)))
    await _register(real_store, worker)
    with_path = start_router(
        {"tokenizerPath": str(model_dir), "proxyAdmissionTtftMs": 0, "servedModelName": "flexlb-sim"}
    )
    from_engine = start_router(
        {"proxyAdmissionTtftMs": 0, "servedModelName": "flexlb-sim"}
    )  # no tokenizerPath: the worker's /tokenize
    async with aiohttp.ClientSession() as http:
        first = chat("what is the capital of france?")
        want = set(block_cache_keys(expected_chat_ids(model_dir, first), BLOCK))
        assert want and want.isdisjoint(block_cache_keys(tokenize(render_chat(first)), BLOCK))  # not whitespace's
        await _chat_through(http, with_path, first)
        assert await _inflight(real_store, worker) == want

        second = chat("the quick brown fox jumps over the lazy dog")
        async with http.post(f"{worker.url}/tokenize", json={"messages": second}) as resp:
            engine_ids = (await resp.json())["tokens"]
        assert engine_ids == expected_chat_ids(model_dir, second)  # the sim tokenises as the model does
        await _chat_through(http, from_engine, second)
        new = await _inflight(real_store, worker) - want
        assert new == set(block_cache_keys(engine_ids, BLOCK)) - want


async def test_a_missing_tokenizer_stops_the_router_at_start_up(start_router: Any, tmp_path: Path) -> None:
    router = start_router({"tokenizerPath": str(tmp_path / "no-such-model")}, wait=False)

    async def exited() -> bool:
        return router.process.poll() is not None

    await eventually(exited, "the router exits", timeout_s=20)
    assert router.process.returncode != 0
    assert "tokenizerPath" in router.log() and "no tokenizer.json there" in router.log()
