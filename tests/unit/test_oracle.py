"""The oracle's lower bound on hand-computed examples (flexlb/bench/oracle.py)."""

from __future__ import annotations

import math

import pytest

from flexlb.bench.oracle import OracleCosts, OracleRequest, oracle_bound
from flexlb.blocks import block_cache_keys, tokenize
from flexlb.sim.engine import EngineConfig

# block 4 tokens, 3 ms per prefill step, 2 tokens per ms, decode steps of 8 + 0.5 per sequence, real time
COSTS = OracleCosts(block_size=4, prefill_overhead_ms=3.0, prefill_tokens_per_ms=2.0)


def test_a_cold_request_computes_its_whole_prompt() -> None:
    bound = oracle_bound([OracleRequest(10, (1, 2), output_tokens=3)], COSTS)
    assert bound.cached_tokens == (0,) and bound.uncached_tokens == (10,)
    assert bound.ttft_ms == (3.0 + 10 / 2,)  # 8 ms
    assert bound.e2e_ms == (8.0 + 2 * 8.5,)  # two more decode steps of a batch of one
    assert bound.hit_ratio == 0.0


def test_later_requests_compute_only_the_blocks_no_earlier_request_had() -> None:
    requests = [
        OracleRequest(10, (1, 2)),  # cold: 10 tokens
        OracleRequest(9, (1, 2)),  # both blocks seen: 9 - 8 = 1 token
        OracleRequest(12, (1, 5, 6)),  # block 1 seen, 5 is not: the match ends there, 12 - 4 = 8 tokens
        OracleRequest(12, (7, 2, 6)),  # 7 never seen: nothing matches although 2 and 6 were seen
        OracleRequest(8, (1, 5)),  # both seen (the third request brought 5): a full hit computes one token
    ]
    bound = oracle_bound(requests, COSTS)
    assert bound.cached_tokens == (0, 8, 4, 0, 8)
    assert bound.uncached_tokens == (10, 1, 8, 12, 1)
    assert bound.ttft_ms == (8.0, 3.5, 7.0, 9.0, 3.5)
    assert bound.prompt_tokens == 51
    assert bound.hit_ratio == pytest.approx(20 / 51)
    assert bound.e2e_ms == bound.ttft_ms  # one output token each: no decode step after the first token


def test_time_scale_scales_every_bound() -> None:
    half = OracleCosts(block_size=4, prefill_overhead_ms=3.0, prefill_tokens_per_ms=2.0, time_scale=0.5)
    bound = oracle_bound([OracleRequest(10, (1, 2), output_tokens=2)], half)
    assert bound.ttft_ms == (4.0,) and bound.e2e_ms == (4.0 + 4.25,)


def test_the_order_of_the_workload_decides_who_pays_for_a_prefix() -> None:
    a, b = OracleRequest(8, (1, 2)), OracleRequest(4, (1,))
    assert oracle_bound([a, b], COSTS).uncached_tokens == (8, 1)
    assert oracle_bound([b, a], COSTS).uncached_tokens == (4, 4)


def test_costs_are_the_simulators_own_and_prompts_are_hashed_as_workers_hash_them() -> None:
    config = EngineConfig(block_size=64, prefill_overhead_ms=3.0, prefill_tokens_per_ms=20.0, time_scale=0.1)
    costs = OracleCosts.of(config)
    assert costs.prefill_ms(500) == pytest.approx(config.prefill_ms(500) * 0.1)
    assert costs.decode_step_ms() == pytest.approx(config.decode_step_ms(1) * 0.1)
    prompt = " ".join(f"w{i}" for i in range(150))  # 150 tokens: two full blocks of 64
    req = OracleRequest.from_prompt(prompt, 4, 64)
    assert req.prompt_tokens == 150 and req.block_keys == tuple(block_cache_keys(tokenize(prompt), 64))
    again = oracle_bound([req, req], costs)
    assert again.uncached_tokens == (150, 150 - 128)


def test_summary_and_empty_workload() -> None:
    summary = oracle_bound([OracleRequest(10, (1, 2)), OracleRequest(10, (1, 2))], COSTS).summary()
    assert summary["requests"] == 2 and summary["cached_tokens"] == 8 and summary["hit_ratio"] == 0.4
    assert summary["ttft_ms"]["mean"] == pytest.approx((8.0 + 4.0) / 2)
    empty = oracle_bound([], COSTS)
    assert empty.hit_ratio is None and math.isnan(empty.summary()["ttft_ms"]["mean"])  # type: ignore[index]


def test_inconsistent_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="block keys"):
        oracle_bound([OracleRequest(7, (1, 2))], COSTS)  # 7 tokens hold one full block of 4, not two
    with pytest.raises(ValueError, match="prompt and an output"):
        oracle_bound([OracleRequest(4, (1,), output_tokens=0)], COSTS)
    with pytest.raises(ValueError, match="positive"):
        OracleCosts(prefill_tokens_per_ms=0)
