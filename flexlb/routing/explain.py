"""Why a decision chose what it chose: its best candidates by estimated TTFT, with what the estimate is made of, and
the rule that picked among them (pure; only computed when asked: a debug request, or the decision log at DEBUG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flexlb.domain import Role, WorkerView
from flexlb.routing.strategies import PREFILL_ROLES, StrategyName, StrategyParams, near_best
from flexlb.routing.ttft import estimate_ttft_ms

TOP_CANDIDATES = 5


def explain(
    role: Role,
    strategy: StrategyName,
    chosen: WorkerView,
    candidates: Sequence[WorkerView],
    seq_len: int,
    params: StrategyParams,
) -> dict[str, Any]:
    """The chosen worker, the rule that chose it, and the best ``TOP_CANDIDATES`` eligible workers (the chosen one
    always among them) with their estimated TTFT, cached prefix and load."""
    estimates = [estimate_ttft_ms(v, seq_len, params.ttft) for v in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (estimates[i], candidates[i].worker_id))
    top = order[:TOP_CANDIDATES]
    chosen_at = next((i for i, v in enumerate(candidates) if v.worker_id == chosen.worker_id), None)
    if chosen_at is not None and chosen_at not in top:
        top.append(chosen_at)
    return {
        "role": role.value,
        "strategy": strategy.value,
        "chosen": chosen.worker_id,
        "reason": _reason(strategy, role, chosen_at, estimates, candidates, params),
        "eligible": len(candidates),
        "candidates": [_candidate(candidates[i], estimates[i]) for i in top],
    }


def _candidate(view: WorkerView, estimate: float) -> dict[str, Any]:
    status = view.status
    return {
        "worker": view.worker_id,
        "estimate_ttft_ms": round(estimate, 3),
        "hit_tokens": view.hit_tokens,
        "running": status.running,
        "waiting": status.waiting,
        "pending": view.pending_count,
        "queued_tokens": status.queued_tokens + view.pending_tokens,
        "kv_free": view.kv_free if status.kv_total > 0 else None,
    }


def _reason(
    strategy: StrategyName,
    role: Role,
    chosen_at: int | None,
    estimates: Sequence[float],
    candidates: Sequence[WorkerView],
    params: StrategyParams,
) -> str:
    if strategy is not StrategyName.SHORTEST_TTFT or role not in PREFILL_ROLES or chosen_at is None:
        return f"{strategy.value} among the {len(candidates)} eligible {role.value} workers"
    best = min(estimates)
    equal = near_best(estimates, params.tie_ratio, params.best_fraction)
    if len(equal) <= 1:
        return "the shortest estimated TTFT"
    chosen = candidates[chosen_at]
    longest = max(candidates[i].hit_tokens for i in equal)
    rule = (
        f"the longest cached prefix ({chosen.hit_tokens} tokens)"
        if chosen.hit_tokens == longest and longest > 0
        else "the least recently chosen"
    )
    return (
        f"{len(equal)} workers within the near-tie band of the best estimate ({best:.1f} ms): {rule}"
        f", {estimates[chosen_at]:.1f} ms"
    )
