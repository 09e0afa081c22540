"""KV events for an exact index, with real processes: a vLLM-mode sim worker publishing on ZMQ (``--kv-events-port``),
``flexlb master`` subscribing (MODEL_SERVICE_CONFIG ``kv_events``) and redis-server. The worker's ``cache:`` set and
the ``blk:`` index follow its cache exactly (``GET /sim/cache`` is the simulator's own key set): stores, evictions, a
clear, batches missed (a late subscriber, a dropped range) recovered through the replay socket, a restart resynced."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from conftest import eventually

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.domain import EngineKind, Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import free_port_pair
from flexlb.state.store import FleetStore

BLOCK = 16
# 8 blocks of 16 tokens: three 48-token prompts (3 cached blocks + 1 for the output each) make it evict.
SMALL = ("--engine", "vllm", "--block-size", str(BLOCK), "--kv-blocks", "8", "--max-concurrency", "1")
FAST = {"engineMetricsIntervalMs": 50, "healthCheckIntervalMs": 100}
LONG_TIMEOUT = {"WORKER_TIMEOUT_US": str(120_000_000)}  # never forgotten here: only the events change the index


def prompt(tag: str, blocks: int = 3) -> str:
    return " ".join(f"{tag}{i}" for i in range(blocks * BLOCK))


def keys_of(tag: str) -> list[int]:
    return block_cache_keys(tokenize(prompt(tag)), BLOCK)


def service_config(worker: Any, events_port: int) -> dict[str, str]:
    endpoint = {"address": [worker.worker_id], "engine": "vllm", "kv_events": f"tcp://127.0.0.1:{events_port}"}
    return {"MODEL_SERVICE_CONFIG": json.dumps({"pd_fusion_endpoint": endpoint})}


def start_worker(start_sim_worker: Any, *extra: str, port: int | None = None) -> tuple[Any, int]:
    events_port = free_port_pair()
    worker = start_sim_worker(args=(*SMALL, "--kv-events-port", str(events_port), *extra), port=port)
    return worker, events_port


async def register(store: FleetStore, worker: Any) -> None:
    spec = WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION, engine=EngineKind.VLLM)
    await store.register_worker(spec, WorkerStatus(alive=True))


async def complete(http: aiohttp.ClientSession, worker: Any, text: str) -> None:
    body = {"model": "flexlb-sim", "prompt": text, "max_tokens": 1}
    async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def sim_keys(http: aiohttp.ClientSession, worker: Any) -> set[int]:
    async with http.get(f"{worker.url}/sim/cache") as resp:
        return set((await resp.json())["keys"])


async def index_matches(http: aiohttp.ClientSession, store: FleetStore, worker: Any) -> bool:
    want = await sim_keys(http, worker)
    return await store.cache_blocks(worker.worker_id) == want


async def test_the_index_follows_stores_evictions_and_a_clear_exactly(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_master: Any
) -> None:
    worker, events_port = start_worker(start_sim_worker)
    await register(real_store, worker)
    start_master(FAST, env={**service_config(worker, events_port), **LONG_TIMEOUT})
    async with aiohttp.ClientSession() as http:
        await complete(http, worker, prompt("a"))
        a = keys_of("a")
        await eventually(lambda: index_matches(http, real_store, worker), "the index after one prompt")
        assert await real_store.cache_blocks(worker.worker_id) == set(a)  # flexlb's keys, not the engine's hashes
        assert await real_store.block_holders(a[0]) == {worker.worker_id}  # and in the inverted index
        await complete(http, worker, prompt("b"))
        await complete(http, worker, prompt("c"))  # evicts a's tail (least recently used first)
        await eventually(lambda: index_matches(http, real_store, worker), "the index after evictions")
        held = await real_store.cache_blocks(worker.worker_id)
        assert a[0] in held and a[2] not in held and set(keys_of("c")) <= held
        assert await real_store.block_holders(a[2]) == set()
        async with http.post(f"{worker.url}/reset_prefix_cache") as resp:
            assert resp.status == 200
        await eventually(lambda: _empty(real_store, worker), "AllBlocksCleared empties the worker's index entries")
        assert await real_store.block_holders(a[0]) == set()


async def _empty(store: FleetStore, worker: Any) -> bool:
    return await store.cache_blocks(worker.worker_id) == set()


async def test_a_late_subscriber_rebuilds_the_index_from_the_replay_socket(
    real_store: FleetStore, start_sim_worker: Any, start_master: Any
) -> None:
    worker, events_port = start_worker(start_sim_worker)
    await register(real_store, worker)
    async with aiohttp.ClientSession() as http:
        for tag in ("a", "b", "c"):  # published before anyone subscribes: only the replay buffer has them
            await complete(http, worker, prompt(tag))
        await real_store.set_cache_blocks(worker.worker_id, [12345])  # stale: another term's, say
        master = start_master(FAST, env={**service_config(worker, events_port), **LONG_TIMEOUT})
        await eventually(lambda: index_matches(http, real_store, worker), "the index rebuilt from the replay")
        assert 12345 not in await real_store.cache_blocks(worker.worker_id)  # the whole history: stale ones go
        assert "KV events" in master.log()


async def test_a_dropped_sequence_range_is_recovered_through_the_replay_socket(
    real_store: FleetStore, start_sim_worker: Any, start_master: Any
) -> None:
    worker, events_port = start_worker(start_sim_worker, "--kv-events-drop", "1:3")  # lost live, kept for replay
    await register(real_store, worker)
    master = start_master(FAST, env={**service_config(worker, events_port), **LONG_TIMEOUT})
    async with aiohttp.ClientSession() as http:
        await complete(http, worker, prompt("warm", 1))  # batch 0: the subscriber is connected once it is indexed
        await eventually(lambda: index_matches(http, real_store, worker), "the first batch arrives live")
        for tag in ("a", "b", "c", "d"):  # batches 1..3 dropped, 4.. sent: the gap shows at the next one
            await complete(http, worker, prompt(tag))
        await eventually(lambda: index_matches(http, real_store, worker), "the dropped batches replayed")
        assert set(keys_of("d")) <= await real_store.cache_blocks(worker.worker_id)
        assert "missed sequences 1..3" in master.log()


async def test_a_restarted_worker_is_resynced(real_store: FleetStore, start_sim_worker: Any, start_master: Any) -> None:
    worker, events_port = start_worker(start_sim_worker)
    await register(real_store, worker)
    master = start_master(FAST, env={**service_config(worker, events_port), **LONG_TIMEOUT})
    async with aiohttp.ClientSession() as http:
        for tag in ("a", "b", "c"):
            await complete(http, worker, prompt(tag))
        await eventually(lambda: index_matches(http, real_store, worker), "the first life's index")
        worker.stop(signal.SIGKILL)  # no AllBlocksCleared: the new life's sequence starting over tells
        again = start_sim_worker(args=(*SMALL, "--kv-events-port", str(events_port)), port=worker.port)
        await asyncio.sleep(0)
        await eventually(lambda: _answers(http, again), "the restarted worker serves")
        await complete(http, again, prompt("new"))
        await eventually(lambda: index_matches(http, real_store, again), "the index resynced to the new life")
        assert await real_store.cache_blocks(again.worker_id) == set(keys_of("new"))
        assert "restarted" in master.log()


async def _answers(http: aiohttp.ClientSession, worker: Any) -> bool:
    try:
        async with http.get(f"{worker.url}/health") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False
