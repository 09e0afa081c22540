"""The simulated engine: prefix hits shorten prefill, batching and queueing, KV admission, roles, and a status that
reports exactly the engine's internal state. Timing is checked on a fake clock, never on wall time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from flexlb.domain import Role
from flexlb.sim.engine import EngineConfig, EngineStopped, QueueFull, RequestState, RequestTooLarge, SimEngine

FAST = 0.02  # time_scale: 50x faster than real


class FakeClock:
    """A clock that moves only when the engine sleeps: every duration the engine computes shows up exactly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


EngineFactory = Callable[..., SimEngine]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    engines: list[SimEngine] = []

    def make(clock: FakeClock | None = None, **overrides: object) -> SimEngine:
        config = EngineConfig(**{"block_size": 16, "kv_blocks": 1024, "time_scale": FAST, **overrides})  # type: ignore[arg-type]
        engine = SimEngine(config, clock=clock, sleep=clock.sleep) if clock else SimEngine(config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


async def test_a_repeated_prefix_prefills_faster(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    shared = prompt(1600)  # 100 blocks of 16
    first = engine.submit([*shared, 1, 2, 3], 2)
    await first.text()
    second = engine.submit([*shared, 7, 8, 9, 10], 2)
    await second.text()
    assert first.cached_tokens == 0
    assert first.prefill_ms == pytest.approx(3.0 + 1603 / 20.0)
    assert second.matched_blocks == 100 and second.cached_tokens == 1600
    assert second.prefill_ms == pytest.approx(3.0 + 4 / 20.0)
    assert second.prefill_ms < first.prefill_ms / 10
    finished = {t.request_id: t for t in engine.status().finished_task_list}
    assert finished[first.request_id].prefix_length == 0
    assert finished[second.request_id].prefix_length == 1600
    counters = engine.counters
    assert counters.prompt_tokens == 1603 + 1604 and counters.cached_tokens == 1600
    assert counters.prefill_tokens == 1603 + 4


async def test_timing_model_on_a_fake_clock(make_engine: EngineFactory) -> None:
    """TTFT = prefill step; each later token one decode step; prefills batch up to prefill_batch_tokens."""
    clock = FakeClock()
    engine = make_engine(clock, time_scale=0.5, prefill_batch_tokens=8192)
    a, b, c = (engine.submit(prompt(4000, start=i * 10_000), 3) for i in range(3))
    await engine.start()
    await asyncio.gather(a.text(), b.text(), c.text())
    # Step 1 prefills a and b (8000 tokens), step 2 c alone; durations are model ms despite time_scale 0.5.
    assert a.ttft_ms == pytest.approx(3 + 8000 / 20) and b.ttft_ms == pytest.approx(a.ttft_ms)
    assert c.ttft_ms == pytest.approx(a.ttft_ms + 3 + 4000 / 20)
    # Prefill has priority: a and b make no decode step during c's prefill, then all three decode together.
    assert a.finished_ms is not None and c.finished_ms is not None and c.first_token_ms is not None
    assert a.finished_ms == pytest.approx(c.finished_ms)
    three_seq_step = 8.0 + 0.5 * 3
    assert c.finished_ms - c.first_token_ms == pytest.approx(2 * three_seq_step)
    assert engine.last_step_ms == pytest.approx(three_seq_step)
    # The event loop took exactly the scaled model time.
    assert clock.now - 1000.0 == pytest.approx(c.finished_ms * 0.5 / 1000)


async def test_requests_beyond_max_concurrency_wait_in_fcfs_order(make_engine: EngineFactory) -> None:
    engine = make_engine(max_concurrency=2)
    reqs = [engine.submit(prompt(40, start=i * 100), 20) for i in range(5)]
    status = engine.status()
    assert (status.running_query_len, status.waiting_query_len, status.available_concurrency) == (2, 3, 0)
    assert [t.is_waiting for t in status.running_task_info] == [False, False, True, True, True]
    assert [t.request_id for t in status.running_task_info] == [r.request_id for r in reqs]
    await engine.start()
    await asyncio.gather(*(r.text() for r in reqs))
    assert all(r.state is RequestState.FINISHED and r.completion_tokens == 20 for r in reqs)
    # A waiting request starts only when an earlier one frees its slot.
    assert reqs[2].admitted_ms >= min(reqs[0].finished_ms, reqs[1].finished_ms)
    assert reqs[4].queue_ms > 0
    assert engine.counters.queue_time_ms == pytest.approx(sum(r.queue_ms for r in reqs))


async def test_queue_full_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine(max_concurrency=1, max_queue=2)
    for i in range(3):
        engine.submit(prompt(10, start=i * 100), 5)
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(prompt(10, start=900), 5)
    assert engine.waiting_count == 2 and engine.counters.rejected == 1 and engine.counters.requests == 3


async def test_a_request_that_can_never_fit_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine(kv_blocks=10)
    with pytest.raises(RequestTooLarge, match="needs 11 KV blocks"):
        engine.submit(prompt(150), 20)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], 5)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1], 0)


async def test_kv_shortage_keeps_a_request_waiting(make_engine: EngineFactory) -> None:
    engine = make_engine(kv_blocks=10, max_concurrency=4)
    first = engine.submit(prompt(100), 12)  # 7 blocks reserved for prompt + output
    second = engine.submit(prompt(100, start=1000), 12)  # 7 more do not fit: waits despite a free slot
    assert first.state is RequestState.RUNNING and second.state is RequestState.WAITING
    assert engine.status().available_concurrency == 3
    await engine.start()
    await first.text()
    await second.text()
    assert second.admitted_ms >= first.finished_ms
    assert engine.cache.reserved_blocks == 0 and engine.cache.pinned_blocks == 0


async def test_status_reports_the_internal_state(make_engine: EngineFactory) -> None:
    engine = make_engine(max_concurrency=2, kv_blocks=100)
    await engine.start()
    shared = prompt(64)
    done = engine.submit(shared, 1)
    await done.text()
    running = engine.submit([*shared, *prompt(36, start=500)], 10_000 // 16)  # 100 tokens, 4 blocks cached
    second = engine.submit(prompt(32, start=900), 5)  # takes the second slot
    blocked = engine.submit(prompt(32, start=950), 5)  # no slot left: waits
    await wait_until(lambda: running.completion_tokens >= 1)
    status = engine.status()
    cache = engine.cache
    assert status.role == "RoleType.PDFUSION" and status.alive
    assert status.running_query_len == 2 and status.waiting_query_len == 1
    assert status.available_concurrency == 0
    assert status.total_kv_cache == 100 * 16
    assert status.available_kv_cache == (cache.free_blocks + cache.evictable_blocks) * 16
    assert status.iterate_count == engine.counters.iterations
    assert status.step_latency_ms == engine.last_step_ms
    infos = {t.request_id: t for t in status.running_task_info}
    assert infos[running.request_id].prefix_length == 64
    assert infos[running.request_id].input_length == 100
    assert infos[running.request_id].iterate_count == running.iterate_count
    assert not infos[second.request_id].is_waiting
    assert infos[blocked.request_id].is_waiting and infos[blocked.request_id].prefix_length == 0
    assert status.latest_finished_version == 1
    assert [t.request_id for t in status.finished_task_list] == [done.request_id]
    assert engine.status().status_version > status.status_version

    cache_status = engine.cache_status(latest_cache_version=-1, need_keys=True)
    assert cache_status.version == cache.version and cache_status.block_size == 16
    assert set(cache_status.cache_keys) == cache.keys() and len(cache_status.cache_keys) >= 6
    assert cache_status.available_kv_cache == status.available_kv_cache
    assert engine.cache_status(cache_status.version, need_keys=True).cache_keys == {}  # version did not move
    assert engine.cache_status(-1, need_keys=False).cache_keys == {}  # not asked
    engine.cancel(running)


async def test_finished_list_after_a_version(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await engine.start()
    reqs = []
    for i in range(4):
        req = engine.submit(prompt(20, start=i * 100), 2)
        await req.text()
        reqs.append(req)
    assert engine.latest_finished_version == 4
    after = engine.status(latest_finished_version=2).finished_task_list
    assert [t.request_id for t in after] == [r.request_id for r in reqs[2:]]
    assert all(t.end_time_ms > 0 and t.input_length == 20 for t in after)
    assert engine.status(latest_finished_version=4).finished_task_list == ()
    # A version from a previous life of the worker (above ours): everything kept.
    assert len(engine.status(latest_finished_version=99).finished_task_list) == 4


async def test_cancel_frees_the_slot_and_kv(make_engine: EngineFactory) -> None:
    engine = make_engine(max_concurrency=1)
    await engine.start()
    long = engine.submit(prompt(100), 100_000 // 16)
    queued = engine.submit(prompt(100, start=500), 3)
    pieces = []
    async for piece in long.stream():
        pieces.append(piece)
        if len(pieces) == 2:
            assert engine.cancel(long)
    assert long.state is RequestState.CANCELLED and long.finish_reason == "cancelled"
    await queued.text()  # the freed slot went to the queued request
    assert not engine.cancel(long)
    assert engine.running_count == 0 and engine.cache.reserved_blocks == 0 and engine.cache.pinned_blocks == 0
    assert engine.status().available_kv_cache == engine.config.total_kv_tokens
    assert engine.counters.cancelled == 1
    assert long.request_id in {t.request_id for t in engine.status().finished_task_list}


async def test_prefill_role_stops_after_the_first_token(make_engine: EngineFactory) -> None:
    engine = make_engine(role=Role.PREFILL)
    await engine.start()
    req = engine.submit(prompt(64), 50)
    text = await req.text()
    assert req.completion_tokens == 1 and len(text.split()) == 1
    assert engine.status().role == "RoleType.PREFILL"
    assert engine.cache.match_prefix(req.block_keys) == 4  # its KV stays cached for the next request


async def test_decode_role_skips_prefill_compute(make_engine: EngineFactory) -> None:
    engine = make_engine(role="DECODE")
    await engine.start()
    req = engine.submit(prompt(640), 4)
    text = await req.text()
    assert req.completion_tokens == 4 and len(text.split()) == 4
    assert engine.counters.prefill_tokens == 0 and req.prefill_ms == 0
    assert engine.counters.iterations == 4  # decode steps only


async def test_outputs_are_deterministic(make_engine: EngineFactory) -> None:
    a, b = make_engine(), make_engine()
    await a.start()
    await b.start()
    first = await a.submit(prompt(50), 8).text()
    assert first == await b.submit(prompt(50), 8).text()
    assert len(first.split()) == 8


async def test_stop_ends_live_requests(make_engine: EngineFactory) -> None:
    engine = make_engine(max_concurrency=1)
    await engine.start()
    running = engine.submit(prompt(10), 10_000)
    waiting = engine.submit(prompt(10, start=100), 5)
    await engine.stop()
    for req in (running, waiting):
        with pytest.raises(EngineStopped):
            await req.text()
    assert not engine.status().alive
    with pytest.raises(EngineStopped):
        engine.submit(prompt(10), 1)
