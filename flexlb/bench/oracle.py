"""Oracle baseline: the TTFT a clairvoyant scheduler could reach on a workload, from the simulator's cost model.

A pure lower bound, not a simulation. For each request, in the order the workload sends them, it assumes:

1. **A perfect fleet-wide prefix cache.** Every full prompt block any earlier request had is cached, on whichever
   worker this request runs, never evicted, and usable at once (even when that earlier request is still in flight).
   The request computes only the rest: ``uncached = prompt_tokens - matched_blocks * block_size``, at least one
   token (the last position yields the first token), exactly as the simulator counts it. Blocks are chained hashes
   (``flexlb.blocks``), so a matching key means the whole prefix up to it matches; a hole ends the match.
2. **No queueing and no interference.** The request finds an idle worker: no waiting queue, no decode step in
   progress, and a prefill step of its own (a batch would also pay for the other requests' tokens).
3. **Nothing but the engine.** No routing, HTTP or network time.

Then ``TTFT = (prefill_overhead_ms + uncached / prefill_tokens_per_ms) * time_scale`` (model milliseconds times
real seconds per model second), the simulator's own prefill cost (``EngineConfig.prefill_ms``). On a colocated
(PDFUSION) worker the rest of the answer needs ``output_tokens - 1`` more decode steps of at least
``decode_step_ms(1)`` each (a batch of one), which bounds the end-to-end latency. No scheduler can beat either bound
on the simulated engine, so a strategy's distance from it is what better placement could still win, at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flexlb.bench.report import latency_summary
from flexlb.blocks import block_cache_keys, tokenize
from flexlb.sim.engine import EngineConfig


@dataclass(frozen=True, slots=True)
class OracleRequest:
    """What the bound needs of one request: its prompt length, the prompt's block keys and its output length."""

    prompt_tokens: int
    block_keys: tuple[int, ...]
    output_tokens: int = 1

    @classmethod
    def from_prompt(cls, prompt: str, output_tokens: int, block_size: int) -> OracleRequest:
        """The request a simulated worker sees for ``prompt`` (its tokeniser and block hashing)."""
        tokens = tokenize(prompt)
        return cls(len(tokens), tuple(block_cache_keys(tokens, block_size)), output_tokens)


@dataclass(frozen=True, slots=True)
class OracleCosts:
    """The part of the simulator's cost model the bound uses (``EngineConfig``'s fields of the same names)."""

    block_size: int = 64
    prefill_overhead_ms: float = 3.0
    prefill_tokens_per_ms: float = 20.0
    decode_step_ms_base: float = 8.0
    decode_step_ms_per_seq: float = 0.5
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not (self.prefill_tokens_per_ms > 0 and self.time_scale > 0):
            raise ValueError("prefill_tokens_per_ms and time_scale must be positive")

    @classmethod
    def of(cls, config: EngineConfig) -> OracleCosts:
        return cls(
            config.block_size,
            config.prefill_overhead_ms,
            config.prefill_tokens_per_ms,
            config.decode_step_ms_base,
            config.decode_step_ms_per_seq,
            config.time_scale,
        )

    def prefill_ms(self, uncached_tokens: int) -> float:
        """Real milliseconds of a prefill step computing ``uncached_tokens`` alone."""
        return (self.prefill_overhead_ms + uncached_tokens / self.prefill_tokens_per_ms) * self.time_scale

    def decode_step_ms(self) -> float:
        """Real milliseconds of the shortest decode step (a batch of one)."""
        return (self.decode_step_ms_base + self.decode_step_ms_per_seq) * self.time_scale


@dataclass(frozen=True, slots=True)
class OracleBound:
    """Per request (in workload order): cached and computed prompt tokens, TTFT and E2E lower bounds (real ms)."""

    cached_tokens: tuple[int, ...]
    uncached_tokens: tuple[int, ...]
    ttft_ms: tuple[float, ...]
    e2e_ms: tuple[float, ...]
    prompt_tokens: int

    @property
    def hit_ratio(self) -> float | None:
        """Prompt tokens a perfect fleet-wide cache serves / prompt tokens: the most any placement can reach."""
        return sum(self.cached_tokens) / self.prompt_tokens if self.prompt_tokens else None

    def summary(self) -> dict[str, object]:
        return {
            "requests": len(self.ttft_ms),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": sum(self.cached_tokens),
            "hit_ratio": self.hit_ratio,
            "ttft_ms": latency_summary(self.ttft_ms),
            "e2e_ms": latency_summary(self.e2e_ms),
        }


def _matched(keys: Sequence[int], seen: set[int]) -> int:
    n = 0
    for key in keys:
        if key not in seen:
            break
        n += 1
    return n


def oracle_bound(requests: Iterable[OracleRequest], costs: OracleCosts) -> OracleBound:
    """The lower bounds of every request, in order (see the module's docstring for what they assume)."""
    seen: set[int] = set()
    cached_all: list[int] = []
    uncached_all: list[int] = []
    ttft: list[float] = []
    e2e: list[float] = []
    prompt_total = 0
    for req in requests:
        if req.prompt_tokens < 1 or req.output_tokens < 1:
            raise ValueError(f"a request needs a prompt and an output, got {req}")
        if len(req.block_keys) > req.prompt_tokens // costs.block_size:
            raise ValueError(f"{len(req.block_keys)} block keys for {req.prompt_tokens} tokens of {costs.block_size}")
        cached = min(_matched(req.block_keys, seen) * costs.block_size, req.prompt_tokens)
        uncached = max(req.prompt_tokens - cached, 1)
        first = costs.prefill_ms(uncached)
        cached_all.append(cached)
        uncached_all.append(uncached)
        ttft.append(first)
        e2e.append(first + (req.output_tokens - 1) * costs.decode_step_ms())
        prompt_total += req.prompt_tokens
        seen.update(req.block_keys)
    return OracleBound(tuple(cached_all), tuple(uncached_all), tuple(ttft), tuple(e2e), prompt_total)
