"""A closed loop of streaming requests spread over several endpoints in turn: request i goes to target i mod n.

``concurrency`` clients each take the workload's next request when their previous one ended, so every strategy
gets the same requests in the same order; setting ``stop`` cancels what is in flight (recorded as errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from flexlb.bench.client import RequestRecord, StreamingClient
from flexlb.bench.workloads import RequestSpec


@dataclass(slots=True)
class LoadProgress:
    total: int
    sent: int = 0
    done: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    records: list[RequestRecord]  # the requests sent, in workload order
    elapsed_s: float  # from the first request's start to the last one's end (or to the interruption)
    interrupted: bool


async def closed_loop(
    session: aiohttp.ClientSession,
    specs: Sequence[RequestSpec],
    targets: Sequence[str],
    concurrency: int,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[LoadProgress, float], None] | None = None,
    progress_interval_s: float = 0.25,
    model: str | None = None,
) -> LoadOutcome:
    """Send ``specs`` through ``targets`` in turn with ``concurrency`` clients; ``on_progress(progress, elapsed_s)``
    is called every ``progress_interval_s`` and once at the end."""
    if not targets:
        raise ValueError("no target to send to")
    stop = stop or asyncio.Event()
    clients = [StreamingClient(session, t, model=model) for t in targets]
    records: list[RequestRecord | None] = [None] * len(specs)
    progress = LoadProgress(len(specs))
    indexes = iter(range(len(specs)))  # shared by the clients: each request is sent once, in order
    t0 = time.perf_counter()

    async def client_loop() -> None:
        for i in indexes:
            spec = specs[i]
            record = records[i] = RequestRecord(i, spec.tag, spec.api, spec.max_tokens)
            progress.sent += 1
            await clients[i % len(clients)].send(spec, record, t0)
            progress.done += 1
            progress.errors += 0 if record.ok else 1

    async def report() -> None:
        while on_progress is not None:
            on_progress(progress, time.perf_counter() - t0)
            await asyncio.sleep(progress_interval_s)

    loops = [asyncio.create_task(client_loop()) for _ in range(min(concurrency, len(specs)) or 1)]
    everything = asyncio.gather(*loops)
    stopped = asyncio.create_task(stop.wait())
    reporter = asyncio.create_task(report())
    try:
        await asyncio.wait({everything, stopped}, return_when=asyncio.FIRST_COMPLETED)
        interrupted = not everything.done()
        if interrupted:
            everything.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await everything
        else:
            everything.result()  # a bug in the loop surfaces here
    finally:
        for task in (stopped, reporter):
            task.cancel()
        await asyncio.gather(stopped, reporter, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    if on_progress is not None:
        on_progress(progress, elapsed)
    sent = [r for r in records if r is not None]
    ends = [r.end_s for r in sent if r.e2e_ms is not None]
    return LoadOutcome(sent, elapsed if interrupted or not ends else max(ends), interrupted)
