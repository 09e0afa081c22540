"""`flexlb bench control`: how fresh the fleet status in Redis is, and what the master's polling costs.

The stack: a redis-server (REDIS_URL / --redis-url, or an embedded one), ``--workers`` simulated workers in one
``flexlb sim-worker --count`` process, registered under a fresh service id, and one ``flexlb master`` polling them.

1. Idle phase: nothing happens for ``--duration`` seconds; the master's CPU (its process CPU time from
   /proc/<pid>/stat over the wall time) is what polling an idle fleet costs.
2. Busy phase: for ``--duration`` seconds, requests go straight to the workers of a fraction of the fleet (at most
   one at a time per worker, ``--rate`` per second in all). Each one changes its worker's state twice: ``running``
   goes 0 -> 1 when it arrives and 1 -> 0 when it finishes. A watcher reads those workers' ``running`` field from
   Redis every ``--watch-interval-ms`` and records, per change, the time from the change until Redis shows it:
   the **freshness** of the fleet status (the age of Redis' view of a worker that has just changed).

The change times are taken in this process: just before the request is sent (the worker changes a little later) and
when its answer arrives (the worker finished a little earlier), so both are off by about one local HTTP round trip,
in opposite directions. The watcher's own period adds up to one interval to every sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from flexlb.bench.report import Target, latency_summary
from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.ports import free_port, free_ports
from flexlb.stack.processes import Child, NotReady, spawn, stop_all, wait_http_ready
from flexlb.state.store import FleetStore

TARGET_P99_MS = 100.0  # freshness p99 at 1,250 workers
TARGET_BUSY_CORES = 1.0  # master CPU at 1,250 workers
TARGET_IDLE_CORES_4 = 0.05  # master CPU for 4 idle workers
LARGE_FLEET = 1250
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT = " ".join(f"w{i}" for i in range(16))


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class ControlBenchParams:
    workers: int = 4
    duration_s: float = 10.0  # each phase
    busy_fraction: float = 0.2  # of the workers get requests in the busy phase
    rate: float | None = None  # requests/s over the busy workers (default: 2 per busy worker, at most 250)
    request_tokens: int = 16  # max_tokens of each request (~8 ms a token on the default simulated engine)
    settle_s: float = 2.0  # after every worker was polled once, before the idle phase
    watch_interval_ms: float = 2.0
    redis_url: str | None = None
    startup_timeout_s: float = 60.0
    seed: int | None = None
    poll_shards: int = 1  # `flexlb master` processes, one shard each (pollShards); 1: one master polls all

    @property
    def busy_workers(self) -> int:
        return max(1, min(self.workers, math.ceil(self.workers * self.busy_fraction)))

    @property
    def request_rate(self) -> float:
        return self.rate if self.rate is not None else min(250.0, 2.0 * self.busy_workers)


def process_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (/proc/<pid>/stat utime, stime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return sum(process_cpu_times(pid))


def master_polls(master_url: str) -> float:
    """Status polls the master made so far (its flexlb_master_polls_total, rpc=status, any result)."""
    import urllib.request

    with urllib.request.urlopen(f"{master_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("flexlb_master_polls_total{") and 'rpc="status"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class CpuWindow:
    """CPU seconds of some processes over one wall-clock window."""

    pids: dict[str, int]
    master_urls: list[str] = field(default_factory=list)
    started: float = 0.0
    cpu0: dict[str, tuple[float, float]] = field(default_factory=dict)
    polls0: float = 0.0

    def start(self) -> CpuWindow:
        self.started = time.monotonic()
        self.cpu0 = {name: process_cpu_times(pid) for name, pid in self.pids.items()}
        self.polls0 = sum(map(master_polls, self.master_urls))
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        out: dict[str, Any] = {"wall_s": wall}
        for name, pid in self.pids.items():
            user, system = process_cpu_times(pid)
            user, system = user - self.cpu0[name][0], system - self.cpu0[name][1]
            out[f"{name}_cpu_s"] = user + system
            out[f"{name}_user_s"], out[f"{name}_sys_s"] = user, system
            out[f"{name}_cores"] = (user + system) / wall if wall > 0 else math.nan
        masters = [name for name in self.pids if name.startswith("master")]
        if len(masters) > 1:  # the pollers together: "master_cores" is all of them, as one master's with one
            for what in ("cpu_s", "user_s", "sys_s", "cores"):
                out[f"master_{what}"] = sum(out[f"{name}_{what}"] for name in masters)
        if self.master_urls:
            polls = sum(map(master_polls, self.master_urls)) - self.polls0
            out["status_polls_per_s"] = polls / wall if wall > 0 else math.nan
            out["master_cpu_us_per_poll"] = out["master_cpu_s"] / polls * 1e6 if polls else math.nan
        return out


@dataclass
class ControlStack:
    params: ControlBenchParams
    service: str
    redis_url: str = ""
    embedded: EmbeddedRedis | None = None
    sim: Child | None = None
    masters: list[Child] = field(default_factory=list)
    base_port: int = 0
    master_urls: list[str] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flexlb-bench-control-")))

    @property
    def specs(self) -> list[WorkerSpec]:
        return [WorkerSpec("127.0.0.1", self.base_port + 2 * i, Role.PDFUSION) for i in range(self.params.workers)]

    def log(self, name: str, chars: int = 3000) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "REDIS_URL": self.redis_url, "FLEXLB_SERVICE_ID": self.service}
        if self.params.poll_shards > 1:
            config = json.loads(env.get("FLEXLB_CONFIG") or "{}")
            env["FLEXLB_CONFIG"] = json.dumps({**config, "pollShards": self.params.poll_shards})
        return env

    def _spawn(self, name: str, args: list[str]) -> Child:
        # A retried start begins a new log: its checks must not read the failed attempt's lines.
        command = [sys.executable, "-m", "flexlb.cli", "--log-level", "WARNING", *args]
        return spawn(name, command, self.log_dir, self._env(), truncate=True)

    def start_redis(self) -> None:
        if self.params.redis_url:
            self.redis_url = self.params.redis_url
        else:
            self.embedded = EmbeddedRedis().start()
            self.redis_url = self.embedded.url

    def start_sim(self, rng: random.Random) -> None:
        n = self.params.workers
        for _ in range(5):
            self.base_port = free_ports(2 * n, rng=rng)
            args = ["sim-worker", "--role", "pdfusion", "--port", str(self.base_port), "--count", str(n)]
            self.sim = self._spawn("sim", args)
            deadline = time.monotonic() + self.params.startup_timeout_s
            while time.monotonic() < deadline:
                if "ready on ports" in self.log("sim"):
                    return
                if not self.sim.alive():
                    break
                time.sleep(0.05)
            else:
                raise BenchError(f"{n} simulated workers not ready in {self.params.startup_timeout_s:g}s")
            if "cannot bind" not in self.log("sim") and "in use" not in self.log("sim"):
                raise BenchError(f"sim-worker exited with {self.sim.process.returncode}:\n{self.log('sim')}")
        raise BenchError(f"sim-worker could not bind its ports:\n{self.log('sim')}")

    def master_name(self, i: int) -> str:
        return "master" if i == 0 else f"master{i}"

    def start_masters(self) -> None:
        """One `flexlb master` per polling shard (they share the shards out among themselves)."""
        for i in range(self.params.poll_shards):
            name, port = self.master_name(i), free_port()
            url = f"http://127.0.0.1:{port}"
            child = self._spawn(name, ["master", "--host", "127.0.0.1", "--port", str(port)])
            self.masters.append(child)
            self.master_urls.append(url)
            try:
                wait_http_ready(url, child.process, child.log_tail, name, 30)
            except NotReady as exc:
                raise BenchError(str(exc)) from None

    def check(self) -> None:
        named = [("sim", self.sim), *((self.master_name(i), p) for i, p in enumerate(self.masters))]
        for name, child in named:
            if child is not None and not child.alive():
                raise BenchError(f"{name} exited with {child.process.returncode}:\n{self.log(name)}")

    def close(self, *, keep_logs: bool = False) -> None:
        stop_all(self.masters)
        if self.sim is not None:
            stop_all([self.sim])
        if self.embedded is not None:
            self.embedded.close()
        elif self.redis_url:
            with contextlib.suppress(Exception):
                import redis as redis_sync

                client = redis_sync.Redis.from_url(self.redis_url, socket_timeout=5)
                keys = list(client.scan_iter(match=f"flexlb:{{{self.service}}}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])
                client.close()
        if not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


# ---- the measured phases ----


@dataclass
class Watch:
    worker_id: str
    want_running: int  # the value of `running` that shows the change
    changed_at: float  # monotonic s
    kind: str  # "start" | "finish"


@dataclass
class BusyOutcome:
    start_ms: list[float] = field(default_factory=list)
    finish_ms: list[float] = field(default_factory=list)
    requests: int = 0
    request_errors: int = 0
    missed: int = 0  # changes undone before Redis showed them (a request shorter than the master's delay)
    unseen: int = 0  # changes still not shown when the phase ended
    first_error: str = ""


async def wait_all_polled(redis: aioredis.Redis, store: FleetStore, specs: list[WorkerSpec], timeout_s: float) -> None:
    """Until the master wrote a polled status (``kv_total`` from the worker) for every worker."""
    deadline = time.monotonic() + timeout_s
    pending = [s.worker_id for s in specs]
    while pending:
        async with redis.pipeline(transaction=False) as pipe:
            for wid in pending:
                pipe.hget(store.keys.worker(wid), "kv_total")
            values = await pipe.execute()
        pending = [wid for wid, v in zip(pending, values, strict=True) if not v or v == "0"]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} workers never polled by the master within {timeout_s:g}s")
        await asyncio.sleep(0.1)


async def busy_phase(
    params: ControlBenchParams, stack: ControlStack, redis: aioredis.Redis, store: FleetStore, rng: random.Random
) -> BusyOutcome:
    out = BusyOutcome()
    specs = rng.sample(stack.specs, params.busy_workers)
    free = {s.worker_id: s for s in specs}
    watches: dict[str, list[Watch]] = {}
    stop_at = time.monotonic() + params.duration_s
    watch_s = params.watch_interval_ms / 1000
    body = {"model": "flexlb-sim", "prompt": PROMPT, "max_tokens": params.request_tokens}

    def watch(w: Watch) -> None:
        watches.setdefault(w.worker_id, []).append(w)

    async def one(session: aiohttp.ClientSession, spec: WorkerSpec) -> None:
        out.requests += 1
        watch(Watch(spec.worker_id, 1, time.monotonic(), "start"))
        try:
            async with session.post(f"http://127.0.0.1:{spec.http_port}/v1/completions", json=body) as resp:
                text = await resp.read()
                ok = resp.status == 200
        except aiohttp.ClientError as exc:
            ok, text = False, repr(exc).encode()
        finished = time.monotonic()
        if not ok:
            out.request_errors += 1
            out.first_error = out.first_error or text[:300].decode(errors="replace")
        pending = watches.get(spec.worker_id, [])
        for w in pending:
            if w.kind == "start":  # never shown while it ran: the master missed the whole request
                out.missed += 1
        pending[:] = [w for w in pending if w.kind != "start"]
        watch(Watch(spec.worker_id, 0, finished, "finish"))
        free[spec.worker_id] = spec

    drained: list[float] = []  # when every request had ended

    async def watcher() -> None:
        while not drained or watches:
            if watches:
                ids = list(watches)
                async with redis.pipeline(transaction=False) as pipe:
                    for wid in ids:
                        pipe.hget(store.keys.worker(wid), "running")
                    values = await pipe.execute()
                now = time.monotonic()
                for wid, value in zip(ids, values, strict=True):
                    pending = watches.get(wid)
                    if not pending:
                        continue
                    running = int(value or 0)
                    w = pending[0]
                    if (running >= 1) if w.want_running else (running == 0):
                        (out.start_ms if w.kind == "start" else out.finish_ms).append((now - w.changed_at) * 1000)
                        pending.pop(0)
                    if not pending:
                        watches.pop(wid, None)
                if drained and time.monotonic() > drained[0] + 5:  # not shown 5 s after the end: never
                    out.unseen += sum(len(p) for p in watches.values())
                    watches.clear()
            await asyncio.sleep(watch_s)

    connector = aiohttp.TCPConnector(limit=0, limit_per_host=2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        watch_task = asyncio.create_task(watcher())
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / params.request_rate
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            if free:
                wid = rng.choice(list(free))
                spec = free.pop(wid)
                task = asyncio.create_task(one(session, spec))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(1.0 / interval)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks)
        drained.append(time.monotonic())
        await watch_task
    return out


async def _run_phases(
    params: ControlBenchParams, stack: ControlStack, rng: random.Random, out: Callable[[str], None]
) -> dict[str, Any]:
    from flexlb.app import make_redis

    redis = make_redis(stack.redis_url, 5000)
    try:
        store = FleetStore(redis, stack.service)
        specs = stack.specs
        for spec in specs:
            await store.register_worker(spec)
        stack.start_masters()
        assert stack.masters and stack.sim is not None
        started = time.monotonic()
        await wait_all_polled(redis, store, specs, params.startup_timeout_s)
        out(f"all {len(specs)} workers polled {time.monotonic() - started:.1f}s after the master started")
        await asyncio.sleep(params.settle_s)
        stack.check()
        pids = {stack.master_name(i): p.pid for i, p in enumerate(stack.masters)}
        pids["sim"] = stack.sim.pid
        if stack.embedded is not None and stack.embedded.process is not None:
            pids["redis"] = stack.embedded.process.pid
        out(f"idle phase: {params.duration_s:g}s")
        window = CpuWindow(pids, stack.master_urls).start()
        await asyncio.sleep(params.duration_s)
        idle = window.stop()
        stack.check()
        out(f"busy phase: {params.duration_s:g}s, {params.request_rate:g} requests/s on {params.busy_workers} workers")
        window = CpuWindow(pids, stack.master_urls).start()
        outcome = await busy_phase(params, stack, redis, store, rng)
        busy = window.stop()
        stack.check()
        return {"idle": idle, "busy": busy, "outcome": outcome}
    finally:
        await redis.aclose()


def run_control_bench(params: ControlBenchParams, *, out: Callable[[str], None] = print) -> dict[str, Any]:
    seed = params.seed if params.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    stack = ControlStack(params, service=f"bench-control-{rng.getrandbits(32):08x}")
    failed = True
    try:
        stack.start_redis()
        stack.start_sim(rng)
        out(f"{params.workers} simulated workers in sim-worker pid {stack.sim.pid if stack.sim else '?'}")
        measured = asyncio.run(_run_phases(params, stack, rng, out))
        failed = False
    finally:
        stack.close(keep_logs=failed)
    return build_result(params, seed, stack, measured)


def build_result(
    params: ControlBenchParams, seed: int, stack: ControlStack, measured: dict[str, Any]
) -> dict[str, Any]:
    outcome: BusyOutcome = measured["outcome"]
    both = outcome.start_ms + outcome.finish_ms
    freshness = latency_summary(both)
    idle, busy = measured["idle"], measured["busy"]
    targets = []
    if params.workers >= LARGE_FLEET:
        targets += [
            Target(f"freshness p99 ms, {params.workers} workers", TARGET_P99_MS, False, freshness["p99"]),
            Target(f"master cores, busy, {params.workers} workers", TARGET_BUSY_CORES, False, busy["master_cores"]),
            Target(f"master cores, idle, {params.workers} workers", TARGET_BUSY_CORES, False, idle["master_cores"]),
        ]
    if params.workers <= 4:
        targets.append(Target("master cores, 4 idle workers", TARGET_IDLE_CORES_4, False, idle["master_cores"]))
    notes = [
        "freshness = time from a worker's state change (running 0 -> 1 at a request's start, 1 -> 0 at its end) "
        "until the worker's hash in Redis shows it; the watcher reads Redis every "
        f"{params.watch_interval_ms:g} ms, which adds up to that much to each sample",
        "cores = CPU seconds of the process (/proc/<pid>/stat utime + stime) / wall seconds of the phase; master "
        "cores = the sum over every `flexlb master` process",
        f"the simulated workers, redis-server, the master and this driver share this machine's {os.cpu_count()} CPUs",
    ]
    if outcome.missed:
        notes.append(f"{outcome.missed} request(s) ended before Redis showed them running (counted as missed)")
    return {
        "benchmark": "control",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": {
            **dataclasses.asdict(params),
            "redis_url": "external" if params.redis_url else None,
            "seed": seed,
            "busy_workers": params.busy_workers,
            "request_rate": params.request_rate,
        },
        "environment": {
            "cpu_count": os.cpu_count(),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
            "service_id": stack.service,
            "flexlb_config": os.environ.get("FLEXLB_CONFIG", ""),
        },
        "results": {
            "idle": idle,
            "busy": {
                **busy,
                "requests": outcome.requests,
                "request_errors": outcome.request_errors,
                "first_error": outcome.first_error,
                "changes_seen": len(both),
                "changes_missed": outcome.missed,
                "changes_unseen": outcome.unseen,
                "freshness_ms": freshness,
                "freshness_start_ms": latency_summary(outcome.start_ms),
                "freshness_finish_ms": latency_summary(outcome.finish_ms),
            },
        },
        "targets": [t.to_json() for t in targets],
        "notes": notes,
    }


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"


def _masters(shards: int) -> str:
    return "1 master" if shards == 1 else f"{shards} `flexlb master` processes sharing {shards} polling shards"


def render_control_table(result: dict[str, Any]) -> str:
    p, res = result["parameters"], result["results"]
    idle, busy = res["idle"], res["busy"]
    fresh, start, finish = busy["freshness_ms"], busy["freshness_start_ms"], busy["freshness_finish_ms"]
    load = ", ".join(f"{x:.2f}" for x in result["environment"]["load_average"])
    lines = [
        f"flexlb bench control: {p['workers']} simulated workers (1 process), "
        f"{_masters(p.get('poll_shards', 1))}; phases of "
        f"{p['duration_s']:g} s; busy: {p['request_rate']:g} requests/s on {p['busy_workers']} workers; "
        f"load average {load}",
        "",
    ]
    rows = [
        ["master cores (all pollers), idle / busy", f"{_num(idle['master_cores'])} / {_num(busy['master_cores'])}"],
        ["  of which kernel (sys), idle / busy", f"{_num(idle['master_sys_s'] / idle['wall_s'])} / "
         f"{_num(busy['master_sys_s'] / busy['wall_s'])}"],
        ["status polls/s, idle / busy", f"{_num(idle['status_polls_per_s'], 0)} / "
         f"{_num(busy['status_polls_per_s'], 0)}"],
        ["master CPU per poll, idle / busy", f"{_num(idle['master_cpu_us_per_poll'], 1)} / "
         f"{_num(busy['master_cpu_us_per_poll'], 1)} us"],
        ["sim-worker cores, idle / busy", f"{_num(idle['sim_cores'])} / {_num(busy['sim_cores'])}"],
    ]  # fmt: skip
    if "redis_cores" in idle:
        rows.append(["redis-server cores, idle / busy", f"{_num(idle['redis_cores'])} / {_num(busy['redis_cores'])}"])
    rows += [
        ["requests (errors)", f"{busy['requests']} ({busy['request_errors']})"],
        ["changes seen / missed / unseen", f"{busy['changes_seen']} / {busy['changes_missed']} / "
         f"{busy['changes_unseen']}"],
        ["freshness p50 / p99 / max", f"{_num(fresh['p50'], 1)} / {_num(fresh['p99'], 1)} / "
         f"{_num(fresh['max'], 1)} ms"],
        ["  at a start, p50 / p99", f"{_num(start['p50'], 1)} / {_num(start['p99'], 1)} ms"],
        ["  at a finish, p50 / p99", f"{_num(finish['p50'], 1)} / {_num(finish['p99'], 1)} ms"],
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines += [f"{a.ljust(widths[0])}  {b}" for a, b in rows]
    if result["targets"]:
        lines.append("")
        for t in result["targets"]:
            lines.append(f"{t['name']}: {t['goal']}, measured {_num(t['value'])}: {t['result']}")
    lines += ["", *(f"note: {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"
