"""The KV events wire format of vLLM (``vllm/distributed/kv_events.py``) and SGLang, pure (no sockets).

A PUB socket sends three frames per batch: the topic, the sequence number (8 bytes, big-endian) and a msgpack
``KVEventBatch``; a ROUTER socket answers a replay request (an 8-byte start sequence) with ``(seq, payload)`` messages
for every buffered batch from there, then ``(-1, b"")``. The msgspec structs are tagged (the tag is the class name)
and ``omit_defaults``; older vLLM and SGLang encode them ``array_like`` (``["BlockStored", hashes, parent, ...]``),
newer vLLM as maps (``{"type": "BlockStored", ...}``): ``decode_batch`` reads both, and ignores fields it does not
use (``lora_name``, ``extra_keys``, ``group_idx``...). Engine block hashes are ints or bytes; they are only compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

EngineHash = int | bytes
SEQ_BYTES = 8
END_SEQ = -1  # the replay's end marker (signed)


class _Event(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    """Encoding as vLLM's ``KVCacheEvent`` (array_like, tagged by class name)."""


class BlockStored(_Event):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[EngineHash]
    medium: str | None = None


class AllBlocksCleared(_Event):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)


def read_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise ValueError(f"a sequence number is {SEQ_BYTES} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


class BadBatch(ValueError):
    """A payload that is not a KVEventBatch."""


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    ts: float
    events: tuple[Event, ...]


_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def _hash(value: Any, what: str) -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise BadBatch(f"{what}: expected an int or bytes block hash, got {type(value).__name__}")
    return value


def _event(raw: Any) -> Event | None:
    """One event, from either encoding; None for an event kind this reader does not know (newer engines)."""
    if isinstance(raw, list | tuple):
        if not raw or not isinstance(raw[0], str):
            raise BadBatch("an array-like event must start with its tag")
        tag, values = raw[0], dict(zip(_FIELDS.get(raw[0], ()), raw[1:], strict=False))
    elif isinstance(raw, dict):
        tag, values = raw.get("type"), raw
    else:
        raise BadBatch(f"an event must be an array or a map, got {type(raw).__name__}")
    if tag == "BlockStored":
        hashes = [_hash(h, "block_hashes") for h in values.get("block_hashes") or ()]
        parent = values.get("parent_block_hash")
        tokens = values.get("token_ids") or []
        size = values.get("block_size")
        if not isinstance(size, int) or size <= 0:
            raise BadBatch(f"BlockStored.block_size: expected a positive int, got {size!r}")
        if not isinstance(tokens, list) or len(tokens) != size * len(hashes):
            raise BadBatch(f"BlockStored: {len(tokens)} token_ids for {len(hashes)} blocks of {size}")
        return BlockStored(
            hashes,
            None if parent is None else _hash(parent, "parent_block_hash"),
            tokens,
            size,
            values.get("lora_id"),
            values.get("medium"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved([_hash(h, "block_hashes") for h in values.get("block_hashes") or ()], values.get("medium"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes) -> DecodedBatch:
    """A ``KVEventBatch`` payload, in either encoding; BadBatch when it is not one."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise BadBatch(f"not msgpack: {exc}") from None
    if isinstance(raw, list | tuple) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
    elif isinstance(raw, dict):
        ts, events = raw.get("ts"), raw.get("events")
    else:
        raise BadBatch("a KVEventBatch is [ts, events, ...] or {ts, events, ...}")
    if not isinstance(events, list | tuple) or not isinstance(ts, int | float):
        raise BadBatch("a KVEventBatch needs a numeric ts and a list of events")
    decoded: Sequence[Event | None] = [_event(e) for e in events]
    return DecodedBatch(float(ts), tuple(e for e in decoded if e is not None))
