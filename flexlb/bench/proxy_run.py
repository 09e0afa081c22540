"""`flexlb bench proxy`, the I/O part: a redis-server, one simulated worker and one router (contendForMaster true:
it polls the worker itself), then the phases of ``proxy_overhead.phase_plan`` against the worker and the router.

Each phase also measures the router process's CPU time (from /proc, on Linux): during a proxy phase that is the
proxy's cost per request plus the router's polling of the worker, which the direct phases show alone."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flexlb.bench import proxy_overhead as po
from flexlb.bench.client import ERROR_TEXT_LIMIT, RequestRecord, base_url, payload
from flexlb.bench.closed_loop import LoadOutcome, LoadProgress, closed_loop
from flexlb.bench.stats import summarize
from flexlb.bench.workloads import RequestSpec
from flexlb.domain import Role
from flexlb.stack.interrupts import Interrupts
from flexlb.stack.local import Stack, StackError
from flexlb.stack.processes import Child, process_cpu_seconds, spawn, stop_all
from flexlb.stack.terminal import Terminal
from flexlb.stack.worker_options import WorkerOptions

REQUEST_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class BenchWorkerOptions(WorkerOptions):
    """The demo's worker options plus the engine speed options the bench was given."""

    engine: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [*WorkerOptions.argv(self), *self.engine]


class RouterProfiler:
    """py-spy recording the router process while a proxy phase runs; the phases' samples add up in ``path``."""

    def __init__(self, pid: int, path: Path, log_dir: Path, rate: int = 250) -> None:
        binary = shutil.which("py-spy")
        if binary is None:
            raise StackError("--profile-router needs py-spy on PATH (pip install py-spy)")
        self.binary, self.pid, self.path, self.log_dir, self.rate = binary, pid, path, log_dir, rate
        self.samples: Counter[str] = Counter()
        self._child: Child | None = None

    def start(self) -> None:
        part = self.path.with_name(self.path.name + ".part")
        command = [self.binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--nonblocking"]
        command += ["--format", "raw", "--output", str(part)]
        # A log per phase: an error message quotes this phase's py-spy, not an earlier one's.
        self._child = spawn("py-spy", command, self.log_dir, truncate=True)

    def stop(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.process.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        try:
            child.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_all([child], grace_s=0)
            raise StackError("py-spy did not stop within 30 s") from None
        part = self.path.with_name(self.path.name + ".part")
        if not part.exists():
            raise StackError(f"py-spy wrote no samples: {child.log_tail(500).strip()}")
        for line in part.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                self.samples[stack] += int(n)
        part.unlink()
        self.path.write_text("".join(f"{stack} {n}\n" for stack, n in self.samples.items()))

    def result(self) -> dict[str, Any]:
        samples, parts = po.profile_parts(self.path.read_text() if self.path.exists() else "")
        return {"path": str(self.path), "samples": samples, "parts": parts}


async def _send_plain(session: aiohttp.ClientSession, url: str, spec: RequestSpec, record: RequestRecord) -> None:
    """One request whose answer comes whole: E2E only; output tokens from its usage."""
    body = payload(spec, None, ignore_eos=True)
    body["stream"] = False
    del body["stream_options"]
    data = orjson.dumps(body)
    start = time.perf_counter()
    try:
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
            record.status = resp.status
            answer = await resp.read()
        if resp.status != 200:
            record.error = f"HTTP {resp.status}: {answer[:ERROR_TEXT_LIMIT].decode('utf-8', 'replace')}"
        else:
            usage = orjson.loads(answer).get("usage") or {}
            record.output_tokens = int(usage.get("completion_tokens") or 0)
    except asyncio.CancelledError:
        record.error = "cancelled: the run was interrupted"
        raise
    except TimeoutError:
        record.error = "timeout"
    except (aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
    finally:
        record.e2e_ms = (time.perf_counter() - start) * 1000


async def _plain_loop(
    session: aiohttp.ClientSession,
    specs: list[RequestSpec],
    target: str,
    concurrency: int,
    stop: asyncio.Event,
    on_progress: Callable[[LoadProgress, float], None],
) -> LoadOutcome:
    """``closed_loop`` for answers not streamed: ``concurrency`` clients each send the next request when theirs
    ended; ``stop`` cancels what is in flight."""
    url = f"{base_url(target)}/v1/completions"
    records: list[RequestRecord] = []
    progress = LoadProgress(len(specs))
    indexes = iter(range(len(specs)))
    t0 = time.perf_counter()

    async def client() -> None:
        for i in indexes:
            record = RequestRecord(i, specs[i].tag, specs[i].api, specs[i].max_tokens)
            records.append(record)
            record.start_s = time.perf_counter() - t0
            progress.sent += 1
            await _send_plain(session, url, specs[i], record)
            progress.done += 1
            progress.errors += 0 if record.ok else 1

    async def report() -> None:
        while True:
            on_progress(progress, time.perf_counter() - t0)
            await asyncio.sleep(0.5)

    clients = asyncio.gather(*(client() for _ in range(min(concurrency, len(specs)))))
    stopped, reporter = asyncio.create_task(stop.wait()), asyncio.create_task(report())
    try:
        await asyncio.wait({clients, stopped}, return_when=asyncio.FIRST_COMPLETED)
        interrupted = not clients.done()
        if interrupted:
            clients.cancel()
        await asyncio.gather(clients, return_exceptions=True)
    finally:
        stopped.cancel()
        reporter.cancel()
        await asyncio.gather(stopped, reporter, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    on_progress(progress, elapsed)
    records.sort(key=lambda r: r.index)
    ends = [r.end_s for r in records if r.e2e_ms is not None]
    return LoadOutcome(records, elapsed if interrupted or not ends else max(ends), interrupted)


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
            if not params.stream:
                return await _plain_loop(session, specs, url, params.concurrency, stop, on_progress)
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
    worker_options = BenchWorkerOptions(
        kv_blocks=4096,
        max_concurrency=params.max_concurrency,
        time_scale=params.time_scale,
        engine=tuple(params.engine_argv()),
    )
    options = {Role.PDFUSION: worker_options}
    service = stack.start_service("bench-proxy", [Role.PDFUSION], options, 1, params.router_config(), master=False)
    (worker,), (router,) = service.workers, service.routers
    targets = {"direct": worker.url, "proxy": router.url}
    term.line(f"worker {worker.url} (pid {worker.child.pid}), router {router.url} (pid {router.child.pid})")
    profiler = None
    if params.profile_router:
        profiler = RouterProfiler(router.child.pid, Path(params.profile_router).resolve(), stack.log_dir)
        profiler.path.unlink(missing_ok=True)
    phases: list[dict[str, Any]] = []
    interrupted = False
    for index, (round_, mode) in enumerate(po.phase_plan(params.rounds)):
        interrupts.check()

        def progress(p: LoadProgress, elapsed_s: float, mode: str = mode, round_: int = round_) -> None:
            term.overwrite(
                f"round {round_} {mode:<6} {p.done:>5}/{p.total} done  {p.errors} errors  {elapsed_s:5.1f} s"
            )

        profiling = profiler is not None and mode == "proxy"
        if profiling:
            profiler.start()
        cpu_before = process_cpu_seconds(router.child.pid)
        try:
            outcome = asyncio.run(_phase(targets[mode], params, index, interrupts, progress))
        finally:
            cpu_after = process_cpu_seconds(router.child.pid)
            if profiling:
                profiler.stop()
        term.line()
        ok = [r for r in outcome.records if r.ok]
        phases.append(
            {
                "round": round_,
                "mode": mode,
                "target": targets[mode],
                "router_cpu_s": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
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
    extra = {"router_profile": profiler.result()} if profiler is not None else {}
    return extra | {
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
