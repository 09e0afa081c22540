"""``ScheduleRequest.exclude_workers``, the proxy's retry without a worker that failed: eligibility drops them, and a
schedule with every worker excluded says so. The scheduler part runs on fakeredis (with Lua)."""

from __future__ import annotations

import random

import fakeredis
from prometheus_client import CollectorRegistry

from flexlb.domain import ErrorCode, Role, ScheduleRequest, WorkerSpec, WorkerStatus, WorkerView
from flexlb.metrics import SchedulerMetrics
from flexlb.routing import ChoiceMemory, StrategyName, eligible
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.state.store import FleetStore


def view(ip: str) -> WorkerView:
    return WorkerView(WorkerSpec(ip, 8000, Role.PDFUSION), WorkerStatus())


def test_eligible_leaves_out_the_excluded_workers_only() -> None:
    views = [view("10.0.0.1"), view("10.0.0.2"), view("10.0.0.3")]
    assert eligible(views, Role.PDFUSION, 10) == views
    kept = eligible(views, Role.PDFUSION, 10, frozenset({"10.0.0.2:8000"}))
    assert [v.worker_id for v in kept] == ["10.0.0.1:8000", "10.0.0.3:8000"]


async def test_a_schedule_skips_excluded_workers_and_names_them_when_none_is_left() -> None:
    redis = fakeredis.FakeAsyncRedis(decode_responses=True, version=(7, 0))
    store = FleetStore(redis, "exclude")
    for ip in ("10.0.0.1", "10.0.0.2"):
        await store.register_worker(WorkerSpec(ip, 8000, Role.PDFUSION), WorkerStatus(kv_total=10_000))
    strategies = dict.fromkeys(Role, StrategyName.LOWEST_CONCURRENCY)
    scheduler = Scheduler(
        store,
        SchedulerOptions(strategies=strategies),
        ChoiceMemory(rng=random.Random(1)),
        SchedulerMetrics(CollectorRegistry()),
    )
    try:
        for rid in range(1, 5):
            result = await scheduler.schedule(ScheduleRequest(rid, 10, exclude_workers=frozenset({"10.0.0.1:8000"})))
            assert result.success and result.choices[Role.PDFUSION].worker.worker_id == "10.0.0.2:8000"
            await scheduler.release(rid)

        both = frozenset({"10.0.0.1:8000", "10.0.0.2:8000"})
        result = await scheduler.schedule(ScheduleRequest(9, 10, exclude_workers=both))
        assert not result.success and result.code == ErrorCode.NO_PDFUSION_WORKER
        assert "all 2 available PDFUSION workers already failed this request" in result.message

        await store.register_worker(
            WorkerSpec("10.0.0.3", 8000, Role.PDFUSION, max_concurrency=1), WorkerStatus(running=1)
        )
        result = await scheduler.schedule(ScheduleRequest(10, 10, exclude_workers=both))
        assert not result.success
        assert "2 PDFUSION workers already failed this request; the other 1 are at their concurrency" in result.message
    finally:
        await redis.aclose()
