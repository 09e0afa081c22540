"""The router's block mirror on a real redis-server: fed only by the change stream (and the reads it asks for), it
holds exactly what Redis' index holds through cache sets, master diffs large and small, reservations' in-flight
blocks, forgotten, re-roled and removed workers and a trimmed stream; and its lookups answer as lua/lookup.lua."""

from __future__ import annotations

import random

import pytest
from test_master_scripts import become_master

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.block_mirror import INDEXED_ROLES, BlockMirror
from flexlb.state.store import FleetStore
from flexlb.state.view import FleetView
from flexlb.state.view_sync import ViewSync

SPECS = [
    WorkerSpec("10.0.0.1", 8000, Role.PREFILL),
    WorkerSpec("10.0.0.2", 8000, Role.PREFILL),
    WorkerSpec("10.0.0.3", 8000, Role.PDFUSION),
    WorkerSpec("10.0.0.4", 8000, Role.DECODE),
]
BLOCKS = range(1, 41)  # a small universe, so prefixes overlap
INFLIGHT_TTL = 600_000  # no expiry during the test: Redis and the mirror are compared at one moment


async def redis_truth(store: FleetStore, worker_id: str, now_ms: int) -> set[int]:
    """What Redis says the worker holds: its cache set and its unexpired in-flight blocks."""
    live = {b for b, until in (await store.inflight_blocks(worker_id)).items() if until > now_ms}
    return await store.cache_blocks(worker_id) | live


async def redis_now_ms(store: FleetStore) -> int:
    seconds, micros = await store.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def assert_mirror_matches(store: FleetStore, sync: ViewSync, mirror: BlockMirror, what: str) -> None:
    await sync.catch_up()
    now = await redis_now_ms(store)
    mirror.expire(now)
    for spec in SPECS:
        view = sync.view.get(spec.worker_id)
        indexed = view is not None and view.spec.role in INDEXED_ROLES
        expected = await redis_truth(store, spec.worker_id, now) if indexed else set()
        assert mirror.blocks_of(spec.worker_id) == expected, f"{spec.worker_id} after {what}"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_mirror_follows_every_write_of_the_index(real_store: FleetStore, seed: int) -> None:
    rng = random.Random(seed)
    store = real_store
    for spec in SPECS:
        await store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
    mirror = BlockMirror()
    sync = ViewSync(store, FleetView(), mirror=mirror)
    await sync.catch_up()
    epoch = await become_master(store, "m")
    request_id = 0
    for step in range(60):
        spec = rng.choice(SPECS)
        wid = spec.worker_id
        op = rng.choice(["set", "diff", "big diff", "reserve", "reserve", "forget", "role", "trim"])
        if op == "set":
            await store.set_cache_blocks(wid, rng.sample(BLOCKS, rng.randrange(0, 12)))
        elif op in ("diff", "big diff"):
            add = rng.sample(BLOCKS, rng.randrange(0, 8))
            remove = rng.sample(BLOCKS, rng.randrange(0, 8))
            if op == "big diff":  # more than the stream carries: the mirror reads the worker again
                add += list(range(1_000, 1_600))
            await store.apply_cache_diff(epoch, wid, add, [b for b in remove if b not in add])
        elif op == "reserve":
            request_id += 1
            await store.update_status(wid, {"alive": 1})  # a forgotten worker is not alive
            blocks = rng.sample(BLOCKS, rng.randrange(1, 8))
            outcome = await store.reserve(
                request_id, [(wid, 10)], 60_000, inflight_blocks=blocks, inflight_ttl_ms=INFLIGHT_TTL
            )
            assert outcome.ok
        elif op == "forget":
            await store.forget_worker(epoch, wid)
        elif op == "role":  # to a role outside the index and back again, or the other way
            await store.register_worker(WorkerSpec(spec.ip, spec.http_port, rng.choice(list(Role))))
        else:  # the mirror falls behind a trimmed stream: it reads everything again
            await store.redis.xtrim(store.keys.changes, maxlen=1, approximate=False)
        await assert_mirror_matches(store, sync, mirror, f"step {step}: {op} on {wid}")
    await store.remove_worker(SPECS[0].worker_id)
    await assert_mirror_matches(store, sync, mirror, "a removal")


async def test_mirror_lookups_answer_as_the_lua_lookup(real_store: FleetStore) -> None:
    rng = random.Random(7)
    store = real_store
    prefill = SPECS[:3]  # at most LOOKUP_FOLLOW holders: lua/lookup.lua follows them all, no sampling
    for spec in prefill:
        await store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
        chain = list(BLOCKS)[: rng.randrange(5, 30)]
        await store.set_cache_blocks(spec.worker_id, [b for b in chain if rng.random() > 0.1])
    assert (await store.reserve(1, [(prefill[0].worker_id, 1)], 60_000, inflight_blocks=[31, 32, 33],
                                inflight_ttl_ms=INFLIGHT_TTL)).ok  # fmt: skip
    mirror = BlockMirror()
    sync = ViewSync(store, FleetView(), mirror=mirror)
    await sync.catch_up()
    for _ in range(50):
        request = list(BLOCKS)[: rng.randrange(1, 40)]
        local = sync.lookup_prefix(request)
        assert local is not None
        assert dict(local) == dict(await store.lookup_prefix(request)), request


async def test_only_a_role_change_of_a_worker_with_blocks_asks_the_mirrors_to_read_it_again(
    real_store: FleetStore,
) -> None:
    store = real_store
    spec = SPECS[0]

    async def k_entries() -> list[dict[str, str]]:
        entries = await store.redis.xrange(store.keys.changes)
        return [fields for _, fields in entries if fields["t"] == "k"]

    await store.register_worker(spec, WorkerStatus())  # new: it holds nothing, the mirrors have nothing to read
    assert await k_entries() == []
    await store.register_worker(WorkerSpec(spec.ip, spec.http_port, Role.DECODE))  # out of the index
    assert [(e["w"], e["op"]) for e in await k_entries()] == [(spec.worker_id, "l")]


async def test_a_read_overtaken_three_times_waits_for_the_next_batch_not_a_full_read(
    real_store: FleetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's blocks read while another reader applied a 'k' entry of it are read again; after three such
    reads it is left for the next batch (a full read of the fleet each time was the cost before)."""
    store = real_store
    spec = SPECS[0]
    await store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
    await store.set_cache_blocks(spec.worker_id, [1, 2, 3])
    mirror = BlockMirror()
    sync = ViewSync(store, FleetView(), mirror=mirror)
    await sync.catch_up()
    assert mirror.blocks_of(spec.worker_id) == {1, 2, 3}
    mirror.forget(spec.worker_id)  # as if its 'k' entry said "read it again"
    reads = 0
    read_worker_blocks = store.read_worker_blocks

    async def overtaken(worker_ids: list[str]):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        answer = await read_worker_blocks(worker_ids)
        for wid in worker_ids:  # a 'k' entry of the worker applied by the other reader while this read was away
            sync._touched[wid] = sync._touched.get(wid, 0) + 1
        return answer

    monkeypatch.setattr(store, "read_worker_blocks", overtaken)
    resyncs = sync.resyncs
    await sync._reload_blocks([spec.worker_id])
    assert reads == 3 and sync.resyncs == resyncs
    assert mirror.blocks_of(spec.worker_id) == set()  # not taken from an overtaken read
    monkeypatch.setattr(store, "read_worker_blocks", read_worker_blocks)
    await sync.catch_up(block_ms=1)  # the next batch: no entry came, the worker is read all the same
    assert mirror.blocks_of(spec.worker_id) == {1, 2, 3} and sync.resyncs == resyncs
