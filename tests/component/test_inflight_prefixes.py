"""Issue 11: a request's blocks count as held by the prefill worker it was reserved on, fleet-wide, until the worker's
own cache report confirms them or a short TTL passes; a reservation whose new prefix was placed elsewhere meanwhile is
refused as prefix_moved. Through FleetStore on real Redis (pipelined) and fakeredis."""

from __future__ import annotations

import asyncio
import time

from test_master_scripts import become_master

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

P1 = WorkerSpec("10.9.0.1", 8000, Role.PREFILL)
P2 = WorkerSpec("10.9.0.2", 8000, Role.PREFILL)
D1 = WorkerSpec("10.9.0.3", 8000, Role.DECODE)
PROMPT = [11, 12, 13]
MINUTE = 60_000
HOLD = {"inflight_blocks": PROMPT, "inflight_ttl_ms": MINUTE}


async def fleet(store: FleetStore) -> None:
    for spec in (P1, P2, D1):
        await store.register_worker(spec, WorkerStatus(kv_total=100_000))


async def index_of(store: FleetStore, block: int) -> set[str]:
    return set(await store.redis.smembers(store.keys.block(block)))


async def test_reserved_blocks_are_held_until_the_workers_report_confirms_them(store: FleetStore) -> None:
    await fleet(store)
    picks = [(P1.worker_id, 10), (D1.worker_id, 10)]
    assert (await store.reserve(1, picks, MINUTE, **HOLD)).ok
    assert await store.lookup_prefix([*PROMPT, 14]) == {P1.worker_id: 3}
    assert set(await store.inflight_blocks(P1.worker_id)) == set(PROMPT)
    assert await store.inflight_blocks(D1.worker_id) == {}  # only the prefill-type pick holds them

    epoch = await become_master(store, "m")
    await store.apply_cache_diff(epoch, P1.worker_id, [11, 12], [])  # the worker reports two of them
    assert set(await store.inflight_blocks(P1.worker_id)) == {13}
    assert await store.cache_blocks(P1.worker_id) == {11, 12}
    assert await store.lookup_prefix(PROMPT) == {P1.worker_id: 3}

    await store.apply_cache_diff(epoch, P1.worker_id, [], [11])  # then evicts the first: the match ends there
    assert await index_of(store, 11) == set()
    assert await store.lookup_prefix(PROMPT) == {}


async def test_in_flight_blocks_expire_and_leave_the_index(store: FleetStore) -> None:
    await fleet(store)
    assert (await store.reserve(1, [(P1.worker_id, 10)], MINUTE, inflight_blocks=PROMPT, inflight_ttl_ms=30)).ok
    assert await store.lookup_prefix(PROMPT) == {P1.worker_id: 3}
    deadline = time.monotonic() + 5
    while await store.lookup_prefix(PROMPT) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # the expiry is Redis' clock: poll it
    assert await store.lookup_prefix(PROMPT) == {}, "expired in-flight blocks still count"
    # the next reservation on the worker clears them from the inverted index too
    assert (await store.reserve(2, [(P1.worker_id, 10)], MINUTE)).ok
    assert [await index_of(store, b) for b in PROMPT] == [set(), set(), set()]
    assert await store.inflight_blocks(P1.worker_id) == {}


async def test_only_heads_are_indexed_and_expired_blocks_go_in_bounded_steps(store: FleetStore) -> None:
    await fleet(store)
    runs = [list(range(1000, 1100)), list(range(1100, 1200))]  # two requests' new blocks on P1
    for rid, run in enumerate(runs, start=1):
        assert (await store.reserve(rid, [(P1.worker_id, 1)], MINUTE, inflight_blocks=run, inflight_ttl_ms=30)).ok
    indexed = [b for run in runs for b in run if await index_of(store, b)]
    assert indexed == [1000, 1100], "the index names the worker for each request's first new block only"
    deadline = time.monotonic() + 5
    while await store.lookup_prefix(runs[0]) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # the expiry is Redis' clock: poll it
    left = []
    for rid in range(3, 7):  # each reservation on the worker clears at most 64 of its expired blocks
        assert (await store.reserve(rid, [(P1.worker_id, 1)], MINUTE)).ok
        left.append(len(await store.inflight_blocks(P1.worker_id)))
    assert left == [136, 72, 8, 0]
    assert await index_of(store, 1000) == set() and await index_of(store, 1100) == set()
    assert not await store.redis.exists(store.keys.inflight_heads(P1.worker_id))


async def test_a_removed_or_forgotten_worker_leaves_every_block_it_had_in_flight(store: FleetStore) -> None:
    await fleet(store)
    for rid, spec in ((1, P1), (2, P2)):
        assert (await store.reserve(rid, [(spec.worker_id, 1)], MINUTE, **HOLD)).ok
    await store.remove_worker(P1.worker_id)
    epoch = await become_master(store, "m")
    await store.forget_worker(epoch, P2.worker_id)
    for block in PROMPT:
        assert await index_of(store, block) == set()
    for spec in (P1, P2):
        key, heads = store.keys.inflight_blocks(spec.worker_id), store.keys.inflight_heads(spec.worker_id)
        assert not await store.redis.exists(key, heads)


async def test_a_reservation_whose_new_prefix_went_elsewhere_meanwhile_is_refused(store: FleetStore) -> None:
    await fleet(store)
    # two requests of one new prefix looked up at once (nothing held); the first is placed on P1
    assert (await store.reserve(1, [(P1.worker_id, 1)], MINUTE, **HOLD)).ok
    moved = await store.reserve(
        2,
        [(P2.worker_id, 1), (D1.worker_id, 1)],
        MINUTE,
        inflight_blocks=PROMPT,
        inflight_ttl_ms=MINUTE,
        probe_block=11,
    )
    assert not moved.ok and moved.reason == "prefix_moved" and moved.refused_index == 0
    assert P1.worker_id in moved.detail
    assert await store.redis.zcard(store.keys.reservations(P2.worker_id)) == 0  # nothing written
    assert await store.redis.zcard(store.keys.reservations(D1.worker_id)) == 0
    # also on P1 itself: the caller's tokens assumed no hit there
    assert (await store.reserve(2, [(P1.worker_id, 1)], MINUTE, probe_block=11)).reason == "prefix_moved"
    # deciding again with the new lookup (no probe then), any worker is taken as asked
    assert await store.lookup_prefix(PROMPT) == {P1.worker_id: 3}
    assert (await store.reserve(2, [(P1.worker_id, 0)], MINUTE)).ok
    assert (await store.reserve(3, [(P2.worker_id, 1)], MINUTE)).ok


async def test_a_sampled_lookup_says_how_deep_some_worker_holds_the_prompt(store: FleetStore) -> None:
    """More holders of the first block than a lookup follows: the hits come from a sample, and held_by_any says
    how deep the index goes, so a router's probe is not a block some unsampled worker held all along."""
    popular = [WorkerSpec(f"10.9.1.{i}", 8000, Role.PREFILL) for i in range(12)]
    for i, spec in enumerate(popular):
        await store.register_worker(spec, WorkerStatus(kv_total=100_000))
        await store.set_cache_blocks(spec.worker_id, [11, 12, 13] if i == 11 else [11, 12])
    hits = await store.lookup_prefix([*PROMPT, 14], follow=4)
    assert hits.held_by_any == 3
    assert set(hits.values()) <= {2, 3}
    few = await store.lookup_prefix([*PROMPT, 14], follow=16)  # every holder followed: the hits are exact
    assert few.held_by_any == 0 and few[popular[11].worker_id] == 3


async def test_a_bounded_worker_keeps_its_newest_in_flight_blocks_and_heads(store: FleetStore) -> None:
    await fleet(store)
    runs = [[2000 + 10 * i + b for b in range(3)] for i in range(4)]  # four requests' new blocks, oldest first
    for rid, run in enumerate(runs, start=1):
        hold = {"inflight_blocks": run, "inflight_ttl_ms": MINUTE + rid, "inflight_max_blocks": 2}
        assert (await store.reserve(rid, [(P1.worker_id, 1)], MINUTE, **hold)).ok
    assert set(await store.inflight_blocks(P1.worker_id)) == {2031, 2032}  # the newest request's, at most 2
    heads = await store.redis.zrange(store.keys.inflight_heads(P1.worker_id), 0, -1)
    assert {int(h) for h in heads} == {2020, 2030}
    assert [bool(await index_of(store, run[0])) for run in runs] == [False, False, True, True]
