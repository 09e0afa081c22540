"""Scheduler decisions against a FleetStore (real Redis and fakeredis): roles, groups, retries and rollback."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from flexlb.domain import ErrorCode, Role, ScheduleRequest, WorkerSpec, WorkerStatus
from flexlb.metrics import SchedulerMetrics
from flexlb.routing import ChoiceMemory, StrategyName
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.state.store import FleetStore, ReserveOutcome

STRATEGIES = {
    Role.PREFILL: StrategyName.SHORTEST_TTFT,
    Role.PDFUSION: StrategyName.SHORTEST_TTFT,
    Role.DECODE: StrategyName.LEAST_KV_USED,
    Role.VIT: StrategyName.ROUND_ROBIN,
}


def make_scheduler(store: FleetStore, **options: object) -> Scheduler:
    return Scheduler(
        store,
        SchedulerOptions(strategies=STRATEGIES, **options),  # type: ignore[arg-type]
        ChoiceMemory(rng=random.Random(7)),
        SchedulerMetrics(CollectorRegistry()),
    )


async def add(store: FleetStore, ip: str, role: Role, group: str = "", limit: int = 0, **status: int) -> str:
    spec = WorkerSpec(ip, 8000, role, group=group, max_concurrency=limit)
    await store.register_worker(spec, WorkerStatus(kv_total=10_000, **status))
    return spec.worker_id


async def test_disaggregated_request_gets_one_prefill_and_one_decode(store: FleetStore) -> None:
    p = await add(store, "10.0.1.1", Role.PREFILL)
    d = await add(store, "10.0.1.2", Role.DECODE)
    result = await make_scheduler(store).schedule(ScheduleRequest(request_id=1, seq_len=100))
    assert result.success and result.attempts == 1
    assert {r: c.worker.worker_id for r, c in result.choices.items()} == {Role.DECODE: d, Role.PREFILL: p}
    assert sorted(await store.request_workers(1)) == sorted([p, d])


async def test_fused_deployment_uses_pdfusion_only(store: FleetStore) -> None:
    f = await add(store, "10.0.2.1", Role.PDFUSION)
    result = await make_scheduler(store).schedule(ScheduleRequest(request_id=2, seq_len=100))
    assert result.success and list(result.choices) == [Role.PDFUSION]
    assert result.choices[Role.PDFUSION].worker.worker_id == f


async def test_later_role_stays_in_the_group_of_the_earlier_choice(store: FleetStore) -> None:
    await add(store, "10.0.3.1", Role.DECODE, group="a", kv_used=9_000)  # least free KV: chosen last
    await add(store, "10.0.3.2", Role.DECODE, group="b")
    await add(store, "10.0.3.3", Role.PREFILL, group="a")
    p_b = await add(store, "10.0.3.4", Role.PREFILL, group="b", waiting=50)  # much slower than a's
    result = await make_scheduler(store).schedule(ScheduleRequest(request_id=3, seq_len=100))
    assert result.success
    assert result.choices[Role.DECODE].worker.spec.group == "b"  # decode is chosen first (original's order)
    assert result.choices[Role.PREFILL].worker.worker_id == p_b  # so prefill must come from group b


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("none", ErrorCode.NO_AVAILABLE_WORKER, "no workers registered"),
        ("no_decode", ErrorCode.NO_DECODE_WORKER, "no DECODE worker registered"),
        ("dead_prefill", ErrorCode.NO_PREFILL_WORKER, "none of 1 PREFILL workers is alive"),
        ("full_decode", ErrorCode.NO_DECODE_WORKER, "at their concurrency or KV limit"),
    ],
)
async def test_no_worker_answers_name_the_role_and_reason(
    store: FleetStore, setup: str, code: ErrorCode, message: str
) -> None:
    roles: tuple[Role, ...] = ()
    if setup != "none":
        await add(store, "10.0.4.1", Role.PREFILL, alive=setup != "dead_prefill")
    if setup == "no_decode":
        roles = (Role.PREFILL, Role.DECODE)  # the deployment declares decode, but none is registered
    if setup in ("dead_prefill", "full_decode"):
        await add(store, "10.0.4.2", Role.DECODE, limit=1, running=1 if setup == "full_decode" else 0)
    result = await make_scheduler(store, roles=roles).schedule(ScheduleRequest(request_id=4, seq_len=10))
    assert not result.success and result.code == code
    assert message in result.message and result.message.startswith(code.name)
    assert await store.request_workers(4) == []


class InterloperStore(FleetStore):
    """A FleetStore before whose first reservation another router takes the decode worker's last slot (after this
    router decided on its view): the race that optimistic reservation must survive."""

    def __init__(self, store: FleetStore, decode_id: str) -> None:
        super().__init__(store.redis, store.keys.service)
        self.other_router = FleetStore(store.redis, store.keys.service)
        self.decode_id = decode_id
        self.reservations = 0

    async def reserve(
        self, request_id: int, picks: Sequence[tuple[str, int]], ttl_ms: int, **inflight: Any
    ) -> ReserveOutcome:
        self.reservations += 1
        if self.reservations == 1:
            assert (await self.other_router.reserve(-1, [(self.decode_id, 1)], 60_000)).ok
        return await super().reserve(request_id, picks, ttl_ms, **inflight)


async def test_decode_refused_after_prefill_chosen_leaves_prefill_exactly_as_before(store: FleetStore) -> None:
    p = await add(store, "10.0.5.1", Role.PREFILL, limit=4)
    d = await add(store, "10.0.5.2", Role.DECODE, limit=1)
    racing = InterloperStore(store, d)
    before = await store.redis.hgetall(store.keys.worker(p))
    result = await make_scheduler(racing, retries=2).schedule(ScheduleRequest(request_id=5, seq_len=100))
    # first attempt: prefill and decode chosen, reservation refused on decode (taken meanwhile); the view learns
    # what the script saw, so the second attempt sees decode full and answers NO_DECODE_WORKER without reserving
    assert racing.reservations == 1 and result.attempts == 2
    assert not result.success and result.code == ErrorCode.NO_DECODE_WORKER
    assert await store.redis.hgetall(store.keys.worker(p)) == before
    assert await store.redis.zcard(store.keys.reservations(p)) == 0
    assert await store.request_workers(5) == []


async def test_refused_reservation_is_retried_on_what_the_script_saw(store: FleetStore) -> None:
    await add(store, "10.0.6.1", Role.PREFILL, limit=4)
    d1 = await add(store, "10.0.6.2", Role.DECODE, limit=1)
    d2 = await add(store, "10.0.6.3", Role.DECODE, limit=1, kv_used=5_000)  # LEAST_KV_USED prefers d1
    racing = InterloperStore(store, d1)
    result = await make_scheduler(racing).schedule(ScheduleRequest(request_id=6, seq_len=100))
    assert result.success and result.attempts == 2
    assert result.choices[Role.DECODE].worker.worker_id == d2


class SlowReplyStore(FleetStore):
    """A FleetStore whose first reservation's reply reaches the router only after the router's view applied that
    reservation's change-stream entry and made another decision (``during``): the tail reading the stream on its own
    connection can be faster than the reply to the script call."""

    def __init__(self, store: FleetStore) -> None:
        super().__init__(store.redis, store.keys.service)
        self.during: Any = None
        self.seen_meanwhile: Any = None

    async def reserve(
        self, request_id: int, picks: Sequence[tuple[str, int]], ttl_ms: int, **inflight: Any
    ) -> ReserveOutcome:
        outcome = await super().reserve(request_id, picks, ttl_ms, **inflight)
        if self.during is not None:
            during, self.during = self.during, None
            self.seen_meanwhile = await during()
        return outcome


async def test_a_reservation_whose_entry_the_view_applied_before_its_reply_counts_once(store: FleetStore) -> None:
    slow = SlowReplyStore(store)
    p = await add(slow, "10.0.6.5", Role.PREFILL)
    scheduler = make_scheduler(slow)

    async def decide_meanwhile() -> dict:
        await scheduler.view_sync.catch_up()  # the view now holds request 1's reservation, from the stream
        result = await scheduler.schedule(ScheduleRequest(request_id=2, seq_len=1000, explain=True))
        assert result.success
        explanation = result.choices[Role.PREFILL].explanation
        return next(c for c in explanation["candidates"] if c["worker"] == p)

    slow.during = decide_meanwhile
    assert (await scheduler.schedule(ScheduleRequest(request_id=1, seq_len=1000))).success
    # request 2 saw request 1 once: in the view, not again as on its way
    assert slow.seen_meanwhile["pending"] == 1
    assert slow.seen_meanwhile["queued_tokens"] == 1000


class HeldTailStore(FleetStore):
    """A FleetStore whose blocking stream reads (the view's tail) wait until ``release``: the view lags the stream
    while inline catch-ups still read it."""

    def __init__(self, store: FleetStore) -> None:
        super().__init__(store.redis, store.keys.service, store._pipelined)
        self.release = asyncio.Event()

    async def read_changes(self, after_id: str, *, block_ms: int | None = None, count: int = 2000) -> list:
        if block_ms is not None:
            await self.release.wait()
        return await super().read_changes(after_id, block_ms=block_ms, count=count)


async def test_a_worker_the_view_learns_of_at_the_decision_is_chosen_by_its_cache(store: FleetStore) -> None:
    held = HeldTailStore(store)
    scheduler = make_scheduler(held)
    scheduler.view_sync.start()
    try:
        await asyncio.wait_for(scheduler.view_sync.connected.wait(), 10)
        blocks = [11, 12, 13, 14]
        await add(store, "10.0.6.6", Role.PREFILL)  # the tail has not applied them: the view has no worker
        cached = await add(store, "10.0.6.7", Role.PREFILL)
        await store.set_cache_blocks(cached, blocks)
        request = ScheduleRequest(request_id=3, seq_len=4 * 64, block_cache_keys=blocks)
        result = await scheduler.schedule(request)
        assert result.success
        assert result.choices[Role.PREFILL].worker.worker_id == cached  # the catch-up also looked the prefix up
        assert result.choices[Role.PREFILL].worker.hit_tokens > 0
    finally:
        held.release.set()
        await scheduler.view_sync.stop()


async def test_retries_are_bounded(store: FleetStore) -> None:
    await add(store, "10.0.7.1", Role.DECODE, limit=1)

    class AlwaysTaken(FleetStore):
        """Another router takes the worker just before every reservation and frees it just after, and the script's
        refusal tells nothing: the view keeps seeing the worker free."""

        async def reserve(
            self, request_id: int, picks: Sequence[tuple[str, int]], ttl_ms: int, **inflight: Any
        ) -> ReserveOutcome:
            if request_id == -1:
                return await super().reserve(request_id, picks, ttl_ms)
            assert (await self.reserve(-1, [("10.0.7.1:8000", 1)], 60_000)).ok
            outcome = await super().reserve(request_id, picks, ttl_ms)
            await self.release(-1)
            return dataclasses.replace(outcome, seen={})

    store2 = AlwaysTaken(store.redis, store.keys.service)
    result = await make_scheduler(store2, retries=3).schedule(ScheduleRequest(request_id=7, seq_len=1))
    assert not result.success and result.attempts == 4 and result.code == ErrorCode.NO_DECODE_WORKER
    assert "refused 4 times, last concurrency_full on 10.0.7.1:8000" in result.message


async def test_reservation_ttl_is_capped_by_generate_timeout(store: FleetStore) -> None:
    p = await add(store, "10.0.8.1", Role.PDFUSION)
    sched = make_scheduler(store, reservation_ttl_ms=60_000)
    assert (await sched.schedule(ScheduleRequest(request_id=8, seq_len=1, generate_timeout_ms=2_000))).success
    expiry = await store.redis.zscore(store.keys.reservations(p), "8")
    now = await store.redis.time()
    remaining = expiry - (now[0] * 1000 + now[1] // 1000)
    assert 0 < remaining <= 2_000


async def test_a_worker_hash_that_cannot_be_decoded_is_skipped_not_fatal(store: FleetStore) -> None:
    good = await add(store, "10.0.9.1", Role.PDFUSION)
    bad = "10.0.9.2:8000"  # written by hand with a role flexlb does not know
    await store.redis.hset(store.keys.worker(bad), mapping={"role": "BOGUS", "alive": "1"})
    await store.redis.sadd(store.keys.role_set(Role.PDFUSION), bad)
    await store.redis.incr(store.keys.members_version)
    result = await make_scheduler(store).schedule(ScheduleRequest(request_id=9, seq_len=100))
    assert result.success and result.choices[Role.PDFUSION].worker.worker_id == good
    assert [v.worker_id for v in await store.list_workers()] == [good]


async def test_metrics_count_in_flight_reservations_and_hit_tokens_chosen_vs_available(store: FleetStore) -> None:
    a = await add(store, "10.0.10.1", Role.PDFUSION)
    b = await add(store, "10.0.10.2", Role.PDFUSION, waiting=40)  # holds the prefix but is much busier
    await store.set_cache_blocks(b, [1, 2, 3])
    scheduler = make_scheduler(store)
    registry = scheduler.metrics.registry
    result = await scheduler.schedule(ScheduleRequest(request_id=11, seq_len=500, block_cache_keys=(1, 2, 3, 4)))
    assert result.success
    chosen = result.choices[Role.PDFUSION].worker
    value = registry.get_sample_value
    assert value("flexlb_reservations_in_flight") == 1
    assert value("flexlb_cache_hit_tokens_total", {"role": "PDFUSION", "kind": "available"}) == 3 * 64
    assert value("flexlb_cache_hit_tokens_total", {"role": "PDFUSION", "kind": "chosen"}) == chosen.hit_tokens
    assert chosen.worker_id in (a, b)
    await scheduler.release(11)
    assert value("flexlb_reservations_in_flight") == 0
