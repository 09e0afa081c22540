"""`flexlb demo`'s run: one redis-server, then per strategy a fresh fleet (workers with empty caches, a master,
routers with that ``loadBalanceStrategy``) that gets the same workload through the routers' OpenAI proxy; the
workers' own counters before and after; everything stopped before the next strategy starts."""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flexlb.bench.closed_loop import LoadOutcome, LoadProgress, closed_loop
from flexlb.bench.oracle import OracleCosts, OracleRequest, oracle_bound
from flexlb.bench.worker_metrics import read_workers, worker_deltas
from flexlb.bench.workloads import RequestSpec
from flexlb.demo import report
from flexlb.demo.params import DemoParams, describe
from flexlb.domain import Role
from flexlb.stack.interrupts import Interrupts
from flexlb.stack.local import Service, Stack
from flexlb.stack.terminal import Terminal

REQUEST_TIMEOUT_S = 120.0


@dataclass
class DemoRun:
    """The state of one run, kept so an interruption can still report what finished and every process started."""

    params: DemoParams
    stack: Stack
    specs: list[RequestSpec]
    interrupts: Interrupts = field(default_factory=Interrupts)
    strategies: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    failed: str | None = None


def oracle(params: DemoParams, specs: list[RequestSpec]) -> dict[str, Any]:
    """The oracle's bound on ``specs`` with the prefilling workers' costs (see flexlb.bench.oracle). It bounds a
    disaggregated fleet's TTFT too: its decode workers wait for their prefill's KV (flexlb.sim.kv_transfer)."""
    role = params.fleet.compute_role
    config = params.worker_options(role).engine_config(role)
    requests = [OracleRequest.from_prompt(s.rendered(), s.max_tokens, config.block_size) for s in specs]
    bound = oracle_bound(requests, OracleCosts.of(config))
    return report.oracle_result(bound, ttft_comparable=True)


async def _measure(
    run: DemoRun, service: Service, on_progress: Callable[[LoadProgress, float], None]
) -> tuple[LoadOutcome, list[dict[str, Any]], list[dict[str, Any]]]:
    """Counters before, the closed loop through the routers in turn, counters after. SIGINT / SIGTERM end the loop
    (in-flight requests are cancelled) instead of the process, so the caller reports and stops the stack."""
    compute = [w.url for w in service.workers if w.role is not Role.DECODE]
    decode = [w.url for w in service.workers if w.role is Role.DECODE]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    run.interrupts.on_loop(loop, stop.set)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            before = await read_workers(session, compute + decode)
            outcome = await closed_loop(
                session,
                run.specs,
                [r.url for r in service.routers],
                run.params.concurrency,
                stop=stop,
                on_progress=on_progress,
            )
            after = await read_workers(session, compute + decode)
    finally:
        run.interrupts.off_loop(loop)
    n = len(compute)
    rows_compute = worker_deltas(compute, before[:n], after[:n])
    rows_decode = worker_deltas(decode, before[n:], after[n:])
    return outcome, rows_compute, rows_decode


def _cpu(service: Service) -> dict[str, float | None]:
    """CPU seconds used so far by each process of the service and by this one (the load generator)."""
    times = os.times()
    return {"client": times.user + times.system} | {c.name: c.cpu_seconds() for c in service.children}


def _run_strategy(run: DemoRun, step: int, strategy: str, nonce: str, term: Terminal) -> dict[str, Any]:
    params, stack = run.params, run.stack
    steps = len(params.strategies)
    roles = params.fleet.roles()
    term.overwrite(
        report.status_line(
            step, steps, strategy, f"starting {params.fleet.describe()}, a master and {params.routers} routers ..."
        )
    )
    started = time.monotonic()
    options = {role: params.worker_options(role) for role in set(roles)}
    router_config = {"contendForMaster": False, "loadBalanceStrategy": strategy}
    service_id = f"demo-{strategy.lower()}-{nonce}"
    service = stack.start_service(service_id, roles, options, params.routers, router_config)
    startup_s = time.monotonic() - started
    cpu_before = _cpu(service)
    try:

        def on_progress(p: LoadProgress, elapsed_s: float) -> None:
            term.overwrite(report.progress_line(step, steps, strategy, p.done, p.total, p.errors, elapsed_s))

        run.interrupts.check()
        outcome, compute, decode = asyncio.run(_measure(run, service, on_progress))
        cpu_after = _cpu(service)
        stack.check_alive(service)
    finally:
        stack.stop_service(service)
    result = report.strategy_result(
        strategy, service_id, outcome.records, outcome.elapsed_s, outcome.interrupted, compute, decode, startup_s
    )
    result["cpu"] = report.cpu_usage(cpu_before, cpu_after, outcome.elapsed_s)
    s, fleet = result["summary"], result["fleet"]
    term.line(
        report.status_line(
            step,
            steps,
            strategy,
            f"{s['ok']}/{s['requests']} ok in {s['elapsed_s']:.1f} s, TTFT mean {report.num(s['ttft_ms']['mean'])} "
            f"ms, worker hit {report.pct(fleet['hit_ratio'])}, busiest worker {report.pct(fleet['busiest_share'])}",
        ).rstrip()
    )
    return result


def run_demo(run: DemoRun, term: Terminal) -> None:
    """Run every strategy of ``run.params`` into ``run.strategies``; stops early (``run.interrupted``) on SIGINT /
    SIGTERM during a strategy's load; a KeyboardInterrupt outside of it propagates. The caller closes the stack."""
    params = run.params
    nonce = secrets.token_hex(3)
    url = run.stack.start_redis()
    redis_pid = run.stack.redis.pid if run.stack.redis else "?"
    term.line(f"flexlb demo: redis-server at {url} (pid {redis_pid}); process logs in {run.stack.log_dir}")
    for step, strategy in enumerate(params.strategies, 1):
        result = _run_strategy(run, step, strategy, nonce, term)
        run.strategies.append(result)
        if result["interrupted"] or run.interrupts.requested:
            run.interrupted = True
            return


def build_result(run: DemoRun, oracle: dict[str, Any], started_at: float) -> dict[str, Any]:
    return {
        "benchmark": "demo",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "duration_s": time.time() - started_at,
        "config": describe(run.params),
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
        },
        "interrupted": run.interrupted,
        "error": run.failed,
        "strategies": run.strategies,
        "oracle": oracle,
        "processes": [child.describe() for child in run.stack.started],
    }
