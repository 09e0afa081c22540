"""Scheduler: picks one worker per role for a request and reserves them fleet-wide in Redis.

One decision is two Redis round trips: a snapshot (status, pending load and cache hit of every worker) and an
atomic reservation of the chosen worker of every role. A reservation refused because a concurrent router took the
capacity first is retried on a fresh snapshot, a bounded number of times.

When Redis is unreachable the scheduler keeps deciding from its last snapshot plus its own in-flight reservations
(degraded mode) until that snapshot is older than ``max_staleness_ms``; then it answers STATE_UNAVAILABLE. Each
request tries Redis again (at most once per ``probe_interval_s``), so shared scheduling resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

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
from flexlb.metrics import SchedulerMetrics
from flexlb.routing import ChoiceMemory, StrategyName, StrategyParams, choose, eligible
from flexlb.state.store import FleetSnapshot, FleetStore

log = logging.getLogger("flexlb.scheduler")

MAX_UNWRITTEN_RELEASES = 100_000  # beyond that, the rest expire by TTL

# Errors that mean "Redis is not there", as opposed to a bug in a script (ResponseError), which must surface.
REDIS_UNAVAILABLE = (ConnectionError, TimeoutError, BusyLoadingError, OSError)


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    strategies: dict[Role, StrategyName]
    params: StrategyParams = field(default_factory=StrategyParams)
    roles: tuple[Role, ...] = ()  # roles every request needs; () = the roles that have registered workers
    reservation_ttl_ms: int = 60_000
    retries: int = 3
    max_staleness_ms: int = 10_000
    probe_interval_s: float = 0.5


@dataclass(slots=True)
class _LocalReservation:
    picks: list[tuple[str, int]]
    expires_at: float


class Scheduler:
    def __init__(
        self,
        store: FleetStore,
        options: SchedulerOptions,
        memory: ChoiceMemory,
        metrics: SchedulerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.options = options
        self.memory = memory
        self.metrics = metrics
        self._clock = clock
        self._last_snapshot: FleetSnapshot | None = None
        self._last_snapshot_at = 0.0
        self._redis_down_since: float | None = None
        self._next_probe_at = 0.0
        # Reservations made while Redis was down: only this process knows them, until released or expired.
        self._local: dict[int, _LocalReservation] = {}
        # Releases Redis did not get (it was down): written when it is back, so capacity is not held until TTL.
        self._unwritten_releases: set[int] = set()
        # Workers this router reserved per request, so a release here needs no lookup: request -> (workers, when).
        self._reserved_here: dict[int, tuple[list[str], float]] = {}
        self._releasing: set[asyncio.Task[int]] = set()  # releases still writing to Redis (see release)

    # ---- public API ----

    @property
    def redis_up(self) -> bool:
        return self._redis_down_since is None

    @property
    def last_snapshot(self) -> FleetSnapshot | None:
        return self._last_snapshot

    @property
    def snapshot_age_ms(self) -> float | None:
        if self._last_snapshot is None:
            return None
        return (self._clock() - self._last_snapshot_at) * 1000

    @property
    def in_flight(self) -> int:
        """Requests this router reserved capacity for and has not released yet (queue mode's admission counts them)."""
        return len(self._reserved_here) + len(self._local)

    def can_schedule(self) -> bool:
        """Redis is up, or the local snapshot is fresh enough to schedule from."""
        age = self.snapshot_age_ms
        return self.redis_up or (age is not None and age <= self.options.max_staleness_ms)

    async def schedule(self, request: ScheduleRequest) -> ScheduleResult:
        result = await self._schedule(request)
        self.metrics.in_flight.set(self.in_flight)
        return result

    async def _schedule(self, request: ScheduleRequest) -> ScheduleResult:
        ttl_ms = max(1, min(self.options.reservation_ttl_ms, request.generate_timeout_ms))
        if self._should_try_redis():
            try:
                if self._unwritten_releases:  # free what Redis missed before deciding on its state
                    await self.write_unwritten_releases()
                result = await self._schedule_shared(request, ttl_ms)
                self._mark_redis_up()
                return result
            except REDIS_UNAVAILABLE as exc:
                self._mark_redis_down(exc)
        return self._schedule_degraded(request, ttl_ms)

    async def release(self, request_id: int) -> int:
        """Give back every reservation of the request; returns how many were held. Idempotent.

        The release runs as a task of its own: a caller cancelled meanwhile (client gone, shutdown) does not cut it
        short, and :meth:`finish_releases` waits for it before the Redis client closes."""
        task = asyncio.ensure_future(self._release(request_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return await asyncio.shield(task)

    async def finish_releases(self) -> None:
        """At shutdown, before the Redis client closes: wait for the releases still running and write the ones Redis
        missed while it was down."""
        if self._releasing:
            await asyncio.wait(set(self._releasing))
        try:
            await self.write_unwritten_releases()
        except REDIS_UNAVAILABLE as exc:
            log.warning(
                "%d releases not written to Redis (%s): their reservations expire by their TTL",
                len(self._unwritten_releases),
                exc,
            )

    async def _release(self, request_id: int) -> int:
        released = 0
        local = self._local.pop(request_id, None)
        if local is not None:
            released += len(local.picks)
        workers, _ = self._reserved_here.pop(request_id, ((), 0.0))
        self.metrics.in_flight.set(self.in_flight)
        try:
            released += await self.store.release_request(request_id, workers)
            self._mark_redis_up()
        except REDIS_UNAVAILABLE as exc:
            self._mark_redis_down(exc)
            if len(self._unwritten_releases) < MAX_UNWRITTEN_RELEASES:
                self._unwritten_releases.add(request_id)
            log.warning("release of request %s not written to Redis (%s); retried when Redis is back", request_id, exc)
        return released

    async def write_unwritten_releases(self) -> int:
        """Write the releases Redis missed while it was down; returns how many reservations they freed."""
        freed = 0
        while self._unwritten_releases:
            request_id = next(iter(self._unwritten_releases))
            freed += await self.store.release(request_id)  # raises while Redis is still away: try again later
            self._unwritten_releases.discard(request_id)
        return freed

    def local_reservations(self) -> dict[int, list[tuple[str, int]]]:
        self._prune_local()
        return {rid: list(r.picks) for rid, r in self._local.items()}

    # ---- shared (Redis) path ----

    async def _schedule_shared(self, request: ScheduleRequest, ttl_ms: int) -> ScheduleResult:
        refusal = ""
        refused_role: Role | None = None
        for attempt in range(1, self.options.retries + 2):
            started = self._clock()
            snapshot = await self.store.snapshot(self._roles_to_read(), request.block_cache_keys)
            self._last_snapshot, self._last_snapshot_at = snapshot, started
            result = self._decide(request, self._with_local_load(snapshot.views))
            if not result.success:
                result.attempts = attempt
                return result
            roles = list(result.choices)
            picks = [(result.choices[r].worker.worker_id, result.choices[r].reserve_tokens) for r in roles]
            outcome = await self.store.reserve(request.request_id, picks, ttl_ms)
            if outcome.ok:
                result.attempts = attempt
                self._last_snapshot = _with_reservation(snapshot, picks)
                self._remember_reserved(request.request_id, [wid for wid, _ in picks])
                self._count_hits(result, snapshot.views)
                return result
            refused_role = roles[outcome.refused_index]
            refusal = f"{outcome.reason} on {picks[outcome.refused_index][0]} ({outcome.detail})"
            self.metrics.reserve_refused.labels(role=refused_role.value, reason=outcome.reason).inc()
            log.debug("request %s: %s reservation refused: %s; retrying", request.request_id, refused_role, refusal)
        assert refused_role is not None
        code = NO_WORKER_CODE[refused_role]
        return ScheduleResult(
            success=False,
            code=code,
            message=f"{code.name}: reservation refused {self.options.retries + 1} times, last {refusal}",
            attempts=self.options.retries + 1,
        )

    def _roles_to_read(self) -> tuple[Role, ...]:
        return self.options.roles or ROLE_ORDER

    # ---- the decision itself (no I/O) ----

    def _decide(self, request: ScheduleRequest, views: dict[Role, list[WorkerView]]) -> ScheduleResult:
        roles = self.options.roles or tuple(r for r in ROLE_ORDER if views.get(r))
        if not roles:
            return ScheduleResult(
                success=False,
                code=ErrorCode.NO_AVAILABLE_WORKER,
                message=f"NO_AVAILABLE_WORKER: no workers registered for service {self.store.keys.service!r}",
            )
        choices: dict[Role, Choice] = {}
        group = ""
        for role in (r for r in ROLE_ORDER if r in roles):
            registered = views.get(role, [])
            candidates = eligible(registered, role, request.seq_len, request.exclude_workers)
            if group:  # a later role stays in the group of the earlier choice, as the original
                candidates = [c for c in candidates if c.spec.group == group]
            strategy = self.options.strategies[role]
            choice = choose(strategy, role, candidates, request, self.memory, self.options.params)
            if choice is None:
                code = NO_WORKER_CODE[role]
                return ScheduleResult(
                    success=False,
                    code=code,
                    message=f"{code.name}: {_why_none(role, registered, group, request.exclude_workers)}",
                )
            choices[role] = choice
            group = group or choice.worker.spec.group
        return ScheduleResult(success=True, choices=choices)

    # ---- degraded (local) path ----

    def _schedule_degraded(self, request: ScheduleRequest, ttl_ms: int) -> ScheduleResult:
        age = self.snapshot_age_ms
        if self._last_snapshot is None or age is None or age > self.options.max_staleness_ms:
            self.metrics.schedules_unavailable.inc()
            known = "no snapshot yet" if age is None else f"last snapshot {age / 1000:.1f}s old"
            return ScheduleResult(
                success=False,
                code=ErrorCode.STATE_UNAVAILABLE,
                message=f"STATE_UNAVAILABLE: Redis is unreachable and {known} "
                f"(limit {self.options.max_staleness_ms / 1000:.1f}s)",
            )
        # cache hits are unknown without Redis; the views keep the load, not the last request's hit
        views = {r: [replace(v, hit_blocks=0) for v in vs] for r, vs in self._last_snapshot.views.items()}
        result = self._decide(request, self._with_local_load(views))
        result.degraded = True
        if result.success:
            picks = [(c.worker.worker_id, c.reserve_tokens) for c in result.choices.values()]
            self._local[request.request_id] = _LocalReservation(picks, self._clock() + ttl_ms / 1000)
            self.metrics.schedules_degraded.inc()
            log.warning(
                "request %s scheduled in degraded mode from a %.0f ms old snapshot: %s",
                request.request_id,
                age,
                ", ".join(f"{r.value}={c.worker.worker_id}" for r, c in result.choices.items()),
            )
        return result

    def _with_local_load(self, views: dict[Role, list[WorkerView]]) -> dict[Role, list[WorkerView]]:
        """Add the reservations only this process knows (made in degraded mode) to the pending load."""
        self._prune_local()
        if not self._local:
            return views
        count: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for res in self._local.values():
            for wid, t in res.picks:
                count[wid] = count.get(wid, 0) + 1
                tokens[wid] = tokens.get(wid, 0) + t
        return {
            role: [
                replace(
                    v,
                    pending_count=v.pending_count + count.get(v.worker_id, 0),
                    pending_tokens=v.pending_tokens + tokens.get(v.worker_id, 0),
                )
                for v in vs
            ]
            for role, vs in views.items()
        }

    def _count_hits(self, result: ScheduleResult, views: dict[Role, list[WorkerView]]) -> None:
        for role, choice in result.choices.items():
            best = max((v.hit_tokens for v in views.get(role, ())), default=0)
            if best:
                self.metrics.hit_tokens.labels(role=role.value, kind="chosen").inc(choice.worker.hit_tokens)
                self.metrics.hit_tokens.labels(role=role.value, kind="available").inc(best)

    def _remember_reserved(self, request_id: int, workers: list[str]) -> None:
        now = self._clock()
        self._reserved_here[request_id] = (workers, now)
        # insertion order is age order: drop what is older than any reservation lives (never released here)
        horizon = now - self.options.reservation_ttl_ms / 1000
        while self._reserved_here:
            oldest = next(iter(self._reserved_here))
            if self._reserved_here[oldest][1] > horizon:
                break
            del self._reserved_here[oldest]

    def _prune_local(self) -> None:
        now = self._clock()
        for rid in [rid for rid, r in self._local.items() if r.expires_at <= now]:
            del self._local[rid]

    # ---- Redis health ----

    def _should_try_redis(self) -> bool:
        return self._redis_down_since is None or self._clock() >= self._next_probe_at

    def _mark_redis_down(self, exc: BaseException) -> None:
        self.metrics.redis_errors.inc()
        now = self._clock()
        self._next_probe_at = now + self.options.probe_interval_s
        if self._redis_down_since is None:
            self._redis_down_since = now
            self.metrics.redis_up.set(0)
            log.error("Redis unreachable (%s: %s): scheduling in degraded mode", type(exc).__name__, exc)

    def _mark_redis_up(self) -> None:
        if self._redis_down_since is not None:
            down_s = self._clock() - self._redis_down_since
            self._redis_down_since = None
            self.metrics.redis_up.set(1)
            log.warning("Redis reachable again after %.1fs: shared scheduling resumed", down_s)


def _with_reservation(snapshot: FleetSnapshot, picks: Sequence[tuple[str, int]]) -> FleetSnapshot:
    """The snapshot as it stands after our own reservation, so degraded mode does not count it as free."""
    tokens = dict(picks)
    views = {
        role: [
            replace(v, pending_count=v.pending_count + 1, pending_tokens=v.pending_tokens + tokens[v.worker_id])
            if v.worker_id in tokens
            else v
            for v in vs
        ]
        for role, vs in snapshot.views.items()
    }
    return FleetSnapshot(views=views, now_ms=snapshot.now_ms)


def _why_none(role: Role, registered: Sequence[WorkerView], group: str, excluded: frozenset[str] = frozenset()) -> str:
    """A message naming why no worker of the role could take the request."""
    where = f" in group {group!r}" if group else ""
    if not registered:
        return f"no {role.value} worker registered"
    alive = [v for v in registered if v.status.alive]
    if not alive:
        return f"none of {len(registered)} {role.value} workers is alive"
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
