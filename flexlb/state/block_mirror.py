"""BlockMirror: a router process's in-memory copy of the fleet's inverted cache-block index (block -> workers).

Redis holds the index (``blk:<hash>`` sets, each worker's ``cache:`` set and ``inflight:`` zset); every script that
changes a prefill-type worker's blocks also appends a ``k`` entry to the change stream (a diff, or "read this worker
again"), and a reservation's ``p`` entry carries the blocks it put in flight. ViewSync applies those entries here in
stream order, so a decision looks its request's prefix up in memory instead of in Redis (lua/lookup.lua stays the
path while the mirror is not synced). Applying entries in order over a snapshot read after them converges on the
same state: for each block, the last write wins.

No I/O here. Block hashes are ints, worker ids strings, times Redis milliseconds.

A block held by one worker (most of them) maps to that worker's id itself, not to a set of one: a str is not
tracked by Python's cyclic garbage collector and a set is, and with a set per block each full pass of the collector
walked every block of the fleet (2M blocks: 250 ms a pass with sets, 2 ms with strs; flexlb/gc_policy.py).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Mapping, Sequence

from flexlb.domain import Role
from flexlb.state.store import PrefixHits

INDEXED_ROLES = frozenset({Role.PREFILL, Role.PDFUSION})  # as lua/_lib.lua: only their hits matter to a decision
COMPACT_MIN = 4096
FOLLOW = 8  # holders of the first block followed whole; a more popular prefix is sampled, as lua/lookup.lua does
# (each hit is a candidate the decision scores: more would cost router CPU per decision, not find better workers)


class BlockMirror:
    def __init__(self, rng: random.Random | None = None, follow: int = FOLLOW) -> None:
        self.follow = follow
        self._cache: dict[str, set[int]] = {}
        self._inflight: dict[str, dict[int, int]] = {}  # worker -> block -> expiry, oldest first
        self._index: dict[int, str | set[str]] = {}  # block -> its one holder, or the set of its holders (2+)
        # (expiry, seq, worker, blocks) heap: one entry per reservation's blocks, not per block
        self._expiry: list[tuple[int, int, str, tuple[int, ...]]] = []
        self._seq = itertools.count()
        self._compact_above = COMPACT_MIN  # heap size that makes the next add compact it (refreshes leave stale ones)
        self._rng = rng or random.Random()
        self.synced = False  # holds a full read and what followed it
        self.loaded = False  # held a full read since the last clear: usable, if stale, while Redis is away

    # ---- reading ----

    def holders(self, block: int, now_ms: int | None = None) -> set[str]:
        """The workers holding ``block`` (cached, or in flight and not expired)."""
        if now_ms is not None:
            self.expire(now_ms)
        return set(_as_set(self._index.get(block)))

    def blocks_of(self, worker_id: str) -> set[int]:
        """What ``worker_id`` holds: its cached and its in-flight blocks."""
        return self._cache.get(worker_id, set()) | set(self._inflight.get(worker_id, ()))

    def lookup_prefix(self, block_keys: Sequence[int], now_ms: int | None = None) -> PrefixHits:
        """Workers holding a prefix of ``block_keys`` -> the length of that prefix (its first missing block ends a
        worker's match), as lua/lookup.lua answers from Redis; with more than ``follow`` holders of the first block,
        a random ``follow`` of them plus up to ``follow`` holders of the deepest block anyone holds. ``held_by_any``:
        the position of the first block past every match that nobody holds (a worker may hold later blocks without
        their prefix), so a reservation's probe (lua/reserve.lua) is a block that was truly held nowhere."""
        hits = PrefixHits()
        if not block_keys:
            return hits
        if now_ms is not None:
            self.expire(now_ms)
        index = self._index
        held = index.get(block_keys[0])
        if not held:
            return hits
        first = _as_set(held)
        current = first
        follow = self.follow
        if len(first) > follow:
            current = set(self._rng.sample(tuple(first), follow))
            lo, hi = 0, len(block_keys) - 1  # the deepest block held at all (holders are prefix-closed, mostly)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if index.get(block_keys[mid]):
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                deep = _as_set(index[block_keys[lo]])
                current |= set(self._rng.sample(tuple(deep), follow)) if len(deep) > follow else deep
        self._match(block_keys, current, hits)
        unheld = max(hits.values(), default=0)
        while unheld < len(block_keys) and index.get(block_keys[unheld]):
            unheld += 1
        hits.held_by_any = unheld
        return hits

    def _match(self, block_keys: Sequence[int], current: set[str], hits: PrefixHits) -> None:
        """Into ``hits``: how many leading blocks each of ``current`` (holders of the first block) holds (``current``
        is only read: it may be the index's own set)."""
        index = self._index
        for depth in range(1, len(block_keys)):
            holders = index.get(block_keys[depth])
            if not holders:
                for wid in current:
                    hits[wid] = depth
                return
            still = current & ({holders} if holders.__class__ is str else holders)  # one holder: a str
            for wid in current - still:
                hits[wid] = depth
            if not still:
                return
            current = still
        for wid in current:
            hits[wid] = len(block_keys)

    # ---- writing (stream entries, snapshots) ----

    def replace_worker(self, worker_id: str, cached: Iterable[int], inflight: Mapping[int, int]) -> None:
        """Hold exactly these blocks for ``worker_id`` (a read of its sets)."""
        self.forget(worker_id)
        cache = self._cache[worker_id] = set(cached)
        for block in cache:
            self._add(block, worker_id)
        self.add_inflight(worker_id, sorted(inflight, key=inflight.__getitem__), 0, 0, expiries=inflight)

    def apply_diff(self, worker_id: str, added: Iterable[int], removed: Iterable[int]) -> None:
        """The worker's cache report: ``added`` are cached now (confirmed, if they were in flight), ``removed`` are
        not; a removed block still in flight there stays held until it expires (lua/master_cache.lua)."""
        cache = self._cache.setdefault(worker_id, set())
        inflight = self._inflight.get(worker_id, {})
        for block in added:
            cache.add(block)
            inflight.pop(block, None)
            self._add(block, worker_id)
        for block in removed:
            cache.discard(block)
            if block not in inflight:
                self._unindex(block, worker_id)

    def add_inflight(
        self,
        worker_id: str,
        blocks: Sequence[int],
        until_ms: int,
        cap: int,
        *,
        expiries: Mapping[int, int] | None = None,
    ) -> None:
        """``blocks`` are in flight on ``worker_id`` until ``until_ms`` (or each until ``expiries[block]``); at most
        ``cap`` of them kept per worker (0: no bound), the soonest to expire dropped first."""
        inflight = self._inflight.setdefault(worker_id, {})
        add = self._add
        if expiries is None:
            held = inflight.get
            # a block already in flight as long (this router's note, then the stream's echo of it) or longer (a
            # later reservation noted before the echo of an earlier one) stays as it is: Redis holds the latest
            fresh = tuple(b for b in blocks if (old := held(b)) is None or old < until_ms)
            if not fresh:
                return
            for block in fresh:
                inflight.pop(block, None)  # to the end: the newest
                inflight[block] = until_ms
                add(block, worker_id)
            self._push(until_ms, worker_id, fresh)
        else:  # a read of the worker's blocks: each with its own expiry
            for block in blocks:
                until = expiries[block]
                old = inflight.pop(block, None)
                inflight[block] = until
                if old != until:
                    add(block, worker_id)
                    self._push(until, worker_id, (block,))
        if len(self._expiry) > self._compact_above:
            self._compact()
        if cap > 0 and len(inflight) > cap:
            cache = self._cache.get(worker_id, ())
            for block in list(inflight)[: len(inflight) - cap]:
                del inflight[block]
                if block not in cache:
                    self._unindex(block, worker_id)

    def forget(self, worker_id: str) -> None:
        """The worker holds nothing (removed, forgotten, or no longer of a prefill-type role)."""
        for block in self._cache.pop(worker_id, ()):
            self._unindex(block, worker_id)
        for block in self._inflight.pop(worker_id, {}):
            self._unindex(block, worker_id)

    def clear(self) -> None:
        self._cache.clear()
        self._inflight.clear()
        self._index.clear()
        self._expiry.clear()
        self._compact_above = COMPACT_MIN
        self.synced = self.loaded = False

    def expire(self, now_ms: int) -> None:
        """Drop in-flight blocks whose expiry passed (their heap entries; a refreshed one has a later entry)."""
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            until, _, wid, blocks = heapq.heappop(heap)
            inflight = self._inflight.get(wid)
            if inflight is None:
                continue  # forgotten since
            cache = self._cache.get(wid, ())
            for block in blocks:
                if inflight.get(block) != until:
                    continue  # confirmed or refreshed since
                del inflight[block]
                if block not in cache:
                    self._unindex(block, wid)

    def _push(self, until_ms: int, worker_id: str, blocks: tuple[int, ...]) -> None:
        heapq.heappush(self._expiry, (until_ms, next(self._seq), worker_id, blocks))

    def _compact(self) -> None:
        """Rebuild the heap from the live in-flight blocks, one entry per worker and expiry: amortised, as it runs
        when the heap doubled since."""
        groups: dict[tuple[int, str], list[int]] = {}
        for wid, blocks in self._inflight.items():
            for block, until in blocks.items():
                groups.setdefault((until, wid), []).append(block)
        self._expiry = [(until, next(self._seq), wid, tuple(b)) for (until, wid), b in groups.items()]
        heapq.heapify(self._expiry)
        self._compact_above = max(COMPACT_MIN, 2 * len(self._expiry))

    def _add(self, block: int, worker_id: str) -> None:
        index = self._index
        holders = index.get(block)
        if holders is None:
            index[block] = worker_id
        elif holders.__class__ is str:
            if holders != worker_id:
                index[block] = {holders, worker_id}
        else:
            holders.add(worker_id)  # type: ignore[union-attr]

    def _unindex(self, block: int, worker_id: str) -> None:
        index = self._index
        holders = index.get(block)
        if holders is None:
            return
        if holders.__class__ is str:
            if holders == worker_id:
                del index[block]
            return
        holders.discard(worker_id)  # type: ignore[union-attr]
        if len(holders) == 1:
            index[block] = next(iter(holders))
        elif not holders:
            del index[block]


def _as_set(holders: str | set[str] | None) -> set[str]:
    """An index entry as a set of worker ids, to read only (it may be the index's own)."""
    if holders is None:
        return set()
    return {holders} if holders.__class__ is str else holders  # type: ignore[return-value]


def parse_blocks(text: str) -> list[int]:
    """A stream entry's space-separated block hashes."""
    return [int(b) for b in text.split()] if text else []
