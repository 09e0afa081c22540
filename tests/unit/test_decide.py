"""decide(): the pure multi-role decision, and its pruned scans checked against the full scan on random fleets."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlb.domain import ErrorCode, Role, ScheduleRequest
from flexlb.routing import ChoiceMemory, DecisionOptions, StrategyName, StrategyParams, decide, eligible, order_keys
from flexlb.routing.decide import PLAIN_BAND_TRIES
from flexlb.routing.strategies import near_best
from flexlb.routing.ttft import estimate_ttft_ms
from flexlb.state.view import FleetView

PARAMS = StrategyParams()


def fleet_of(hashes: dict[str, dict[str, str]]) -> FleetView:
    view = FleetView(order_keys(PARAMS))
    view.replace_all(hashes)
    return view


def worker_hash(i: int, role: Role, rng: random.Random) -> dict[str, str]:
    return {
        "ip": f"10.1.{i // 200}.{i % 200}",
        "http_port": "8000",
        "role": role.value,
        "alive": "1" if rng.random() > 0.1 else "0",
        "available": "1" if rng.random() > 0.05 else "0",
        "max_concurrency": str(rng.choice([0, 4, 8])),
        "running": str(rng.randrange(6)),
        "waiting": str(rng.randrange(4)),
        "queued_tokens": str(rng.randrange(0, 20_000, 50)),
        "kv_used": str(rng.randrange(0, 9_000, 100)),
        "kv_total": str(rng.choice([0, 10_000])),
        "prefill_tokens_per_ms": str(rng.choice([0, 5.0, 10.0, 20.0])),
        "pending_count": str(rng.randrange(3)),
        "pending_tokens": str(rng.randrange(0, 3_000, 100)),
    }


def random_fleet(seed: int, size: int, role: Role) -> tuple[FleetView, dict[str, int], random.Random]:
    rng = random.Random(seed)
    hashes = {}
    for i in range(size):
        h = worker_hash(i, role, rng)
        hashes[f"{h['ip']}:8000"] = h
    hits = {wid: rng.randrange(1, 40) for wid in rng.sample(sorted(hashes), k=min(size, rng.randrange(0, 6)))}
    return fleet_of(hashes), hits, rng


def options(strategy: StrategyName, role: Role, prune_above: int) -> DecisionOptions:
    return DecisionOptions(
        strategies={r: strategy for r in Role}, params=PARAMS, roles=(role,), prune_above=prune_above
    )


def both(fleet: FleetView, hits: dict[str, int], strategy: StrategyName, role: Role, request: ScheduleRequest):
    memory = ChoiceMemory(rng=random.Random(1))
    for wid in fleet.ids(role)[::3]:  # some workers chosen before, in some order
        memory.note_chosen(wid)
    full_memory, pruned_memory = memory, copy.deepcopy(memory)
    full = decide(request, fleet, options(strategy, role, prune_above=10**9), full_memory, hits=hits)
    pruned = decide(request, fleet, options(strategy, role, prune_above=0), pruned_memory, hits=hits)
    return full, pruned


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(1, 120), seq_len=st.integers(0, 8_000))
def test_pruned_shortest_ttft_is_within_the_full_scans_near_tie_band(seed: int, size: int, seq_len: int) -> None:
    fleet, hits, _ = random_fleet(seed, size, Role.PREFILL)
    request = ScheduleRequest(request_id=1, seq_len=seq_len)
    full, pruned = both(fleet, hits, StrategyName.SHORTEST_TTFT, Role.PREFILL, request)
    assert full.success == pruned.success
    if not full.success:
        assert (full.code, full.message) == (pruned.code, pruned.message)
        return
    # every eligible worker as the full scan saw it
    seen = {
        c.worker_id: c
        for c in decide_candidates(fleet, hits, Role.PREFILL, request)  # (eligible, with the request's hit)
    }
    estimates = {wid: estimate_ttft_ms(v, seq_len, PARAMS.ttft) for wid, v in seen.items()}
    ids = sorted(estimates)
    equal = {ids[i] for i in near_best([estimates[w] for w in ids], PARAMS.tie_ratio, PARAMS.best_fraction)}
    picked = pruned.choices[Role.PREFILL]
    assert picked.worker.worker_id in equal
    assert picked.estimate_ttft_ms == estimates[picked.worker.worker_id]
    # the best is never missed: the pruned pick is within tie_ratio of the full scan's best
    assert picked.estimate_ttft_ms <= min(estimates.values()) * (1 + PARAMS.tie_ratio)


def decide_candidates(fleet: FleetView, hits: dict[str, int], role: Role, request: ScheduleRequest):
    """The eligible workers of the role, each with the request's cache hit (what a full scan scores)."""
    with_hits = [dataclasses.replace(v, hit_blocks=hits.get(v.worker_id, 0)) for v in fleet.workers(role)]
    return eligible(with_hits, role, request.seq_len)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    size=st.integers(1, 120),
    seq_len=st.integers(0, 8_000),
    strategy=st.sampled_from([StrategyName.LOWEST_CONCURRENCY, StrategyName.LEAST_KV_USED]),
    role=st.sampled_from([Role.PREFILL, Role.DECODE]),
)
def test_pruned_lowest_load_and_least_kv_equal_the_full_scan(
    seed: int, size: int, seq_len: int, strategy: StrategyName, role: Role
) -> None:
    fleet, hits, _ = random_fleet(seed, size, role)
    request = ScheduleRequest(request_id=1, seq_len=seq_len)
    full, pruned = both(fleet, hits, strategy, role, request)
    assert (full.success, full.code, full.message) == (pruned.success, pruned.code, pruned.message)
    if full.success:
        assert full.choices[role] == pruned.choices[role]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(1, 80))
def test_pruned_round_robin_and_random_pick_eligible_workers(seed: int, size: int) -> None:
    fleet, hits, _ = random_fleet(seed, size, Role.DECODE)
    request = ScheduleRequest(request_id=1, seq_len=500)
    eligible_ids = {v.worker_id for v in decide_candidates(fleet, hits, Role.DECODE, request)}
    for strategy in (StrategyName.ROUND_ROBIN, StrategyName.RANDOM, StrategyName.WEIGHTED_CACHE):
        full, pruned = both(fleet, hits, strategy, Role.DECODE, request)
        assert full.success == pruned.success == bool(eligible_ids)
        if pruned.success:
            assert pruned.choices[Role.DECODE].worker.worker_id in eligible_ids


def weighted_cache_picks(
    fleet: FleetView, memory: ChoiceMemory, draws: int, local_load: dict[str, tuple[int, int]]
) -> Counter[str]:
    """How often each decode worker is chosen by the pruned WEIGHTED_CACHE over ``draws`` decisions."""
    return Counter(
        decide(
            ScheduleRequest(request_id=i + 1, seq_len=10),
            fleet,
            options(StrategyName.WEIGHTED_CACHE, Role.DECODE, prune_above=0),
            memory,
            local_load=local_load,
        )
        .choices[Role.DECODE]
        .worker.worker_id
        for i in range(draws)
    )


@pytest.mark.parametrize(
    ("kv_used", "full", "in_transit"),
    [
        ([0, 300, 600, 1_000, 2_500, 4_000], 0, {}),
        ([0, 2_000, 5_000, 5_100, 5_200, 9_000, 9_500, 12_000, 12_500, 13_000, 30_000], 0, {}),  # most mass is tiny
        ([0, 0, 100, 20_000, 20_300, 21_000, 60_000], 3, {}),  # the least used are at their limit: the next share
        # this router's reservations on their way: the least used hold more than their band says
        ([0, 0, 0, 100, 900, 1_500, 3_000, 3_100], 0, {0: 2_000, 1: 4_000, 2: 500, 3: 2_000, 6: 20_000}),
        ([0, 0, 100, 20_000, 20_300, 21_000, 60_000], 3, {3: 3_000, 5: 50_000}),
    ],
)
def test_pruned_weighted_cache_samples_the_full_scans_distribution(
    kv_used: list[int], full: int, in_transit: dict[int, int]
) -> None:
    """Rejection sampling keeps WEIGHTED_CACHE's probabilities: compare frequencies with the weights of the
    eligible workers (the first ``full`` are at their concurrency limit), counting what this router has in transit
    (``in_transit``: worker index -> tokens)."""
    from flexlb.routing import weighted_cache_weights

    rng = random.Random(5)
    hashes = {}
    for i, used in enumerate(kv_used):
        limit = {"max_concurrency": "1", "running": "1"} if i < full else {"max_concurrency": "0"}
        h = worker_hash(i, Role.DECODE, rng) | {"alive": "1", "available": "1"} | limit
        hashes[f"{h['ip']}:8000"] = h | {"kv_used": str(used), "pending_tokens": "0", "kv_total": "0"}
    fleet = fleet_of(hashes)
    ids = list(hashes)
    local_load = {ids[i]: (1, tokens) for i, tokens in in_transit.items()}
    workers = [
        dataclasses.replace(v, pending_tokens=v.pending_tokens + local_load.get(v.worker_id, (0, 0))[1])
        for v in fleet.workers(Role.DECODE)
        if not v.spec.max_concurrency
    ]
    assert len(workers) == len(kv_used) - full
    expected = dict(zip([v.worker_id for v in workers], weighted_cache_weights(workers, 0.001), strict=True))
    memory = ChoiceMemory(rng=random.Random(11))
    draws = 20_000
    picks = weighted_cache_picks(fleet, memory, draws, local_load)
    assert set(picks) <= set(expected)
    for wid, p in expected.items():
        assert abs(picks[wid] / draws - p) < 0.015, (wid, picks[wid] / draws, p)


def test_roles_are_chosen_in_order_within_the_first_choices_group() -> None:
    rng = random.Random(2)
    hashes = {}
    for i, (role, group, kv_used) in enumerate(
        [(Role.DECODE, "a", 9_000), (Role.DECODE, "b", 0), (Role.PREFILL, "a", 0), (Role.PREFILL, "b", 0)]
    ):
        h = worker_hash(i, role, rng) | {"alive": "1", "available": "1", "max_concurrency": "0", "kv_total": "10000"}
        hashes[f"{h['ip']}:8000"] = h | {"group": group, "kv_used": str(kv_used), "pending_tokens": "0"}
    fleet = fleet_of(hashes)
    opts = DecisionOptions(
        strategies={Role.DECODE: StrategyName.LEAST_KV_USED, Role.PREFILL: StrategyName.SHORTEST_TTFT},
        params=PARAMS,
        roles=(Role.PREFILL, Role.DECODE),
    )
    result = decide(ScheduleRequest(request_id=1, seq_len=100), fleet, opts, ChoiceMemory())
    assert result.success
    assert result.choices[Role.DECODE].worker.spec.group == "b"
    assert result.choices[Role.PREFILL].worker.spec.group == "b"


def test_no_worker_refusal_names_the_role() -> None:
    result = decide(
        ScheduleRequest(request_id=1, seq_len=1),
        fleet_of({}),
        options(StrategyName.RANDOM, Role.DECODE, 32),
        ChoiceMemory(),
    )
    assert not result.success and result.code == ErrorCode.NO_DECODE_WORKER
    assert "no DECODE worker registered" in result.message


def test_a_worker_whose_last_status_is_too_old_is_not_chosen() -> None:
    """Issue 10: with no master polling, a killed worker's status still says alive; past the bound it is out."""
    rng = random.Random(3)
    hashes = {}
    for i in range(40):
        h = worker_hash(i, Role.PREFILL, rng)
        h |= {"alive": "1", "available": "1", "max_concurrency": "0", "kv_total": "0"}
        h["updated_ms"] = str(100_000 if i == 7 else 10_000)  # only worker 7 was polled in the last 5 s
        hashes[f"{h['ip']}:8000"] = h
    fleet = fleet_of(hashes)
    request = ScheduleRequest(request_id=1, seq_len=100)
    for strategy in StrategyName:
        for prune_above in (0, 64):  # the pruned walks and the full scan
            opts = dataclasses.replace(options(strategy, Role.PREFILL, prune_above), status_max_age_ms=5_000)
            memory = ChoiceMemory(rng=random.Random(1))
            result = decide(request, fleet, opts, memory, redis_now_ms=101_000)
            assert result.success, (strategy, result.message)
            assert result.choices[Role.PREFILL].worker.worker_id == "10.1.0.7:8000", strategy
            stale = decide(request, fleet, opts, memory, redis_now_ms=200_000)
            assert not stale.success and stale.code == ErrorCode.NO_PREFILL_WORKER
            assert "status of all 40 alive PREFILL workers is too old" in stale.message
            unbounded = dataclasses.replace(opts, status_max_age_ms=0)
            assert decide(request, fleet, unbounded, memory, redis_now_ms=200_000).success


def _full_fleet(kv_total: int = 10_000) -> FleetView:
    """Two PDFUSION workers at their concurrency limit; the second has the shorter queue."""
    hashes = {}
    for i, queued in ((1, 40_000), (2, 5_000)):
        hashes[f"10.2.0.{i}:8000"] = {
            "ip": f"10.2.0.{i}", "http_port": "8000", "role": "PDFUSION", "alive": "1", "available": "1",
            "max_concurrency": "4", "running": "4", "waiting": "3", "queued_tokens": str(queued),
            "kv_used": "0", "kv_total": str(kv_total), "prefill_tokens_per_ms": "10",
        }  # fmt: skip
    return fleet_of(hashes)


def test_admission_by_wait_sends_to_a_worker_at_its_limit_when_its_estimate_is_within_the_bound() -> None:
    """Issue 11: a worker at its running limit still queues; what matters is the wait."""
    fleet = _full_fleet()
    opts = options(StrategyName.SHORTEST_TTFT, Role.PDFUSION, 32)
    strict = decide(ScheduleRequest(request_id=1, seq_len=100), fleet, opts, ChoiceMemory())
    assert not strict.success and "at their concurrency or KV limit" in strict.message
    for prune_above in (0, 32):
        opts = options(StrategyName.SHORTEST_TTFT, Role.PDFUSION, prune_above)
        soft = ScheduleRequest(request_id=1, seq_len=100, ttft_bound_ms=5_000)
        result = decide(soft, fleet, opts, ChoiceMemory())
        assert result.success and result.choices[Role.PDFUSION].worker.worker_id == "10.2.0.2:8000"
        tight = decide(dataclasses.replace(soft, ttft_bound_ms=100), fleet, opts, ChoiceMemory())
        assert not tight.success and tight.code == ErrorCode.NO_PDFUSION_WORKER  # retryable: the queue holds it
        assert "estimated TTFT of 530 ms, above the admission bound of 100 ms" in tight.message


def test_a_request_larger_than_every_workers_kv_is_refused_as_context_length_exceeded() -> None:
    fleet = _full_fleet(kv_total=1_000)
    opts = options(StrategyName.SHORTEST_TTFT, Role.PDFUSION, 32)
    for bound in (0, 5_000):
        for request in (
            ScheduleRequest(request_id=1, seq_len=1_200, ttft_bound_ms=bound),
            ScheduleRequest(request_id=1, seq_len=800, output_tokens=300, ttft_bound_ms=bound),
        ):
            result = decide(request, fleet, opts, ChoiceMemory())
            assert not result.success and result.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED, result.message
            assert not result.code.retryable
            assert "the largest of the 2 alive PDFUSION workers holds 1000" in result.message
    ok = decide(ScheduleRequest(request_id=1, seq_len=900, ttft_bound_ms=5_000), fleet, opts, ChoiceMemory())
    assert ok.success  # fits the whole KV: a worker queues it until its KV frees


def test_an_explained_decision_names_its_best_candidates_and_the_rule_that_chose() -> None:
    fleet = _full_fleet()
    for prune_above in (0, 32):
        opts = options(StrategyName.SHORTEST_TTFT, Role.PDFUSION, prune_above)
        request = ScheduleRequest(request_id=1, seq_len=100, ttft_bound_ms=5_000, explain=True)
        result = decide(request, fleet, opts, ChoiceMemory())
        why = result.choices[Role.PDFUSION].explanation
        assert why is not None and why["chosen"] == "10.2.0.2:8000" and why["eligible"] == 2
        assert why["reason"] == "the shortest estimated TTFT"
        assert [c["worker"] for c in why["candidates"]] == ["10.2.0.2:8000", "10.2.0.1:8000"]
        assert why["candidates"][0]["estimate_ttft_ms"] == 530.0 and why["candidates"][1]["queued_tokens"] == 40_000
    plain = decide(ScheduleRequest(request_id=1, seq_len=100, ttft_bound_ms=5_000), fleet, opts, ChoiceMemory())
    assert plain.choices[Role.PDFUSION].explanation is None  # only when asked: it scans every eligible worker


class CountingFleet(FleetView):
    """A fleet view that counts the workers drawn from its orders (the pruned samplers' proposals)."""

    draws = 0

    def nth(self, role: Role, order: str, index: int):  # type: ignore[no-untyped-def]
        self.draws += 1
        return super().nth(role, order, index)


def test_weighted_cache_proposes_workers_in_transit_by_their_own_weight() -> None:
    """A busy router's least used workers are those it just chose, with reservations still on their way: their band
    overstates them, and proposing from it was rejected until the sampler fell back to its scan. Proposed apart by
    their own weight once a few plain proposals failed, a decision needs no more draws from the bands."""
    hashes = {}
    for i in range(200):
        h = worker_hash(i, Role.DECODE, random.Random(i)) | {"alive": "1", "available": "1", "max_concurrency": "0"}
        hashes[f"{h['ip']}:8000"] = h | {"kv_used": str(20_000 * (i % 7)), "pending_tokens": "0", "kv_total": "0"}
    fleet = CountingFleet(order_keys(PARAMS))
    fleet.replace_all(hashes)
    least_used = [wid for i, wid in enumerate(hashes) if i % 7 == 0]  # every worker within the bands' horizon
    local_load = {wid: (1, 2_000 * (1 + j % 3)) for j, wid in enumerate(least_used)}
    memory = ChoiceMemory(rng=random.Random(1))
    chosen = weighted_cache_picks(fleet, memory, 500, local_load)
    # a few plain proposals, then the ones in transit by their own weight: was ~11 per decision, then the scan
    assert fleet.draws <= PLAIN_BAND_TRIES * 500
    assert set(chosen) <= set(least_used)
    light = [wid for j, wid in enumerate(least_used) if j % 3 == 0]  # 2,000 tokens in transit, not 4,000 or 6,000
    assert sum(chosen[w] for w in light) > 0.6 * 500  # exp(-2) against exp(-4), exp(-6): ~86% of the weight
