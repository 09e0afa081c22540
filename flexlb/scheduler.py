"""Scheduler: picks one worker per role for a request and reserves them fleet-wide in Redis.

The decision reads this process's live fleet view (flexlb.state.view, kept current from Redis' change stream by a
ViewSync), plus, for prefill-type roles, the request's own blocks in the inverted cache index: at most one lookup
call (more only for prefixes longer than LOOKUP_CHUNK blocks) and one atomic reservation of the chosen worker of
every role. The reservation re-checks those workers; one refused because the view was behind (another router took
the capacity first) updates the view with what the script saw and is retried, a bounded number of times. A refusal
is only answered from a view caught up with the stream.

When Redis is unreachable the scheduler keeps deciding from the view plus its own in-flight reservations (degraded
mode) until the view is older than ``max_staleness_ms``; then it answers STATE_UNAVAILABLE. Each request tries
Redis again (at most once per ``probe_interval_s``), so shared scheduling resumes by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flexlb.domain import NO_WORKER_CODE, ROLE_ORDER, ErrorCode, Role, ScheduleRequest, ScheduleResult
from flexlb.in_transit import InTransit
from flexlb.metrics import SchedulerMetrics
from flexlb.routing import ChoiceMemory, DecisionOptions, StrategyName, StrategyParams, decide, order_keys
from flexlb.routing.decide import orders_per_role
from flexlb.routing.strategies import PREFILL_ROLES
from flexlb.state.block_mirror import BlockMirror
from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.script_batch import AFTER_ANSWER_DEFER_S, DEFER_S
from flexlb.state.store import FleetStore, PrefixHits
from flexlb.state.view import FleetView
from flexlb.state.view_sync import ViewSync

log = logging.getLogger("flexlb.scheduler")
# At DEBUG, every decision is logged with its best candidates and the rule that chose (flexlb.routing.explain).
decision_log = logging.getLogger("flexlb.decision")

MAX_UNWRITTEN_RELEASES = 100_000  # beyond that, the rest expire by TTL


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    strategies: dict[Role, StrategyName]
    params: StrategyParams = field(default_factory=StrategyParams)
    roles: tuple[Role, ...] = ()  # roles every request needs; () = the roles that have registered workers
    reservation_ttl_ms: int = 60_000
    retries: int = 3
    max_staleness_ms: int = 10_000
    probe_interval_s: float = 0.5
    prune_above: int = 32  # roles with more workers are pruned, not scored in full (flexlb.routing.decide)
    status_max_age_ms: int = 0  # workers whose last status write is older are not chosen; 0: no bound
    inflight_ttl_ms: int = 0  # a request's blocks count as held by its prefill worker this long (0: not at all)
    # on a worker with no cache report of its own (vLLM / SGLang without KV events): the fleet's approximate view of
    # its cache, held this long (0: inflight_ttl_ms) and at most approx_max_blocks blocks per worker
    approx_ttl_ms: int = 0
    approx_max_blocks: int = 32_768
    view_block_ms: int = 500  # the fleet view's XREAD BLOCK; below the Redis client's socket timeout
    block_mirror: bool = True  # look prefixes up in a router-local copy of the block index (flexlb.state.block_mirror)

    @property
    def decision(self) -> DecisionOptions:
        return DecisionOptions(self.strategies, self.params, self.roles, self.prune_above, self.status_max_age_ms)


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
        self._decision = options.decision
        self.view = FleetView(order_keys(options.params), orders_per_role(options.strategies))
        mirror = BlockMirror() if options.block_mirror else None
        self.view_sync = ViewSync(store, self.view, block_ms=options.view_block_ms, clock=clock, mirror=mirror)
        self._redis_down_since: float | None = None
        self._next_probe_at = 0.0
        # Reservations made while Redis was down: only this process knows them, until released or expired.
        self._local: dict[int, _LocalReservation] = {}
        # Releases Redis did not get (it was down): written when it is back, so capacity is not held until TTL.
        self._unwritten_releases: set[int] = set()
        # Workers this router reserved per request, so a release here needs no lookup: request -> (workers, when).
        self._reserved_here: dict[int, tuple[list[str], float]] = {}
        self._releasing: set[asyncio.Task[int]] = set()  # releases still writing to Redis (see release)
        # Picks whose reservation is on its way to Redis. Decisions made meanwhile count them (once), so a burst
        # through this router sees its own queue building up (a hot prefix's worker, say).
        self._in_transit = InTransit()

    # ---- public API ----

    @property
    def redis_up(self) -> bool:
        return self._redis_down_since is None

    @property
    def view_age_ms(self) -> float | None:
        """How long ago Redis last confirmed the fleet view (None: never read)."""
        age = self.view_sync.age_s()
        return None if age is None else age * 1000

    @property
    def in_flight(self) -> int:
        """Requests this router reserved capacity for and has not released yet (queue mode's admission counts them)."""
        return len(self._reserved_here) + len(self._local)

    def can_schedule(self) -> bool:
        """Redis is up, or the fleet view is fresh enough to schedule from."""
        age = self.view_age_ms
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
        return await asyncio.shield(self.release_soon(request_id, defer_s=DEFER_S))

    def release_soon(self, request_id: int, *, defer_s: float = AFTER_ANSWER_DEFER_S) -> asyncio.Task[int]:
        """Start the release of :meth:`release` without waiting for it (the proxy, once its answer is out: nobody
        waits for it, so it may wait up to ``defer_s`` to share a batch with other calls)."""
        task = asyncio.ensure_future(self._release(request_id, defer_s))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

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

    async def _release(self, request_id: int, defer_s: float) -> int:
        released = 0
        local = self._local.pop(request_id, None)
        if local is not None:
            released += len(local.picks)
        workers, _ = self._reserved_here.pop(request_id, ((), 0.0))
        self.metrics.in_flight.set(self.in_flight)
        try:
            released += await self.store.release_request(request_id, workers, defer_s=defer_s)
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
        if not self.view_sync.running:  # no tail following the stream (not started, or reconnecting): read inline
            await self.view_sync.catch_up()
        looked_up, hits, probe = await self._prefix_of(request)  # the probe once: a moved prefix costs one lookup more
        refusal = ""
        refused_role: Role | None = None
        caught_up = not self.view_sync.running
        attempt = 0
        while attempt <= self.options.retries:
            attempt += 1
            result = self._decide(request, hits)
            if not result.success:
                if caught_up:
                    result.attempts = attempt
                    return result
                # the view may lag the stream by a moment (a worker just registered or freed): confirm first
                await self.view_sync.catch_up()
                caught_up = True
                attempt -= 1
                if not looked_up:  # the view may hold a prefill-type worker only now
                    looked_up, hits, probe = await self._prefix_of(request)
                continue
            roles = list(result.choices)
            picks = [(result.choices[r].worker.worker_id, result.choices[r].reserve_tokens) for r in roles]
            inflight_ttl, inflight_cap = self._inflight_hold(result)
            in_transit = self._in_transit.add(picks, self._view_pending)
            try:
                outcome = await self.store.reserve(
                    request.request_id,
                    picks,
                    ttl_ms,
                    inflight_blocks=self._inflight_blocks(request, result, hits),
                    inflight_ttl_ms=inflight_ttl,
                    inflight_max_blocks=inflight_cap,
                    probe_block=probe,
                    limits=not request.ttft_bound_ms,
                )
            finally:
                self._in_transit.remove(in_transit)
            probe = None
            if outcome.ok:
                for (wid, _), (count, tokens) in zip(picks, outcome.pending, strict=True):
                    self.view.set_pending(wid, count, tokens)
                result.attempts = attempt
                self._remember_reserved(request.request_id, [wid for wid, _ in picks])
                if outcome.inflight_blocks:
                    self._note_inflight(result, outcome.inflight_blocks, outcome.redis_ms + inflight_ttl, inflight_cap)
                self._count_hits(result, hits)
                return result
            refused_role = roles[outcome.refused_index]
            refused_id = picks[outcome.refused_index][0]
            if outcome.reason == "gone":
                self.view.forget(refused_id)
            elif outcome.reason == "prefix_moved":  # another request of this new prefix was placed meanwhile
                hits = await self.store.lookup_prefix(request.block_cache_keys)
            else:
                self.view.merge_fields(refused_id, outcome.seen or {})
            refusal = f"{outcome.reason} on {refused_id} ({outcome.detail})"
            self.metrics.reserve_refused.labels(role=refused_role.value, reason=outcome.reason).inc()
            log.debug("request %s: %s reservation refused: %s; retrying", request.request_id, refused_role, refusal)
        assert refused_role is not None
        code = NO_WORKER_CODE[refused_role]
        return ScheduleResult(
            success=False,
            code=code,
            message=f"{code.name}: reservation refused {self.options.retries + 1} times, last {refusal}",
            attempts=self.options.retries + 1,
            busy=True,  # other routers took the capacity first
        )

    async def _prefix_of(self, request: ScheduleRequest) -> tuple[bool, dict[str, int], int | None]:
        """Whether the request's prefix matters to the decision (``_needs_lookup``), its hits and its probe block."""
        if not self._needs_lookup(request):
            return False, {}, None
        hits = await self._lookup(request.block_cache_keys)
        return True, hits, self._probe_block(request, hits)

    async def _lookup(self, block_keys: list[int]) -> PrefixHits:
        """The request's prefix hits: from the router's block mirror when it is synced, else from Redis."""
        hits = self.view_sync.lookup_prefix(block_keys)
        return await self.store.lookup_prefix(block_keys) if hits is None else hits

    def _note_inflight(self, result: ScheduleResult, blocks: Sequence[int], until_ms: int, cap: int) -> None:
        """The reservation's in-flight blocks, into this router's block mirror at once (on its prefill-type worker,
        as lua/reserve.lua records them)."""
        for role, choice in result.choices.items():
            if role in PREFILL_ROLES:
                self.view_sync.note_inflight(choice.worker.worker_id, blocks, until_ms, cap)
                return

    def _inflight_hold(self, result: ScheduleResult) -> tuple[int, int]:
        """How long the request's new blocks count as held by its prefill-type worker, and the bound per worker
        (0: none): a worker that reports its cache (RTP-LLM status, KV events) confirms them soon, so they only
        bridge until then; one that never will (vLLM / SGLang without KV events) keeps them as the fleet's
        approximate view of its cache."""
        opts = self.options
        for role, choice in result.choices.items():
            if role in PREFILL_ROLES:
                spec = choice.worker.spec
                if opts.approx_ttl_ms and not spec.engine.speaks_status_rpc and spec.kv_events is None:
                    return opts.approx_ttl_ms, opts.approx_max_blocks
                return opts.inflight_ttl_ms, 0
        return 0, 0

    def _inflight_blocks(self, request: ScheduleRequest, result: ScheduleResult, hits: dict[str, int]) -> list[int]:
        """The request's blocks its prefill-type worker does not hold yet: in flight there once reserved, so the next
        request of the same new prefix, through any router, finds them (lua/reserve.lua)."""
        if not (self.options.inflight_ttl_ms or self.options.approx_ttl_ms) or not request.block_cache_keys:
            return []
        for role, choice in result.choices.items():
            if role in PREFILL_ROLES:
                return list(request.block_cache_keys[hits.get(choice.worker.worker_id, 0) :])
        return []

    def _probe_block(self, request: ScheduleRequest, hits: PrefixHits) -> int | None:
        """The request's first block no worker held at the lookup: if it is held elsewhere by the time of the
        reservation, a concurrent request of the same new prefix went there first (lua/reserve.lua)."""
        if not (self.options.inflight_ttl_ms or self.options.approx_ttl_ms):
            return None
        # the first block nobody held: beyond every match, and beyond what a sample of a popular prefix's holders
        # missed (held_by_any), so a block someone held all along is not taken for a moved prefix
        best = max(max(hits.values(), default=0), hits.held_by_any)
        return request.block_cache_keys[best] if best < len(request.block_cache_keys) else None

    def _needs_lookup(self, request: ScheduleRequest) -> bool:
        """Only prefill-type roles use cache hits; a request with no blocks has none."""
        if not request.block_cache_keys:
            return False
        roles = self.options.roles or ROLE_ORDER
        return any(r in PREFILL_ROLES and self.view.count(r) for r in roles)

    # ---- the decision itself (no I/O) ----

    def _decide(self, request: ScheduleRequest, hits: dict[str, int]) -> ScheduleResult:
        logged = decision_log.isEnabledFor(logging.DEBUG)
        if logged and not request.explain:
            request = dataclasses.replace(request, explain=True)
        result = self._decide_now(request, hits)
        if logged:
            for choice in result.choices.values():
                decision_log.debug("request %s: %s", request.request_id, choice.explanation)
            if not result.success:
                decision_log.debug("request %s: %s", request.request_id, result.message)
        return result

    def _decide_now(self, request: ScheduleRequest, hits: dict[str, int]) -> ScheduleResult:
        return decide(
            request,
            self.view,
            self._decision,
            self.memory,
            hits=hits,
            local_load=self._local_load(),
            service=self.store.keys.service,
            redis_now_ms=self.view.redis_now_ms(self._clock()),
        )

    # ---- degraded (local) path ----

    def _schedule_degraded(self, request: ScheduleRequest, ttl_ms: int) -> ScheduleResult:
        age = self.view_age_ms
        if age is None or age > self.options.max_staleness_ms:
            self.metrics.schedules_unavailable.inc()
            known = "no fleet view yet" if age is None else f"the fleet view is {age / 1000:.1f}s old"
            return ScheduleResult(
                success=False,
                code=ErrorCode.STATE_UNAVAILABLE,
                message=f"STATE_UNAVAILABLE: Redis is unreachable and {known} "
                f"(limit {self.options.max_staleness_ms / 1000:.1f}s)",
            )
        # the view keeps the load, and the block mirror the cache hits, as they were when Redis went away
        looked_up = self._needs_lookup(request)
        hits = self.view_sync.lookup_prefix(request.block_cache_keys, stale_ok=True) if looked_up else None
        result = self._decide(request, hits or {})
        result.degraded = True
        if result.success:
            picks = [(c.worker.worker_id, c.reserve_tokens) for c in result.choices.values()]
            self._local[request.request_id] = _LocalReservation(picks, self._clock() + ttl_ms / 1000)
            self.metrics.schedules_degraded.inc()
            log.warning(
                "request %s scheduled in degraded mode from a fleet view %.0f ms old: %s",
                request.request_id,
                age,
                ", ".join(f"{r.value}={c.worker.worker_id}" for r, c in result.choices.items()),
            )
        return result

    def _local_load(self) -> Mapping[str, tuple[int, int]]:
        """Reservations only this process knows (made in degraded mode, or on their way to Redis): worker ->
        (count, tokens)."""
        self._prune_local()
        in_transit = self._in_transit.extra(self._view_pending) if self._in_transit else None
        if not self._local:
            return in_transit or {}
        load = dict(in_transit or {})
        for res in self._local.values():
            _add_load(load, res.picks)
        return load

    def _view_pending(self, worker_id: str) -> tuple[int, int]:
        view = self.view.get(worker_id)
        return (view.pending_count, view.pending_tokens) if view is not None else (0, 0)

    def _count_hits(self, result: ScheduleResult, hits: dict[str, int]) -> None:
        if not hits:
            return
        for role, choice in result.choices.items():
            if role not in PREFILL_ROLES:  # hits are of prefill-type workers only (the index's)
                continue
            best = 0
            for wid, blocks in hits.items():
                view = self.view.get(wid)
                if view is not None and view.spec.role is role:
                    best = max(best, blocks * view.status.block_size)
            if best:
                self.metrics.hit_tokens_by(role.value, "chosen").inc(choice.worker.hit_tokens)
                self.metrics.hit_tokens_by(role.value, "available").inc(best)

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


def _add_load(load: dict[str, tuple[int, int]], picks: list[tuple[str, int]]) -> None:
    """Add one reservation of each of ``picks`` to ``load``."""
    for wid, tokens in picks:
        count, total = load.get(wid, (0, 0))
        load[wid] = (count + 1, total + tokens)
