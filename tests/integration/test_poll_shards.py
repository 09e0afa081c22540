"""Sharded polling (pollShards > 1) and adaptive poll intervals, on a real redis-server with real `flexlb master`
and `flexlb sim-worker --count` processes: holders split the fleet, a SIGKILLed holder's shard is taken over, a
deposed holder's write is refused, a cold worker's change still shows, every key stays in the service's slot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import eventually
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.master.election import PRESENCE_NAME, MasterElection
from flexlb.master.poller import MasterDuties, PollOptions
from flexlb.master.service import MasterService
from flexlb.master.shards import fair_share, shard_of
from flexlb.metrics import MasterMetrics
from flexlb.ports import free_ports
from flexlb.settings.environment import load_settings
from flexlb.state.keys import ServiceKeys
from flexlb.state.store import FleetStore, StaleEpoch

SHARDS = 2
WORKERS = 6
PROMPT = " ".join(f"w{i}" for i in range(64 * 3))  # 3 blocks of 64 tokens
CONFIG = {"pollShards": SHARDS, "masterLockTtlMs": 1500, "masterRenewIntervalMs": 300}


async def lease_holders(redis: aioredis.Redis, keys: ServiceKeys) -> list[str | None]:
    """The holder named in each shard's lease (shard 0's is the master lock), or None."""
    values = await redis.mget([keys.master_lock, *(keys.shard_lock(i) for i in range(1, SHARDS))])
    return [v.split("|", 2)[2].split(" shard ")[0] if v else None for v in values]


async def cached_blocks(redis: aioredis.Redis, keys: ServiceKeys, worker_id: str) -> int:
    return await redis.scard(keys.cache_blocks(worker_id))


async def complete(http: aiohttp.ClientSession, spec: WorkerSpec) -> None:
    body = {"model": "flexlb-sim", "prompt": PROMPT, "max_tokens": 2}
    async with http.post(f"http://127.0.0.1:{spec.http_port}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


def fleet_specs(base: int) -> list[WorkerSpec]:
    return [WorkerSpec("127.0.0.1", base + 2 * i, Role.PDFUSION) for i in range(WORKERS)]


def one_per_shard(specs: list[WorkerSpec]) -> dict[int, WorkerSpec]:
    by_shard = {shard_of(s.worker_id, SHARDS): s for s in specs}
    assert len(by_shard) == SHARDS, "the test fleet must have a worker in every shard"
    return by_shard


async def test_two_holders_split_the_fleet_and_a_killed_holders_shard_is_taken_over(
    real_store: FleetStore, real_redis: aioredis.Redis, start_master, start_sim_worker
) -> None:
    base = free_ports(2 * WORKERS)
    start_sim_worker(port=base, args=("--count", str(WORKERS)))
    specs = fleet_specs(base)
    for spec in specs:
        await real_store.register_worker(spec)
    keys = real_store.keys
    a = start_master(CONFIG)
    await eventually(
        lambda: _all(lease_holders(real_redis, keys), lambda h: h == [a.holder] * SHARDS), "one poller holds all"
    )
    b = start_master(CONFIG)
    split = await eventually(
        lambda: _all(lease_holders(real_redis, keys), lambda h: sorted(map(str, h)) == sorted([a.holder, b.holder])),
        "the two pollers hold one shard each",
    )
    async with aiohttp.ClientSession() as http:
        for shard, spec in one_per_shard(specs).items():  # each holder writes its own shard's workers
            await complete(http, spec)
            await eventually(lambda s=spec: cached_blocks(real_redis, keys, s.worker_id), f"shard {shard} written")
        b_shard = split.index(b.holder)
        b.stop(signal.SIGKILL)
        await eventually(
            lambda: _all(lease_holders(real_redis, keys), lambda h: h == [a.holder] * SHARDS),
            "the survivor took the killed holder's shard over",
            timeout_s=15,
        )
        orphan = next(
            s for s in specs if shard_of(s.worker_id, SHARDS) == b_shard and s != one_per_shard(specs)[b_shard]
        )
        await complete(http, orphan)
        await eventually(lambda: cached_blocks(real_redis, keys, orphan.worker_id), "the taken-over shard is written")


async def _all(values, ok):  # type: ignore[no-untyped-def]
    got = await values
    return got if ok(got) else None


async def test_a_deposed_shard_holders_write_is_refused(real_store: FleetStore, real_redis: aioredis.Redis) -> None:
    keys = real_store.keys
    spec = WorkerSpec("127.0.0.1", 1, Role.PDFUSION)
    await real_store.register_worker(spec)

    async def duties(epoch: int) -> None:
        await asyncio.Event().wait()

    async def deposed() -> None:
        pass

    def lease(holder: str) -> MasterElection:
        return MasterElection(real_redis, keys, holder=holder, ttl_ms=1000, renew_interval_ms=300,
                              lock_key=keys.shard_lock(1), epoch_key=keys.shard_epoch(1))  # fmt: skip

    old, new = lease("old"), lease("new")
    await old.step(duties, deposed)
    assert old.holding
    await real_redis.delete(keys.shard_lock(1))  # its lease ran out (a pause past the TTL)
    await new.step(duties, deposed)
    assert new.holding and new.epoch > old.epoch
    shard_store = FleetStore(real_redis, real_store.keys.service, fence_key=keys.shard_epoch(1))
    try:
        await shard_store.write_worker_status(old.epoch, spec.worker_id, {"running": "1"})
    except StaleEpoch:
        pass
    else:
        raise AssertionError("the deposed holder's write was accepted")
    assert await real_redis.hget(keys.worker(spec.worker_id), "running") != "1"
    await shard_store.write_worker_status(new.epoch, spec.worker_id, {"running": "2"})
    assert await real_redis.hget(keys.worker(spec.worker_id), "running") == "2"
    try:  # a shard's epoch is no master epoch
        await real_store.write_worker_status(new.epoch, spec.worker_id, {"running": "3"})
    except StaleEpoch:
        pass
    else:
        raise AssertionError("a shard epoch passed the master's fence")
    await old.resign(deposed)
    await new.resign(deposed)
    await old.close_presence()
    await new.close_presence()


async def test_a_cold_workers_change_shows_and_brings_it_back_to_fast_polls(
    real_store: FleetStore, real_redis: aioredis.Redis, start_sim_worker
) -> None:
    worker = start_sim_worker()
    spec = WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION)
    await real_store.register_worker(spec)
    await real_redis.set(real_store.keys.master_epoch, "7")
    options = PollOptions(idle_interval_s=0.05, cold_after_s=0.3, cold_interval_s=0.4)
    duties = MasterDuties(real_store, options, MasterMetrics(CollectorRegistry()))
    task = asyncio.create_task(duties.run(7))
    try:
        poller = (await eventually(lambda: _now(duties.pollers.get(spec.worker_id)), "polling starts"))[0]
        await eventually(lambda: _now(poller.interval_s == options.cold_interval_s), "the idle worker goes cold")
        key = real_store.keys.worker(spec.worker_id)
        version = int(await real_redis.hget(key, "status_version") or 0)
        async with aiohttp.ClientSession() as http:
            await complete(http, spec)
        await eventually(
            lambda: _now(poller.interval_s < options.cold_interval_s), "the change brings fast polls back", 2
        )

        async def written() -> bool:
            return int(await real_redis.hget(key, "status_version") or 0) > version

        await eventually(written, "the cold worker's change is written", 2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _now(value):  # type: ignore[no-untyped-def]
    return value


def test_shard_keys_share_the_service_slot_and_shares_cover_every_shard() -> None:
    keys = ServiceKeys("svc-a")
    slot = key_slot(keys.master_lock.encode())
    names = [keys.pollers, keys.master_epoch] + [
        k for i in range(1, 9) for k in (keys.shard_lock(i), keys.shard_epoch(i))
    ]
    assert {key_slot(k.encode()) for k in names} == {slot}
    for shards in range(1, 9):
        for live in range(1, 10):
            assert fair_share(shards, live) * live >= shards
    assert {shard_of(f"10.0.0.{i}:8000", 4) for i in range(64)} == {0, 1, 2, 3}


@pytest.mark.parametrize("shards", [1, SHARDS])
async def test_a_stopped_master_leaves_no_presence_connection(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str, shards: int
) -> None:
    """One process holding the master lock (and every shard's lease), in this event loop, then stopped: the presence
    connection each lease named itself by (flexlb/master/election.py's docstring) is closed with it."""
    config = {**CONFIG, "pollShards": shards}
    environ = {"FLEXLB_CONFIG": json.dumps(config), "FLEXLB_SERVICE_ID": service, "REDIS_URL": redis_server.url}
    master = MasterService(real_redis, load_settings(environ), MasterMetrics(CollectorRegistry()), holder="solo")
    keys = ServiceKeys(service)
    locks = [keys.master_lock, *(keys.shard_lock(i) for i in range(1, shards))]

    async def presence_ids() -> list[str] | None:
        marks = [re.search(r"\[presence ([0-9a-f]+)\]$", v or "") for v in await real_redis.mget(locks)]
        return [m[1] for m in marks if m is not None] if all(marks) else None

    master.start()
    try:
        ids = await eventually(presence_ids, "every shard's lease held and marked with its presence id")
        named = {c["name"] for c in await real_redis.client_list()}
        assert {PRESENCE_NAME + i for i in ids} <= named  # their connections are open while held
    finally:
        await master.stop()

    async def closed() -> bool:  # the server notices a closed socket on its next round, not at once
        return not {PRESENCE_NAME + i for i in ids} & {c["name"] for c in await real_redis.client_list()}

    await eventually(closed, "the stopped master's presence connections closed", timeout_s=5)
