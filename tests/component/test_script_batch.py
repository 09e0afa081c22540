"""lua/batch.lua and flexlb/state/script_batch.py on a real redis-server: reserves and releases of one loop round go
as one script call, with the same effect and replies as one call each; one change-stream entry carries them all."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.block_mirror import BlockMirror
from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.store import FleetStore, ReserveOutcome
from flexlb.state.view import FleetView
from flexlb.state.view_sync import ViewSync

WORKERS = [WorkerSpec(f"10.1.0.{i}", 8000, Role.PREFILL if i < 3 else Role.DECODE, max_concurrency=3) for i in range(6)]


@contextlib.asynccontextmanager
async def fleet(redis: aioredis.Redis, server: EmbeddedRedis, service: str) -> AsyncIterator[FleetStore]:
    """A store whose scripts go through a pipelined client of their own, as a router's, with WORKERS registered."""
    pipelined = PipelinedRedis(server.url, timeout_s=10)
    store = FleetStore(redis, service, pipelined)
    try:
        for spec in WORKERS:
            await store.register_worker(spec, WorkerStatus(kv_total=1000))
        yield store
    finally:
        await pipelined.aclose()


async def state(store: FleetStore) -> dict[str, object]:
    """Everything the two scripts write, but the clock: pending loads, reservations, request indexes."""
    out: dict[str, object] = {}
    for spec in WORKERS:
        w = spec.worker_id
        out[w] = await store.redis.hmget(store.keys.worker(w), "pending_count", "pending_tokens")
        out[f"{w} reservations"] = sorted(await store.redis.zrange(store.keys.reservations(w), 0, -1))
    for rid in range(40):
        out[f"request {rid}"] = await store.redis.hgetall(store.keys.request(rid))
    return out


def outcome(o: ReserveOutcome) -> tuple[object, ...]:
    return (o.ok, o.refused_index, o.reason, o.detail, o.pending)


async def test_a_batch_has_the_effect_and_replies_of_its_calls_one_by_one(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    rng = random.Random(7)
    calls: list[tuple[str, int, list[str]]] = []
    for _ in range(60):  # reserves over the limits (refusals), releases of held, unknown and released requests
        rid = rng.randrange(40)
        workers = rng.sample([w.worker_id for w in WORKERS], rng.choice((1, 2)))
        calls.append((rng.choice(("reserve", "reserve", "release")), rid, workers))
    async with (
        fleet(real_redis, redis_server, service) as batched,
        fleet(real_redis, redis_server, service + "-alone") as alone,
    ):

        def run(store: FleetStore, kind: str, rid: int, workers: list[str]):  # type: ignore[no-untyped-def]
            if kind == "reserve":
                return store.reserve(rid, [(w, 100 + rid) for w in workers], 60_000)
            return store.release(rid, workers)

        together = await asyncio.gather(*(run(batched, *c) for c in calls))  # one loop round: batches
        one_by_one = [await run(alone, *c) for c in calls]
        assert batched.scripts.batch is not None and batched.scripts.batch.batches >= 1
        assert any(isinstance(r, ReserveOutcome) and not r.ok for r in one_by_one)  # refusals are in it
        for a, b in zip(together, one_by_one, strict=True):
            assert (outcome(a) if isinstance(a, ReserveOutcome) else a) == (
                outcome(b) if isinstance(b, ReserveOutcome) else b
            )
        assert await state(batched) == await state(alone)


async def test_a_call_that_fails_in_a_batch_fails_alone(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    w0, w1 = WORKERS[0].worker_id, WORKERS[3].worker_id
    async with fleet(real_redis, redis_server, service) as store:
        await real_redis.set(store.keys.request(2), "not a hash")  # the reserve of request 2 raises WRONGTYPE
        first, broken, last = await asyncio.gather(
            store.reserve(1, [(w0, 10)], 60_000),
            store.reserve(2, [(w1, 10)], 60_000),
            store.reserve(3, [(w1, 10)], 60_000),
            return_exceptions=True,
        )
        assert isinstance(broken, Exception) and "WRONGTYPE" in str(broken)
        assert isinstance(first, ReserveOutcome) and first.ok and isinstance(last, ReserveOutcome) and last.ok
        assert await store.release(1) == 1 and await store.release(3) == 1


async def test_one_stream_entry_carries_a_batch_and_another_router_sees_every_reservation(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    mirror, view = BlockMirror(), FleetView()
    sync = ViewSync(FleetStore(real_redis, service), view, mirror=mirror, block_ms=100)  # another router's tail
    async with fleet(real_redis, redis_server, service) as store:
        sync.start()
        try:
            await asyncio.wait_for(sync.connected.wait(), 5)
            before = await real_redis.xlen(store.keys.change_keys()[0])
            prefills = [w.worker_id for w in WORKERS[:3]]
            replies = await asyncio.gather(
                *(
                    store.reserve(rid, [(prefills[rid], 50), (WORKERS[3].worker_id, 5)], 60_000,
                                  inflight_blocks=[1000 * rid + b for b in range(4)], inflight_ttl_ms=60_000)
                    for rid in range(3)
                )
            )  # fmt: skip
            assert all(r.ok for r in replies)
            assert await real_redis.xlen(store.keys.change_keys()[0]) == before + 1
            (_, fields), *_ = await real_redis.xrevrange(store.keys.change_keys()[0], count=1)
            assert {k for k in fields if k.startswith("+i")} == {"+i", "+i2", "+i3"}
            assert fields[WORKERS[3].worker_id] == "3 15"  # the worker's last value

            async def seen() -> bool:
                decode = view.get(WORKERS[3].worker_id)
                held = all(mirror.holders(1000 * rid + 3) == {prefills[rid]} for rid in range(3))
                return held and decode is not None and (decode.pending_count, decode.pending_tokens) == (3, 15)

            await eventually(seen, "the other router's view and block mirror hold all three reservations")
        finally:
            await sync.stop()


async def test_after_script_flush_a_batch_and_a_lone_call_load_their_script_and_run_once(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    w = WORKERS[3].worker_id
    async with fleet(real_redis, redis_server, service) as store:
        assert (await store.reserve(1, [(w, 10)], 60_000)).ok  # the connection is up: calls are submitted
        for wave in (range(2, 6), range(6, 7)):  # a batch, then a lone call
            await real_redis.script_flush()
            replies = await asyncio.gather(*(store.reserve(rid, [(w, 10)], 60_000, limits=False) for rid in wave))
            assert all(r.ok for r in replies)
        assert await real_redis.hmget(store.keys.worker(w), "pending_count", "pending_tokens") == ["6", "60"]


async def test_a_call_redis_cannot_take_fails_its_callers_and_the_batch_goes_on(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    """An argument the protocol cannot encode fails the batch it is in at once (its callers get the error, none hangs),
    and later calls are served."""
    w = WORKERS[3].worker_id
    async with fleet(real_redis, redis_server, service) as store:
        assert (await store.reserve(1, [(w, 10)], 60_000)).ok  # the connection is up: calls are submitted
        assert store.scripts.batch is not None
        broken = store.scripts.batch.call("release", [store.keys.request(9), *store.keys.change_keys()], [object()])
        good = store.reserve(2, [(w, 10)], 60_000)
        outcomes = await asyncio.wait_for(asyncio.gather(broken, good, return_exceptions=True), 10)
        assert all(isinstance(o, Exception) for o in outcomes), outcomes  # one batch: both callers learn why
        assert (await store.reserve(3, [(w, 10)], 60_000)).ok
        assert await store.release(1) == 1 and await store.release(3) == 1


async def test_a_deferred_call_shares_the_next_batch_or_goes_alone_a_moment_later(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> None:
    """A release nothing waits for (``defer_s``) waits up to that long for company: the next call takes it along, in
    one batch, after it; without company it goes alone; of several waiting, the shortest wait sends them all."""
    w = WORKERS[3].worker_id
    async with fleet(real_redis, redis_server, service) as store:
        batch = store.scripts.batch
        assert batch is not None
        assert (await store.reserve(1, [(w, 10)], 60_000)).ok
        before = batch.batches
        deferred = asyncio.ensure_future(store.release_request(1, [w], defer_s=60.0))  # company comes long before
        for _ in range(5):  # loop rounds: a call that is not deferred would be sent (alone) by now
            await asyncio.sleep(0)
        assert not deferred.done()
        again = await store.reserve(1, [(w, 10)], 60_000)  # the same request: after the release, counted anew
        assert await deferred == 1 and batch.batches == before + 1  # one batch of the two
        assert again.ok and again.pending == ((1, 10),)
        assert await store.release_request(1, [w], defer_s=0.001) == 1  # alone: sent a moment later
        assert batch.batches == before + 1
        assert (await store.reserve(2, [(w, 10)], 60_000)).ok and (await store.reserve(3, [(w, 10)], 60_000)).ok
        long_wait = asyncio.ensure_future(store.release_request(2, [w], defer_s=60.0))
        await asyncio.sleep(0)
        short_wait = asyncio.ensure_future(store.release_request(3, [w], defer_s=0.001))
        assert await asyncio.wait_for(asyncio.gather(long_wait, short_wait), 10) == [1, 1]  # not 60 s: the shorter
        assert batch.batches == before + 2  # the two in one batch
