"""Load-balancing strategies: pure functions from the candidate workers (as the fleet view sees them) to one choice.

The only mutable input is a per-router ``ChoiceMemory`` (random source, round-robin counters, when each worker was
last chosen), so a strategy's result depends only on its arguments. Candidates are sorted by ``worker_id`` before a
strategy sees them, so results do not depend on input order (except through the injected random source).
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flexlb.domain import Choice, Role, ScheduleRequest, WorkerView
from flexlb.routing.ttft import TtftModel, estimate_ttft_ms, reserve_tokens


class StrategyName(enum.StrEnum):
    RANDOM = "RANDOM"
    ROUND_ROBIN = "ROUND_ROBIN"
    LOWEST_CONCURRENCY = "LOWEST_CONCURRENCY"
    SHORTEST_TTFT = "SHORTEST_TTFT"
    WEIGHTED_CACHE = "WEIGHTED_CACHE"
    LEAST_KV_USED = "LEAST_KV_USED"


@dataclass
class ChoiceMemory:
    """One router's memory of its past choices; the only state the strategies read and write."""

    rng: random.Random = field(default_factory=random.Random)
    round_robin: dict[Role, int] = field(default_factory=dict)
    last_chosen: dict[str, int] = field(default_factory=dict)  # worker_id -> sequence of its last choice; 0 = never
    sequence: int = 0

    def note_chosen(self, worker_id: str) -> None:
        self.sequence += 1
        self.last_chosen[worker_id] = self.sequence

    def recency(self, view: WorkerView) -> int:
        """Sequence number of the worker's last choice; smaller = longer ago (0 = never)."""
        return self.last_chosen.get(view.worker_id, 0)


@dataclass(frozen=True, slots=True)
class StrategyParams:
    ttft: TtftModel = field(default_factory=TtftModel)
    weighted_cache_decay: float = 0.001
    tie_ratio: float = 0.1  # near-tie band: within max(tie_ratio * best, 0.5 * stdev) of the best
    best_fraction: float = 0.3  # only the best 30% (at least 1) are considered for the tie band

    def __post_init__(self) -> None:
        if not self.weighted_cache_decay >= 0:
            raise ValueError(f"weighted_cache_decay must be >= 0, got {self.weighted_cache_decay}")
        if not self.tie_ratio >= 0:
            raise ValueError(f"tie_ratio must be >= 0, got {self.tie_ratio}")
        if not 0 < self.best_fraction <= 1:
            raise ValueError(f"best_fraction must be in (0, 1], got {self.best_fraction}")


# A strategy gets candidates sorted by worker_id and never empty.
StrategyFn = Callable[[Role, Sequence[WorkerView], ScheduleRequest, ChoiceMemory, StrategyParams], WorkerView]

PREFILL_ROLES = frozenset({Role.PREFILL, Role.PDFUSION})


def choose_random(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    return memory.rng.choice(candidates)


def choose_round_robin(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    counter = memory.round_robin.get(role, 0)
    memory.round_robin[role] = counter + 1
    return candidates[counter % len(candidates)]


def choose_lowest_concurrency(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    # Least recently chosen breaks ties so a burst (pending counts not yet refreshed) spreads.
    return min(candidates, key=lambda v: (v.load, memory.recency(v), v.worker_id))


def near_best(estimates: Sequence[float], tie_ratio: float, best_fraction: float) -> list[int]:
    """Indices (into ``estimates``) of the values treated as equal to the best.

    Keep the best ``ceil(best_fraction * n)`` (at least 1), widened to every value within ``tie_ratio`` of the best
    so that equally good workers are never cut off by the fraction alone (with 3 equal workers the 30% cut would
    otherwise keep one, and a burst could not spread). Among those kept, values within
    ``max(tie_ratio * best, 0.5 * population stdev of the kept)`` of the best are equal.
    """
    order = sorted(range(len(estimates)), key=lambda i: estimates[i])
    best = estimates[order[0]]
    relative_band = tie_ratio * best
    within_relative = sum(1 for e in estimates if e <= best + relative_band)
    keep = max(1, math.ceil(best_fraction * len(estimates)), within_relative)
    kept = order[:keep]
    stdev = _pstdev([estimates[i] for i in kept])
    band = max(relative_band, 0.5 * stdev)
    return [i for i in kept if estimates[i] <= best + band]


def _pstdev(values: Sequence[float]) -> float:
    """Population standard deviation in floats (statistics.pstdev computes exact fractions: ~40x slower, and it
    was the largest single cost of a decision)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def choose_shortest_ttft(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    estimates = [estimate_ttft_ms(v, request.seq_len, params.ttft) for v in candidates]
    equal = near_best(estimates, params.tie_ratio, params.best_fraction)
    best = min(equal, key=lambda i: ttft_tiebreak(candidates[i], estimates[i], memory))
    return candidates[best]


def ttft_tiebreak(view: WorkerView, estimate: float, memory: ChoiceMemory) -> tuple[float, int, float, str]:
    """Among workers of near-equal estimated TTFT: the longest cached prefix first (the same wait costs the fleet
    less compute, and a burst of one prefix stays where it is cached or in flight); then least recently chosen (a
    burst with no hit anywhere spreads over the equal workers before its reservations show in the view); then the
    better estimate; then worker_id for determinism."""
    return (-view.hit_tokens, memory.recency(view), estimate, view.worker_id)


def weighted_cache_weights(views: Sequence[WorkerView], decay: float) -> list[float]:
    """Choice probabilities of WEIGHTED_CACHE, proportional to ``exp(-decay * (used - mean used))``.

    ``used`` is the KV in use plus this fleet's pending reservations. The largest exponent is subtracted before
    ``exp`` so that large KV differences cannot overflow; that only rescales the weights.
    """
    if not views:
        return []
    used = [v.status.kv_used + v.pending_tokens for v in views]
    mean = statistics.fmean(used)
    exponents = [-decay * (u - mean) for u in used]
    top = max(exponents)
    weights = [math.exp(e - top) for e in exponents]
    total = math.fsum(weights)
    return [w / total for w in weights]


def choose_weighted_cache(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    weights = weighted_cache_weights(candidates, params.weighted_cache_decay)
    cumulative = list(itertools.accumulate(weights))
    point = memory.rng.random() * cumulative[-1]
    # min() guards against rounding leaving the point at or past the last edge.
    return candidates[min(bisect.bisect_right(cumulative, point), len(candidates) - 1)]


def choose_least_kv_used(
    role: Role, candidates: Sequence[WorkerView], request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> WorkerView:
    return min(candidates, key=lambda v: (-v.kv_free, v.load, memory.recency(v), v.worker_id))


STRATEGIES: dict[StrategyName, StrategyFn] = {
    StrategyName.RANDOM: choose_random,
    StrategyName.ROUND_ROBIN: choose_round_robin,
    StrategyName.LOWEST_CONCURRENCY: choose_lowest_concurrency,
    StrategyName.SHORTEST_TTFT: choose_shortest_ttft,
    StrategyName.WEIGHTED_CACHE: choose_weighted_cache,
    StrategyName.LEAST_KV_USED: choose_least_kv_used,
}


def choose(
    name: StrategyName,
    role: Role,
    candidates: Sequence[WorkerView],
    request: ScheduleRequest,
    memory: ChoiceMemory,
    params: StrategyParams,
) -> Choice | None:
    """Pick one of ``candidates`` for ``role`` with strategy ``name``; None when there are none.

    Records the pick in ``memory``. The estimate is filled for prefill-type roles only (it is the TTFT the request
    will see); the reservation size comes from ``reserve_tokens``.
    """
    view = pick(name, role, candidates, request, memory, params)
    return None if view is None else make_choice(role, view, request, memory, params)


def pick(
    name: StrategyName,
    role: Role,
    candidates: Sequence[WorkerView],
    request: ScheduleRequest,
    memory: ChoiceMemory,
    params: StrategyParams,
) -> WorkerView | None:
    """The worker strategy ``name`` picks of ``candidates`` (in worker_id order, as every strategy expects), not yet
    recorded in ``memory``; None when there are none."""
    if not candidates:
        return None
    return STRATEGIES[name](role, sorted(candidates, key=lambda v: v.worker_id), request, memory, params)


def make_choice(
    role: Role, view: WorkerView, request: ScheduleRequest, memory: ChoiceMemory, params: StrategyParams
) -> Choice:
    """The Choice of ``view`` for ``role``, recorded in ``memory``."""
    memory.note_chosen(view.worker_id)
    estimate = estimate_ttft_ms(view, request.seq_len, params.ttft) if role in PREFILL_ROLES else 0.0
    return Choice(worker=view, estimate_ttft_ms=estimate, reserve_tokens=reserve_tokens(role, view, request.seq_len))
