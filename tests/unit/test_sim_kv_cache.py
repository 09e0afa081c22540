"""The simulator's KV block pool: strict prefix match, LRU eviction, pins, reservations and the key-set version."""

from __future__ import annotations

import pytest

from flexlb.sim.kv_cache import PrefixKVCache


def test_match_prefix_is_strict() -> None:
    cache = PrefixKVCache(8)
    cache.insert([1, 2, 3])
    assert cache.match_prefix([1, 2, 3, 4]) == 3
    assert cache.match_prefix([1, 2]) == 2
    assert cache.match_prefix([9, 1, 2]) == 0  # the first block missing: no match
    assert cache.match_prefix([1, 9, 3]) == 1  # a hole ends the match
    assert cache.match_prefix([]) == 0


def test_lru_eviction_at_capacity() -> None:
    cache = PrefixKVCache(4)
    cache.insert([1, 2])
    cache.insert([3, 4])
    assert cache.used_blocks == 4 and cache.free_blocks == 0
    cache.insert([5])  # evicts from the least recently used chain, its last block first
    assert cache.keys() == {1, 3, 4, 5}
    cache.insert([6])
    assert cache.keys() == {3, 4, 5, 6}
    assert cache.used_blocks == 4


def test_a_hit_refreshes_every_matched_block() -> None:
    cache = PrefixKVCache(4)
    cache.insert([1, 2])
    cache.insert([3, 4])
    cache.insert([1, 2])  # a hit on the older chain: both its blocks become recent
    cache.insert([5, 6])
    assert cache.keys() == {1, 2, 5, 6}
    # touch() alone does the same.
    cache.touch([5, 6])
    cache.insert([7])
    assert cache.keys() == {1, 5, 6, 7}


def test_pinned_blocks_are_not_evicted() -> None:
    cache = PrefixKVCache(3)
    cache.insert([1, 2], pin=True)
    cache.insert([3])
    assert cache.insert([4]) == 1  # evicts 3, the only unpinned block
    assert cache.keys() == {1, 2, 4}
    cache.pin([4])
    assert cache.insert([5]) == 0  # everything pinned: nothing fits, nothing evicted
    assert cache.keys() == {1, 2, 4}
    assert not cache.reserve(1)
    cache.unpin([1, 2])
    assert cache.evictable_blocks == 2
    assert cache.insert([5]) == 1
    assert 5 in cache and 4 in cache


def test_pins_are_counted() -> None:
    cache = PrefixKVCache(2)
    cache.insert([1])
    cache.pin([1])
    cache.pin([1])
    cache.unpin([1])
    assert cache.evictable_blocks == 0  # one pin left
    cache.unpin([1])
    assert cache.evictable_blocks == 1
    with pytest.raises(KeyError):
        cache.unpin([1])
    with pytest.raises(KeyError):
        cache.pin([99])


def test_insert_stops_at_the_first_block_that_does_not_fit() -> None:
    cache = PrefixKVCache(3)
    assert cache.insert([1, 2, 3, 4, 5]) == 3  # never evicts its own head to store its tail
    assert cache.keys() == {1, 2, 3}
    assert cache.match_prefix([1, 2, 3, 4, 5]) == 3


def test_reservations_share_the_pool_and_evict_lru() -> None:
    cache = PrefixKVCache(4)
    cache.insert([1, 2, 3])
    assert cache.reserve(2)  # evicts one cached block (the chain's last)
    assert cache.keys() == {1, 2} and cache.reserved_blocks == 2 and cache.free_blocks == 0
    assert not cache.reserve(3)  # all or nothing
    assert cache.keys() == {1, 2}
    assert cache.can_reserve(2) and not cache.can_reserve(2, keep=[1])
    cache.release(2)
    assert cache.free_blocks == 2
    with pytest.raises(ValueError):
        cache.release(1)


def test_version_moves_only_when_the_key_set_changes() -> None:
    cache = PrefixKVCache(3)
    v0 = cache.version
    cache.insert([1, 2])
    v1 = cache.version
    assert v1 > v0
    cache.insert([1, 2])  # touch only
    cache.touch([1])
    cache.pin([1])
    cache.unpin([1])
    assert cache.reserve(1)
    cache.release(1)
    assert cache.match_prefix([1, 2]) == 2
    assert cache.version == v1
    cache.insert([3, 4])  # inserts 3, evicts 2 for 4
    assert cache.version > v1
    assert cache.keys() == {1, 3, 4}
