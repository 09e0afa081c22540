"""`flexlb bench run`'s driver: send request specs to an endpoint on an arrival schedule or in a closed loop,
print progress, and collect one record per request sent (plus the workers' counters, when asked)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flexlb.bench.client import RequestRecord, StreamingClient
from flexlb.bench.worker_metrics import read_workers, worker_deltas
from flexlb.bench.workloads import Arrivals, RequestSpec


@dataclass(frozen=True, slots=True)
class RunOptions:
    target: str
    arrivals: Arrivals
    duration_s: float | None = None  # no request is started after this many seconds
    model: str | None = None
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    worker_metrics: tuple[str, ...] = ()
    progress_interval_s: float = 1.0
    more_targets: tuple[str, ...] = ()  # other replicas: request i goes to (target, *more_targets)[i mod n]


@dataclass(slots=True)
class RunOutcome:
    records: list[RequestRecord]  # the requests that were sent, in workload order
    elapsed_s: float  # from the start to the end of the last request (or to the interruption)
    interrupted: bool
    workers: list[dict[str, Any]] | None = None  # worker_deltas, when worker metrics were asked for


@dataclass(slots=True)
class Progress:
    total: int
    sent: int = 0
    done: int = 0
    errors: int = 0
    output_tokens: int = 0
    last_tokens: int = field(default=0, repr=False)

    def line(self, elapsed_s: float, interval_s: float | None = None) -> str:
        """One progress line; with ``interval_s``, the output tokens/s of requests finished since the last one."""
        text = (
            f"  {elapsed_s:6.1f} s  sent {self.sent}/{self.total}  done {self.done}  errors {self.errors}  "
            f"in flight {self.sent - self.done}"
        )
        if interval_s:
            text += f"  {(self.output_tokens - self.last_tokens) / interval_s:.0f} out tok/s"
            self.last_tokens = self.output_tokens
        return text


class _Driver:
    """Sends the specs; one task per request in flight."""

    def __init__(self, specs: Sequence[RequestSpec], options: RunOptions, clients: Sequence[StreamingClient]) -> None:
        self.specs = specs
        self.options = options
        self.clients = clients
        self.records: list[RequestRecord | None] = [None] * len(specs)
        self.finished = [asyncio.Event() for _ in specs]
        self.progress = Progress(len(specs))
        self.tasks: set[asyncio.Task[None]] = set()
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _past_duration(self, at_s: float) -> bool:
        return self.options.duration_s is not None and at_s >= self.options.duration_s

    async def one(self, i: int) -> None:
        spec = self.specs[i]
        try:
            if spec.depends_on is not None:
                await self.finished[spec.depends_on].wait()
            record = RequestRecord(i, spec.tag, spec.api, spec.max_tokens)
            if self.options.arrivals.open_loop:
                record.scheduled_s = spec.arrival_s
            self.records[i] = record
            self.progress.sent += 1
            await self.clients[i % len(self.clients)].send(spec, record, self.t0)
            self.progress.done += 1
            self.progress.errors += 0 if record.ok else 1
            self.progress.output_tokens += record.output_tokens if record.ok else 0
        finally:
            self.finished[i].set()

    async def open_loop(self) -> None:
        for i, spec in enumerate(self.specs):
            if self._past_duration(spec.arrival_s):
                break
            delay = spec.arrival_s - self.elapsed()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(i))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def closed_loop(self) -> None:
        indexes = iter(range(len(self.specs)))  # shared: each client takes the next request in order

        async def client_loop() -> None:
            for i in indexes:
                if self._past_duration(self.elapsed()):
                    return
                await self.one(i)

        concurrency = self.options.arrivals.concurrency or 1
        clients = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
        self.tasks.update(clients)
        await asyncio.gather(*clients)

    async def run(self) -> None:
        await (self.open_loop() if self.options.arrivals.open_loop else self.closed_loop())

    async def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _report_progress(driver: _Driver, interval_s: float, out: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        out(driver.progress.line(driver.elapsed(), interval_s))


async def run_requests(
    specs: Sequence[RequestSpec],
    options: RunOptions,
    *,
    out: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> RunOutcome:
    """Send ``specs`` to ``options.target``; setting ``stop`` ends the run early (in-flight requests are cancelled
    and recorded as errors)."""
    stop = stop or asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=options.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        before = await read_workers(session, options.worker_metrics) if options.worker_metrics else []
        clients = [
            StreamingClient(session, t, model=options.model, ignore_eos=options.ignore_eos)
            for t in (options.target, *options.more_targets)
        ]
        driver = _Driver(specs, options, clients)
        run = asyncio.create_task(driver.run())
        stopped = asyncio.create_task(stop.wait())
        progress = asyncio.create_task(_report_progress(driver, options.progress_interval_s, out))
        try:
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
            interrupted = not run.done()
            if interrupted:
                run.cancel()
                await driver.cancel_all()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
            else:
                run.result()  # re-raise a bug in the driver
        finally:
            for task in (stopped, progress):
                task.cancel()
            await asyncio.gather(stopped, progress, return_exceptions=True)
        stop_s = driver.elapsed()
        out(driver.progress.line(stop_s))
        records = [r for r in driver.records if r is not None]
        ends = [r.end_s for r in records if r.e2e_ms is not None]
        elapsed = stop_s if interrupted or not ends else max(ends)
        workers = None
        if options.worker_metrics:
            after = await read_workers(session, options.worker_metrics)
            workers = worker_deltas(options.worker_metrics, before, after)
    return RunOutcome(records, elapsed, interrupted, workers)
