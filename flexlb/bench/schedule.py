"""`flexlb bench schedule`: schedule + release throughput and Redis round trips of one router process.

The stack is a redis-server (REDIS_URL, or an embedded one), ``--workers`` registered workers under a fresh service
id and one ``flexlb serve`` subprocess. Client processes run a closed loop (schedule a request, then release it) for
a warm-up and a measured window; the parent process prints progress and reads Redis' own counters at the window's
edges, so round trips are what the server saw, not what the client believes it sent.

Round trips are Redis' ``total_reads_processed`` (one read event per request a client sends and waits for); client
commands are the ``INFO commandstats`` calls of commands no flexlb script calls (EVALSHA, HKEYS, ...). Commandstats
also count every ``redis.call`` inside a script, so the sum over all commands is the server's work, not round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis as redis_sync
import redis.asyncio as aioredis

from flexlb.bench.report import Target, latency_summary
from flexlb.domain import Role, WorkerSpec
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.proxy.http1 import UpstreamError, UpstreamPool
from flexlb.stack.processes import Child, NotReady, process_cpu_seconds, spawn, stop_all, wait_http_ready
from flexlb.state.scripts import SCRIPT_NAMES, script_source
from flexlb.state.store import FleetStore

TARGET_DECISIONS_PER_S = 5000.0
TARGET_ROUND_TRIPS_PER_SCHEDULE = 2.0
TARGET_REDIS_USEC_PER_DECISION = 30.0
TARGET_ROUTER_CPU_USEC_PER_DECISION = 150.0
BLOCK_SIZE = 64  # tokens per KV block the bench workers report; block keys cover seq_len // BLOCK_SIZE blocks
SPLIT_PROC = 255  # request-id slot of the parent's schedule-only / release-only phases
JSON_HEADERS = {"Content-Type": "application/json"}
# the statuses are written once and have no engine behind them (Stack._router_env)
BENCH_ROUTER_CONFIG = {"contendForMaster": False, "workerStatusMaxAgeMs": 0, "healthCheckIntervalMs": 3_600_000}


class BenchError(RuntimeError):
    """The stack could not be started or died during the run (the message says what and where the log is)."""


@dataclass(frozen=True, slots=True)
class ScheduleBenchParams:
    workers: int = 16
    concurrency: int = 64
    duration_s: float = 10.0
    warmup_s: float = 1.0
    client_processes: int = 1
    seq_len: int = 2000
    blocks: int = 30
    prefix_groups: int = 4
    split_requests: int = 2000
    idle_baseline_s: float = 6.0
    redis_url: str | None = None
    startup_timeout_s: float = 30.0
    profile_router: str | None = None
    seed: int | None = None


# ------------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True, slots=True)
class Workload:
    """Request bodies: a shared prefix drawn from a few groups (system prompts) plus a unique tail per request."""

    groups: tuple[tuple[int, ...], ...]
    tail_blocks: int
    seq_len: int
    nonce: int  # makes request ids unique across runs on a shared Redis

    @classmethod
    def build(cls, params: ScheduleBenchParams, rng: random.Random) -> Workload:
        blocks = max(1, min(params.blocks, params.seq_len // BLOCK_SIZE or 1))
        prefix = max(1, blocks * 2 // 3)
        groups = tuple(tuple(rng.getrandbits(62) for _ in range(prefix)) for _ in range(params.prefix_groups))
        return cls(groups=groups, tail_blocks=blocks - prefix, seq_len=params.seq_len, nonce=rng.randrange(1, 1 << 29))

    def request_id(self, proc: int, seq: int) -> int:
        # < 2**61: a positive int64 the wire format accepts, never 0
        return (self.nonce << 32) | (proc << 24) | (seq & 0xFFFFFF)

    def schedule_body(self, request_id: int, rng: random.Random) -> bytes:
        keys = [*rng.choice(self.groups), *(rng.getrandbits(62) for _ in range(self.tail_blocks))]
        return orjson.dumps({"request_id": request_id, "seq_len": self.seq_len, "block_cache_keys": keys})


def worker_specs(count: int) -> list[WorkerSpec]:
    """Half PREFILL, half DECODE; http ports two apart so no worker's grpc port (http + 1) is another's http port."""
    half = count // 2
    return [
        WorkerSpec("127.0.0.1", 20000 + 2 * i, Role.PREFILL if i < half else Role.DECODE, max_concurrency=1_000_000)
        for i in range(count)
    ]


def worker_status(i: int) -> dict[str, object]:
    """Alive, unequal load (so strategies compare real numbers) and a KV total nothing in the bench can exhaust."""
    return {
        "alive": "true",
        "running": i % 4,
        "waiting": i % 3,
        "queued_tokens": 1000 * (i % 5),
        "kv_used": 20_000 * (i % 7),
        "kv_total": 1_000_000_000,
        "block_size": BLOCK_SIZE,
        "step_latency_ms": 20.0 + i,
        "prefill_tokens_per_ms": 8.0 + i % 4,
    }


def worker_cache(i: int, workload: Workload, rng: random.Random) -> list[int]:
    """One group's prefix in full and half of the next group's, plus unrelated blocks: matches stop at varied points."""
    groups = workload.groups
    own, nxt = groups[i % len(groups)], groups[(i + 1) % len(groups)]
    return [*own, *nxt[: len(nxt) // 2], *(rng.getrandbits(62) for _ in range(500))]


# ------------------------------------------------------------------------------------------- server counters


def _script_commands() -> frozenset[str]:
    """Commands flexlb's Lua scripts call (lower case), read from the scripts themselves so they cannot drift."""
    pattern = re.compile(r"redis\.call\(\s*['\"]([A-Za-z]+)['\"]")
    return frozenset(m.lower() for name in SCRIPT_NAMES for m in pattern.findall(script_source(name)))


SCRIPT_COMMANDS = _script_commands()
# The routers' tail of the change stream: background reads proportional to the fleet's changes (batched), not
# part of any one decision's round trips; reported on their own.
VIEW_COMMANDS = frozenset({"xread"})


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """Redis' cumulative counters at one moment."""

    calls: dict[str, int]
    usec: dict[str, int]
    reads: int
    at: float

    @classmethod
    def parse(cls, info: dict[str, Any]) -> ServerCounters:
        calls, usec = {}, {}
        for key, value in info.items():
            if key.startswith("cmdstat_") and isinstance(value, dict):
                name = key.removeprefix("cmdstat_")
                calls[name] = int(value.get("calls", 0))
                usec[name] = int(value.get("usec", 0))
        return cls(calls=calls, usec=usec, reads=int(info.get("total_reads_processed", 0)), at=time.time())


def counters_delta(before: ServerCounters, after: ServerCounters, ops: int) -> dict[str, Any]:
    """What Redis did between two INFO calls, per operation (decision, schedule or release).

    The bench's own INFO is left out: the earlier INFO is counted in ``calls`` and the later one's read in ``reads``.
    """
    calls = {
        name: n - before.calls.get(name, 0)
        for name, n in after.calls.items()
        if name != "info" and n - before.calls.get(name, 0) > 0
    }
    usec = {name: after.usec[name] - before.usec.get(name, 0) for name in calls}
    per = max(ops, 1)
    client = {n: c for n, c in calls.items() if n.split("|")[0] not in SCRIPT_COMMANDS}
    view = sum(c for n, c in client.items() if n in VIEW_COMMANDS)
    reads = after.reads - before.reads - 1
    return {
        "ops": ops,
        "seconds": after.at - before.at,
        "round_trips": reads,
        "round_trips_per_op": reads / per,
        "client_commands_total": sum(client.values()),
        "client_commands_per_op": sum(client.values()) / per,
        # what the decision path itself sends, without the view tail's reads
        "decision_commands_per_op": (sum(client.values()) - view) / per,
        "view_reads_per_op": view / per,
        "client_commands": {n: {"calls": c, "per_op": c / per} for n, c in sorted(client.items())},
        "all_commands_total": sum(calls.values()),
        "all_commands_per_op": sum(calls.values()) / per,
        # a script's time includes the commands it calls: only client commands, so nothing is counted twice
        "server_usec_per_op": sum(usec[n] for n in client) / per,
        "per_command": {
            n: {"calls": c, "per_op": c / per, "usec": usec[n], "in_scripts": n.split("|")[0] in SCRIPT_COMMANDS}
            for n, c in sorted(calls.items())
        },
    }


def read_counters(client: redis_sync.Redis) -> ServerCounters:
    return ServerCounters.parse(client.info("stats", "commandstats"))


async def read_counters_async(client: aioredis.Redis) -> ServerCounters:
    return ServerCounters.parse(await client.info("stats", "commandstats"))


# ------------------------------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    """redis-server (if ours), the service's workers and one router subprocess; ``close()`` undoes all of it."""

    params: ScheduleBenchParams
    workload: Workload
    service: str
    redis_url: str = ""
    embedded: EmbeddedRedis | None = None
    router: Child | None = None
    router_url: str = ""
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flexlb-bench-")))
    specs: list[WorkerSpec] = field(default_factory=list)

    @property
    def router_log(self) -> Path:
        return self.log_dir / "router.log"

    def start(self, rng: random.Random) -> None:
        if self.params.redis_url:
            self.redis_url = self.params.redis_url
        else:
            self.embedded = EmbeddedRedis().start()
            self.redis_url = self.embedded.url
        self.specs = worker_specs(self.params.workers)
        asyncio.run(self._register(rng))
        self._start_router()

    async def _register(self, rng: random.Random) -> None:
        from flexlb.app import make_redis

        client = make_redis(self.redis_url, 5000)
        try:
            store = FleetStore(client, self.service)
            for i, spec in enumerate(self.specs):
                await store.register_worker(spec, worker_status(i))
                await store.set_cache_blocks(spec.worker_id, worker_cache(i, self.workload, rng))
        finally:
            await client.aclose()

    def _router_env(self) -> dict[str, str]:
        by_role: dict[Role, list[str]] = {}
        for spec in self.specs:
            by_role.setdefault(spec.role, []).append(spec.worker_id)
        config: dict[str, Any] = {"service_id": self.service}
        for role, key in ((Role.PREFILL, "prefill_endpoint"), (Role.DECODE, "decode_endpoint")):
            if by_role.get(role):
                config[key] = {"address": by_role[role], "type": "SpecifiedIpPortList"}
        # The registered workers are statuses the benchmark writes once, with no engine behind them: a router that
        # became master would poll them, find nothing and mark them down, and the statuses are never refreshed (no
        # freshness bound, no health checks). The user's own options still apply.
        flexlb_config = orjson.loads(os.environ.get("FLEXLB_CONFIG") or "{}")
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "FLEXLB_SERVICE_ID": self.service,
            "MODEL_SERVICE_CONFIG": orjson.dumps(config).decode(),
            "FLEXLB_CONFIG": orjson.dumps({**BENCH_ROUTER_CONFIG, **flexlb_config}).decode(),
        }

    def _start_router(self) -> None:
        port = free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        command = [sys.executable]
        if self.params.profile_router:
            command += ["-m", "cProfile", "-o", str(Path(self.params.profile_router).resolve())]
        command += ["-m", "flexlb.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--advertise", f"127.0.0.1:{port}"]
        # Own session: a Ctrl-C in the terminal reaches only this process, which then stops the router itself.
        router = self.router = spawn("router", command, self.log_dir, self._router_env())
        try:
            wait_http_ready(self.router_url, router.process, router.log_tail, "router", self.params.startup_timeout_s)
        except NotReady as exc:
            raise BenchError(f"{exc}\nlog: {self.router_log}") from None

    def check_router(self) -> None:
        if self.router is not None and not self.router.alive():
            code = self.router.process.returncode
            raise BenchError(f"router exited with {code}; log: {self.router_log}\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.router.log_tail(chars) if self.router is not None else ""

    def close(self, *, keep_log: bool = False) -> None:
        """Stop the router (SIGTERM, then SIGKILL, to its process group), drop the service's keys from a shared Redis,
        stop our Redis.

        The router's log is kept when the run failed (error messages name it), else removed with its folder.
        """
        if self.router is not None:
            stop_all([self.router])
        if self.embedded is not None:
            self.embedded.close()
        elif self.redis_url:
            with contextlib.suppress(Exception):  # best effort: Redis may be what failed
                client = redis_sync.Redis.from_url(self.redis_url, socket_timeout=5)
                keys = list(client.scan_iter(match=f"flexlb:{{{self.service}}}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])
                client.close()
        if not keep_log:
            shutil.rmtree(self.log_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- load client


@dataclass(frozen=True, slots=True)
class ClientJob:
    """What one client process runs (picklable: client processes are spawned)."""

    index: int
    concurrency: int
    router_url: str
    workload: Workload
    seed: int


@dataclass(slots=True)
class ClientResult:
    schedule_ms: list[float] = field(default_factory=list)
    release_ms: list[float] = field(default_factory=list)
    decisions: int = 0  # successful schedules completed inside the measured window
    schedule_errors: int = 0  # whole run
    release_errors: int = 0
    first_error: str = ""

    def note_error(self, what: str, status: int, body: bytes) -> None:
        if not self.first_error:
            self.first_error = f"{what} -> {status}: {body[:500].decode(errors='replace')}"


async def _closed_loop(
    job: ClientJob, window: tuple[float, float], counter: Any, stop: Any, result: ClientResult
) -> None:
    """``job.concurrency`` tasks, each: schedule, then release what was scheduled, until the window ends."""
    start, end = window
    rng = random.Random(job.seed)
    sequence = iter(range(1, 1 << 24))
    ok_slot, err_slot = 2 * job.index, 2 * job.index + 1
    stopping = False

    # The load generator's own CPU shares the machine with the router: it uses the proxy's lean HTTP/1.1 client
    # (flexlb/proxy/http1.py, a fraction of aiohttp's client per request) so decisions/s measures the router more.
    target = urllib.parse.urlsplit(job.router_url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    heads = {
        path: f"POST {path} HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: application/json\r\n".encode()
        for path in ("/rtp_llm/schedule", "/rtp_llm/release")
    }

    async def post(pool: UpstreamPool, path: str, body: bytes) -> tuple[int, bytes]:
        request = b"%sContent-Length: %d\r\n\r\n%s" % (heads[path], len(body), body)
        try:
            async with asyncio.timeout(30):
                response = await pool.send(host, port, request)
                return response.status, await response.read()
        except (UpstreamError, TimeoutError, OSError) as exc:
            await asyncio.sleep(0.01)  # a dead router must not turn this loop into a busy spin
            return -1, repr(exc).encode()

    async def one(pool: UpstreamPool) -> None:
        nonlocal stopping
        while not stopping and time.time() < end:
            rid = job.workload.request_id(job.index, next(sequence))
            body = job.workload.schedule_body(rid, rng)
            t0 = time.perf_counter()
            status, payload = await post(pool, "/rtp_llm/schedule", body)
            t1 = time.perf_counter()
            done = time.time()
            if status != 200:
                result.schedule_errors += 1
                counter[err_slot] += 1
                result.note_error("schedule", status, payload)
                continue
            counter[ok_slot] += 1
            if start <= done < end:
                result.decisions += 1
                result.schedule_ms.append((t1 - t0) * 1000)
            # released even after the window: the bench leaves no reservation behind
            t2 = time.perf_counter()
            status, payload = await post(pool, "/rtp_llm/release", orjson.dumps({"request_id": rid}))
            t3 = time.perf_counter()
            if status != 200:
                result.release_errors += 1
                counter[err_slot] += 1
                result.note_error("release", status, payload)
            elif start <= time.time() < end:
                result.release_ms.append((t3 - t2) * 1000)

    async def watch_stop() -> None:
        nonlocal stopping
        while not stopping:
            stopping = stop.is_set()
            await asyncio.sleep(0.1)

    pool = UpstreamPool(connect_timeout_s=10, max_per_worker=job.concurrency, keepalive_s=60)
    try:
        watcher = asyncio.create_task(watch_stop())
        await asyncio.gather(*(one(pool) for _ in range(job.concurrency)))
        stopping = True
        await watcher
    finally:
        await pool.close()


def client_process(job: ClientJob, ready: Any, go: Any, window: Any, counter: Any, stop: Any, results: Any) -> None:
    """Entry point of a client process: wait for the parent's start signal, run the loop, send back the result."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us via ``stop``
    result = ClientResult()
    try:
        ready.wait(timeout=60)
        go.wait()
        uvloop.run(_closed_loop(job, (window[0], window[1]), counter, stop, result))
    except Exception as exc:  # reported by the parent, which owns the output
        result.first_error = result.first_error or f"client process {job.index} failed: {exc!r}"
    results.put((job.index, dataclasses.asdict(result)))


# ------------------------------------------------------------------------------------ schedule/release phases


def _background_corrected(phase: dict[str, Any], background_per_s: float | None) -> None:
    """Add the phase's round trips per operation without the router's background traffic."""
    redis = phase["redis"]
    if background_per_s is None:
        redis["round_trips_per_op_excl_background"] = None
        return
    own = redis["round_trips"] - background_per_s * redis["seconds"]
    redis["round_trips_per_op_excl_background"] = own / max(redis["ops"], 1)


async def split_phases(
    router_url: str,
    redis_url: str,
    workload: Workload,
    requests: int,
    concurrency: int,
    seed: int,
    idle_baseline_s: float,
) -> dict[str, Any]:
    """Schedule ``requests`` requests (no release), then release them all: Redis' work for each, apart.

    Between the two, with the reservations still pending, Redis is watched for ``idle_baseline_s`` without any
    request: what it sees then is the router's own background traffic (the periodic reservation sweep), which the
    phases' figures "excl. background" subtract. It should span at least one sweep interval (5 s by default).
    """
    rng = random.Random(seed)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    connector = aiohttp.TCPConnector(limit=concurrency * 2, limit_per_host=0)
    scheduled: list[int] = []
    errors: list[str] = []  # every failure's message; the first is reported, all are counted

    async def run(items: Iterator[tuple[int, bytes]], url: str, ok: list[int], lat: list[float]) -> None:
        for rid, body in items:  # one iterator shared by every task: each item is sent once
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                payload = await resp.read()
                if resp.status == 200:
                    ok.append(rid)
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors.append(f"{url} -> {resp.status}: {payload[:500].decode(errors='replace')}")

    async def phase(items: Iterator[tuple[int, bytes]], url: str, ok: list[int]) -> dict[str, Any]:
        latencies: list[float] = []
        failed_before = len(errors)
        before = await read_counters_async(client)
        started = time.perf_counter()
        await asyncio.gather(*(run(items, url, ok, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = await read_counters_async(client)
        return {
            "count": len(ok),
            "errors": len(errors) - failed_before,
            "seconds": elapsed,
            "per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
            "latency_ms": latency_summary(latencies),
            "redis": counters_delta(before, after, len(ok)),
        }

    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            ids = (workload.request_id(SPLIT_PROC, seq) for seq in range(1, requests + 1))
            schedule_items = ((rid, workload.schedule_body(rid, rng)) for rid in ids)
            sched = await phase(schedule_items, f"{router_url}/rtp_llm/schedule", scheduled)
            background_per_s: float | None = None
            if idle_baseline_s > 0:
                before = await read_counters_async(client)
                await asyncio.sleep(idle_baseline_s)
                after = await read_counters_async(client)
                background_per_s = counters_delta(before, after, 0)["round_trips"] / (after.at - before.at)
            released: list[int] = []
            release_items = ((rid, orjson.dumps({"request_id": rid})) for rid in list(scheduled))
            rel = await phase(release_items, f"{router_url}/rtp_llm/release", released)
    finally:
        await client.aclose()
    for item in (sched, rel):
        _background_corrected(item, background_per_s)
    return {
        "schedule_only": sched,
        "release_only": rel,
        "idle_baseline": {"seconds": idle_baseline_s, "round_trips_per_s": background_per_s},
        "first_error": errors[0] if errors else "",
    }


# ------------------------------------------------------------------------------------------------------ run


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _flexlb_version() -> str:
    try:
        return importlib.metadata.version("flexlb")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def redact(url: str) -> str:
    """A Redis URL without its password (it goes to the terminal and the JSON)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _redis_version(client: redis_sync.Redis) -> str:
    return str(client.info("server").get("redis_version", "?"))


def run_schedule_bench(params: ScheduleBenchParams, *, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result. Raises BenchError when the stack fails."""
    seed = params.seed if params.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    workload = Workload.build(params, rng)
    stack = Stack(params, workload, service=f"bench-{rng.getrandbits(32):08x}")
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = []
    stop = ctx.Event()
    failed = True
    closing = contextlib.ExitStack()
    try:
        stack.start(rng)
        assert stack.router is not None
        out(
            f"router pid {stack.router.pid} on {stack.router_url}, service {stack.service!r}, "
            f"redis {redact(stack.redis_url)}"
        )
        admin = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True, socket_timeout=10)
        redis_version = _redis_version(admin)
        closing.callback(admin.close)

        nproc = max(1, min(params.client_processes, params.concurrency))
        go, counter, results = ctx.Event(), ctx.Array("q", 2 * nproc, lock=False), ctx.Queue()
        window, ready = ctx.Array("d", 2, lock=False), ctx.Barrier(nproc + 1)
        for i, conc in enumerate(_shares(params.concurrency, nproc)):
            job = ClientJob(i, conc, stack.router_url, workload, seed + 1 + i)
            args = (job, ready, go, window, counter, stop, results)
            proc = ctx.Process(target=client_process, args=args, daemon=True)
            proc.start()
            procs.append(proc)

        # The clock starts once every client process has imported its libraries and waits for ``go``.
        try:
            ready.wait(timeout=params.startup_timeout_s)
        except threading.BrokenBarrierError:
            raise BenchError(f"client processes not ready within {params.startup_timeout_s:g}s") from None
        t0 = time.time()
        start, end = t0 + params.warmup_s, t0 + params.warmup_s + params.duration_s
        window[0], window[1] = start, end
        go.set()

        before = after = None
        cpu_before = cpu_after = None
        next_tick = t0 + 1
        last_ok = 0
        while after is None:
            now = time.time()
            wake = min(next_tick, end, start if before is None else end)
            time.sleep(max(0.0, wake - now))
            now = time.time()
            if before is None and now >= start:
                before = read_counters(admin)
                cpu_before = process_cpu_seconds(stack.router.pid)
            if now >= end:
                after = read_counters(admin)
                cpu_after = process_cpu_seconds(stack.router.pid)
            if now >= next_tick or after is not None:
                ok, errors = sum(counter[0::2]), sum(counter[1::2])
                phase = "warm-up" if now - 0.5 < start else "measure"  # the second that just ended
                out(f"  {now - t0:5.1f} s  {phase:<8} decisions {ok:>8}  ({ok - last_ok:>6}/s)  errors {errors}")
                last_ok = ok
                next_tick += 1
            stack.check_router()
            if not any(p.is_alive() for p in procs) and after is None:
                raise BenchError("every client process exited early")

        merged = ClientResult()
        for _ in procs:
            try:
                _, data = results.get(timeout=60)
            except Exception as exc:  # queue.Empty: a client process died without a result
                raise BenchError("a client process sent no result") from exc
            part = ClientResult(**data)
            merged.schedule_ms += part.schedule_ms
            merged.release_ms += part.release_ms
            merged.decisions += part.decisions
            merged.schedule_errors += part.schedule_errors
            merged.release_errors += part.release_errors
            merged.first_error = merged.first_error or part.first_error
        for proc in procs:
            proc.join(timeout=10)
        assert before is not None

        split: dict[str, Any] | None = None
        if params.split_requests > 0:
            out(
                f"  schedule-only phase, {params.idle_baseline_s:g} s idle baseline, release-only phase; "
                f"{params.split_requests} requests each ..."
            )
            split = asyncio.run(
                split_phases(
                    stack.router_url,
                    stack.redis_url,
                    workload,
                    params.split_requests,
                    params.concurrency,
                    seed,
                    params.idle_baseline_s,
                )
            )
            stack.check_router()
            merged.first_error = merged.first_error or split.pop("first_error")
        failed = False
        router_cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        loop_redis = counters_delta(before, after, merged.decisions)
        return _result(params, seed, stack, redis_version, merged, loop_redis, split, nproc, router_cpu_s)
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        closing.close()
        stack.close(keep_log=failed)


def _result(
    params: ScheduleBenchParams,
    seed: int,
    stack: Stack,
    redis_version: str,
    loop: ClientResult,
    redis: dict[str, Any],
    split: dict[str, Any] | None,
    nproc: int,
    router_cpu_s: float | None = None,
) -> dict[str, Any]:
    decisions_per_s = loop.decisions / params.duration_s
    cpu_per_decision = None if router_cpu_s is None else router_cpu_s * 1e6 / max(loop.decisions, 1)
    loop_redis = {
        "round_trips": redis["round_trips"],
        "round_trips_per_decision": redis["round_trips_per_op"],
        "client_commands_per_decision": redis["client_commands_per_op"],
        "decision_commands_per_decision": redis["decision_commands_per_op"],
        "view_reads_per_decision": redis["view_reads_per_op"],
        "client_commands": redis["client_commands"],
        "all_commands_per_decision": redis["all_commands_per_op"],
        "server_usec_per_decision": redis["server_usec_per_op"],
        "per_command": redis["per_command"],
        "seconds": redis["seconds"],
    }
    per_schedule = None
    if split:
        sched = split["schedule_only"]["redis"]
        per_schedule = sched["decision_commands_per_op"]
    targets = [
        Target(f"decisions/s, 1 router, {params.workers} workers", TARGET_DECISIONS_PER_S, True, decisions_per_s),
        Target("redis calls per schedule decision", TARGET_ROUND_TRIPS_PER_SCHEDULE, False, per_schedule),
        Target(
            "redis server us per decision",
            TARGET_REDIS_USEC_PER_DECISION,
            False,
            redis["server_usec_per_op"],
        ),
        Target("router CPU us per decision", TARGET_ROUTER_CPU_USEC_PER_DECISION, False, cpu_per_decision),
    ]
    notes = [
        f"the load generator ({nproc} client process(es)) and redis-server share this machine's {os.cpu_count()} "
        "CPUs with the router, so decisions/s is a lower bound for a router on its own cores",
        "round trips = redis total_reads_processed (server side); client commands = commandstats of commands no "
        "flexlb script calls; 'incl. inside scripts' adds every redis.call a script made",
        "the router's periodic reservation sweep (a few round trips every few seconds) is included in every figure "
        "but the 'excl. background' ones, which subtract the rate Redis saw while no request was sent",
    ]
    if params.redis_url:
        notes.append("external Redis: other clients of that server are counted too")
    if not split:
        notes.append("--split-requests 0: round trips per schedule alone were not measured")
    if params.profile_router:
        notes.append(f"router ran under cProfile (slower); profile written to {params.profile_router}")
    return {
        "benchmark": "schedule",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": {
            **dataclasses.asdict(params),
            "redis_url": redact(params.redis_url) if params.redis_url else None,
            "seed": seed,
            "client_processes": nproc,
        },
        "environment": {
            "cpu_count": os.cpu_count(),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "redis_version": redis_version,
            "redis_mode": "external" if params.redis_url else "embedded",
            "flexlb_version": _flexlb_version(),
            "aiohttp_version": aiohttp.__version__,
            "service_id": stack.service,
            "flexlb_config": os.environ.get("FLEXLB_CONFIG", ""),
        },
        "results": {
            "loop": {
                "decisions": loop.decisions,
                "duration_s": params.duration_s,
                "decisions_per_s": decisions_per_s,
                "router_cpu_s": router_cpu_s,
                "router_cpu_usec_per_decision": cpu_per_decision,
                "schedule_latency_ms": latency_summary(loop.schedule_ms),
                "release_latency_ms": latency_summary(loop.release_ms),
                "redis": loop_redis,
            },
            "errors": {
                "schedule": loop.schedule_errors,
                "release": loop.release_errors,
                "first_error": loop.first_error,
            },
            "split": split,
        },
        "targets": [t.to_json() for t in targets],
        "notes": notes,
    }
