"""The decision for one request, as a pure function: ``decide(request, fleet, options, memory) -> ScheduleResult``.

Roles are chosen in ROLE_ORDER (a later role stays in the group of the earlier choice, as the original), each with
its role's strategy, over the workers the fleet view holds, adjusted by the request's own cache hits and by load
only this router knows (reservations made while Redis was down).

Roles with more than ``prune_above`` workers are not scored in full: each strategy looks only at the workers that
can win, found from orderings the view keeps (see ORDERS), so the work grows with the few best workers and the
request's cache holders, not with the fleet:

- SHORTEST_TTFT: the cache holders, then the others by ascending queue time and by descending prefill rate at once
  (a threshold algorithm), until no worker not seen yet can be within the near-tie band of the best so far. The pick
  is the least recently chosen of the workers within ``tie_ratio`` of the best (at most TIE_CANDIDATES of them beyond
  the best): the same best as a full scan, and a pick the full scan's near-tie rule counts as equal to it.
- LOWEST_CONCURRENCY, LEAST_KV_USED: by ascending load / KV in use, until the key passes the best; exactly the
  full scan's pick.
- RANDOM, WEIGHTED_CACHE: rejection sampling from uniform draws of the role's workers (a draw is kept when eligible,
  and for WEIGHTED_CACHE with probability weight / largest weight), a full scan after 64 misses: the same
  distribution as a full scan.
- ROUND_ROBIN: from the counter's position in the role's id order, the next eligible worker.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flexlb.domain import (
    NO_WORKER_CODE,
    ROLE_ORDER,
    Choice,
    ErrorCode,
    Role,
    ScheduleRequest,
    ScheduleResult,
    WorkerView,
)
from flexlb.routing.eligibility import is_eligible
from flexlb.routing.explain import explain
from flexlb.routing.strategies import (
    PREFILL_ROLES,
    ChoiceMemory,
    StrategyName,
    StrategyParams,
    choose,
    make_choice,
    pick,
    ttft_tiebreak,
)
from flexlb.routing.ttft import TtftModel, estimate_ttft_ms, prefill_rate

# The orderings the view keeps per role (FleetView(orders=order_keys(params))).
BY_QUEUE = "queue_ms"
BY_LOAD = "load"
BY_KV_USED = "kv_used"  # KV in use plus pending tokens: WEIGHTED_CACHE's weight, ascending
BY_KV_FREE = "kv_free_desc"
BY_RATE = "rate_desc"
SAMPLE_TRIES = 64
# SHORTEST_TTFT: once no unseen worker can beat the best, at most this many workers of the near-tie band are
# collected for the recency tie-break (a full scan takes them all; this keeps the work bounded in a large, even fleet)
TIE_CANDIDATES = 16
# WEIGHTED_CACHE: workers whose weight is below this fraction of the largest are left out of the pruned draw
NEGLIGIBLE_WEIGHT = 1e-6
BANDS = math.ceil(-math.log(NEGLIGIBLE_WEIGHT))  # WEIGHTED_CACHE's proposal bands, each a factor e of weight
# proposals by band: an eligible one is accepted with probability >= 1/e, so 16 all fail 1 time in 1,500; when the
# least used are at their limits, the scan of the eligible ones near them (cheaper than more proposals) decides
BAND_TRIES = 16
REDRAWS = 8  # draws from a band landing on workers proposed apart before the band's others are listed
PLAIN_BAND_TRIES = 4  # WEIGHTED_CACHE's proposals before this router's reservations in transit are proposed apart


def queue_ms(view: WorkerView, model: TtftModel) -> float:
    """The part of the TTFT estimate that does not depend on the request (see routing/ttft.py)."""
    status = view.status
    rate = prefill_rate(view, model)
    return (status.queued_tokens + view.pending_tokens) / rate + (
        status.waiting + view.pending_count
    ) * model.overhead_ms


def order_keys(params: StrategyParams) -> dict[str, Callable[[WorkerView], float]]:
    model = params.ttft
    return {
        BY_QUEUE: lambda v: queue_ms(v, model),
        BY_LOAD: lambda v: float(v.load),
        BY_KV_USED: lambda v: float(v.status.kv_used + v.pending_tokens),
        BY_KV_FREE: lambda v: -float(v.kv_free),
        BY_RATE: lambda v: -prefill_rate(v, model),
    }


# The orderings each strategy's pruned scan reads.
STRATEGY_ORDERS: dict[StrategyName, tuple[str, ...]] = {
    StrategyName.SHORTEST_TTFT: (BY_QUEUE, BY_RATE),
    StrategyName.LOWEST_CONCURRENCY: (BY_LOAD,),
    StrategyName.LEAST_KV_USED: (BY_KV_FREE,),
    StrategyName.WEIGHTED_CACHE: (BY_KV_USED,),
    StrategyName.RANDOM: (),
    StrategyName.ROUND_ROBIN: (),
}


def orders_per_role(strategies: Mapping[Role, StrategyName]) -> dict[Role, tuple[str, ...]]:
    """The orderings a fleet view must keep for each role, given the roles' strategies."""
    return {role: STRATEGY_ORDERS[name] for role, name in strategies.items()}


class Fleet(Protocol):
    """What a decision reads: flexlb.state.view.FleetView."""

    def get(self, worker_id: str) -> WorkerView | None: ...
    def workers(self, role: Role) -> list[WorkerView]: ...
    def ids(self, role: Role) -> list[str]: ...
    def count(self, role: Role) -> int: ...
    def ordered(self, role: Role, order: str) -> Iterator[tuple[float, WorkerView]]: ...
    def count_up_to(self, role: Role, order: str, key: float) -> int: ...
    def nth(self, role: Role, order: str, index: int) -> WorkerView: ...


@dataclass(frozen=True, slots=True)
class DecisionOptions:
    strategies: dict[Role, StrategyName]
    params: StrategyParams = field(default_factory=StrategyParams)
    roles: tuple[Role, ...] = ()  # roles every request needs; () = the roles that have registered workers
    prune_above: int = 32  # roles with more workers than this are pruned, not scanned in full
    status_max_age_ms: int = 0  # a worker whose last status write is older is not chosen; 0: no bound


def decide(
    request: ScheduleRequest,
    fleet: Fleet,
    options: DecisionOptions,
    memory: ChoiceMemory,
    *,
    hits: Mapping[str, int] | None = None,
    local_load: Mapping[str, tuple[int, int]] | None = None,
    service: str = "",
    redis_now_ms: int | None = None,
) -> ScheduleResult:
    """One worker per role for ``request``, or a refusal naming the role and why none could take it.

    ``hits``: worker id -> cached prefix of the request's blocks, in blocks (the inverted index's lookup).
    ``local_load``: worker id -> (count, tokens) of reservations only this router knows, added to the pending load.
    ``redis_now_ms``: Redis' clock now (workers' ``updated_ms`` are on it), for ``options.status_max_age_ms``.
    Records the picks in ``memory`` (recency, round-robin counters); nothing else changes.
    """
    roles = options.roles or tuple(r for r in ROLE_ORDER if fleet.count(r))
    if not roles:
        return ScheduleResult(
            success=False,
            code=ErrorCode.NO_AVAILABLE_WORKER,
            message=f"NO_AVAILABLE_WORKER: no workers registered for service {service!r}",
        )
    fresh_after_ms = 0
    if options.status_max_age_ms and redis_now_ms is not None:
        fresh_after_ms = redis_now_ms - options.status_max_age_ms
    scan = _Scan(request, fleet, memory, options.params, hits or {}, local_load or {}, fresh_after_ms)
    choices: dict[Role, Choice] = {}
    for role in (r for r in ROLE_ORDER if r in roles):
        strategy = options.strategies[role]
        if fleet.count(role) <= options.prune_above:
            choice = choose(strategy, role, scan.all_eligible(role), request, memory, options.params)
        else:
            view = scan.pick(strategy, role)
            choice = None if view is None else make_choice(role, view, request, memory, options.params)
        if choice is None:
            too_large = never_fits(role, fleet.workers(role), request)
            if too_large:
                code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
                return ScheduleResult(success=False, code=code, message=f"{code.name}: {too_large}")
            code = NO_WORKER_CODE[role]
            registered = fleet.workers(role)
            why = why_none(role, registered, scan.group, request.exclude_workers, fresh_after_ms)
            busy = any(
                v.status.alive and v.status.updated_ms >= fresh_after_ms and v.worker_id not in request.exclude_workers
                for v in registered
            )
            return ScheduleResult(success=False, code=code, message=f"{code.name}: {why}", busy=busy)
        bound = request.ttft_bound_ms
        if bound and role in PREFILL_ROLES and choice.estimate_ttft_ms > bound:
            code = NO_WORKER_CODE[role]
            return ScheduleResult(
                success=False,
                busy=True,
                code=code,
                message=f"{code.name}: the best {role.value} worker ({choice.worker.worker_id}) has an estimated TTFT "
                f"of {choice.estimate_ttft_ms:.0f} ms, above the admission bound of {bound:.0f} ms",
            )
        if request.explain:
            eligible = scan.all_eligible(role)
            why = explain(role, strategy, choice.worker, eligible, request.seq_len, options.params)
            choice = dataclasses.replace(choice, explanation=why)
        choices[role] = choice
        scan.group = scan.group or choice.worker.spec.group
    return ScheduleResult(success=True, choices=choices)


class _Scan:
    """The candidates of one decision: each worker as the request sees it, and the pruned strategies."""

    def __init__(
        self,
        request: ScheduleRequest,
        fleet: Fleet,
        memory: ChoiceMemory,
        params: StrategyParams,
        hits: Mapping[str, int],
        local_load: Mapping[str, tuple[int, int]],
        fresh_after_ms: int = 0,
    ) -> None:
        self.request, self.fleet, self.memory, self.params = request, fleet, memory, params
        self.hits, self.local_load = hits, local_load
        self.fresh_after_ms = fresh_after_ms
        self.group = ""
        self._excluded = request.exclude_workers
        self._soft = request.ttft_bound_ms > 0

    def as_seen(self, view: WorkerView, role: Role) -> WorkerView | None:
        """The worker with the request's cache hit and this router's own load, if it may take the request
        (flexlb.routing.eligibility's rule; this runs for every worker a decision looks at)."""
        spec = view.spec
        wid = spec.worker_id
        if (self._excluded and wid in self._excluded) or (self.group and spec.group != self.group):
            return None
        status = view.status
        if not (status.alive and status.available) or spec.role is not role or status.updated_ms < self.fresh_after_ms:
            return None
        hit = self.hits.get(wid, 0) if self.hits and role in PREFILL_ROLES else 0
        extra = self.local_load.get(wid) if self.local_load else None
        if self._soft:  # admission by wait: a worker at its limits queues the request; only its whole KV must fit
            if 0 < status.kv_total < kv_needed(role, self.request):
                return None
            if hit or extra:
                count, tokens = extra or (0, 0)
                view = WorkerView(spec, status, view.pending_count + count, view.pending_tokens + tokens, hit)
            return view
        if hit or extra:
            count, tokens = extra or (0, 0)
            view = WorkerView(spec, status, view.pending_count + count, view.pending_tokens + tokens, hit)
            return view if is_eligible(view, role, self.request.seq_len) else None
        if spec.max_concurrency and status.running + status.waiting + view.pending_count >= spec.max_concurrency:
            return None
        # no hit: the reservation holds the whole prompt (routing/ttft.py reserve_tokens)
        if status.kv_total > 0 and status.kv_total - status.kv_used - view.pending_tokens < self.request.seq_len:
            return None
        return view

    def all_eligible(self, role: Role) -> list[WorkerView]:
        seen = (self.as_seen(v, role) for v in self.fleet.workers(role))
        return [v for v in seen if v is not None]

    def pick(self, strategy: StrategyName, role: Role) -> WorkerView | None:
        if strategy is StrategyName.SHORTEST_TTFT:
            return self._shortest_ttft(role)
        if strategy is StrategyName.LOWEST_CONCURRENCY:
            return self._lowest(role, BY_LOAD, lambda v: float(v.load), lambda v: (self.memory.recency(v), v.worker_id))
        if strategy is StrategyName.LEAST_KV_USED:
            return self._lowest(
                role, BY_KV_FREE, lambda v: -float(v.kv_free), lambda v: (v.load, self.memory.recency(v), v.worker_id)
            )
        if strategy is StrategyName.ROUND_ROBIN:
            return self._round_robin(role)
        return self._sample(strategy, role)

    # ---- the pruned strategies ----

    def _shortest_ttft(self, role: Role) -> WorkerView | None:
        model, seq_len, tie = self.params.ttft, self.request.seq_len, self.params.tie_ratio
        found: dict[str, tuple[float, WorkerView]] = {}
        for wid in self.hits:
            view = self.fleet.get(wid)
            if view is not None and view.spec.role is role and (seen := self.as_seen(view, role)) is not None:
                found[wid] = (estimate_ttft_ms(seen, seq_len, model), seen)
        best = min((e for e, _ in found.values()), default=math.inf)
        # Without a cache hit a worker estimates queue_ms + overhead + prompt / rate: walk the workers by queue time
        # and by rate at once (Fagin's threshold algorithm). No worker not seen yet beats the queue time reached in
        # the one walk plus the prompt at the rate reached in the other, so the walk stops once that bound is past
        # the near-tie band (or past the best, with enough of the band collected for the tie-break).
        prompt = max(seq_len, 1)
        by_queue, by_rate = self.fleet.ordered(role, BY_QUEUE), self.fleet.ordered(role, BY_RATE)
        collected = 0
        for (q, by_q), (neg_rate, by_r) in zip(by_queue, by_rate, strict=False):
            for view in (by_q, by_r):
                if view.worker_id in found or (seen := self.as_seen(view, role)) is None:
                    continue
                estimate = estimate_ttft_ms(seen, seq_len, model)
                found[view.worker_id] = (estimate, seen)
                best = min(best, estimate)
                collected += 1
            bound = q + model.overhead_ms + prompt / -neg_rate
            if bound > best * (1 + tie) or (bound > best and collected >= TIE_CANDIDATES):
                break
        equal = [(e, v) for e, v in found.values() if e <= best * (1 + tie)]
        if not equal:
            return None
        return min(equal, key=lambda ev: ttft_tiebreak(ev[1], ev[0], self.memory))[1]

    def _lowest(
        self, role: Role, order: str, metric: Callable[[WorkerView], float], tiebreak: Callable[[WorkerView], object]
    ) -> WorkerView | None:
        """The eligible worker with the smallest ``metric``, ties by ``tiebreak``; ``order``'s key is a lower
        bound of the metric (this router's own load only adds to it)."""
        best = math.inf
        tied: list[WorkerView] = []
        for key, view in self.fleet.ordered(role, order):
            if key > best:
                break
            if (seen := self.as_seen(view, role)) is None:
                continue
            value = metric(seen)
            if value < best:
                best, tied = value, [seen]
            elif value == best:
                tied.append(seen)
        return min(tied, key=tiebreak) if tied else None

    def _round_robin(self, role: Role) -> WorkerView | None:
        ids = self.fleet.ids(role)
        counter = self.memory.round_robin.get(role, 0)
        self.memory.round_robin[role] = counter + 1
        for step in range(len(ids)):
            view = self.fleet.get(ids[(counter + step) % len(ids)])
            if view is not None and (seen := self.as_seen(view, role)) is not None:
                return seen
        return None

    def _sample(self, strategy: StrategyName, role: Role) -> WorkerView | None:
        """Rejection sampling: exact, as long as every proposal is drawn uniformly from a set holding every worker
        with a weight that is not negligible. WEIGHTED_CACHE proposes from the workers whose KV in use is within
        the horizon where the weight falls below NEGLIGIBLE_WEIGHT of the largest."""
        rng = self.memory.rng
        if strategy is StrategyName.WEIGHTED_CACHE:
            decay = self.params.weighted_cache_decay
            least_used = next(self.fleet.ordered(role, BY_KV_USED))[0]
            # Proposals by band of 1 / decay tokens above the least used, each band drawn by its count times the
            # largest weight in it, so a proposal is accepted with probability >= 1/e: proposing uniformly from the
            # horizon failed SAMPLE_TRIES times, and fell back to the full scan, when most of it had tiny weights.
            width = 1 / decay if decay > 0 else math.inf
            bands = BANDS if decay > 0 else 1
            limits = [least_used + (k + 1) * width for k in range(bands)]
            edges = [self.fleet.count_up_to(role, BY_KV_USED, limit) for limit in limits]
            counts = [e - s for s, e in zip([0, *edges[:-1]], edges, strict=True)]
            if self.local_load and decay > 0:
                # A worker this router has reservations in transit on holds more than its order key says, so its
                # band's largest weight overstates it: a busy router's least used workers are the ones it just
                # chose, and in a mid-sized fleet most proposals of the first band were rejected until the sampler
                # fell back to its scan. After a few plain proposals such workers are proposed apart, each by its
                # own weight, and left out of their band's count (each trial of either kind is exact on its own).
                seen = self._band_draws(role, PLAIN_BAND_TRIES, least_used, edges, counts, {})
                if seen is None:
                    apart = self._in_transit_apart(role, decay, least_used, limits, counts)
                    seen = self._band_draws(role, BAND_TRIES, least_used, edges, counts, apart)
            else:
                seen = self._band_draws(role, BAND_TRIES, least_used, edges, counts, {})
            if seen is not None:
                return seen
            if decay > 0:  # the least used are not eligible (at their limits): the eligible ones near them
                return pick(strategy, role, self._least_used_eligible(role, bands * width), self.request,
                            self.memory, self.params)  # fmt: skip
        else:
            ids = self.fleet.ids(role)
            for _ in range(SAMPLE_TRIES):
                view = self.fleet.get(rng.choice(ids))
                if view is not None and (seen := self.as_seen(view, role)) is not None:
                    return seen
        return pick(strategy, role, self.all_eligible(role), self.request, self.memory, self.params)

    def _band_draws(
        self,
        role: Role,
        tries: int,
        least_used: float,
        edges: Sequence[int],
        counts: Sequence[int],
        apart: Mapping[str, tuple[WorkerView, float]],
    ) -> WorkerView | None:
        """Up to ``tries`` WEIGHTED_CACHE proposals: a band by its count times its largest weight, then one of its
        workers uniformly, accepted by its weight over that largest; or one of ``apart`` by its own weight
        (``counts`` leaves them out of their bands)."""
        rng, decay = self.memory.rng, self.params.weighted_cache_decay
        mass = list(
            itertools.accumulate([*(w for _, w in apart.values()), *(n * math.exp(-k) for k, n in enumerate(counts))])
        )
        if mass[-1] <= 0:
            return None
        views = [v for v, _ in apart.values()]
        for _ in range(tries):
            i = bisect.bisect_right(mass, rng.random() * mass[-1])
            if i < len(views):  # its exact weight: taken as it is, if it may take the request
                if (seen := self.as_seen(views[i], role)) is not None:
                    return seen
                continue
            k = min(i - len(views), len(counts) - 1)
            if counts[k] <= 0:
                continue
            view = self._uniform_in_band(role, edges[k - 1] if k else 0, edges[k], apart)
            if view is None or (seen := self.as_seen(view, role)) is None:
                continue
            used = seen.status.kv_used + seen.pending_tokens - least_used
            if rng.random() < math.exp(k - decay * used):  # its weight over its band's largest
                return seen
        return None

    def _uniform_in_band(self, role: Role, start: int, end: int, apart: Mapping[str, object]) -> WorkerView | None:
        """A worker drawn uniformly from positions [start, end) of the role's KV order, less those in ``apart``."""
        rng = self.memory.rng
        for _ in range(REDRAWS):
            view = self.fleet.nth(role, BY_KV_USED, rng.randrange(start, end))
            if view.worker_id not in apart:
                return view
        # mostly apart: the others by a scan of the band (a uniform choice all the same)
        others = [v for i in range(start, end) if (v := self.fleet.nth(role, BY_KV_USED, i)).worker_id not in apart]
        return rng.choice(others) if others else None

    def _in_transit_apart(
        self, role: Role, decay: float, least_used: float, limits: Sequence[float], counts: list[int]
    ) -> dict[str, tuple[WorkerView, float]]:
        """WEIGHTED_CACHE's workers of the role with this router's reservations in transit, within the bands'
        horizon (``limits``: each band's largest key): each with its weight relative to the least used, counting
        what is in transit; each is taken out of its band's count in ``counts``."""
        apart: dict[str, tuple[WorkerView, float]] = {}
        for wid, (_, tokens) in self.local_load.items():
            view = self.fleet.get(wid)
            if view is None or view.spec.role is not role:
                continue
            key = view.status.kv_used + view.pending_tokens  # its BY_KV_USED key
            k = bisect.bisect_left(limits, key)
            if k == len(limits):
                continue  # past the horizon: negligible, as the bands leave it
            counts[k] -= 1
            apart[wid] = (view, math.exp(-decay * (key + tokens - least_used)))
        return apart

    def _least_used_eligible(self, role: Role, horizon: float) -> list[WorkerView]:
        """The eligible workers by KV used, up to ``horizon`` tokens past the first: those after it weigh less than
        NEGLIGIBLE_WEIGHT of it (a key is a lower bound of what the worker holds as seen)."""
        found: list[WorkerView] = []
        limit = math.inf
        for key, view in self.fleet.ordered(role, BY_KV_USED):
            if key > limit:
                break
            if (seen := self.as_seen(view, role)) is not None:
                if not found:
                    limit = seen.status.kv_used + seen.pending_tokens + horizon
                found.append(seen)
        return found


def kv_needed(role: Role, request: ScheduleRequest) -> int:
    """KV tokens the request needs on a worker of the role at its largest: the prompt on a prefill worker, the prompt
    and the output asked for where the output is generated."""
    return request.seq_len if role is Role.PREFILL else request.seq_len + request.output_tokens


def never_fits(role: Role, registered: Sequence[WorkerView], request: ScheduleRequest) -> str:
    """Why the request can never be served by the role (larger than every alive worker's whole KV cache), or ''."""
    sizes = [v.status.kv_total for v in registered if v.status.alive]
    if not sizes or min(sizes) <= 0:  # no alive worker, or one whose KV size is unknown (unlimited)
        return ""
    need, largest = kv_needed(role, request), max(sizes)
    if need <= largest:
        return ""
    output = f" + {request.output_tokens} output" if request.output_tokens and role is not Role.PREFILL else ""
    return (
        f"the request needs {need} tokens of KV cache ({request.seq_len} prompt{output}); the largest of the "
        f"{len(sizes)} alive {role.value} workers holds {largest}"
    )


def why_none(
    role: Role,
    registered: Sequence[WorkerView],
    group: str,
    excluded: frozenset[str] = frozenset(),
    fresh_after_ms: int = 0,
) -> str:
    """A message naming why no worker of the role could take the request."""
    where = f" in group {group!r}" if group else ""
    if not registered:
        return f"no {role.value} worker registered"
    alive = [v for v in registered if v.status.alive]
    if not alive:
        return f"none of {len(registered)} {role.value} workers is alive"
    fresh = [v for v in alive if v.status.updated_ms >= fresh_after_ms]
    if not fresh:
        oldest = (fresh_after_ms - max(v.status.updated_ms for v in alive)) / 1000
        return (
            f"the status of all {len(alive)} alive {role.value} workers is too old (the newest is {oldest:.1f}s "
            "past workerStatusMaxAgeMs): is a master polling them?"
        )
    alive = fresh
    available = [v for v in alive if v.status.available]
    if not available:
        return f"all {len(alive)} alive {role.value} workers are unavailable (too many waiting tasks or KV too full)"
    tried = sum(1 for v in available if v.worker_id in excluded)
    if tried == len(available):
        return f"all {tried} available {role.value} workers already failed this request"
    if tried:  # a retry: the ones tried failed, the others are full
        others = len(available) - tried
        return (
            f"{tried} {role.value} workers already failed this request; the other {others}{where}"
            " are at their concurrency or KV limit"
        )
    return f"all {len(alive)} alive {role.value} workers{where} are at their concurrency or KV limit"
