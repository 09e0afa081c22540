"""The Lua scripts through FleetStore, on a real redis-server (the reference) and on fakeredis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.scripts import SCRIPT_NAMES, Scripts, script_source
from flexlb.state.store import FleetStore

P1 = WorkerSpec("10.0.0.1", 8000, Role.PREFILL, max_concurrency=2)
P2 = WorkerSpec("10.0.0.2", 8000, Role.PREFILL, max_concurrency=2)
D1 = WorkerSpec("10.0.0.3", 8000, Role.DECODE, max_concurrency=1)


async def register_fleet(store: FleetStore) -> None:
    for spec in (P1, P2, D1):
        await store.register_worker(spec, WorkerStatus(kv_total=1000, block_size=16))


async def worker_state(store: FleetStore, wid: str) -> tuple:
    """Everything Redis holds about a worker's load, read raw (not through the code under test's decoding)."""
    r = store.redis
    h = await r.hgetall(store.keys.worker(wid))
    return (
        h.get("pending_count"),
        h.get("pending_tokens"),
        await r.zrange(store.keys.reservations(wid), 0, -1, withscores=True),
        {
            rid: await r.hget(store.keys.request(int(rid)), wid)
            for rid in await r.zrange(store.keys.reservations(wid), 0, -1)
        },
    )


def raw_pending(state: tuple) -> tuple[int, int]:
    return int(state[0]), int(state[1])


async def test_reserve_records_and_release_gives_back_exactly(store: FleetStore) -> None:
    await register_fleet(store)
    before = await worker_state(store, P1.worker_id)
    out = await store.reserve(42, [(P1.worker_id, 300), (D1.worker_id, 500)], ttl_ms=60_000)
    assert out.ok
    p1 = await worker_state(store, P1.worker_id)
    assert raw_pending(p1) == (1, 300)
    assert [m for m, _ in p1[2]] == ["42"] and p1[3] == {"42": "300"}
    assert raw_pending(await worker_state(store, D1.worker_id)) == (1, 500)
    assert sorted(await store.request_workers(42)) == sorted([P1.worker_id, D1.worker_id])

    assert await store.release(42) == 2
    assert await worker_state(store, P1.worker_id) == before
    assert raw_pending(await worker_state(store, D1.worker_id)) == (0, 0)
    # exactly once: a second release finds nothing and changes nothing
    assert await store.release(42) == 0
    assert await worker_state(store, P1.worker_id) == before
    assert await store.redis.exists(store.keys.request(42)) == 0


async def test_refused_later_role_leaves_earlier_worker_exactly_as_before(store: FleetStore) -> None:
    await register_fleet(store)
    assert (await store.reserve(1, [(D1.worker_id, 100)], 60_000)).ok  # D1 is now at max_concurrency=1
    await store.reserve(2, [(P1.worker_id, 50)], 60_000)
    before_p1 = await worker_state(store, P1.worker_id)
    before_d1 = await worker_state(store, D1.worker_id)

    out = await store.reserve(3, [(P1.worker_id, 200), (D1.worker_id, 100)], 60_000)

    assert not out.ok and out.refused_index == 1 and out.reason == "concurrency_full"
    assert "load 1 of max 1" in out.detail
    assert await worker_state(store, P1.worker_id) == before_p1
    assert await worker_state(store, D1.worker_id) == before_d1
    assert await store.redis.exists(store.keys.request(3)) == 0


async def test_rollback_of_some_roles_keeps_the_others(store: FleetStore) -> None:
    await register_fleet(store)
    assert (await store.reserve(7, [(P1.worker_id, 100), (D1.worker_id, 100)], 60_000)).ok
    assert await store.release(7, [P1.worker_id]) == 1
    assert raw_pending(await worker_state(store, P1.worker_id)) == (0, 0)
    assert raw_pending(await worker_state(store, D1.worker_id)) == (1, 100)
    assert await store.request_workers(7) == [D1.worker_id]


async def test_refusal_reasons(store: FleetStore) -> None:
    await register_fleet(store)
    assert (await store.reserve(1, [(P1.worker_id, 900)], 60_000)).ok
    kv = await store.reserve(2, [(P1.worker_id, 200)], 60_000)
    assert (kv.ok, kv.reason, kv.detail) == (False, "kv_full", "needs 200 tokens, 100 free")
    await store.update_status(P2.worker_id, {"alive": "false"})
    dead = await store.reserve(3, [(P2.worker_id, 1)], 60_000)
    assert (dead.ok, dead.reason) == (False, "not_alive")
    gone = await store.reserve(4, [("10.9.9.9:1", 1)], 60_000)
    assert (gone.ok, gone.reason) == (False, "gone")
    # the worker's own reported load counts against the limit too
    await store.update_status(P2.worker_id, {"alive": "true", "running": "1", "waiting": "1"})
    busy = await store.reserve(5, [(P2.worker_id, 1)], 60_000)
    assert (busy.ok, busy.reason, busy.detail) == (False, "concurrency_full", "load 2 of max 2")


async def test_re_reserving_the_same_request_does_not_count_twice(store: FleetStore) -> None:
    await register_fleet(store)
    assert (await store.reserve(9, [(D1.worker_id, 100)], 60_000)).ok
    # D1 is full (max 1), but request 9 already holds it: a retry of the same request is not refused
    assert (await store.reserve(9, [(D1.worker_id, 100)], 60_000)).ok
    assert raw_pending(await worker_state(store, D1.worker_id)) == (1, 100)


async def test_overdue_reservations_expire_and_give_load_back(store: FleetStore) -> None:
    await register_fleet(store)
    assert (await store.reserve(11, [(P1.worker_id, 100), (P2.worker_id, 100)], ttl_ms=1)).ok
    assert (await store.reserve(12, [(P1.worker_id, 70)], ttl_ms=60_000)).ok
    await _wait_until_server_time_passes(store.redis, 5)

    # P1 is reserved again: its overdue reservation goes, the live one stays, and the script says so
    again = await store.reserve(14, [(P1.worker_id, 5)], ttl_ms=60_000)
    assert again.ok and again.pending == ((2, 75),)
    assert raw_pending(await worker_state(store, P1.worker_id)) == (2, 75)
    assert await store.release(14) == 1
    # and the sweep script does the same for a worker nobody reads
    assert (await store.reserve(13, [(P2.worker_id, 5)], ttl_ms=1)).ok
    await _wait_until_server_time_passes(store.redis, 5)
    assert await store.sweep([P2.worker_id]) >= 1
    assert raw_pending(await worker_state(store, P2.worker_id)) == (0, 0)
    # a release after expiry is a no-op
    assert await store.release(11) == 0
    assert raw_pending(await worker_state(store, P1.worker_id)) == (1, 70)


async def test_a_worker_with_room_looks_for_overdue_reservations_once_its_check_is_due(store: FleetStore) -> None:
    """reserve.lua searches a worker's overdue reservations at most every min(1 s, TTL / 4) while it has room (a
    full worker searches at once, above); once the check is due the next reservation gives their load back."""
    await register_fleet(store)
    assert (await store.reserve(21, [(P1.worker_id, 40)], ttl_ms=60_000)).ok
    due_ms = int(await store.redis.hget(store.keys.worker(P1.worker_id), "resv_check"))
    await store.redis.zadd(store.keys.reservations(P1.worker_id), {"21": 1})  # overdue since 1970
    now = await store.redis.time()
    await _wait_until_server_time_passes(store.redis, due_ms - (now[0] * 1000 + now[1] // 1000) + 1)
    again = await store.reserve(22, [(P1.worker_id, 5)], ttl_ms=60_000)
    assert again.ok and again.pending == ((1, 5),)
    assert raw_pending(await worker_state(store, P1.worker_id)) == (1, 5)
    assert await store.release(21) == 0 and await store.release(22) == 1
    assert raw_pending(await worker_state(store, P1.worker_id)) == (0, 0)


async def test_expired_in_flight_blocks_are_removed_once_the_worker_s_check_is_due_and_never_count_meanwhile(
    store: FleetStore,
) -> None:
    """reserve.lua removes a worker's expired in-flight blocks at most every min(1 s, in-flight TTL / 4)
    ('inflight_check'); until then they stay in its zset but no lookup counts them."""
    await register_fleet(store)
    assert (await store.reserve(31, [(P1.worker_id, 40)], 60_000, inflight_blocks=[71, 72], inflight_ttl_ms=20)).ok
    worker_key = store.keys.worker(P1.worker_id)
    await store.redis.hset(worker_key, "inflight_check", str(2**52))  # not due for a long time
    await _wait_until_server_time_passes(store.redis, 25)
    assert (await store.reserve(32, [(P1.worker_id, 5)], 60_000)).ok
    assert set(await store.inflight_blocks(P1.worker_id)) == {71, 72}  # expired, still there
    assert await store.lookup_prefix([71, 72]) == {}  # and held by nobody
    await store.redis.hset(worker_key, "inflight_check", "0")  # due
    assert await store.release(32) == 1  # P1 takes 2 at once
    assert (await store.reserve(33, [(P1.worker_id, 5)], 60_000)).ok
    assert await store.inflight_blocks(P1.worker_id) == {}
    assert int(await store.redis.hget(worker_key, "inflight_check")) > 0  # the next one is set
    assert P1.worker_id not in await store.block_holders(71)


async def _wait_until_server_time_passes(redis: aioredis.Redis, ms: int) -> None:
    """Poll Redis's own clock (the scripts' clock) until ``ms`` have passed."""
    start = await redis.time()
    start_ms = start[0] * 1000 + start[1] // 1000
    for _ in range(5000):
        now = await redis.time()
        if now[0] * 1000 + now[1] // 1000 >= start_ms + ms:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("Redis clock did not advance")


@pytest.mark.parametrize(
    ("cached", "request_keys", "expected"),
    [
        ([1, 2, 3], [1, 2, 3, 4], 3),
        ([1, 2, 3], [1, 2, 3], 3),
        ([2, 3], [1, 2, 3], 0),  # the first block missing ends the match at once
        ([1, 3], [1, 2, 3], 1),  # a hole ends the match even if later blocks are cached
        ([], [1, 2], 0),
        ([1], [], 0),
        (list(range(100)), list(range(100)), 100),
        (list(range(70)), [*range(65), 999, *range(66, 100)], 65),
        (list(range(300)), list(range(300)), 300),  # across several lookup chunks
        (list(range(300)), [*range(200), 999, *range(201, 300)], 200),
        (list(range(256)), list(range(300)), 256),  # ends exactly at a chunk's edge
    ],
)
async def test_lookup_prefix_is_a_strict_prefix_match(
    store: FleetStore, cached: list[int], request_keys: list[int], expected: int
) -> None:
    await register_fleet(store)
    await store.set_cache_blocks(P1.worker_id, cached)
    await store.set_cache_blocks(P2.worker_id, [5])  # holds a block, never a prefix of these requests
    hits = await store.lookup_prefix(request_keys)
    assert hits == ({P1.worker_id: expected} if expected else {})


async def test_lookup_gives_each_worker_its_own_prefix(store: FleetStore) -> None:
    await register_fleet(store)
    await store.set_cache_blocks(P1.worker_id, [1, 2, 3, 4])
    await store.set_cache_blocks(P2.worker_id, [1, 2])
    await store.set_cache_blocks(D1.worker_id, [1, 2, 3, 9])  # decode's cache hits do not matter: not indexed
    assert await store.lookup_prefix([1, 2, 3, 4, 5]) == {P1.worker_id: 4, P2.worker_id: 2}
    # replacing a worker's blocks replaces them in the inverted index too
    await store.set_cache_blocks(P1.worker_id, [7])
    assert await store.block_holders(1) == {P2.worker_id}
    assert await store.lookup_prefix([1, 2, 3, 4, 5]) == {P2.worker_id: 2}
    # a worker changing role enters or leaves the index with what it holds
    await store.register_worker(WorkerSpec(D1.ip, D1.http_port, Role.PDFUSION), WorkerStatus())
    assert await store.lookup_prefix([1, 2, 3, 4, 5]) == {P2.worker_id: 2, D1.worker_id: 3}
    await store.register_worker(WorkerSpec(P2.ip, P2.http_port, Role.DECODE), WorkerStatus())
    assert await store.lookup_prefix([1, 2, 3, 4, 5]) == {D1.worker_id: 3}
    assert await store.cache_blocks(P2.worker_id) == {1, 2}  # its own set stays


async def test_lookup_work_is_bounded_when_many_workers_hold_the_prefix(store: FleetStore) -> None:
    """A popular prefix on 100 workers: a lookup follows a sample of them, and never misses the one holding the
    longest match."""
    many = [WorkerSpec(f"10.9.{i // 200}.{i % 200}", 8000, Role.PREFILL) for i in range(100)]
    for spec in many:
        await store.register_worker(spec, WorkerStatus())
        await store.set_cache_blocks(spec.worker_id, [1, 2, 3])
    await store.set_cache_blocks(many[57].worker_id, [1, 2, 3, 4, 5, 6])
    hits = await store.lookup_prefix([1, 2, 3, 4, 5, 6, 7], follow=8)
    assert hits[many[57].worker_id] == 6
    assert 8 <= len(hits) <= 9 and all(h == 3 for w, h in hits.items() if w != many[57].worker_id)
    assert len(await store.lookup_prefix([1, 2, 3, 4, 5, 6, 7], follow=200)) == 100  # under the bound: exact


async def test_update_of_unknown_worker_is_refused_and_creates_nothing(store: FleetStore) -> None:
    from flexlb.state.store import WorkerNotFound

    with pytest.raises(WorkerNotFound, match=r"unknown worker 1\.2\.3\.4:5"):
        await store.update_status("1.2.3.4:5", {"running": 1})
    assert await store.redis.exists(store.keys.worker("1.2.3.4:5")) == 0


async def test_status_version_grows_and_updated_ms_is_server_time(store: FleetStore) -> None:
    await register_fleet(store)

    def d1(views: list) -> WorkerStatus:
        return next(v.status for v in views if v.worker_id == D1.worker_id)

    v0 = d1(await store.list_workers())
    await store.update_status(D1.worker_id, {"running": 3, "kv_used": 120})
    v1 = d1(await store.list_workers())
    now = await store.redis.time()
    assert v1.status_version == v0.status_version + 1
    assert (v1.running, v1.kv_used) == (3, 120)
    assert v0.updated_ms <= v1.updated_ms <= now[0] * 1000 + now[1] // 1000


async def test_every_script_call_touches_one_cluster_slot(store: FleetStore) -> None:
    """Redis Cluster: all keys of a script must hash to one slot; the {service} tag guarantees it."""
    seen: list[tuple[str, list[str]]] = []
    real_call = Scripts._call  # what goes to Redis: a batch of several calls too (flexlb/state/script_batch.py)

    async def recording_call(self: Scripts, name: str, keys: list[str], args: list, **options: bool) -> object:
        seen.append((name, keys))
        return await real_call(self, name, keys, args, **options)

    real_submit = Scripts.submit

    def recording_submit(self: Scripts, name: str, keys: list[str], args: list) -> object:
        seen.append((name, keys))
        return real_submit(self, name, keys, args)

    store.scripts._call = recording_call.__get__(store.scripts)  # type: ignore[method-assign]
    store.scripts.submit = recording_submit.__get__(store.scripts)  # type: ignore[method-assign]
    if store.scripts.batch is not None:
        store.scripts.batch._call, store.scripts.batch._submit = store.scripts._call, store.scripts.submit
    await register_fleet(store)
    await store.set_cache_blocks(P1.worker_id, [1, 2])
    await store.lookup_prefix([1, 2])
    await store.reserve(5, [(P1.worker_id, 1), (D1.worker_id, 1)], 60_000)
    assert (await store.audit_reservations(P1.worker_id)).reserved == {5: 1}
    await store.sweep([P1.worker_id, D1.worker_id])
    await store.release(5)
    await asyncio.gather(store.reserve(6, [(P1.worker_id, 1)], 60_000), store.release(6, [P1.worker_id]))
    await store.remove_worker(P2.worker_id)
    own_tests = {"batch"} if store.scripts.batch is None else set()  # batches: with the pipelined client only
    own_tests |= {"lock_acquire", "lock_renew", "lock_release", "lock_take_over", "fenced_set"}  # own tests, as
    own_tests |= {"master_status", "master_cache", "master_forget"}  # are the master's writes
    own_tests |= {"shard_pollers"}  # tests/integration/test_poll_shards.py
    assert {name for name, _ in seen} == set(SCRIPT_NAMES) - own_tests
    for name, keys in seen:
        assert len({key_slot(k.encode()) for k in keys}) == 1, (name, keys)
    # keys the scripts name from a prefix (a worker's blocks in the inverted index, a candidate's own block set, a
    # request's index named from a worker's key) are in the same slot as every declared key
    home = key_slot(store.keys.worker("w").encode())
    for key in (store.keys.block(12345), store.keys.cache_blocks("w"), store.keys.request(12345)):
        assert key_slot(key.encode()) == home


def test_script_sources_have_their_includes_expanded_and_a_header() -> None:
    for name in SCRIPT_NAMES:
        text = script_source(name)
        assert not [line for line in text.splitlines() if line.startswith("-- @include ")]
        if "expire_reservations(" in text:
            assert "local function expire_reservations" in text
        assert text.startswith(f"-- {name}:"), f"lua/{name}.lua must open with its KEYS/ARGV header"
        assert "KEYS" in text.split("\n\n")[0] or name == "sweep"


@pytest.mark.parametrize("hint", ["all", "some", "none", "wrong"])
async def test_release_request_frees_every_reservation_whatever_the_hint(store: FleetStore, hint: str) -> None:
    await register_fleet(store)
    assert (await store.reserve(21, [(P1.worker_id, 10), (D1.worker_id, 20)], 60_000)).ok
    likely = {
        "all": [P1.worker_id, D1.worker_id],
        "some": [D1.worker_id],
        "none": [],
        "wrong": [P2.worker_id],
    }[hint]
    assert await store.release_request(21, likely) == 2
    for spec in (P1, P2, D1):
        assert raw_pending(await worker_state(store, spec.worker_id)) == (0, 0)
    assert await store.redis.exists(store.keys.request(21)) == 0
    assert await store.release_request(21, likely) == 0


async def test_a_zero_token_reservation_is_released_like_any_other(store: FleetStore) -> None:
    """seq_len 0, or a prompt fully cached on the worker, reserves 0 tokens: Lua must not send HINCRBY '-0'."""
    await register_fleet(store)
    assert (await store.reserve(31, [(P1.worker_id, 0), (D1.worker_id, 0)], 60_000)).ok
    assert raw_pending(await worker_state(store, P1.worker_id)) == (1, 0)
    assert await store.release(31) == 2
    assert raw_pending(await worker_state(store, P1.worker_id)) == (0, 0)
    assert raw_pending(await worker_state(store, D1.worker_id)) == (0, 0)


async def test_reservations_whose_request_index_was_lost_give_back_exactly_what_is_left(store: FleetStore) -> None:
    """A reservation's tokens are in its request's index only (req:<rid>), which outlives it by a minute; when the
    index is gone (an expiry that ran later, an eviction), release and expiry count the worker's tokens again from the
    reservations it has left instead of leaving its pending tokens wrong for good."""
    await register_fleet(store)
    p1 = P1.worker_id
    for rid, tokens in ((1, 100), (2, 200), (3, 50)):
        assert (await store.reserve(rid, [(p1, tokens)], ttl_ms=60_000, limits=False)).ok  # over max_concurrency 2
    assert raw_pending(await worker_state(store, p1)) == (3, 350)
    await store.redis.delete(store.keys.request(1), store.keys.request(3))

    assert await store.release(1, [p1]) == 1  # 3's tokens are unknown too: only 2's 200 are known to be held
    assert raw_pending(await worker_state(store, p1)) == (2, 200)
    await store.redis.zadd(store.keys.reservations(p1), {"3": 1})  # overdue since 1970
    assert await store.sweep([p1]) == 1
    assert raw_pending(await worker_state(store, p1)) == (1, 200)
    assert (await store.audit_reservations(p1)).mismatch == ""
    assert await store.release(2) == 1
    assert raw_pending(await worker_state(store, p1)) == (0, 0)
