"""Strategies and eligibility on hand-built snapshots."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from flexlb.domain import Choice, Role, ScheduleRequest, WorkerSpec, WorkerStatus, WorkerView
from flexlb.routing import (
    ChoiceMemory,
    StrategyName,
    StrategyParams,
    TtftModel,
    choose,
    eligible,
    near_best,
    weighted_cache_weights,
)

PARAMS = StrategyParams(ttft=TtftModel(default_prefill_tokens_per_ms=10.0, overhead_ms=5.0))


def worker(
    port: int,
    role: Role = Role.PREFILL,
    *,
    alive: bool = True,
    running: int = 0,
    waiting: int = 0,
    queued_tokens: int = 0,
    kv_used: int = 0,
    kv_total: int = 0,
    rate: float = 0.0,
    pending_count: int = 0,
    pending_tokens: int = 0,
    hit_blocks: int = 0,
    max_concurrency: int = 0,
) -> WorkerView:
    """A worker with id ``10.0.0.1:<port>``; block size 64."""
    return WorkerView(
        spec=WorkerSpec(ip="10.0.0.1", http_port=port, role=role, max_concurrency=max_concurrency),
        status=WorkerStatus(
            alive=alive,
            running=running,
            waiting=waiting,
            queued_tokens=queued_tokens,
            kv_used=kv_used,
            kv_total=kv_total,
            block_size=64,
            prefill_tokens_per_ms=rate,
        ),
        pending_count=pending_count,
        pending_tokens=pending_tokens,
        hit_blocks=hit_blocks,
    )


def request(seq_len: int = 2000) -> ScheduleRequest:
    return ScheduleRequest(request_id=1, seq_len=seq_len)


def memory(seed: int = 7) -> ChoiceMemory:
    return ChoiceMemory(rng=random.Random(seed), round_robin={}, last_chosen={}, sequence=0)


def pick(
    name: StrategyName, views: list[WorkerView], mem: ChoiceMemory, role: Role = Role.PREFILL, seq_len: int = 2000
) -> Choice:
    choice = choose(name, role, views, request(seq_len), mem, PARAMS)
    assert choice is not None
    return choice


def burst(
    name: StrategyName, views: list[WorkerView], n: int, role: Role = Role.PREFILL, seq_len: int = 2000
) -> list[int]:
    """Ports chosen by ``n`` choices on one unchanging snapshot (a burst before reservations show up)."""
    mem = memory()
    return [pick(name, views, mem, role, seq_len).worker.spec.http_port for _ in range(n)]


# --- common behaviour -------------------------------------------------------------------------------------------


def test_strategy_names_are_their_values() -> None:
    assert [s.value for s in StrategyName] == [
        "RANDOM",
        "ROUND_ROBIN",
        "LOWEST_CONCURRENCY",
        "SHORTEST_TTFT",
        "WEIGHTED_CACHE",
        "LEAST_KV_USED",
    ]


@pytest.mark.parametrize("name", list(StrategyName))
def test_no_candidates_gives_none_and_leaves_memory_alone(name: StrategyName) -> None:
    mem = memory()
    assert choose(name, Role.PREFILL, [], request(), mem, PARAMS) is None
    assert mem.sequence == 0
    assert mem.last_chosen == {}
    assert mem.round_robin == {}


@pytest.mark.parametrize("name", list(StrategyName))
def test_single_candidate_is_chosen_and_noted(name: StrategyName) -> None:
    mem = memory()
    only = worker(8001, hit_blocks=16)
    choice = pick(name, [only], mem)
    assert choice.worker == only
    assert mem.sequence == 1
    assert mem.last_chosen == {"10.0.0.1:8001": 1}


def test_prefill_choice_carries_estimate_and_uncached_tokens() -> None:
    # Idle, unmeasured (10 tokens/ms): 5 + (2000 - 1024) / 10 = 102.6 ms; reserve 2000 - 1024 = 976 tokens.
    choice = pick(StrategyName.RANDOM, [worker(8001, hit_blocks=16)], memory())
    assert choice.estimate_ttft_ms == pytest.approx(102.6)
    assert choice.reserve_tokens == 976


def test_decode_choice_has_no_estimate_and_reserves_whole_sequence() -> None:
    choice = pick(StrategyName.WEIGHTED_CACHE, [worker(8001, Role.DECODE, hit_blocks=16)], memory(), Role.DECODE)
    assert choice.estimate_ttft_ms == 0.0
    assert choice.reserve_tokens == 2000


# --- RANDOM --------------------------------------------------------------------------------------------------------


def test_random_is_seeded_and_independent_of_input_order() -> None:
    views = [worker(p) for p in (8001, 8002, 8003)]
    first = burst(StrategyName.RANDOM, views, 50)
    again = burst(StrategyName.RANDOM, list(reversed(views)), 50)
    assert first == again
    assert set(first) == {8001, 8002, 8003}


# --- ROUND_ROBIN ---------------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_worker_id_order_regardless_of_input_order() -> None:
    views = [worker(8003), worker(8001), worker(8002)]
    assert burst(StrategyName.ROUND_ROBIN, views, 7) == [8001, 8002, 8003, 8001, 8002, 8003, 8001]


def test_round_robin_counters_are_per_role() -> None:
    mem = memory()
    prefill = [worker(8001), worker(8002)]
    decode = [worker(9001, Role.DECODE), worker(9002, Role.DECODE)]
    assert pick(StrategyName.ROUND_ROBIN, prefill, mem).worker.spec.http_port == 8001
    assert pick(StrategyName.ROUND_ROBIN, decode, mem, Role.DECODE).worker.spec.http_port == 9001
    assert pick(StrategyName.ROUND_ROBIN, prefill, mem).worker.spec.http_port == 8002
    assert mem.round_robin == {Role.PREFILL: 2, Role.DECODE: 1}


# --- LOWEST_CONCURRENCY --------------------------------------------------------------------------------------------


def test_lowest_concurrency_counts_pending_reservations() -> None:
    # 8001: 1 running (load 1); 8002: idle per its status but 2 reservations on their way (load 2).
    views = [worker(8001, running=1), worker(8002, pending_count=2)]
    assert pick(StrategyName.LOWEST_CONCURRENCY, views, memory()).worker.spec.http_port == 8001


def test_lowest_concurrency_counts_running_and_waiting() -> None:
    views = [worker(8001, running=1, waiting=2), worker(8002, running=2)]
    assert pick(StrategyName.LOWEST_CONCURRENCY, views, memory()).worker.spec.http_port == 8002


def test_lowest_concurrency_ties_go_to_least_recently_chosen() -> None:
    views = [worker(8002, running=1), worker(8001, running=1), worker(8003, running=5)]
    assert burst(StrategyName.LOWEST_CONCURRENCY, views, 4) == [8001, 8002, 8001, 8002]


# --- SHORTEST_TTFT -------------------------------------------------------------------------------------------------


def test_shortest_ttft_picks_cache_holder_when_load_is_equal() -> None:
    # Holder: 5 + 976 / 10 = 102.6 ms; cold: 5 + 2000 / 10 = 205 ms (not within 10% of 102.6).
    holder, cold = worker(8002, hit_blocks=16), worker(8001)
    for views in ([holder, cold], [cold, holder]):
        assert pick(StrategyName.SHORTEST_TTFT, views, memory()).worker is holder


def test_shortest_ttft_lightly_loaded_holder_still_wins() -> None:
    # Holder with 500 queued tokens and 1 waiting: 500 / 10 + 5 + 102.6 = 157.6 ms < cold idle 205 ms.
    holder, cold = worker(8002, hit_blocks=16, queued_tokens=500, waiting=1), worker(8001)
    choice = pick(StrategyName.SHORTEST_TTFT, [holder, cold], memory())
    assert choice.worker is holder
    assert choice.estimate_ttft_ms == pytest.approx(157.6)


def test_shortest_ttft_loaded_holder_loses_to_idle_cold_worker() -> None:
    # Holder: 20000 / 10 + 10 * 5 + 102.6 = 2152.6 ms; cold idle worker: 205 ms. Load outweighs the prefix hit.
    holder, cold = worker(8001, hit_blocks=16, queued_tokens=20000, waiting=10), worker(8002)
    choice = pick(StrategyName.SHORTEST_TTFT, [holder, cold], memory())
    assert choice.worker is cold
    assert choice.estimate_ttft_ms == pytest.approx(205.0)


def test_shortest_ttft_uses_measured_rate() -> None:
    # Both cold; 8002 measured at 40 tokens/ms: 5 + 2000 / 40 = 55 ms vs 205 ms at the default rate.
    fast = worker(8002, rate=40.0)
    choice = pick(StrategyName.SHORTEST_TTFT, [worker(8001), fast], memory())
    assert choice.worker is fast
    assert choice.estimate_ttft_ms == pytest.approx(55.0)


def test_shortest_ttft_burst_spreads_over_equal_workers() -> None:
    # Three identical idle workers: the 30% cut alone would keep one; equal workers are kept and rotated.
    views = [worker(8003), worker(8001), worker(8002)]
    assert burst(StrategyName.SHORTEST_TTFT, views, 6) == [8001, 8002, 8003, 8001, 8002, 8003]


def test_shortest_ttft_burst_spreads_over_near_equal_workers_only() -> None:
    # Rates 10, 10.2, 9.8, 10.1 tokens/ms -> 205, 201.08, 209.08, 203.02 ms: all within 10% of the best (201.08).
    # 8005 at 5 tokens/ms (405 ms) is not.
    views = [worker(8001, rate=10.0), worker(8002, rate=10.2), worker(8003, rate=9.8), worker(8004, rate=10.1)]
    views.append(worker(8005, rate=5.0))
    ports = burst(StrategyName.SHORTEST_TTFT, views, 8)
    # Never chosen first go the best estimate; then the others by estimate; then round again.
    assert ports == [8002, 8004, 8001, 8003, 8002, 8004, 8001, 8003]


def test_shortest_ttft_half_stdev_band() -> None:
    # seq_len 10 -> own = 5 + 10 / 10 = 6 ms; queued q adds q / 10. Estimates: 100, 112, 160, and four at 500.
    # n = 7 -> keep ceil(0.3 * 7) = 3: [100, 112, 160]; pstdev = sqrt((24^2 + 12^2 + 36^2) / 3) = 25.92;
    # band = max(10, 12.96) = 12.96, so 112 is equal to 100 (10% alone would exclude it) and 160 is not.
    queued = {8001: 1060, 8002: 940, 8003: 1540, 8004: 4940, 8005: 4940, 8006: 4940, 8007: 4940}
    views = [worker(port, queued_tokens=q) for port, q in queued.items()]
    assert burst(StrategyName.SHORTEST_TTFT, views, 4, seq_len=10) == [8002, 8001, 8002, 8001]


def test_near_best_indices() -> None:
    assert near_best([100.0, 112.0, 160.0, 500.0, 500.0, 500.0, 500.0], 0.1, 0.3) == [0, 1]
    assert near_best([100.0, 112.0], 0.1, 0.3) == [0]  # with one kept value the stdev is 0
    assert near_best([50.0, 50.0, 50.0], 0.1, 0.3) == [0, 1, 2]


def test_shortest_ttft_sees_reservations_from_other_routers() -> None:
    # 8001 holds 10 pending requests of 4000 tokens in total: 4000 / 10 + 10 * 5 + 205 = 655 ms vs 205 ms.
    views = [worker(8001, pending_count=10, pending_tokens=4000), worker(8002)]
    assert pick(StrategyName.SHORTEST_TTFT, views, memory()).worker.spec.http_port == 8002


# --- WEIGHTED_CACHE ------------------------------------------------------------------------------------------------


def test_weighted_cache_weights_exact() -> None:
    # used 0 and 1000 (all of it pending), mean 500: weights exp(0.5) and exp(-0.5) -> 1 / (1 + e^-1) = 0.7311.
    views = [worker(8001, Role.DECODE), worker(8002, Role.DECODE, pending_tokens=1000)]
    low, high = weighted_cache_weights(views, 0.001)
    assert low == pytest.approx(1 / (1 + math.exp(-1)))
    assert high == pytest.approx(1 / (1 + math.exp(1)))


def test_weighted_cache_weights_uniform_when_equal_or_no_decay() -> None:
    views = [worker(p, Role.DECODE, kv_used=700) for p in (8001, 8002, 8003, 8004)]
    assert weighted_cache_weights(views, 0.001) == pytest.approx([0.25] * 4)
    skewed = [worker(8001, Role.DECODE), worker(8002, Role.DECODE, kv_used=10**6)]
    assert weighted_cache_weights(skewed, 0.0) == pytest.approx([0.5, 0.5])
    assert weighted_cache_weights([], 0.001) == []


def test_weighted_cache_weights_do_not_overflow() -> None:
    # Exponent spread of 10^6: a naive exp() of +5e5 would overflow.
    views = [worker(8001, Role.DECODE), worker(8002, Role.DECODE, kv_used=10**9)]
    assert weighted_cache_weights(views, 0.001) == [1.0, 0.0]


def test_weighted_cache_less_used_worker_wins_more_often() -> None:
    views = [worker(8002, Role.DECODE, kv_used=1000), worker(8001, Role.DECODE)]
    counts = Counter(burst(StrategyName.WEIGHTED_CACHE, views, 2000, Role.DECODE))
    # Expected 0.7311 * 2000 = 1462; one standard deviation is about 20.
    assert 1382 <= counts[8001] <= 1542
    assert counts[8001] + counts[8002] == 2000


def test_weighted_cache_equal_workers_are_about_uniform() -> None:
    views = [worker(p, Role.DECODE, kv_used=500) for p in (8001, 8002, 8003)]
    counts = Counter(burst(StrategyName.WEIGHTED_CACHE, views, 2000, Role.DECODE))
    # Expected 666.7 each; one standard deviation is about 21.
    assert set(counts) == {8001, 8002, 8003}
    assert all(580 <= c <= 750 for c in counts.values())


def test_weighted_cache_is_independent_of_input_order() -> None:
    views = [worker(8001, Role.DECODE, kv_used=300), worker(8002, Role.DECODE), worker(8003, Role.DECODE)]
    forward = burst(StrategyName.WEIGHTED_CACHE, views, 100, Role.DECODE)
    backward = burst(StrategyName.WEIGHTED_CACHE, list(reversed(views)), 100, Role.DECODE)
    assert forward == backward


# --- LEAST_KV_USED -------------------------------------------------------------------------------------------------


def test_least_kv_used_picks_most_free_kv_counting_pending() -> None:
    # Free: 8001 10000 - 2000 = 8000; 8002 10000 - 1000 - 3000 pending = 6000; 8003 20000 - 13000 = 7000.
    views = [
        worker(8001, Role.DECODE, kv_used=2000, kv_total=10000),
        worker(8002, Role.DECODE, kv_used=1000, kv_total=10000, pending_tokens=3000),
        worker(8003, Role.DECODE, kv_used=13000, kv_total=20000),
    ]
    assert pick(StrategyName.LEAST_KV_USED, views, memory(), Role.DECODE).worker.spec.http_port == 8001


def test_least_kv_used_ties_go_to_lower_load_then_least_recently_chosen() -> None:
    busy = worker(8001, Role.DECODE, kv_used=1000, kv_total=10000, running=3)
    idle_a = worker(8002, Role.DECODE, kv_used=1000, kv_total=10000, running=1)
    idle_b = worker(8003, Role.DECODE, kv_used=1000, kv_total=10000, running=1)
    assert burst(StrategyName.LEAST_KV_USED, [busy, idle_b, idle_a], 4, Role.DECODE) == [8002, 8003, 8002, 8003]


# --- eligibility ---------------------------------------------------------------------------------------------------


def test_eligible_filters_dead_and_role_mismatch() -> None:
    ok = worker(8001)
    views = [ok, worker(8002, alive=False), worker(8003, Role.DECODE)]
    assert eligible(views, Role.PREFILL, 2000) == [ok]


def test_eligible_respects_concurrency_limit() -> None:
    under = worker(8001, running=1, max_concurrency=4, pending_count=2)  # load 3 < 4
    at_limit = worker(8002, running=2, waiting=1, max_concurrency=4, pending_count=1)  # load 4
    unlimited = worker(8003, running=100)
    assert eligible([under, at_limit, unlimited], Role.PREFILL, 2000) == [under, unlimited]


def test_eligible_needs_free_kv_for_the_reservation() -> None:
    # Prefill reserves seq_len - hit: 2000 cold, 976 with 16 cached blocks.
    roomy = worker(8001, kv_used=8000, kv_total=10000)  # free 2000
    full = worker(8002, kv_used=9000, kv_total=10000)  # free 1000 < 2000
    warm = worker(8003, kv_used=9000, kv_total=10000, hit_blocks=16)  # free 1000 >= 976
    reserved = worker(8004, kv_used=7000, kv_total=10000, pending_tokens=1500)  # free 1500 < 2000
    unknown = worker(8005, kv_used=10**9)  # kv_total 0: not checked
    views = [roomy, full, warm, reserved, unknown]
    assert eligible(views, Role.PREFILL, 2000) == [roomy, warm, unknown]


def test_eligible_decode_needs_whole_sequence() -> None:
    # Decode reserves the whole sequence: a cache hit does not help.
    warm = worker(8001, Role.DECODE, kv_used=9000, kv_total=10000, hit_blocks=16)
    assert eligible([warm], Role.DECODE, 2000) == []
    assert eligible([warm], Role.DECODE, 1000) == [warm]


def test_eligible_of_nothing() -> None:
    assert eligible([], Role.PREFILL, 2000) == []
