"""The simulated engine's side of the PD KV hand-over (a DECODE request that waits for its prefill's KV, on a fake
clock) and the bootstrap server's room board."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from test_sim_engine import FakeClock

from flexlb.domain import Role
from flexlb.sim.bootstrap import RoomBoard
from flexlb.sim.engine import EngineConfig, KvTransferFailed, RequestState, SimEngine
from flexlb.sim.protocol import BootstrapRoom, bootstrap_room


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., SimEngine]]:
    engines: list[SimEngine] = []

    def make(clock: FakeClock, **overrides: object) -> SimEngine:
        config = EngineConfig(**{"block_size": 16, "kv_blocks": 1024, "role": Role.DECODE, **overrides})  # type: ignore[arg-type]
        engine = SimEngine(config, clock=clock, sleep=clock.sleep)
        engine.start_now()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_pending_decode_holds_its_kv_and_decodes_only_after_the_transfer(
    make_engine: Callable[..., SimEngine],
) -> None:
    clock = FakeClock()
    engine = make_engine(clock, kv_transfer_ms_per_token=0.01)
    req = engine.submit(list(range(640)), 3, kv_pending=True)
    other = engine.submit(list(range(1000, 1064)), 2)  # no PD wait: decodes meanwhile
    assert await other.text()
    await settle()
    assert req.state is RequestState.RUNNING and req.first_token_ms is None  # admitted, waiting for KV
    assert engine.available_kv_tokens < engine.config.total_kv_tokens - 640  # its KV is allocated
    waited_from = clock.now
    engine.kv_ready(req)
    assert len((await req.text()).split()) == 3
    transfer_ms = 640 * 0.01
    c = engine.counters
    assert c.kv_transfer_ms == pytest.approx(transfer_ms) and c.prefill_tokens == 0
    # The first token comes one decode step after the transfer (the clock moved only for those two).
    first_after = req.first_token_ms - (waited_from - 1000.0) * 1000.0
    assert first_after == pytest.approx(transfer_ms + engine.config.decode_step_ms(1))


async def test_kv_ready_before_admission_transfers_at_admission(make_engine: Callable[..., SimEngine]) -> None:
    clock = FakeClock()
    engine = make_engine(clock, max_concurrency=1)
    first = engine.submit(list(range(64)), 4)
    queued = engine.submit(list(range(100, 164)), 2, kv_pending=True)
    engine.kv_ready(queued)  # its prefill is done before a slot frees
    assert queued.state is RequestState.WAITING
    assert await first.text() and await queued.text()
    assert engine.counters.kv_transfer_ms == pytest.approx(64 * engine.config.kv_transfer_ms_per_token)


async def test_kv_failed_ends_the_request_with_the_error_and_frees_its_kv(
    make_engine: Callable[..., SimEngine],
) -> None:
    engine = make_engine(FakeClock())
    req = engine.submit(list(range(640)), 3, kv_pending=True)
    await settle()
    assert engine.kv_failed(req, KvTransferFailed("bootstrap room 7: no KV"))
    with pytest.raises(KvTransferFailed, match="room 7"):
        await req.text()
    assert engine.available_kv_tokens == engine.config.total_kv_tokens and engine.idle
    assert engine.counters.kv_failures == 1 and not engine.kv_failed(req, KvTransferFailed("again"))
    assert await req.prefilled() is False


async def test_only_a_decode_worker_waits_and_a_prefill_reports_its_kv(make_engine: Callable[..., SimEngine]) -> None:
    engine = make_engine(FakeClock(), role=Role.PREFILL)
    with pytest.raises(ValueError, match="only a DECODE worker"):
        engine.submit([1, 2, 3], 1, kv_pending=True)
    req = engine.submit(list(range(64)), 1)
    assert await req.prefilled() is True and req.prefill_ms > 0


def test_bootstrap_fields_are_read_only_when_all_three_are_usable() -> None:
    body = {"bootstrap_host": "10.0.0.7", "bootstrap_port": 8998, "bootstrap_room": 5}
    assert bootstrap_room(body) == BootstrapRoom("10.0.0.7", 8998, 5)
    assert bootstrap_room(body).address == "10.0.0.7:8998"  # type: ignore[union-attr]
    for odd in ({"bootstrap_port": None}, {"bootstrap_port": "8998"}, {"bootstrap_room": -1}, {"bootstrap_host": ""}):
        assert bootstrap_room(body | odd) is None


async def test_the_room_board_wakes_its_waiters_and_forgets_old_rooms() -> None:
    board = RoomBoard(ttl_s=3600, max_rooms=2)
    waiter = asyncio.create_task(board.wait(1, 30))
    await settle()
    board.record(1, {"state": "ready"})
    assert await asyncio.wait_for(waiter, 5) == {"state": "ready"}
    assert await board.wait(2, 0.01) is None and not board._waiters  # a timed-out waiter leaves nothing
    board.record(2, {"state": "failed"})
    board.record(3, {"state": "ready"})
    assert board.get(1) is None and board.get(2) == {"state": "failed"}  # bounded: the oldest goes
