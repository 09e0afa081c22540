"""One worker's KV events -> its flexlb block keys, and the diff to write to the fleet's index (pure, no I/O).

A stored engine block is hashed as the router hashes a request (``flexlb.blocks``: chained over the tokens from the
start of the prompt), continuing from its parent's chain state, so the engine's own hashes need not be reproduced:
a map engine hash -> (chain state, flexlb key) translates ``BlockRemoved``. Engine blocks smaller than flexlb's block
size are grouped: a flexlb key exists where the chain reaches a multiple of it (an SGLang page of 1 token gives one key
per 64 tokens). The same block stored twice, or on two media (GPU, CPU offload), is one entry per (hash, medium); a
flexlb key is held while any entry maps to it.

The index diff is kept per key touched since the last write (``take_diff``), so a batch of events costs one script
call, whatever its size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from flexlb.blocks import MASK64, block_cache_keys
from flexlb.domain import DEFAULT_BLOCK_SIZE
from flexlb.kv_events.wire import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, Event
from flexlb.master.engine_load import MIN_BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class _Block:
    state: int  # the flexlb chain's uint64 after this block's last token
    depth: int  # tokens from the prompt's start to this block's end
    key: int | None  # the flexlb key ending here, if the depth is a multiple of the block size


class WorkerKvIndex:
    """What one worker holds, from its events (see the module docstring)."""

    def __init__(self, block_size: int | None = None, written: set[int] | None = None) -> None:
        self.block_size = block_size  # None: from the first BlockStored, as the worker's status reports it
        self._blocks: dict[tuple[EngineHash, str | None], _Block] = {}
        self._chain: dict[EngineHash, _Block] = {}  # any medium: a parent's chain state
        self._media: Counter[EngineHash] = Counter()  # engine hash -> media holding it
        self._held: Counter[int] = Counter()  # flexlb key -> entries mapping to it
        self._written: set[int] = set(written or ())  # what the fleet's index holds for this worker
        self._dirty: set[int] = set()
        self.unknown_parents = 0  # stored blocks skipped: their parent was never seen (events missed)

    @property
    def written_count(self) -> int:
        return len(self._written)

    @property
    def has_changes(self) -> bool:
        """Whether ``take_diff`` would write something (or recheck keys touched)."""
        return bool(self._dirty)

    @property
    def keys(self) -> set[int]:
        """The flexlb keys the worker holds, from its events."""
        return set(self._held)

    def apply(self, events: tuple[Event, ...] | list[Event]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event)
            elif isinstance(event, BlockRemoved):
                self._removed(event)
            elif isinstance(event, AllBlocksCleared):
                self.clear()

    def clear(self) -> None:
        """Nothing held (AllBlocksCleared, a restarted engine); the index forgets every key written."""
        self._dirty |= self._written | set(self._held)
        self._blocks.clear()
        self._chain.clear()
        self._media.clear()
        self._held.clear()

    def reconcile_all(self) -> None:
        """The events seen are the worker's whole history: keys the index holds that they do not are removed."""
        self._dirty |= self._written

    def forget_written(self) -> None:
        """The index lost this worker's keys (the master forgot a silent worker): write them all again."""
        self._written.clear()
        self._dirty |= set(self._held)

    def _stored(self, event: BlockStored) -> None:
        if event.parent_block_hash is None:
            parent = _Block(0, 0, None)
        else:
            found = self._chain.get(event.parent_block_hash)
            if found is None:  # a missed store (before this subscriber, or past the replay buffer)
                self.unknown_parents += len(event.block_hashes)
                return
            parent = found
        if self.block_size is None:
            self.block_size = flexlb_block_size(event.block_size)
        size, b = self.block_size, event.block_size
        state, depth = parent.state, parent.depth
        for i, engine_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[i * b : (i + 1) * b]
            state, depth = _advance(state, depth, tokens)
            block = _Block(state, depth, _to_key(state) if depth % size == 0 else None)
            self._chain[engine_hash] = block
            slot = (engine_hash, event.medium)
            old = self._blocks.get(slot)
            if old is not None:  # stored again: no second count
                self._release(old)
            else:
                self._media[engine_hash] += 1
            self._blocks[slot] = block
            if block.key is not None:
                self._held[block.key] += 1
                self._dirty.add(block.key)

    def _removed(self, event: BlockRemoved) -> None:
        for engine_hash in event.block_hashes:
            block = self._blocks.pop((engine_hash, event.medium), None)
            if block is None:
                continue  # never seen stored (missed), or already removed
            self._release(block)
            self._media[engine_hash] -= 1
            if self._media[engine_hash] <= 0:  # on no medium any more
                del self._media[engine_hash]
                self._chain.pop(engine_hash, None)

    def _release(self, block: _Block) -> None:
        if block.key is None:
            return
        self._held[block.key] -= 1
        if self._held[block.key] <= 0:
            del self._held[block.key]
        self._dirty.add(block.key)

    def take_diff(self) -> tuple[list[int], list[int]]:
        """Keys to add to and remove from the index since the last call; assumed written (``undo_take`` if not)."""
        add = [k for k in self._dirty if k in self._held and k not in self._written]
        remove = [k for k in self._dirty if k not in self._held and k in self._written]
        self._written.update(add)
        self._written.difference_update(remove)
        self._dirty.clear()
        return add, remove

    def undo_take(self, add: list[int], remove: list[int]) -> None:
        """The write of ``take_diff``'s answer failed: it is due again."""
        self._written.difference_update(add)
        self._written.update(remove)
        self._dirty.update(add)
        self._dirty.update(remove)


def flexlb_block_size(engine_block_size: int) -> int:
    """The block size the router cuts this worker's requests at: its engine's, as its polled status reports it
    (``flexlb.master.engine_load``: a page under MIN_BLOCK_SIZE tokens counts as DEFAULT_BLOCK_SIZE)."""
    return engine_block_size if engine_block_size >= MIN_BLOCK_SIZE else DEFAULT_BLOCK_SIZE


def _advance(state: int, depth: int, tokens: list[int]) -> tuple[int, int]:
    """The flexlb chain continued over ``tokens`` (``block_cache_keys`` with one block of all of them)."""
    if not tokens:
        return state, depth
    (key,) = block_cache_keys(tokens, len(tokens), parent=_to_key(state))
    return key & MASK64, depth + len(tokens)


def _to_key(state: int) -> int:
    """A chain state as the signed int64 key ``block_cache_keys`` gives (and takes back as ``parent``)."""
    return state - (1 << 64) if state >= 1 << 63 else state
