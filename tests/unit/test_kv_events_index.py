"""KV events, pure: both encodings of vLLM's batches decode, and a worker's events become flexlb block keys exactly as
the router hashes a request (chained over parents, grouped to flexlb's block size), with the diff to write."""

from __future__ import annotations

import msgspec
import pytest

from flexlb.blocks import block_cache_keys
from flexlb.kv_events.endpoint import kv_events_endpoint
from flexlb.kv_events.wire import (
    AllBlocksCleared,
    BadBatch,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from flexlb.master.kv_index import WorkerKvIndex

TOKENS = list(range(100, 164))  # 64 tokens


def test_array_like_and_map_encodings_decode_alike() -> None:
    events = [BlockStored([1, 2], None, TOKENS[:32], 16, None, "GPU"), BlockRemoved([b"\x01" * 32]), AllBlocksCleared()]
    array = decode_batch(encode_batch(KVEventBatch(1.5, events)))
    as_map = {  # newer vLLM: structs as maps, tagged by "type", with fields this reader ignores
        "ts": 1.5,
        "events": [
            {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None, "token_ids": TOKENS[:32],
             "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None, "group_idx": 0},
            {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32], "medium": None},
            {"type": "AllBlocksCleared"},
            {"type": "SomethingNewer", "x": 1},
        ],
        "data_parallel_rank": 0,
    }  # fmt: skip
    assert decode_batch(msgspec.msgpack.encode(as_map)) == array
    assert array.events[0] == events[0] and isinstance(array.events[2], AllBlocksCleared)
    with pytest.raises(BadBatch):
        decode_batch(b"\xc1")
    with pytest.raises(BadBatch, match="token_ids"):
        decode_batch(encode_batch(KVEventBatch(0.0, [BlockStored([1], None, [1, 2], 16)])))


def test_stored_blocks_get_the_routers_keys_chained_over_parents() -> None:
    index = WorkerKvIndex(block_size=16)
    index.apply([BlockStored([11, 12], None, TOKENS[:32], 16), BlockStored([13, 14], 12, TOKENS[32:], 16)])
    assert index.keys == set(block_cache_keys(TOKENS, 16))
    add, remove = index.take_diff()
    assert sorted(add) == sorted(block_cache_keys(TOKENS, 16)) and remove == []
    index.apply([BlockRemoved([14])])
    assert index.take_diff() == ([], [block_cache_keys(TOKENS, 16)[3]])
    assert index.take_diff() == ([], [])


def test_small_engine_blocks_are_grouped_to_flexlbs_block_size() -> None:
    index = WorkerKvIndex(block_size=32)
    index.apply([BlockStored([1, 2, 3, 4], None, TOKENS, 16)])  # 4 engine blocks of 16: 2 flexlb keys of 32
    assert index.keys == set(block_cache_keys(TOKENS, 32))
    sglang = WorkerKvIndex()  # a page of 1 token: flexlb's default block size (64), as its status reports
    sglang.apply([BlockStored([h], h - 1 if h else None, [t], 1) for h, t in enumerate(TOKENS)])
    assert sglang.block_size == 64 and sglang.keys == set(block_cache_keys(TOKENS, 64))


def test_duplicates_media_unknown_parents_and_a_clear() -> None:
    index = WorkerKvIndex(block_size=16, written={999})
    stored = BlockStored([1], None, TOKENS[:16], 16, None, "GPU")
    index.apply([stored, stored, BlockStored([1], None, TOKENS[:16], 16, None, "CPU")])  # again, and offloaded
    key = block_cache_keys(TOKENS[:16], 16)[0]
    index.apply([BlockRemoved([1], "GPU")])
    assert index.keys == {key}  # still on the CPU
    index.apply([BlockStored([7], 6, TOKENS[16:32], 16)])  # its parent was never seen: cannot be hashed
    assert index.unknown_parents == 1 and index.keys == {key}
    index.reconcile_all()  # the whole history: 999 is stale
    assert index.take_diff() == ([key], [999])
    index.apply([AllBlocksCleared()])
    assert index.keys == set() and index.take_diff() == ([], [key])


def test_kv_events_endpoints() -> None:
    assert kv_events_endpoint(5557, None, "10.0.0.2", "w", single=False).replay == "tcp://10.0.0.2:5558"
    one = kv_events_endpoint("tcp://h:7000", "tcp://h:7100", "x", "w", single=True)
    assert (one.publisher, one.replay) == ("tcp://h:7000", "tcp://h:7100")
    assert kv_events_endpoint("tcp://h:7000", False, "x", "w", single=True).replay is None
    with pytest.raises(ValueError, match="lists several"):
        kv_events_endpoint("tcp://h:7000", None, "x", "w", single=False)
    with pytest.raises(ValueError, match="tcp://host:port"):
        kv_events_endpoint("h:7000", None, "x", "w", single=True)
