"""The master's fenced write scripts (status, cache diff, forget) through FleetStore, on real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.crc import key_slot

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.master.election import StaleEpoch as StaleEpochFromElection
from flexlb.state.scripts import Scripts
from flexlb.state.store import FleetStore, StaleEpoch, StatusWrite

P1 = WorkerSpec("10.0.0.1", 8000, Role.PREFILL)
D1 = WorkerSpec("10.0.0.3", 8000, Role.DECODE)
TTL = 60_000


async def become_master(store: FleetStore, token: str) -> int:
    """Take the master lock (releasing any holder's first, as its expiry would) and return the new epoch."""
    await store.redis.delete(store.keys.master_lock)
    ok, epoch = await store.scripts.call(
        "lock_acquire", [store.keys.master_lock, store.keys.master_epoch], [token, TTL, token]
    )
    assert ok == 1
    return int(epoch)


async def register(store: FleetStore, *specs: WorkerSpec, **status: object) -> None:
    for spec in specs:
        await store.register_worker(spec, status)


async def dump_service(store: FleetStore) -> dict[str, tuple]:
    """Every key of the service with its type, content and whether it has a TTL, read raw."""
    r = store.redis
    out: dict[str, tuple] = {}
    async for key in r.scan_iter(match=f"{store.keys.prefix}:*", count=1000):
        kind = await r.type(key)
        if kind == "hash":
            content: object = await r.hgetall(key)
        elif kind == "zset":
            content = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            content = await r.smembers(key)
        elif kind == "stream":
            content = await r.xrange(key)
        else:
            content = await r.get(key)
        out[key] = (kind, content, await r.pttl(key) > 0)
    return out


async def pending(store: FleetStore, wid: str) -> tuple[int, int]:
    values = await store.redis.hmget(store.keys.worker(wid), "pending_count", "pending_tokens")
    return int(values[0]), int(values[1])


async def status_hash(store: FleetStore, wid: str) -> dict[str, str]:
    return await store.redis.hgetall(store.keys.worker(wid))


async def server_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


@pytest.fixture
async def events(store: FleetStore) -> AsyncIterator[PubSub]:
    """A subscription to the service's events channel, confirmed before the test writes anything."""
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(store.keys.events)
    async with asyncio.timeout(5):
        while (await pubsub.get_message(timeout=5)) is None:
            pass
    yield pubsub
    await pubsub.aclose()


async def next_event(pubsub: PubSub) -> str:
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                return message["data"]


def test_stale_epoch_is_one_class_importable_from_the_store_and_the_election() -> None:
    assert StaleEpochFromElection is StaleEpoch


async def test_a_stale_epoch_writes_nothing_and_publishes_nothing(store: FleetStore, events: PubSub) -> None:
    await register(store, P1, D1, kv_total=10_000)
    wid = P1.worker_id
    with pytest.raises(StaleEpoch, match="stale epoch 1, current none"):  # no master ever elected
        await store.write_worker_status(1, wid, {"running": "1"})
    old = await become_master(store, "a")
    assert (await store.reserve(1, [(wid, 100), (D1.worker_id, 10)], TTL)).ok
    assert (await store.reserve(2, [(wid, 200)], TTL)).ok
    assert await store.apply_cache_diff(old, wid, [1, 2, 3], []) == 3
    new = await become_master(store, "b")
    assert new > old
    before = await dump_service(store)

    for epoch in (old, new + 1):  # a future epoch is no better than a past one
        message = f"stale epoch {epoch}, current {new}"
        with pytest.raises(StaleEpoch, match=message):
            await store.write_worker_status(epoch, wid, {"running": "5", "alive": "0"}, [1, 2])
        with pytest.raises(StaleEpoch, match=message):
            await store.apply_cache_diff(epoch, wid, [4, 5], [1])
        with pytest.raises(StaleEpoch, match=message):
            await store.forget_worker(epoch, wid)

    assert await dump_service(store) == before
    await store.redis.publish(store.keys.events, "marker")
    assert await next_event(events) == "marker"  # nothing was published before it
    assert await store.write_worker_status(new, wid, {}) is not None  # the current master still writes


async def test_a_removed_worker_is_not_recreated(store: FleetStore, events: PubSub) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1, D1)
    wid = P1.worker_id
    assert (await store.reserve(1, [(wid, 100), (D1.worker_id, 10)], TTL)).ok
    assert await store.remove_worker(wid)
    before = await dump_service(store)
    assert before[store.keys.request(1)][1] == {wid: "100", D1.worker_id: "10"}  # the index still names it

    for gone in (wid, "10.9.9.9:1"):  # removed meanwhile, and never registered
        assert await store.write_worker_status(epoch, gone, {"running": "1"}, [1]) is None
        assert await store.apply_cache_diff(epoch, gone, [1, 2], [3]) is None
        assert await store.forget_worker(epoch, gone) is None

    assert await dump_service(store) == before
    for key in (store.keys.worker(wid), store.keys.reservations(wid), store.keys.cache_blocks(wid)):
        assert await store.redis.exists(key) == 0
    await store.redis.publish(store.keys.events, "marker")
    assert await next_event(events) == "marker"


async def test_handled_ids_drop_exactly_the_reservations_present(store: FleetStore) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1, D1, kv_total=10_000)
    p1, d1 = P1.worker_id, D1.worker_id
    assert (await store.reserve(1, [(p1, 100), (d1, 10)], TTL)).ok
    assert (await store.reserve(2, [(p1, 200)], TTL)).ok
    assert (await store.reserve(3, [(p1, 300)], TTL)).ok
    assert await pending(store, p1) == (3, 600)

    write = await store.write_worker_status(epoch, p1, {"running": "2", "waiting": "0"}, [1, 2, 999])
    assert write is not None and write.dropped == 2

    assert await pending(store, p1) == (1, 300)
    assert await store.redis.zrange(store.keys.reservations(p1), 0, -1) == ["3"]
    assert (await store.audit_reservations(p1)).reserved == {3: 300}
    assert await store.redis.hgetall(store.keys.request(1)) == {d1: "10"}  # the other role's reservation stays
    assert await store.redis.exists(store.keys.request(2)) == 0
    assert await store.redis.hgetall(store.keys.request(3)) == {p1: "300"}
    assert await store.redis.exists(store.keys.request(999)) == 0  # an unknown id creates nothing
    assert await pending(store, d1) == (1, 10)
    assert (await status_hash(store, p1))["running"] == "2"

    # the same ids again: nothing left to drop, nothing changes but the status write itself (and its stream entry)
    before = await dump_service(store)
    again = await store.write_worker_status(epoch, p1, {"running": "2", "waiting": "0"}, [1, 2])
    assert again == StatusWrite(dropped=0, status_version=write.status_version + 1)
    after = await dump_service(store)
    for state in (before, after):
        for field in ("status_version", "updated_ms"):
            del state[store.keys.worker(p1)][1][field]
        del state[store.keys.changes], state[store.keys.changes_seq]
    assert after == before

    # the routers' releases that follow find the dropped reservations gone: no load is given back twice
    assert await store.release(1) == 1
    assert await store.release(2) == 0
    assert await pending(store, p1) == (1, 300) and await pending(store, d1) == (0, 0)
    assert await store.release(3) == 1
    assert await pending(store, p1) == (0, 0)


async def test_a_handled_reservation_whose_request_index_was_lost_leaves_the_tokens_of_the_rest(
    store: FleetStore,
) -> None:
    """The reported request's tokens are in its index only: without it the worker's pending tokens are counted
    again from its other reservations."""
    epoch = await become_master(store, "a")
    await store.register_worker(P1, WorkerStatus(alive=True, kv_total=10_000))
    p1 = P1.worker_id
    assert (await store.reserve(1, [(p1, 100)], TTL)).ok
    assert (await store.reserve(2, [(p1, 200)], TTL)).ok
    await store.redis.delete(store.keys.request(1))
    write = await store.write_worker_status(epoch, p1, {"running": "1"}, [1])
    assert write is not None and write.dropped == 1
    assert await pending(store, p1) == (1, 200)
    assert (await store.audit_reservations(p1)).mismatch == ""


async def test_overdue_reservations_expire_before_the_write(store: FleetStore) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1)
    wid = P1.worker_id
    for rid, tokens in ((1, 100), (2, 70), (3, 5)):
        assert (await store.reserve(rid, [(wid, tokens)], TTL)).ok
    await store.redis.zadd(store.keys.reservations(wid), {"1": 1, "2": 1}, xx=True)  # overdue since 1970

    write = await store.write_worker_status(epoch, wid, {}, [1])
    assert write is not None and write.dropped == 0  # 1 had expired: given back once, by the expiry
    assert await pending(store, wid) == (1, 5)
    assert await store.redis.zrange(store.keys.reservations(wid), 0, -1) == ["3"]


async def test_each_write_adds_one_to_status_version_and_publishes_it(store: FleetStore, events: PubSub) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1)
    wid = P1.worker_id
    version = int((await status_hash(store, wid))["status_version"])
    for running in range(1, 4):
        start = await server_ms(store.redis)
        write = await store.write_worker_status(epoch, wid, {"running": str(running), "kv_used": "64"})
        end = await server_ms(store.redis)
        assert write == StatusWrite(dropped=0, status_version=version + 1)
        version += 1
        state = await status_hash(store, wid)
        assert (state["status_version"], state["running"], state["kv_used"]) == (str(version), str(running), "64")
        assert start <= int(state["updated_ms"]) <= end
        assert await next_event(events) == f"status {wid} {version}"

    assert await store.forget_worker(epoch, wid) == 0
    assert await next_event(events) == f"status {wid} {version + 1}"
    assert (await status_hash(store, wid))["status_version"] == str(version + 1)


async def test_script_owned_fields_cannot_be_written(store: FleetStore) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1)
    with pytest.raises(ValueError, match="pending_count"):
        await store.write_worker_status(epoch, P1.worker_id, {"running": "1", "pending_count": "0"})


async def test_cache_diff_of_many_keys(store: FleetStore) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1)
    wid = P1.worker_id
    rng = random.Random(7)
    blocks = {-(2**63), 2**63 - 1, -1, 0}
    while len(blocks) < 20_000:
        blocks.add(rng.randrange(-(2**63), 2**63))
    assert await store.apply_cache_diff(epoch, wid, list(blocks), []) == 20_000
    assert await store.redis.scard(store.keys.cache_blocks(wid)) == 20_000
    assert await store.cache_blocks(wid) == blocks

    removed = set(rng.sample(sorted(blocks), 10_000))
    added = {2**62 + i for i in range(5)} - blocks
    assert len(added) == 5
    assert await store.apply_cache_diff(epoch, wid, added, removed) == 10_005
    expected = (blocks - removed) | added
    assert await store.redis.scard(store.keys.cache_blocks(wid)) == 10_005
    assert await store.cache_blocks(wid) == expected

    # what a request is matched against: the inverted index follows the diffs exactly
    kept = sorted(expected)[:3]
    assert await store.lookup_prefix([*kept, sorted(removed)[0]]) == {wid: 3}
    for block in [*rng.sample(sorted(removed), 50), *added]:
        assert await store.block_holders(block) == ({wid} if block in expected else set())
    assert await store.apply_cache_diff(epoch, wid, [], []) == 10_005


async def test_forget_releases_everything_and_clears_the_cache(store: FleetStore, events: PubSub) -> None:
    epoch = await become_master(store, "a")
    await register(store, P1, D1, running=3, waiting=2, queued_tokens=50, kv_used=100, kv_total=10_000)
    p1, d1 = P1.worker_id, D1.worker_id
    assert (await store.reserve(1, [(p1, 100), (d1, 10)], TTL)).ok
    assert (await store.reserve(2, [(p1, 200)], TTL)).ok
    assert await store.apply_cache_diff(epoch, p1, [1, 2, 3], []) == 3
    version = int((await status_hash(store, p1))["status_version"])

    assert await store.forget_worker(epoch, p1) == 2

    state = await status_hash(store, p1)
    assert {f: state[f] for f in ("alive", "running", "waiting", "queued_tokens", "kv_used")} == dict.fromkeys(
        ("alive", "running", "waiting", "queued_tokens", "kv_used"), "0"
    )
    assert (state["pending_count"], state["pending_tokens"], state["kv_total"]) == ("0", "0", "10000")
    assert state["status_version"] == str(version + 1)
    assert await next_event(events) == f"status {p1} {version + 1}"
    for key in (store.keys.reservations(p1), store.keys.cache_blocks(p1)):
        assert await store.redis.exists(key) == 0
    assert await store.cache_blocks(p1) == set()
    assert [await store.block_holders(b) for b in (1, 2, 3)] == [set(), set(), set()]  # gone from the index too
    assert await store.redis.sismember(store.keys.role_set(Role.PREFILL), p1)  # still registered
    assert await pending(store, d1) == (1, 10)  # other workers are untouched

    # the indexes still name it: the releases that follow are no-ops there and never push it below zero
    assert await store.release(1) == 1
    assert await store.release(2) == 0
    assert await pending(store, p1) == (0, 0) and await pending(store, d1) == (0, 0)
    refused = await store.reserve(3, [(p1, 1)], TTL)
    assert (refused.ok, refused.reason) == (False, "not_alive")
    assert await store.forget_worker(epoch, p1) == 0


async def test_members_version_reads_zero_until_membership_exists(store: FleetStore) -> None:
    assert await store.members_version() == "0"
    await register(store, P1)
    first = await store.members_version()
    assert int(first) > 0
    await store.update_status(P1.worker_id, {"running": 1})  # not a membership change
    assert await store.members_version() == first
    await register(store, D1)
    assert int(await store.members_version()) > int(first)


async def test_every_master_script_call_touches_one_cluster_slot(store: FleetStore) -> None:
    seen: list[tuple[str, list[str]]] = []
    real_call = Scripts.call

    async def recording_call(self: Scripts, name: str, keys: list[str], args: list) -> object:
        seen.append((name, keys))
        return await real_call(self, name, keys, args)

    store.scripts.call = recording_call.__get__(store.scripts)  # type: ignore[method-assign]
    epoch = await become_master(store, "a")
    await register(store, P1)
    await store.write_worker_status(epoch, P1.worker_id, {"running": "1"}, [1, 2])
    await store.apply_cache_diff(epoch, P1.worker_id, [1], [2])
    await store.forget_worker(epoch, P1.worker_id)
    assert {"master_status", "master_cache", "master_forget"} <= {name for name, _ in seen}
    slot = key_slot(store.keys.events.encode())  # the channel is hash-tagged like the keys
    for name, keys in seen:
        assert {key_slot(k.encode()) for k in keys} == {slot}, (name, keys)


@pytest.mark.realredis
async def test_concurrent_reserve_release_and_status_writes_keep_pending_exact(
    redis_server: EmbeddedRedis, real_store: FleetStore
) -> None:
    """Routers reserve and release many requests while the master drops those the worker reports: the pending
    fields always mirror the reservations exactly, never go negative, and end at zero."""
    wid = P1.worker_id
    service = real_store.keys.service
    await real_store.register_worker(P1, WorkerStatus())
    epoch = await become_master(real_store, "master")
    clients = [aioredis.Redis.from_url(redis_server.url, decode_responses=True) for _ in range(6)]
    stores = [FleetStore(c, service) for c in clients]
    routers, master, observer = stores[:4], stores[4], stores[5]
    tokens = {rid: 1 + rid % 97 for rid in range(1, 4 * 150 + 1)}
    reserved: list[int] = []  # request ids reserved so far, in order (the master draws from them)
    done = asyncio.Event()
    observations = dropped = 0

    async def router(index: int, store: FleetStore) -> None:
        rng = random.Random(index)
        mine = list(range(1 + index * 150, 1 + (index + 1) * 150))
        held: list[int] = []
        for rid in mine:
            assert (await store.reserve(rid, [(wid, tokens[rid])], TTL)).ok
            reserved.append(rid)
            held.append(rid)
            if rng.random() < 0.4:  # a request finishes: release one of ours, already dropped by the master or not
                await store.release(held.pop(rng.randrange(len(held))))

    async def master_loop() -> None:
        nonlocal dropped
        rng = random.Random(99)
        seen: set[int] = set()  # the worker reports about half the requests (the others are not yet started)
        writes = 0
        while not done.is_set() or writes < 5:
            fresh = [rid for rid in reserved if rid not in seen]
            handled = [rid for rid in fresh if rng.random() < 0.5]
            seen.update(fresh)
            write = await master.write_worker_status(epoch, wid, {"running": str(len(handled))}, handled)
            assert write is not None
            dropped += write.dropped
            writes += 1

    async def observe() -> None:
        nonlocal observations
        while not done.is_set():
            audit = await observer.audit_reservations(wid)
            assert audit.pending_count >= 0 and audit.pending_tokens >= 0
            assert audit.mismatch == "", audit
            observations += 1

    try:
        async with asyncio.timeout(60):
            background = [asyncio.create_task(master_loop()), asyncio.create_task(observe())]
            await asyncio.gather(*(router(i, s) for i, s in enumerate(routers)))
            done.set()
            await asyncio.gather(*background)
        left = await real_store.redis.zrange(real_store.keys.reservations(wid), 0, -1)
        assert await pending(real_store, wid) == (len(left), sum(tokens[int(rid)] for rid in left))
        assert observations > 0 and dropped > 0

        for rid in tokens:
            await real_store.release(rid)
        assert await pending(real_store, wid) == (0, 0)
        assert await real_store.redis.exists(real_store.keys.reservations(wid)) == 0
    finally:
        for client in clients:
            await client.aclose()


async def test_a_removed_or_evicting_worker_leaves_every_block_of_the_index(store: FleetStore) -> None:
    """The inverted index stays exact: eviction (a diff's removals) and removal from the fleet take the worker out
    of exactly its blocks, and another worker holding the same blocks stays."""
    epoch = await become_master(store, "a")
    p2 = WorkerSpec("10.0.0.2", 8000, Role.PREFILL)
    await register(store, P1, p2)
    assert await store.apply_cache_diff(epoch, P1.worker_id, [1, 2, 3, 4], []) == 4
    assert await store.apply_cache_diff(epoch, p2.worker_id, [1, 2, 9], []) == 3
    assert await store.apply_cache_diff(epoch, P1.worker_id, [5], [3, 4]) == 3  # evicted 3, 4; stored 5
    assert {b: await store.block_holders(b) for b in (1, 2, 3, 4, 5, 9)} == {
        1: {P1.worker_id, p2.worker_id},
        2: {P1.worker_id, p2.worker_id},
        3: set(),
        4: set(),
        5: {P1.worker_id},
        9: {p2.worker_id},
    }
    assert await store.remove_worker(P1.worker_id)
    assert {b: await store.block_holders(b) for b in (1, 2, 5, 9)} == {
        1: {p2.worker_id},
        2: {p2.worker_id},
        5: set(),
        9: {p2.worker_id},
    }
    assert await store.lookup_prefix([1, 2, 5]) == {p2.worker_id: 2}
    # a removed worker's index is not re-created by a late diff
    assert await store.apply_cache_diff(epoch, P1.worker_id, [1], []) is None
    assert await store.block_holders(1) == {p2.worker_id}
