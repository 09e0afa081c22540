"""Mooncake trace replay: JSON lines of ``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids`` (one
id per 512-token block of the prompt; equal ids at the same position mean a shared prefix).

Each hash id becomes a deterministic block of words, so requests that share leading hash ids share a prompt prefix
and therefore flexlb's ``block_cache_keys``. ``length_scale`` shrinks token counts and the block size together
(0.125: 512-token trace blocks become 64-token blocks, one flexlb KV block each); ``time_scale`` is real seconds per
trace second, as the simulator's ``--time-scale`` (0.1 replays ten times faster).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flexlb.bench.workloads.spec import RequestSpec, WorkloadError

OPTION_PREFIX = ""
TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class MooncakeParams:
    trace: str = field(default="", metadata={"help": "path of a Mooncake JSON-lines trace (required)"})
    time_scale: float = field(
        default=1.0, metadata={"help": "real seconds per trace second: 0.1 replays ten times faster"}
    )
    length_scale: float = field(
        default=1.0, metadata={"help": "multiplies input, output and block lengths (0.125: 512-token blocks -> 64)"}
    )
    start: int = field(default=0, metadata={"help": "skip this many trace lines"})
    limit: int = field(default=0, metadata={"help": "take at most this many requests (0: to the end)"})
    trace_block_size: int = field(default=TRACE_BLOCK_TOKENS, metadata={"help": "tokens per hash id in the trace"})


@dataclass(frozen=True, slots=True)
class TraceRow:
    line: int  # 1-based line number in the file
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _field(obj: dict[str, Any], name: str, line: int, path: str) -> Any:
    if name not in obj:
        raise WorkloadError(f"{path}:{line}: missing field {name!r}")
    return obj[name]


def _parse_row(raw: bytes, line: int, path: str) -> TraceRow:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WorkloadError(f"{path}:{line}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{path}:{line}: expected a JSON object")
    ts, inp, out = (_field(obj, n, line, path) for n in ("timestamp", "input_length", "output_length"))
    ids = obj.get("hash_ids", [])
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise WorkloadError(f"{path}:{line}: timestamp must be a number")
    for name, value in (("input_length", inp), ("output_length", out)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WorkloadError(f"{path}:{line}: {name} must be a non-negative integer")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise WorkloadError(f"{path}:{line}: hash_ids must be a list of integers")
    return TraceRow(line, float(ts), inp, out, tuple(ids))


def read_trace(path: str | Path, start: int = 0, limit: int = 0) -> Iterator[TraceRow]:
    """Rows ``start`` .. ``start + limit`` (all when ``limit`` is 0) of a trace file; blank lines are skipped."""
    taken = 0
    index = 0
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                index += 1
                if index <= start:
                    continue
                if limit and taken >= limit:
                    return
                yield _parse_row(raw, number, str(path))
                taken += 1
    except OSError as exc:
        raise WorkloadError(f"cannot read the trace: {exc}") from None


class BlockText:
    """The words of one scaled trace block per hash id, made once and reused."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._cache: dict[int, str] = {}

    def __call__(self, hash_id: int) -> str:
        text = self._cache.get(hash_id)
        if text is None:
            text = " ".join(f"h{hash_id}_{j}" for j in range(self.block_tokens))
            self._cache[hash_id] = text
        return text


def prompt_for(row: TraceRow, tokens: int, blocks: BlockText) -> str:
    """``tokens`` words: the blocks of ``row.hash_ids`` in order (the last one cut), then words unique to the row."""
    parts, remaining = [], tokens
    for hash_id in row.hash_ids:
        if remaining <= 0:
            break
        text = blocks(hash_id)
        if remaining >= blocks.block_tokens:
            parts.append(text)
            remaining -= blocks.block_tokens
        else:
            parts.append(" ".join(text.split(" ", remaining)[:remaining]))
            remaining = 0
    if remaining > 0:
        parts.append(" ".join(f"r{row.line}_{j}" for j in range(remaining)))
    return " ".join(parts)


def generate(params: MooncakeParams, rng: random.Random) -> list[RequestSpec]:
    """One completion per trace row, ``arrival_s`` from the timestamps (relative to the slice's first); tag
    ``trace``. ``rng`` is unused: a replay is the trace."""
    if not params.trace:
        raise WorkloadError("--trace PATH is required for the mooncake workload")
    if not params.time_scale > 0:
        raise WorkloadError(f"--time-scale must be positive, got {params.time_scale}")
    if not params.length_scale > 0:
        raise WorkloadError(f"--length-scale must be positive, got {params.length_scale}")
    if params.start < 0 or params.limit < 0:
        raise WorkloadError("--start and --limit must not be negative")
    if params.trace_block_size < 1:
        raise WorkloadError("--trace-block-size must be at least 1")
    block_tokens = round(params.trace_block_size * params.length_scale)
    if block_tokens < 1:
        raise WorkloadError(f"--length-scale {params.length_scale} makes a trace block shorter than one token")
    blocks = BlockText(block_tokens)
    specs: list[RequestSpec] = []
    first_ms: float | None = None
    for row in read_trace(params.trace, params.start, params.limit):
        first_ms = row.timestamp_ms if first_ms is None else first_ms
        tokens = max(1, round(row.input_length * params.length_scale))
        specs.append(
            RequestSpec(
                prompt=prompt_for(row, tokens, blocks),
                max_tokens=max(1, round(row.output_length * params.length_scale)),
                arrival_s=max(0.0, (row.timestamp_ms - first_ms) / 1000 * params.time_scale),
                tag="trace",
            )
        )
    if not specs:
        raise WorkloadError(f"{params.trace}: no requests in the slice (start {params.start}, limit {params.limit})")
    return specs
