"""The chaos bench's CounterSampler stops even when a cancellation is lost in its Redis read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flexlb.bench import chaos


async def test_the_sampler_stops_when_its_read_swallows_the_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    reading = asyncio.Event()
    stop_reading = False

    async def swallowing_read(fleet: Any) -> list[str]:
        reading.set()
        while not stop_reading:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # lost, as redis-py can lose one in a read completing at the same moment
                break
        return []

    monkeypatch.setattr(chaos, "counter_mismatches", swallowing_read)
    sampler = chaos.CounterSampler(fleet=None)  # type: ignore[arg-type]
    await sampler.__aenter__()
    await asyncio.wait_for(reading.wait(), 5)
    leaving = asyncio.ensure_future(sampler.__aexit__(None, None, None))
    done, _ = await asyncio.wait({leaving}, timeout=5)
    stop_reading = True
    if leaving not in done:  # before the fix: it sampled on for ever; end it here, then fail
        assert sampler._task is not None
        while not sampler._task.done():
            sampler._task.cancel()
            await asyncio.sleep(0.01)
        await leaving
    assert leaving in done, "the sampler did not stop"
