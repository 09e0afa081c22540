"""Routing decisions: pure functions over the fleet view (no I/O)."""

from flexlb.routing.decide import DecisionOptions, decide, order_keys, why_none
from flexlb.routing.eligibility import eligible, is_eligible
from flexlb.routing.strategies import (
    STRATEGIES,
    ChoiceMemory,
    StrategyFn,
    StrategyName,
    StrategyParams,
    choose,
    near_best,
    weighted_cache_weights,
)
from flexlb.routing.ttft import TtftModel, estimate_ttft_ms, prefill_rate, reserve_tokens

__all__ = [
    "STRATEGIES",
    "ChoiceMemory",
    "DecisionOptions",
    "StrategyFn",
    "StrategyName",
    "StrategyParams",
    "TtftModel",
    "choose",
    "decide",
    "eligible",
    "estimate_ttft_ms",
    "is_eligible",
    "near_best",
    "order_keys",
    "prefill_rate",
    "reserve_tokens",
    "weighted_cache_weights",
    "why_none",
]
