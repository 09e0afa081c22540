"""The simulated worker's KV block pool: a prefix cache keyed by block cache keys, plus anonymous reservations.

Every block of the pool is one of: free, cached (has a key; evictable unless pinned by a running request) or
reserved (held by a running request without a key yet: its uncomputed prompt blocks, partial block and output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence


class PrefixKVCache:
    """A fixed number of blocks with LRU eviction of unpinned cached blocks.

    A chain is touched last-block-first, so its first block is the most recent and eviction takes a chain's later
    blocks before its prefix (a prefix without its tail still matches; a tail without its prefix never does).
    """

    def __init__(self, total_blocks: int) -> None:
        if total_blocks <= 0:
            raise ValueError(f"total_blocks must be positive, got {total_blocks}")
        self._total = total_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned cached blocks, least recently used first
        self._pins: dict[int, int] = {}  # pinned cached blocks -> number of running requests holding them
        self._reserved = 0
        self._version = 0
        self.on_evict: Callable[[int], None] | None = None  # told each evicted key (the KV events publisher)

    # ---- sizes ----

    @property
    def total_blocks(self) -> int:
        return self._total

    @property
    def used_blocks(self) -> int:
        """Cached (pinned or not) plus reserved blocks."""
        return len(self._lru) + len(self._pins) + self._reserved

    @property
    def free_blocks(self) -> int:
        return self._total - self.used_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._lru) + len(self._pins)

    @property
    def pinned_blocks(self) -> int:
        return len(self._pins)

    @property
    def evictable_blocks(self) -> int:
        return len(self._lru)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    @property
    def version(self) -> int:
        """Grows whenever the set of cached keys changes (insert or eviction), never otherwise."""
        return self._version

    def keys(self) -> frozenset[int]:
        return frozenset(self._lru.keys() | self._pins.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._lru or key in self._pins

    # ---- prefix cache ----

    def match_prefix(self, keys: Sequence[int]) -> int:
        """Number of leading ``keys`` cached (a hole ends the match). Does not touch."""
        n = 0
        for key in keys:
            if key not in self._lru and key not in self._pins:
                break
            n += 1
        return n

    def touch(self, keys: Sequence[int]) -> None:
        """Mark cached ``keys`` as just used (last block first, so the chain's head ends most recent)."""
        for key in reversed(keys):
            if key in self._lru:
                self._lru.move_to_end(key)

    def insert(self, keys: Sequence[int], *, pin: bool = False) -> int:
        """Cache ``keys`` in order, touching those present and evicting LRU unpinned blocks to make room.

        Stops at the first key that does not fit (keys after a hole would never match). Returns how many leading
        keys are now cached; with ``pin`` exactly those are pinned once more.
        """
        own = set(keys)
        self.touch(keys)  # present blocks of this chain move away from the eviction end first
        n = 0
        for key in keys:
            if key not in self:
                if self.free_blocks <= 0 and not self._evict_one(protect=own):
                    break
                self._lru[key] = None
                self._version += 1
            n += 1
        self.touch(keys[:n])
        if pin:
            self.pin(keys[:n])
        return n

    def pin(self, keys: Iterable[int]) -> None:
        """Protect cached ``keys`` from eviction (counted: each pin needs one unpin)."""
        for key in keys:
            if key in self._pins:
                self._pins[key] += 1
            elif key in self._lru:
                del self._lru[key]
                self._pins[key] = 1
            else:
                raise KeyError(f"cannot pin block {key}: not cached")

    def unpin(self, keys: Sequence[int]) -> None:
        """Drop one pin of each key; a block without pins becomes evictable as the most recently used."""
        for key in reversed(keys):
            count = self._pins.get(key)
            if count is None:
                raise KeyError(f"cannot unpin block {key}: not pinned")
            if count > 1:
                self._pins[key] = count - 1
            else:
                del self._pins[key]
                self._lru[key] = None

    def unpinned_count(self, keys: Iterable[int]) -> int:
        """How many of ``keys`` are cached and evictable (pinning them would take them off the evictable set)."""
        return sum(1 for key in keys if key in self._lru)

    # ---- anonymous reservations ----

    def can_reserve(self, n: int, *, keep: Sequence[int] = ()) -> bool:
        """Whether ``n`` blocks can be reserved without evicting any of ``keep``."""
        return n <= self.free_blocks + self.evictable_blocks - self.unpinned_count(set(keep))

    def reserve(self, n: int) -> bool:
        """Reserve ``n`` blocks, evicting LRU unpinned blocks as needed; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot reserve {n} blocks")
        if n > self.free_blocks + self.evictable_blocks:
            return False
        while self.free_blocks < n:
            self._evict_one()
        self._reserved += n
        return True

    def release(self, n: int) -> None:
        if not 0 <= n <= self._reserved:
            raise ValueError(f"cannot release {n} blocks: {self._reserved} reserved")
        self._reserved -= n

    def _evict_one(self, protect: frozenset[int] | set[int] = frozenset()) -> bool:
        if not self._lru:
            return False
        victim = next(iter(self._lru))
        if victim in protect:
            return False  # the pool is smaller than the chain being inserted: keep its head
        del self._lru[victim]
        self._version += 1
        if self.on_evict is not None:
            self.on_evict(victim)
        return True

    def clear(self) -> bool:
        """Drop every cached block (vLLM's reset_prefix_cache); False, changing nothing, while a request pins some."""
        if self._pins:
            return False
        if self._lru:
            self._lru.clear()
            self._version += 1
        return True
