"""Four router processes race for tight worker limits on one real Redis: nothing over-committed, nothing leaked."""

from __future__ import annotations

import asyncio
import itertools
import random

import aiohttp
import orjson
import redis.asyncio as aioredis

from flexlb.domain import ErrorCode, Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

ROUTERS = 4
TASKS = 64
ROUNDS = 25
LIMIT = 2


async def test_racing_routers_never_over_commit_and_leave_nothing_behind(
    start_router, real_redis: aioredis.Redis, service: str
) -> None:
    store = FleetStore(real_redis, service)
    workers = [WorkerSpec(f"10.1.0.{i}", 8000, Role.PREFILL, max_concurrency=LIMIT) for i in range(3)]
    workers += [WorkerSpec(f"10.2.0.{i}", 8000, Role.DECODE, max_concurrency=LIMIT) for i in range(3)]
    for spec in workers:
        await store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
    routers = [start_router({"reservationTtlMs": 120_000}) for _ in range(ROUTERS)]

    holding = {w.worker_id: f"test:{{{service}}}:holding:{w.worker_id}" for w in workers}
    max_holding = dict.fromkeys(holding, 0)
    max_live_reservations = dict.fromkeys(holding, 0)
    outcomes: dict[str, int] = {}
    released_total = 0
    ids = itertools.count(1)
    stop_watch = asyncio.Event()

    async def watch_reservations() -> None:
        """Independent observer: the live reservation records of each worker, read raw from Redis."""
        while not stop_watch.is_set():
            async with real_redis.pipeline(transaction=False) as pipe:
                for wid in holding:
                    pipe.zcard(store.keys.reservations(wid))
                counts = await pipe.execute()
            for wid, n in zip(holding, counts, strict=True):
                max_live_reservations[wid] = max(max_live_reservations[wid], n)
            await asyncio.sleep(0)

    async def client(session: aiohttp.ClientSession, task: int) -> None:
        nonlocal released_total
        rng = random.Random(task)
        for _ in range(ROUNDS):
            rid = next(ids)
            router = routers[rid % ROUTERS]
            body = {"request_id": rid, "seq_len": 100, "block_cache_keys": [1, 2]}
            async with session.post(f"{router.url}/rtp_llm/schedule", data=orjson.dumps(body)) as resp:
                answer = await resp.json()
            outcomes[str(answer["code"])] = outcomes.get(str(answer["code"]), 0) + 1
            if not answer["success"]:
                assert resp.status == 503, answer
                continue
            chosen = [f"{s['server_ip']}:{s['http_port']}" for s in answer["server_status"]]
            assert sorted(s["role"] for s in answer["server_status"]) == ["DECODE", "PREFILL"]
            for wid in chosen:  # the client "holds" the worker between schedule and release
                max_holding[wid] = max(max_holding[wid], await real_redis.incr(holding[wid]))
            await asyncio.sleep(rng.random() * 0.003)  # the request "runs"
            for wid in chosen:
                await real_redis.decr(holding[wid])
            other = routers[(rid + 1) % ROUTERS]  # release through another router: the fleet shares state
            async with session.post(f"{other.url}/rtp_llm/release", data=orjson.dumps({"request_id": rid})) as resp:
                released_total += (await resp.json())["released"]

    watcher = asyncio.create_task(watch_reservations())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=TASKS)) as session:
        await asyncio.gather(*(client(session, t) for t in range(TASKS)))
    stop_watch.set()
    await watcher

    successes = outcomes.pop(str(int(ErrorCode.OK)), 0)
    refusals = outcomes.pop(str(int(ErrorCode.NO_PREFILL_WORKER)), 0) + outcomes.pop(
        str(int(ErrorCode.NO_DECODE_WORKER)), 0
    )
    assert outcomes == {}, f"unexpected answers: {outcomes}"
    assert successes + refusals == TASKS * ROUNDS
    assert successes > 0 and refusals > 0, "the limits must be tight enough to make routers contend"
    assert released_total == 2 * successes  # each success reserved one prefill and one decode worker, once

    assert max(max_holding.values()) <= LIMIT, max_holding
    assert max(max_live_reservations.values()) <= LIMIT, max_live_reservations
    assert max(max_live_reservations.values()) == LIMIT, "some worker should have been filled to its limit"

    for spec in workers:
        h = await real_redis.hgetall(store.keys.worker(spec.worker_id))
        assert (h["pending_count"], h["pending_tokens"]) == ("0", "0"), (spec.worker_id, h)
        assert await real_redis.zcard(store.keys.reservations(spec.worker_id)) == 0
    assert [k async for k in real_redis.scan_iter(match=f"flexlb:{{{service}}}:req:*")] == []
