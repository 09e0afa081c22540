"""KV events of workers registered through the API, not MODEL_SERVICE_CONFIG, with real processes: a vLLM-mode sim
worker publishing on ZMQ (``--kv-events-port``), registered through a router's admin API (``POST /rtp_llm/workers``,
smg-style ``/add_worker``) or ``flexlb worker add`` with its ``kv_events`` address, ``flexlb master`` and
redis-server. The master subscribes: the index follows the worker's stores and the router's lookups find its blocks;
removal stops the subscription. ``flexlb launch --kv-events-port`` gives each engine its publisher port and registers
it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import eventually
from test_kv_events import BLOCK, FAST, LONG_TIMEOUT, keys_of, prompt

from flexlb.cli import main
from flexlb.embedded_redis import EmbeddedRedis, free_port, free_port_pair
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.launch.plan import ports_in_use
from flexlb.state.store import FleetStore

SMALL = ("--engine", "vllm", "--block-size", str(BLOCK), "--kv-blocks", "64", "--max-concurrency", "1")


async def complete(http: aiohttp.ClientSession, url: str, text: str) -> None:
    body = {"model": "flexlb-sim", "prompt": text, "max_tokens": 1}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def sim_keys(http: aiohttp.ClientSession, url: str) -> set[int]:
    async with http.get(f"{url}/sim/cache") as resp:
        return set((await resp.json())["keys"])


async def index_matches(http: aiohttp.ClientSession, store: FleetStore, worker_id: str) -> bool:
    want = await sim_keys(http, f"http://{worker_id}")
    return bool(want) and await store.cache_blocks(worker_id) == want


async def hit_tokens(http: aiohttp.ClientSession, router: Any, keys: list[int], request_id: int) -> int:
    """The router's lookup of ``keys``: the hit of the worker it chooses (the prefix it holds, in tokens)."""
    body = {"request_id": request_id, "seq_len": len(keys) * BLOCK, "block_cache_keys": keys}
    async with http.post(f"{router.url}/rtp_llm/schedule", json=body) as resp:
        reply = await resp.json()
    async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": request_id}):
        pass
    return reply["server_status"][0]["debug_info"]["hit_cache_len"] if reply.get("success") else -1


async def test_a_worker_registered_with_its_kv_events_is_followed_until_removed(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any, start_master: Any
) -> None:
    events_port = free_port_pair()
    worker = start_sim_worker(args=(*SMALL, "--kv-events-port", str(events_port)))
    wid = worker.worker_id
    router = start_router()  # its admin API; no MODEL_SERVICE_CONFIG names the worker
    master = start_master(FAST, env=LONG_TIMEOUT)
    async with aiohttp.ClientSession() as http:
        body = {"ip": "127.0.0.1", "http_port": worker.port, "role": "pdfusion", "engine": "vllm",
                "kv_events": f"tcp://127.0.0.1:{events_port}"}  # fmt: skip
        async with http.post(f"{router.url}/rtp_llm/workers", json=body) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(f"{router.url}/rtp_llm/workers") as resp:
            (listed,) = (await resp.json())["workers"]
        assert listed["kv_events"] == f"tcp://127.0.0.1:{events_port}"
        assert listed["kv_events_replay"] == f"tcp://127.0.0.1:{events_port + 1}"  # vLLM's convention: port + 1

        await complete(http, worker.url, prompt("a"))
        a = keys_of("a")
        await eventually(lambda: index_matches(http, real_store, wid), "the index follows its stores")
        assert await real_store.cache_blocks(wid) == set(a)
        assert await real_store.block_holders(a[0]) == {wid}
        # the status hash's block size comes with the master's first poll of /metrics, which may come after the events
        await eventually(lambda: _block_size_is(real_redis, real_store, wid, BLOCK), "its block size polled")
        await eventually(
            lambda: _equals(hit_tokens(http, router, a, 70_001), 3 * BLOCK), "the router's lookup finds its blocks"
        )

        async with http.delete(f"{router.url}/rtp_llm/workers/{wid}") as resp:
            assert resp.status == 200
        await eventually(lambda: _in_log(master, f"worker {wid} (KV events tcp://127.0.0.1:{events_port}): no longer"
                                                 " followed"), "the subscription stops")  # fmt: skip

        # registered again without its events: polled (its load), but nothing follows its cache
        body.pop("kv_events")
        async with http.post(f"{router.url}/rtp_llm/workers", json=body) as resp:
            assert resp.status == 201, await resp.text()
        await eventually(lambda: _alive(real_redis, real_store, wid), "polled again")
        await complete(http, worker.url, prompt("b"))
        await asyncio.sleep(1.0)  # events would be indexed within ~50 ms
        assert await real_store.cache_blocks(wid) == set()

        # and through smg's /add_worker with flexlb's kv_events: followed again, its history replayed from 0
        params = {"url": f"http://{wid}", "engine": "vllm", "kv_events": str(events_port)}  # a port: the worker's host
        async with http.post(f"{router.url}/add_worker", params=params) as resp:
            assert resp.status == 200, await resp.text()
        await eventually(lambda: index_matches(http, real_store, wid), "the index rebuilt from the replay socket")
        assert set(keys_of("b")) <= await real_store.cache_blocks(wid)


async def _equals(value: Any, want: Any) -> bool:
    return await value == want


async def _in_log(process: Any, text: str) -> bool:
    return text in process.log()


async def _block_size_is(redis: aioredis.Redis, store: FleetStore, worker_id: str, want: int) -> bool:
    return int(await redis.hget(store.keys.worker(worker_id), "block_size") or 0) == want


async def _alive(redis: aioredis.Redis, store: FleetStore, worker_id: str) -> bool:
    return await redis.hget(store.keys.worker(worker_id), "alive") == "1"


async def test_flexlb_worker_add_takes_the_kv_events_endpoints(
    redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    service = f"t{uuid.uuid4().hex[:12]}"
    common = ["worker", "--redis-url", redis_server.url, "--service", service]
    add = [*common, "add", "10.0.0.5:9000", "--role", "pdfusion", "--engine", "vllm"]
    assert await asyncio.to_thread(main, [*add, "--kv-events", "tcp://*:5557", "--kv-events-replay", "none"]) == 0
    store = FleetStore(aioredis.Redis.from_url(redis_server.url, decode_responses=True), service)
    try:
        (view,) = await store.list_workers()
        assert view.spec.kv_events == KvEventsEndpoint("tcp://10.0.0.5:5557", None)  # *: the worker's host
        assert await asyncio.to_thread(main, [*add, "--kv-events", "6000"]) == 0
        (view,) = await store.list_workers()
        assert view.spec.kv_events == KvEventsEndpoint("tcp://10.0.0.5:6000", "tcp://10.0.0.5:6001")
        assert await asyncio.to_thread(main, add) == 0  # registered again without: none
        (view,) = await store.list_workers()
        assert view.spec.kv_events is None
        capsys.readouterr()
        assert await asyncio.to_thread(main, [*add, "--kv-events", "udp://x:1"]) == 2
        assert 'expected "tcp://host:port"' in capsys.readouterr().err
    finally:
        await store.redis.aclose()


def _free_range(span: int, avoid: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    for _ in range(200):
        base = free_port()
        ports = set(range(base, base + span))
        if base + span < 65536 and not ports & avoid and not ports_in_use("127.0.0.1", sorted(ports)):
            return base
    raise AssertionError(f"no {span} free consecutive ports")


async def test_flexlb_launch_gives_each_engine_a_kv_events_port_and_registers_it(
    tmp_path: Path, real_store: FleetStore, start_router: Any
) -> None:
    """``flexlb launch --engine sim --worker-engine vllm --kv-events-port K``: engine i publishes on K + 2i, is
    registered with it through the router's admin API, and the router (here the master) follows each one's cache."""
    router = start_router({"contendForMaster": True, **FAST}, env=LONG_TIMEOUT)
    base = _free_range(2)
    events = _free_range(4, set(range(base, base + 2)))
    output = tmp_path / "launch.out"
    args = ["--engine", "sim", "--worker-engine", "vllm", "--count", "2", "--base-port", str(base),
            "--kv-events-port", str(events), "--router", router.url, "--log-dir", str(tmp_path / "logs"), "--",
            "--block-size", str(BLOCK), "--kv-blocks", "64"]  # fmt: skip
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flexlb.cli", "launch", *args], stdout=out, stderr=subprocess.STDOUT
        )
    ids = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    try:
        async with aiohttp.ClientSession() as http:

            async def registered() -> bool:
                async with http.get(f"{router.url}/rtp_llm/workers") as resp:
                    found = {w["worker_id"]: w["kv_events"] for w in (await resp.json())["workers"]}
                return found == {ids[0]: f"tcp://127.0.0.1:{events}", ids[1]: f"tcp://127.0.0.1:{events + 2}"}

            await eventually(registered, f"both registered with their KV events\n{output.read_text()}", 60)
            for i, wid in enumerate(ids):
                await complete(http, f"http://{wid}", prompt(f"e{i}"))
            for i, wid in enumerate(ids):
                await eventually(lambda wid=wid: index_matches(http, real_store, wid), f"engine {wid}'s index")
                assert await real_store.cache_blocks(wid) == set(keys_of(f"e{i}"))
        assert f"KV events tcp://127.0.0.1:{events + 2}" in output.read_text()  # the banner says where
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.read_text()[-6000:]
