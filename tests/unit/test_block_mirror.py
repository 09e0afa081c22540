"""BlockMirror, the router's in-memory inverted block index: prefix matches, in-flight blocks, diffs, expiry, bounds,
and the lookup against a brute-force scan on random fleets."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from flexlb.state.block_mirror import FOLLOW, BlockMirror


def test_a_match_is_a_strict_prefix_per_worker() -> None:
    mirror = BlockMirror()
    mirror.replace_worker("a", [1, 2, 3], {})
    mirror.replace_worker("b", [1, 3], {})
    mirror.replace_worker("c", [2, 3], {})
    assert mirror.lookup_prefix([1, 2, 3]) == {"a": 3, "b": 1}  # b lacks 2; c lacks the first block
    assert mirror.lookup_prefix([1, 2, 3, 4]) == {"a": 3, "b": 1}
    assert mirror.lookup_prefix([9, 1]) == {}


def test_in_flight_blocks_count_until_they_expire_or_are_confirmed() -> None:
    mirror = BlockMirror()
    mirror.replace_worker("a", [1], {})
    mirror.add_inflight("a", [2, 3], until_ms=1_000, cap=0)
    assert mirror.lookup_prefix([1, 2, 3], now_ms=999) == {"a": 3}
    assert mirror.lookup_prefix([1, 2, 3], now_ms=1_000) == {"a": 1}  # expired: only the cached block
    mirror.add_inflight("a", [2, 3], until_ms=2_000, cap=0)
    mirror.apply_diff("a", added=[2], removed=[])  # confirmed by the worker's report: no longer expires
    assert mirror.lookup_prefix([1, 2, 3], now_ms=5_000) == {"a": 2}


def test_a_refreshed_in_flight_block_keeps_its_later_expiry() -> None:
    mirror = BlockMirror()
    mirror.add_inflight("a", [1], until_ms=1_000, cap=0)
    mirror.add_inflight("a", [1], until_ms=3_000, cap=0)
    assert mirror.lookup_prefix([1], now_ms=2_000) == {"a": 1}
    assert mirror.lookup_prefix([1], now_ms=3_000) == {}


def test_the_echo_of_an_earlier_reservation_does_not_shorten_a_later_one() -> None:
    """A router notes its own reservations at once and applies the stream's copy later: a later reservation's note
    can come before the echo of an earlier one, and Redis holds the later expiry."""
    mirror = BlockMirror()
    mirror.add_inflight("a", [1, 2], until_ms=1_000, cap=0)  # reservation 1, noted
    mirror.add_inflight("a", [1, 2], until_ms=2_000, cap=0)  # reservation 2, noted
    mirror.add_inflight("a", [1, 2], until_ms=1_000, cap=0)  # the stream's echo of reservation 1
    assert mirror.lookup_prefix([1, 2], now_ms=1_500) == {"a": 2}


def test_a_removed_block_still_in_flight_stays_held_until_it_expires() -> None:
    mirror = BlockMirror()
    mirror.replace_worker("a", [1, 2], {})
    mirror.add_inflight("a", [3], until_ms=1_000, cap=0)
    mirror.apply_diff("a", added=[], removed=[2, 3])  # 3 was never cached: its in-flight entry holds it
    assert mirror.lookup_prefix([1, 2], now_ms=0) == {"a": 1}
    assert mirror.holders(3, now_ms=500) == {"a"}
    assert mirror.holders(3, now_ms=1_000) == set()


def test_the_in_flight_bound_drops_the_oldest_first() -> None:
    mirror = BlockMirror()
    mirror.add_inflight("a", [1, 2], until_ms=1_000, cap=3)
    mirror.add_inflight("a", [3, 4], until_ms=2_000, cap=3)
    assert mirror.blocks_of("a") == {2, 3, 4}
    assert mirror.holders(1) == set()


def test_forgetting_a_worker_takes_it_out_of_every_block() -> None:
    mirror = BlockMirror()
    mirror.replace_worker("a", [1, 2], {3: 10_000})
    mirror.replace_worker("b", [1], {})
    mirror.forget("a")
    assert mirror.lookup_prefix([1, 2, 3], now_ms=0) == {"b": 1}
    assert mirror.holders(2) == mirror.holders(3) == set()


def test_a_popular_prefix_is_sampled_but_the_deepest_holders_are_kept() -> None:
    mirror = BlockMirror(rng=random.Random(3))
    for i in range(FOLLOW * 4):
        mirror.replace_worker(f"w{i}", [1, 2], {})
    mirror.replace_worker("deep", [1, 2, 3, 4], {})
    hits = mirror.lookup_prefix([1, 2, 3, 4, 5])
    assert hits["deep"] == 4 and hits.held_by_any == 4
    assert FOLLOW <= len(hits) <= 2 * FOLLOW + 1


fleets = st.dictionaries(
    st.sampled_from([f"w{i}" for i in range(12)]),
    st.tuples(st.sets(st.integers(0, 9), max_size=8), st.dictionaries(st.integers(0, 9), st.integers(0, 20))),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(fleet=fleets, request=st.lists(st.integers(0, 9), min_size=1, max_size=8, unique=True), now=st.integers(0, 20))
def test_the_lookup_equals_a_scan_of_every_worker(
    fleet: dict[str, tuple[set[int], dict[int, int]]], request: list[int], now: int
) -> None:
    mirror = BlockMirror(follow=len(fleet) + 1)  # every holder followed: no sampling
    for wid, (cached, inflight) in fleet.items():
        mirror.replace_worker(wid, cached, inflight)
    expected = {}
    for wid, (cached, inflight) in fleet.items():
        depth = 0
        while depth < len(request) and (request[depth] in cached or inflight.get(request[depth], -1) > now):
            depth += 1
        if depth:
            expected[wid] = depth
    assert mirror.lookup_prefix(request, now_ms=now) == expected


def test_the_first_block_held_nowhere_skips_blocks_held_without_their_prefix() -> None:
    mirror = BlockMirror()
    mirror.replace_worker("a", [1, 2], {})
    mirror.replace_worker("b", [3, 4], {})  # the later half of the prompt, without its prefix: no match
    hits = mirror.lookup_prefix([1, 2, 3, 4, 5])
    assert hits == {"a": 2} and hits.held_by_any == 4  # the probe is block 5, not block 3 (held by b)


WORKERS = [f"w{i}" for i in range(4)]
blocks = st.sets(st.integers(0, 7), max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("replace"), st.sampled_from(WORKERS), blocks, st.dictionaries(st.integers(0, 7), st.integers(0, 30))
        ),
        st.tuples(st.just("diff"), st.sampled_from(WORKERS), blocks, blocks),
        st.tuples(st.just("inflight"), st.sampled_from(WORKERS), blocks, st.integers(0, 30)),
        st.tuples(st.just("forget"), st.sampled_from(WORKERS)),
        st.tuples(st.just("time"), st.integers(0, 5)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_holders_equal_a_model_through_any_sequence_of_changes(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Blocks gaining and losing holders (one holder is kept as a str, more as a set: block_mirror's docstring)
    always give the holders a plain per-worker model gives."""
    mirror = BlockMirror(follow=len(WORKERS) + 1)
    cached: dict[str, set[int]] = {}
    inflight: dict[str, dict[int, int]] = {}
    now = 0
    for op, *args in ops:
        if op == "replace":
            wid, cache, held = args
            mirror.replace_worker(wid, cache, held)
            cached[wid], inflight[wid] = set(cache), dict(held)
        elif op == "diff":
            wid, added, removed = args
            mirror.apply_diff(wid, added, removed)
            mine = inflight.setdefault(wid, {})
            cached[wid] = (cached.get(wid, set()) | added) - removed
            for block in added:
                mine.pop(block, None)
        elif op == "inflight":
            wid, new, until = args
            mirror.add_inflight(wid, sorted(new), until, 0)
            mine = inflight.setdefault(wid, {})
            mine.update({b: max(until, mine.get(b, until)) for b in new})  # Redis holds the latest: the longest
        elif op == "forget":
            mirror.forget(args[0])
            cached.pop(args[0], None)
            inflight.pop(args[0], None)
        else:
            now += args[0]

        def held(w: str, block: int, now: int = now) -> bool:
            return block in cached.get(w, ()) or inflight.get(w, {}).get(block, -1) > now

        for block in range(8):
            assert mirror.holders(block, now_ms=now) == {w for w in WORKERS if held(w, block)}, (op, block)
        prefix = [0, 1, 2]
        depths = {w: next((i for i, b in enumerate(prefix) if not held(w, b)), len(prefix)) for w in WORKERS}
        assert mirror.lookup_prefix(prefix, now_ms=now) == {w: d for w, d in depths.items() if d}
