"""`flexlb bench proxy`, the I/O part: a redis-server, one simulated worker and one router (contendForMaster true:
it polls the worker itself), then the phases of ``proxy_overhead.phase_plan`` against the worker and the router."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from flexlb.bench import proxy_overhead as po
from flexlb.bench.stats import summarize
from flexlb.demo.interrupts import Interrupts
from flexlb.demo.load import LoadOutcome, LoadProgress, closed_loop
from flexlb.demo.params import WorkerOptions
from flexlb.demo.stack import Stack
from flexlb.demo.terminal import Terminal
from flexlb.domain import Role

REQUEST_TIMEOUT_S = 60.0


async def _phase(
    url: str,
    params: po.ProxyBenchParams,
    index: int,
    interrupts: Interrupts,
    on_progress: Callable[[LoadProgress, float], None],
) -> LoadOutcome:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts.on_loop(loop, stop.set)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            specs = po.phase_specs(params, index)
            return await closed_loop(
                session, specs, [url], params.concurrency, stop=stop, on_progress=on_progress, progress_interval_s=0.5
            )
    finally:
        interrupts.off_loop(loop)


def run_proxy_bench(
    params: po.ProxyBenchParams, stack: Stack, interrupts: Interrupts, term: Terminal
) -> dict[str, Any]:
    """Start the stack, run every phase, return the result (``interrupted`` when a signal cut it short). The
    caller closes ``stack`` and adds the processes it started."""
    stack.start_redis()
    # Room for every request in flight: the worker never queues, so both modes see the same engine.
    options = {Role.PDFUSION: WorkerOptions(kv_blocks=4096, max_concurrency=64, time_scale=params.time_scale)}
    service = stack.start_service("bench-proxy", [Role.PDFUSION], options, 1, {"contendForMaster": True}, master=False)
    (worker,), (router,) = service.workers, service.routers
    targets = {"direct": worker.url, "proxy": router.url}
    term.line(f"worker {worker.url} (pid {worker.child.pid}), router {router.url} (pid {router.child.pid})")
    phases: list[dict[str, Any]] = []
    interrupted = False
    for index, (round_, mode) in enumerate(po.phase_plan(params.rounds)):
        interrupts.check()

        def progress(p: LoadProgress, elapsed_s: float, mode: str = mode, round_: int = round_) -> None:
            term.overwrite(
                f"round {round_} {mode:<6} {p.done:>5}/{p.total} done  {p.errors} errors  {elapsed_s:5.1f} s"
            )

        outcome = asyncio.run(_phase(targets[mode], params, index, interrupts, progress))
        term.line()
        ok = [r for r in outcome.records if r.ok]
        phases.append(
            {
                "round": round_,
                "mode": mode,
                "target": targets[mode],
                "summary": summarize(outcome.records, outcome.elapsed_s),
                "latencies": {
                    "ttft_ms": [r.ttft_ms for r in ok if r.ttft_ms is not None],
                    "e2e_ms": [r.e2e_ms for r in ok if r.e2e_ms is not None],
                },
            }
        )
        stack.check_alive(service)
        if outcome.interrupted or interrupts.requested:
            interrupted = True
            break
    modes = {mode: po.combine(phases, mode) for mode in po.MODES}
    return {
        "benchmark": "proxy",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(params) | {"worker_options": options[Role.PDFUSION].argv()},
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
        },
        "interrupted": interrupted,
        "phases": phases,
        "modes": modes,
        "added": po.added(modes["direct"], modes["proxy"]),
    }
