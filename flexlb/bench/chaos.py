"""`flexlb bench chaos` and the chaos suite (tests/chaos): faults injected into a local fleet of real processes under
load, and the invariants of issue 10's fault run, read straight from Redis.

The fleet: one redis-server (append-only file, so an outage keeps the data unless a fault wipes it), ``workers``
simulated PDFUSION workers (half listed in MODEL_SERVICE_CONFIG, half registered through the admin API), ``masters``
``flexlb master`` processes contending for the lock and ``routers`` ``flexlb serve`` processes, all started through
``flexlb.stack.local`` / ``flexlb.stack.processes`` (own process group, parent-death signal).

The load: a closed loop of schedule + release (every fifth request with ``seq_len`` 0, which reserves 0 tokens) and
proxied ``/v1/completions`` through every live router; each call has a deadline and is recorded.

A fault (``FAULTS``) runs as: heal the fleet, load, inject, observe, heal, load; then the common invariants:

- ``answered``: every call to a live router got an HTTP answer before its deadline, 200 or an expected 503 (a
  router's own death cuts only the calls to it);
- ``counters``: each worker's ``pending_count`` = ``ZCARD resv:<wid>`` and ``pending_tokens`` = the sum of its
  reservations' tokens (``req:<rid>``), each worker sampled atomically all along and after;
- ``drained``: once the load stops, no reservation (``resv:``, ``req:``) and no pending load is left within
  ``reservationTtlMs`` plus a sweep interval;

and each fault's own (a dead worker not named past the bound, one master writing, 503 then recovery, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import random
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from flexlb.domain import ErrorCode, Role
from flexlb.embedded_redis import RedisNotInstalled, free_port, free_port_pair
from flexlb.master.election import holder_name, parse_lock_value
from flexlb.stack.interrupts import sigterm_as_ctrl_c
from flexlb.stack.local import FLEXLB, Stack, StackError, clean_environment
from flexlb.stack.processes import Child, NotReady, stop_all, wait_http_ready
from flexlb.state.keys import ServiceKeys
from flexlb.state.scripts import script_source
from flexlb.state.store import FleetStore
from flexlb.tasks import cancel_until_done

NO_WORKER = int(ErrorCode.NO_PDFUSION_WORKER)
STATE_UNAVAILABLE = int(ErrorCode.STATE_UNAVAILABLE)
MASTER_WRITE_SCRIPTS = ("master_status", "master_cache", "master_forget", "fenced_set")
# What a script does when its write lands; a fenced script refused for a stale epoch runs only GET master_epoch.
WRITE_COMMANDS = frozenset({"HSET", "HINCRBY", "HDEL", "XADD", "ZREM", "SADD", "SREM", "DEL", "PUBLISH", "INCR"})


@dataclass(frozen=True, slots=True)
class ChaosParams:
    """The fleet, the load and the bounds the faults are checked against (short, so a CI run stays bounded)."""

    routers: int = 3
    masters: int = 2
    workers: int = 4
    concurrency: int = 6  # schedule + release client tasks
    proxy_concurrency: int = 1  # proxied /v1/completions client tasks (they make the masters write statuses)
    load_s: float = 1.0  # steady load before and after each fault
    repeat: int = 1  # each fault this many times in a row (heavy runs)
    reservation_ttl_ms: int = 2000
    lock_ttl_ms: int = 1000
    renew_ms: int = 250
    staleness_ms: int = 2500  # degradedMaxStalenessMs
    status_max_age_ms: int = 8000  # workerStatusMaxAgeMs: above the masters' 5 s heartbeat of an unchanged status
    redis_timeout_ms: int = 300
    call_timeout_s: float = 10.0  # every client call's deadline
    dead_worker_bound_s: float = 2.0  # a killed worker named by no answer to a request sent this long after
    startup_timeout_s: float = 60.0

    @classmethod
    def heavy(cls) -> ChaosParams:
        """Longer load, more routers and clients, each fault three times."""
        return cls(routers=4, concurrency=12, proxy_concurrency=2, load_s=5.0, repeat=3)

    @property
    def sweep_interval_s(self) -> float:
        return min(max(self.reservation_ttl_ms / 4000, 0.1), 1.0)  # flexlb.app._maintain's interval

    def router_config(self) -> dict[str, Any]:
        return {
            "contendForMaster": False,
            "reservationTtlMs": self.reservation_ttl_ms,
            "degradedMaxStalenessMs": self.staleness_ms,
            "workerStatusMaxAgeMs": self.status_max_age_ms,
            "redisTimeoutMs": self.redis_timeout_ms,
        }

    def master_config(self) -> dict[str, Any]:
        return {
            "masterLockTtlMs": self.lock_ttl_ms,
            "masterRenewIntervalMs": self.renew_ms,
            "reservationTtlMs": self.reservation_ttl_ms,
            "redisTimeoutMs": self.redis_timeout_ms,
        }


# ---------------------------------------------------------------------------------------------------------------
# the fleet


@dataclass(slots=True)
class Member:
    """One restartable process of the fleet: the same command on the same port every time it is started."""

    name: str
    port: int
    command: list[str]
    env: dict[str, str] | None
    child: Child | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_id(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def signal(self, sig: int) -> None:
        if self.child is not None and self.child.alive():
            self.child.signal_group(sig)


class ChaosStack(Stack):
    """The demo's Stack (every child recorded, all stopped by ``close``) with members started again by name."""

    def launch(self, member: Member) -> None:
        member.child = self._spawn(member.name, member.command, member.env)
        member.paused = False


class ChaosFleet:
    """Redis, workers, masters and routers of one service; methods to break them and to heal them again."""

    def __init__(self, params: ChaosParams, log_dir: Path | None = None) -> None:
        self.params = params
        self.stack = ChaosStack(startup_timeout_s=params.startup_timeout_s)
        if log_dir is not None:
            self.stack.log_dir = log_dir
        self.service = f"chaos-{uuid.uuid4().hex[:8]}"
        self.keys = ServiceKeys(self.service)
        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            raise RedisNotInstalled("redis-server is not on PATH (Debian/Ubuntu: apt-get install -y redis-server)")
        self.redis_dir = self.stack.log_dir / "redis-data"
        redis_port = free_port()
        self.redis = Member("redis", redis_port, [
            redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(self.redis_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        ], None)  # fmt: skip
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.workers = []
        for i in range(params.workers):
            port = free_port_pair()
            command = [*FLEXLB, "sim-worker", "--role", "pdfusion", "--port", str(port), "--kv-blocks", "512",
                       "--max-concurrency", "16", "--time-scale", "0.05", "--model", self.service]  # fmt: skip
            self.workers.append(Member(f"worker{i}", port, command, clean_environment({})))
        self.static_workers = self.workers[: (params.workers + 1) // 2]  # the rest: registered through the API
        endpoints = {"pd_fusion_endpoint": {"address": [w.worker_id for w in self.static_workers]}}
        env = {"REDIS_URL": self.redis_url, "FLEXLB_SERVICE_ID": self.service,
               "MODEL_SERVICE_CONFIG": orjson.dumps({"service_id": self.service, **endpoints}).decode()}  # fmt: skip
        self.masters = []
        for i in range(params.masters):
            port = free_port()
            command = [*FLEXLB, "master", "--port", str(port), "--holder", f"master{i}"]
            master_env = clean_environment({**env, "FLEXLB_CONFIG": orjson.dumps(params.master_config()).decode()})
            self.masters.append(Member(f"master{i}", port, command, master_env))
        self.routers = []
        for i in range(params.routers):
            port = free_port()
            command = [*FLEXLB, "serve", "--host", "127.0.0.1", "--port", str(port),
                       "--advertise", f"127.0.0.1:{port}"]  # fmt: skip
            router_env = clean_environment({**env, "FLEXLB_CONFIG": orjson.dumps(params.router_config()).decode()})
            self.routers.append(Member(f"router{i}", port, command, router_env))
        self._redis: aioredis.Redis | None = None
        self._store: FleetStore | None = None

    # ---- start, heal, stop ----

    def db(self) -> aioredis.Redis:
        """A client of this event loop (tests run each fault in a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._redis is None or getattr(self, "_redis_loop", None) is not loop:
            self._redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2)
            self._redis_loop = loop
        return self._redis

    def store(self) -> FleetStore:
        """The service's store on ``db()`` (its audit reads)."""
        db = self.db()
        if self._store is None or self._store.redis is not db:
            self._store = FleetStore(db, self.service)
        return self._store

    async def start(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        await self.heal()

    async def heal(self) -> None:
        """Start what is not running (Redis, workers, masters, routers), wake what is paused, register the API
        workers Redis does not hold, and wait until the fleet serves: see ``wait_serving``."""
        if not self.redis.alive():
            await self.start_redis()
        for member in [*self.masters]:
            if member.paused:
                self.resume(member)
        for member in [*self.workers, *self.masters, *self.routers]:
            if not member.alive():
                self.stack.launch(member)
        for member in [*self.workers, *self.masters, *self.routers]:
            await self.wait_ready(member)
        await self.register_api_workers()
        await self.wait_serving()

    async def wait_ready(self, member: Member) -> None:
        assert member.child is not None
        child = member.child
        try:  # wait_http_ready blocks: in a thread, so the load keeps running meanwhile
            await asyncio.to_thread(
                wait_http_ready, member.url, child.process, child.log_tail, child.name, self.params.startup_timeout_s
            )
        except NotReady as exc:
            raise StackError(str(exc)) from None

    async def start_redis(self, *, empty: bool = False) -> None:
        if empty:  # Redis restarting with none of its data: the append-only files go first
            shutil.rmtree(self.redis_dir, ignore_errors=True)
            self.redis_dir.mkdir(parents=True)
        self.stack.launch(self.redis)
        await poll(self._redis_answers, "redis-server answers PING", self.params.startup_timeout_s)

    async def _redis_answers(self) -> bool:
        try:
            return bool(await self.db().ping())
        except (aioredis.RedisError, OSError):
            return False

    def stop_redis(self) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits; clients get connection refused."""
        assert self.redis.child is not None
        stop_all([self.redis.child])

    async def register_api_workers(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for worker in self.workers[len(self.static_workers) :]:
                if await self.db().exists(self.keys.worker(worker.worker_id)):
                    continue
                body = {"ip": "127.0.0.1", "http_port": worker.port, "role": "PDFUSION"}
                async with http.post(f"{self.routers[0].url}/rtp_llm/workers", json=body) as resp:
                    if resp.status not in (200, 201):
                        raise StackError(f"registering {worker.worker_id}: {resp.status} {await resp.text()}")

    async def wait_serving(self) -> None:
        """Until one master holds the lock, Redis shows every worker alive, and every router schedules (and
        releases) a request with shared, not degraded, state."""

        async def serving() -> bool:
            if await self.lock_holder() is None:
                return False
            for w in self.workers:
                if await self.db().hget(self.keys.worker(w.worker_id), "alive") != "1":
                    return False
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                for router in self.routers:
                    rid = random.randrange(1 << 40, 1 << 50)
                    async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": rid, "seq_len": 8}) as r:
                        answer = await r.json()
                    if answer["success"]:
                        await http.post(f"{router.url}/rtp_llm/release", json={"request_id": rid})
                    if not answer["success"] or answer.get("degraded"):
                        return False
            return True

        await poll(serving, "the fleet serving (a master, every worker alive, shared answers)", 30.0)

    async def drop_client(self) -> None:
        """Close this loop's Redis client (before the loop ends)."""
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def close(self, *, keep_logs: bool = False) -> None:
        for member in self.masters:
            self.resume(member)  # a stopped process would sit out SIGTERM for the whole grace period
        await self.drop_client()
        await asyncio.to_thread(self.stack.close, keep_logs=keep_logs)

    # ---- faults ----

    def kill(self, member: Member) -> None:
        member.signal(signal.SIGKILL)
        assert member.child is not None
        member.child.process.wait()

    def pause(self, member: Member) -> None:
        member.signal(signal.SIGSTOP)
        member.paused = True

    def resume(self, member: Member) -> None:
        if member.paused:
            member.signal(signal.SIGCONT)
            member.paused = False

    async def lock_holder(self) -> tuple[str, int] | None:
        """(holder, epoch) of the master lock, None when no one holds it or Redis does not answer."""
        try:
            value = await self.db().get(self.keys.master_lock)
        except (aioredis.RedisError, OSError):
            return None
        if value is None:
            return None
        _, epoch, holder = parse_lock_value(value)
        return holder_name(holder), epoch

    async def holder_member(self) -> tuple[Member, int]:
        held = await poll(self.lock_holder, "a master holding the lock", 15.0)
        return next(m for m in self.masters if m.name == held[0]), held[1]

    def log_tails(self) -> str:
        parts = []
        for member in [*self.routers, *self.masters]:
            if member.child is not None:
                parts.append(f"--- {member.name}\n{member.child.log_tail(1500)}")
        return "\n".join(parts)


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float, every_s: float = 0.02) -> Any:
    """``check()`` until it returns something truthy (returned); AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {last!r})")


# ---------------------------------------------------------------------------------------------------------------
# the load


@dataclass(slots=True)
class Call:
    op: str  # schedule, release, proxy
    router: int
    start: float
    end: float
    status: int | None  # the HTTP status; None: no HTTP answer (error says why)
    code: int | None = None
    workers: tuple[str, ...] = ()
    degraded: bool = False
    error: str = ""


@dataclass(slots=True)
class Allowance:
    """503 ``code`` answers (or, with ``code`` None, calls without an HTTP answer to ``router``) are expected from
    calls that end in [start, end]."""

    code: int | None
    start: float
    end: float = float("inf")
    router: int | None = None
    status: int = 503

    def covers(self, call: Call) -> bool:
        if self.router is not None and call.router != self.router:
            return False
        if not self.start <= call.end or not call.start <= self.end:
            return False
        if self.code is None:
            return call.status is None and "timeout" not in call.error.lower()
        return call.status == self.status and call.code == self.code


class Load:
    """Closed-loop clients through every live router; every call recorded with its outcome."""

    def __init__(self, fleet: ChaosFleet, seed: int = 0) -> None:
        self.fleet = fleet
        self.calls: list[Call] = []
        self.down: set[int] = set()  # routers the clients leave alone (killed)
        self.allowances: list[Allowance] = []
        self._ids = itertools.count(random.Random(seed).randrange(1 << 30, 1 << 40))
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        p = self.fleet.params
        timeout = aiohttp.ClientTimeout(total=p.call_timeout_s)
        self._http = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [asyncio.create_task(self._schedule_client(i)) for i in range(p.concurrency)]
        self._tasks += [asyncio.create_task(self._proxy_client(i)) for i in range(p.proxy_concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._http is not None
        await self._http.close()

    def router_down(self, index: int) -> None:
        """The clients stop choosing ``index`` and calls to it that get no answer from now on are expected."""
        self.down.add(index)
        self.allowances.append(Allowance(None, time.monotonic(), router=index))

    def router_up(self, index: int) -> None:
        self.down.discard(index)
        for a in self.allowances:
            if a.code is None and a.router == index and a.end == float("inf"):
                a.end = time.monotonic()

    def allow(self, code: int, start: float, status: int = 503) -> Allowance:
        allowance = Allowance(code, start, status=status)
        self.allowances.append(allowance)
        return allowance

    def _router(self, n: int) -> int:
        live = [i for i in range(len(self.fleet.routers)) if i not in self.down]
        return live[n % len(live)]

    async def _post(self, op: str, router: int, path: str, body: dict[str, Any]) -> tuple[Call, dict[str, Any]]:
        assert self._http is not None
        url = f"{self.fleet.routers[router].url}{path}"
        start = time.monotonic()
        try:
            async with self._http.post(url, data=orjson.dumps(body)) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            call = Call(op, router, start, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}")
            self.calls.append(call)
            return call, {}
        call = Call(op, router, start, time.monotonic(), status)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = {}
        if isinstance(answer, dict):
            call.code = answer.get("code")
            call.degraded = bool(answer.get("degraded"))
            servers = answer.get("server_status") or []
            call.workers = tuple(f"{s['server_ip']}:{s['http_port']}" for s in servers if isinstance(s, dict))
        else:
            answer = {}
        self.calls.append(call)
        return call, answer

    async def _schedule_client(self, task: int) -> None:
        rng = random.Random(task)
        while not self._stop.is_set():
            rid = next(self._ids)
            router = self._router(rid)
            # every fifth reserves 0 tokens: its release once failed (issue 10, bug 1)
            body = {"request_id": rid, "seq_len": 0 if rid % 5 == 0 else rng.randrange(16, 512)}
            call, _ = await self._post("schedule", router, "/rtp_llm/schedule", body)
            if call.status == 200:
                await asyncio.sleep(rng.random() * 0.005)  # the request "runs" on the worker
                release, _ = await self._post("release", router, "/rtp_llm/release", {"request_id": rid})
                if release.status is None:  # that router died meanwhile: any other releases fleet-wide
                    await self._post("release", self._router(rid + 1), "/rtp_llm/release", {"request_id": rid})
            else:
                # A refusal or a dead router: back off a little (no busy loop against an outage). No release:
                # a client cut off from its router does not know whether a reservation was made; the TTL frees it.
                await asyncio.sleep(0.02)

    async def _proxy_client(self, task: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            router = self._router(task + n)
            body = {"model": self.fleet.service, "prompt": f"chaos {task} {n} " * 8, "max_tokens": 4}
            call, _ = await self._post("proxy", router, "/v1/completions", body)
            if call.status != 200:
                await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# invariants


@dataclass(slots=True)
class Check:
    invariant: str
    ok: bool
    detail: str
    measured: str = ""


@dataclass(slots=True)
class FaultResult:
    fault: str
    checks: list[Check] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)  # measured seconds
    calls: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)

    def add(self, invariant: str, ok: bool, detail: str, measured: str = "") -> None:
        self.checks.append(Check(invariant, ok, detail, measured))

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def report(self) -> str:
        lines = [f"{self.fault}: {'ok' if self.ok else 'FAILED'} {self.error}"]
        lines += [f"  {'ok ' if c.ok else 'BAD'} {c.invariant}: {c.detail} {c.measured}" for c in self.checks]
        return "\n".join(lines)


def check_answered(result: FaultResult, load: Load) -> None:
    """Every call answered over HTTP before its deadline, 200 or an expected refusal; never a 5xx but those."""
    bad: list[Call] = []
    for call in load.calls:
        if call.status == 200 and (call.op != "schedule" or call.code == int(ErrorCode.OK)):
            continue
        if call.op == "schedule" and call.status == 503 and call.code == NO_WORKER:
            continue  # the fleet full for a moment: a refusal is an answer
        if call.op == "proxy" and call.status == 503 and call.code in (NO_WORKER, None):
            continue
        if any(a.covers(call) for a in load.allowances):
            continue
        bad.append(call)
    counts: dict[str, int] = {}
    for call in load.calls:
        key = f"{call.op} {call.status if call.status is not None else 'no answer'}"
        counts[key] = counts.get(key, 0) + 1
    result.calls = counts
    answered = [c for c in load.calls if c.status is not None]
    slowest = max((c.end - c.start for c in answered), default=0.0)
    result.bounds["slowest_answer_s"] = slowest
    sample = "; ".join(f"{c.op}@router{c.router} {c.status} {c.code} {c.error[:80]}" for c in bad[:5])
    result.add(
        "answered",
        not bad and len(answered) > 0,
        f"{len(load.calls)} calls, {len(bad)} unexpected" + (f" ({sample})" if bad else ""),
        f"slowest answer {slowest:.2f} s (deadline {load.fleet.params.call_timeout_s:g} s)",
    )


async def counter_mismatches(fleet: ChaosFleet) -> list[str]:
    """Workers whose pending counters differ from their reservations, each read in one atomic step."""
    store = fleet.store()
    audits = [await store.audit_reservations(w.worker_id) for w in fleet.workers]
    return [a.mismatch for a in audits if a.mismatch]


class CounterSampler:
    """Reads the counters against the reservation keys every 100 ms while the load runs (Redis may be away)."""

    def __init__(self, fleet: ChaosFleet) -> None:
        self.fleet = fleet
        self.samples = 0
        self.mismatches: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> CounterSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        # the flag as well as the cancellation: a cancellation that lands in a Redis read can be lost there
        # (redis-py), and the loop then sampled for ever while the fault's round waited for it (seen in CI)
        self._stopping = True
        await cancel_until_done(self._task)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(aioredis.RedisError, OSError):
                self.mismatches += await counter_mismatches(self.fleet)
                self.samples += 1
            await asyncio.sleep(0.1)

    def check(self, result: FaultResult) -> None:
        result.add(
            "counters",
            not self.mismatches and self.samples > 0,
            f"{self.samples} atomic samples under load, {len(self.mismatches)} mismatches "
            + "; ".join(self.mismatches[:3]),
        )


async def check_drained(result: FaultResult, fleet: ChaosFleet) -> None:
    """No reservation and no pending load left once the TTL (plus a sweep, plus slack) has passed."""
    p = fleet.params
    bound_s = p.reservation_ttl_ms / 1000 + p.sweep_interval_s + 3.0
    started = time.monotonic()

    async def drained() -> bool:
        db = fleet.db()
        for w in fleet.workers:
            if await db.zcard(fleet.keys.reservations(w.worker_id)):
                return False
            count, tokens = await db.hmget(fleet.keys.worker(w.worker_id), ["pending_count", "pending_tokens"])
            if int(count or 0) or int(tokens or 0):
                return False
        # req:<rid> (the release index) outlives its reservations by design (TTL + 60 s): it must only expire
        ttl_bound_ms = p.reservation_ttl_ms + 60_000
        async for key in db.scan_iter(match=f"{fleet.keys.prefix}:req:*", count=1000):
            if not 0 < await db.pttl(key) <= ttl_bound_ms and await db.exists(key):
                return False
        return True

    try:
        await poll(drained, "reservations drained", bound_s, every_s=0.05)
        took = time.monotonic() - started
        result.bounds["drained_s"] = took
        result.add(
            "drained",
            True,
            "no reservation and no pending load left, every req: key expiring",
            f"{took:.2f} s (bound {bound_s:g} s)",
        )
    except AssertionError as exc:
        result.add("drained", False, str(exc))
    mismatches = await counter_mismatches(fleet)
    result.add("counters after", not mismatches, "; ".join(mismatches) or "pending counters = reservation keys")


def check_dead_worker(result: FaultResult, load: Load, worker_id: str, died: float, until: float) -> None:
    """No schedule answer names ``worker_id`` for a request sent between ``died`` + the bound and ``until``."""
    bound = load.fleet.params.dead_worker_bound_s
    named = [c for c in load.calls if worker_id in c.workers and died <= c.start <= until]
    late = [c for c in named if c.start > died + bound]
    last = max((c.start - died for c in named), default=0.0)
    result.bounds["dead_worker_named_s"] = last
    result.add(
        "dead worker not named",
        not late,
        f"{len(named)} answers named it after its death, {len(late)} past the bound",
        f"last {last:.2f} s after (bound {bound:g} s)",
    )


class MasterWrites:
    """``redis-cli monitor`` into a file, then the master scripts' writes that landed, by epoch, in Redis's order."""

    def __init__(self, fleet: ChaosFleet) -> None:
        self.fleet = fleet
        self.shas = {hashlib.sha1(script_source(n).encode()).hexdigest(): n for n in MASTER_WRITE_SCRIPTS}
        self.child: Child | None = None
        self.started = time.time()

    def start(self) -> MasterWrites:
        binary = shutil.which("redis-cli")
        if binary is None:
            raise StackError("redis-cli is not on PATH (Debian/Ubuntu: apt-get install -y redis-tools)")
        name = f"monitor-{uuid.uuid4().hex[:6]}"
        member = Member(name, self.fleet.redis.port, [binary, "-p", str(self.fleet.redis.port), "monitor"], None)
        self.fleet.stack.launch(member)
        self.child = member.child
        return self

    async def wait_watching(self) -> None:
        """Until the monitor prints a command this process sends (it is attached)."""
        marker = f"chaos-monitor-{uuid.uuid4().hex[:6]}"

        async def seen() -> bool:
            await self.fleet.db().exists(marker)
            assert self.child is not None
            return marker in self.child.log_path.read_text(errors="replace")

        await poll(seen, "redis-cli monitor attached", 10.0, every_s=0.05)

    def stop(self) -> list[tuple[float, int, str]]:
        """Stop the monitor; (Redis time, epoch, script) of every master write that landed, in order."""
        assert self.child is not None
        stop_all([self.child])
        writes: list[tuple[float, int, str]] = []
        current: tuple[float, int, str] | None = None
        landed = False
        for line in self.child.log_path.read_text(errors="replace").splitlines():
            m = re.match(r"^(\d+\.\d+) \[\d+ ([^\]]+)\] (.*)$", line)
            if m is None:
                continue
            args = [bytes(a, "utf-8").decode("unicode_escape") for a in re.findall(r'"((?:[^"\\]|\\.)*)"', m[3])]
            if not args:
                continue
            if m[2] == "lua":
                if current is not None and not landed and args[0].upper() in WRITE_COMMANDS:
                    writes.append(current)
                    landed = True
                continue
            current, landed = None, False
            if args[0].upper() == "EVALSHA" and len(args) > 3 and args[1] in self.shas:
                nkeys = int(args[2])
                if len(args) > 3 + nkeys:
                    current = (float(m[1]), int(args[3 + nkeys]), self.shas[args[1]])
        return writes


def check_one_master(
    result: FaultResult, writes: list[tuple[float, int, str]], old_epoch: int, woken_at: float | None
) -> None:
    """Landed master writes never go back to an older epoch, and none of ``old_epoch`` lands after ``woken_at``
    (Redis time); the new term wrote."""
    regressions = []
    highest = 0
    for _t, epoch, script in writes:
        if epoch < highest:
            regressions.append(f"{script} epoch {epoch} after {highest}")
        highest = max(highest, epoch)
    late_old = [w for w in writes if w[1] == old_epoch and woken_at is not None and w[0] >= woken_at]
    new_term = [w for w in writes if w[1] > old_epoch]
    epochs = sorted({e for _, e, _ in writes})
    result.add(
        "one master writing",
        not regressions and not late_old and bool(new_term),
        f"{len(writes)} master writes landed, epochs {epochs}; {len(new_term)} of the new term; "
        f"{len(late_old)} of the old term after it woke; {len(regressions)} out of order " + "; ".join(regressions[:3]),
        f"{len(late_old)} writes of the old epoch after it woke, {len(regressions)} going back an epoch",
    )


# ---------------------------------------------------------------------------------------------------------------
# faults

Fault = Callable[[ChaosFleet, Load, FaultResult], Awaitable[None]]


async def fault_router_sigkill(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """SIGKILL a router mid-load: the others answer; its reservations expire; it comes back."""
    index = len(fleet.routers) - 1
    doomed = fleet.routers[index]
    # Clients that go down with their router (a proxied request holds its reservation in the router): reservations
    # nobody will release, so only their TTL gives the load back.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=fleet.params.call_timeout_s)) as http:
        orphans = [random.randrange(1 << 42, 1 << 43) for _ in range(3)]
        for rid in orphans:
            body = {"request_id": rid, "seq_len": 64}
            async with http.post(f"{doomed.url}/rtp_llm/schedule", json=body) as resp:
                assert (await resp.json())["success"], "an orphan reservation through the doomed router"
    load.router_down(index)
    fleet.kill(doomed)
    killed = time.monotonic()
    await asyncio.sleep(fleet.params.load_s)  # the load runs on without it (a duration of load, not a wait for state)
    p = fleet.params

    async def orphans_freed() -> bool:
        for w in fleet.workers:  # the load's own reservations come and go: only the orphans' ids are looked for
            if any(await fleet.db().zmscore(fleet.keys.reservations(w.worker_id), orphans)):
                return False
        return True

    bound = p.reservation_ttl_ms / 1000 + p.sweep_interval_s + 3.0
    await poll(orphans_freed, "the dead router's reservations expired", bound, every_s=0.05)
    freed = time.monotonic() - killed
    result.bounds["orphans_freed_s"] = freed
    result.add(
        "dead router's reservations expire",
        True,
        "3 reservations nobody releases, under load",
        f"freed {freed:.2f} s after the kill (reservationTtlMs {p.reservation_ttl_ms} ms + a sweep; bound {bound:g} s)",
    )
    fleet.stack.launch(fleet.routers[index])
    await fleet.wait_ready(fleet.routers[index])
    load.router_up(index)


async def _takeover(fleet: ChaosFleet, old_holder: str, old_epoch: int) -> tuple[str, int]:
    async def new_term() -> tuple[str, int] | None:
        held = await fleet.lock_holder()
        return held if held is not None and held[1] > old_epoch and held[0] != old_holder else None

    bound = fleet.params.lock_ttl_ms / 1000 + fleet.params.renew_ms / 1000 + 3.0
    return await poll(new_term, "another master took over", bound, every_s=0.01)


async def _redis_time(fleet: ChaosFleet) -> float:
    seconds, micros = await fleet.db().time()
    return seconds + micros / 1e6


async def _statuses_written_since(fleet: ChaosFleet, since_ms: int) -> bool:
    for w in fleet.workers:
        updated = await fleet.db().hget(fleet.keys.worker(w.worker_id), "updated_ms")
        if int(updated or 0) <= since_ms:
            return False
    return True


async def fault_master_sigkill(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """SIGKILL the lock holder: the standby takes over within the lock TTL (plus a renew); one master writes."""
    watch = MasterWrites(fleet).start()
    await watch.wait_watching()
    try:
        master, epoch = await fleet.holder_member()
        killed = time.monotonic()
        fleet.kill(master)
        holder, new_epoch = await _takeover(fleet, master.name, epoch)
        took = time.monotonic() - killed
        elected_ms = int(await _redis_time(fleet) * 1000)
        await poll(lambda: _statuses_written_since(fleet, elected_ms), "the new master wrote every status", 10.0)
        fresh = time.monotonic() - killed
    finally:
        writes = watch.stop()
    p = fleet.params
    bound = (p.lock_ttl_ms + p.renew_ms) / 1000
    result.bounds["takeover_s"] = took
    result.bounds["statuses_fresh_s"] = fresh
    result.add(
        "takeover",
        holder != master.name and new_epoch > epoch,
        f"{holder} holds epoch {new_epoch} (was {master.name}, {epoch})",
        f"{took:.2f} s (bound: lock TTL + renew = {bound:g} s, asserted with 3 s slack); "
        f"every status rewritten after {fresh:.2f} s",
    )
    check_one_master(result, writes, epoch, None)


async def fault_master_sigstop(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """SIGSTOP the lock holder past its TTL, wait for the takeover, SIGCONT it: its writes never land."""
    watch = MasterWrites(fleet).start()
    await watch.wait_watching()
    try:
        master, epoch = await fleet.holder_member()
        stopped = time.monotonic()
        fleet.pause(master)
        holder, new_epoch = await _takeover(fleet, master.name, epoch)
        result.bounds["takeover_s"] = time.monotonic() - stopped
        woken_at = await _redis_time(fleet)
        fleet.resume(master)
        # the woken master runs for a while (its pollers, its renew loop) before the monitor stops
        await asyncio.sleep(max(fleet.params.load_s, 4 * fleet.params.renew_ms / 1000))

        async def standby() -> bool:
            assert master.child is not None and master.alive()
            held = await fleet.lock_holder()
            return held is not None and held[0] != master.name

        await poll(standby, "the woken master left the lock alone", 5.0)
    finally:
        writes = watch.stop()
    result.add(
        "takeover",
        holder != master.name and new_epoch > epoch,
        f"{holder} holds epoch {new_epoch} (was {master.name}, {epoch})",
        f"{result.bounds['takeover_s']:.2f} s after SIGSTOP (lock TTL {fleet.params.lock_ttl_ms} ms + a renew)",
    )
    check_one_master(result, writes, epoch, woken_at)


async def fault_worker_kill_restart(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """SIGKILL a worker registered through the API: marked down, named by no answer past the bound; restarted on
    its port, chosen again."""
    worker = fleet.workers[-1]
    key = fleet.keys.worker(worker.worker_id)
    died = time.monotonic()
    fleet.kill(worker)

    async def down() -> bool:
        return await fleet.db().hget(key, "alive") == "0"

    await poll(down, f"{worker.worker_id} marked not alive", 10.0, every_s=0.005)
    result.bounds["marked_down_s"] = time.monotonic() - died
    await asyncio.sleep(fleet.params.load_s)  # load on the three left
    launched = time.monotonic()  # from here answers may name the new process: the master may poll it before HTTP is up
    fleet.stack.launch(worker)
    await fleet.wait_ready(worker)
    restarted = time.monotonic()

    async def chosen_again() -> bool:
        return any(worker.worker_id in c.workers and c.start > restarted for c in load.calls)

    await poll(chosen_again, f"{worker.worker_id} chosen again", 20.0, every_s=0.05)
    result.bounds["chosen_again_s"] = time.monotonic() - restarted
    check_dead_worker(result, load, worker.worker_id, died, launched)
    result.add(
        "worker back",
        await fleet.db().hget(key, "alive") == "1",
        "alive again in Redis and chosen",
        f"marked down {result.bounds['marked_down_s'] * 1000:.0f} ms after the kill, chosen again "
        f"{result.bounds['chosen_again_s']:.2f} s after the restart",
    )
    # A proxied request in flight on the killed worker may be cut (the proxy retries before the first byte only).
    load.allowances.append(Allowance(None, died, restarted))  # any router: none of them died


async def _outage(fleet: ChaosFleet, load: Load, result: FaultResult, *, long: bool, empty: bool = False) -> None:
    p = fleet.params
    stopped = time.monotonic()
    fleet.stop_redis()
    if long:
        # STATE_UNAVAILABLE only once the view is older than the bound: the allowance starts half a bound in (the
        # view's age counts from its last answer, at most a read's timeout before the stop)
        load.allow(STATE_UNAVAILABLE, stopped + p.staleness_ms / 2000)
        first_refusal: dict[int, float] = {}

        async def all_refuse() -> bool:
            for c in load.calls:
                if c.code == STATE_UNAVAILABLE and c.router not in first_refusal:
                    first_refusal[c.router] = c.end - stopped
            return len(first_refusal) == len(fleet.routers)

        await poll(all_refuse, "every router answering 503 STATE_UNAVAILABLE", p.staleness_ms / 1000 + 10, 0.05)
        result.bounds["state_unavailable_after_s"] = min(first_refusal.values())
        early = [c for c in load.calls if c.code == STATE_UNAVAILABLE and c.end < stopped + p.staleness_ms / 2000]
        result.add(
            "503 past the bound",
            not early,
            f"every router refused with STATE_UNAVAILABLE; {len(early)} refusals before half the bound",
            f"first after {min(first_refusal.values()):.2f} s (degradedMaxStalenessMs {p.staleness_ms} ms)",
        )
    else:
        await asyncio.sleep(max(0.5, min(p.load_s, p.staleness_ms / 2000)))  # an outage well inside the bound
    down_s = time.monotonic() - stopped
    await fleet.start_redis(empty=empty)
    back = time.monotonic()

    async def shared_everywhere() -> bool:
        shared = (c for c in load.calls if c.start > back and c.op == "schedule" and c.status == 200)
        return {c.router for c in shared if not c.degraded} == set(range(len(fleet.routers)))

    if empty:
        await fleet.wait_serving()  # registrations, the lock, statuses: all rebuilt
    await poll(shared_everywhere, "every router scheduling from shared state again", 20.0, 0.05)
    recovered = time.monotonic() - back
    result.bounds["outage_s"] = down_s
    result.bounds["recovered_s"] = recovered
    degraded = [c for c in load.calls if c.degraded and stopped <= c.start <= back]
    result.add(
        "recovered",
        True,
        f"Redis away {down_s:.2f} s; {len(degraded)} degraded answers meanwhile",
        f"shared answers from every router {recovered:.2f} s after Redis came back",
    )
    if not long:
        unavailable = [c for c in load.calls if c.code == STATE_UNAVAILABLE]
        result.add(
            "served from the view",
            bool(degraded) and not unavailable,
            f"{len(degraded)} degraded answers, {len(unavailable)} STATE_UNAVAILABLE",
        )


async def fault_redis_short_outage(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """Redis away well inside degradedMaxStalenessMs: answers come from each router's view (degraded)."""
    await _outage(fleet, load, result, long=False)


async def fault_redis_long_outage(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """Redis away past degradedMaxStalenessMs: 503 STATE_UNAVAILABLE, then shared scheduling once it is back."""
    await _outage(fleet, load, result, long=True)


async def fault_redis_restart_empty(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """Redis restarts with no data: static and API registrations come back, a master is elected, load resumes."""
    started = time.monotonic()
    await _outage(fleet, load, result, long=False, empty=True)
    members = await fleet.db().smembers(fleet.keys.role_set(Role.PDFUSION))
    expected = {w.worker_id for w in fleet.workers}
    result.bounds["registrations_back_s"] = time.monotonic() - started
    result.add(
        "registrations back",
        set(members) == expected,
        f"{len(set(members) & expected)} of {len(expected)} workers registered again "
        f"({len(fleet.static_workers)} static, {len(expected) - len(fleet.static_workers)} through the API)",
    )


async def fault_zero_token_release(fleet: ChaosFleet, load: Load, result: FaultResult) -> None:
    """A 0-token reservation (seq_len 0) is released with 200 through every router (issue 10, bug 1)."""
    bad = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=fleet.params.call_timeout_s)) as http:
        for i, router in enumerate(fleet.routers):
            rid = random.randrange(1 << 41, 1 << 42)
            async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": rid, "seq_len": 0}) as r:
                answer = await r.json()
            tokens = [s["debug_info"]["reserved_tokens"] for s in answer.get("server_status", [])]
            other = fleet.routers[(i + 1) % len(fleet.routers)]  # released fleet-wide, not only where reserved
            async with http.post(f"{other.url}/rtp_llm/release", json={"request_id": rid}) as r:
                released = (r.status, await r.json())
            if not answer["success"] or tokens != [0] or released != (200, {**released[1], "released": 1}):
                bad.append(f"router{i}: {answer.get('code')} tokens {tokens} release {released}")
    zero = [c for c in load.calls if c.op == "release"]
    result.add(
        "0-token release",
        not bad,
        f"{len(fleet.routers)} explicit seq_len 0 reservations released; {len(zero)} releases in the load "
        f"(a fifth of them 0-token) " + "; ".join(bad),
    )


FAULTS: dict[str, Fault] = {
    "router_sigkill": fault_router_sigkill,
    "master_sigkill": fault_master_sigkill,
    "master_sigstop": fault_master_sigstop,
    "worker_kill_restart": fault_worker_kill_restart,
    "redis_short_outage": fault_redis_short_outage,
    "redis_long_outage": fault_redis_long_outage,
    "redis_restart_empty": fault_redis_restart_empty,
    "zero_token_release": fault_zero_token_release,
}


async def run_fault(fleet: ChaosFleet, name: str, seed: int = 0) -> FaultResult:
    """Heal, load, the fault, load, then the common invariants; the result says what held."""
    result = FaultResult(name)
    await fleet.heal()
    try:
        async with CounterSampler(fleet) as sampler, Load(fleet, seed) as load:
            await asyncio.sleep(fleet.params.load_s)  # steady load before the fault
            await FAULTS[name](fleet, load, result)
            await asyncio.sleep(fleet.params.load_s)  # and after it
        check_answered(result, load)
        sampler.check(result)
        await check_drained(result, fleet)
    except (AssertionError, StackError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---------------------------------------------------------------------------------------------------------------
# `flexlb bench chaos`

CHAOS_EPILOG = """\
Starts a private fleet (redis-server, 4 simulated workers, 2 `flexlb master`, 3 `flexlb serve`; --heavy: 4 routers),
then runs each fault under a closed loop of schedule + release and proxied requests: heal, load, the fault,
load; prints a table fault / invariant / result / measured bound and writes JSON. The same faults run in CI as
tests/chaos (FLEXLB_CHAOS=heavy: the --heavy sizes). See docs/failure-behaviour.md.

Exit status: 0 when every invariant held, 1 when one did not, 2 when the fleet failed to start.
"""


def add_chaos_parser(bsub: argparse._SubParsersAction) -> None:
    c = bsub.add_parser(
        "chaos",
        help="inject faults into a local fleet under load; check the invariants in Redis",
        description="Faults (router, master, worker, Redis) under load through several routers, checked in Redis.",
        epilog=CHAOS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from: {', '.join(FAULTS)}")
    c.add_argument("--heavy", action="store_true", help="4 routers, 12 clients, 5 s of load, each fault 3 times")
    c.add_argument("--repeat", type=int, help="each fault this many times (default 1, --heavy 3)")
    c.add_argument("--load", type=float, help="seconds of load before and after each fault (default 1, --heavy 5)")
    c.add_argument("--out", help="JSON result file (default bench-results/chaos-<timestamp>.json)")
    c.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")


def cmd_chaos(args: argparse.Namespace) -> int:
    from flexlb.bench.report import default_out_path, write_json
    from flexlb.bench.tables import table

    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"flexlb bench chaos: unknown faults {unknown}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    params = ChaosParams.heavy() if args.heavy else ChaosParams()
    overrides = {"repeat": args.repeat, "load_s": args.load}
    params = dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})
    try:
        with sigterm_as_ctrl_c():  # everything started is stopped
            results = asyncio.run(_run_bench(params, names, keep_logs=args.keep_logs))
    except (StackError, RedisNotInstalled) as exc:
        print(f"flexlb bench chaos: the fleet failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexlb bench chaos: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    rows = []
    for r in results:
        if r.error:
            rows.append([r.fault, "(fault run)", "FAIL", r.error[:100]])
        for c in r.checks:
            rows.append([r.fault, c.invariant, "ok" if c.ok else "FAIL", c.measured or c.detail[:100]])
    print("\n".join(table(rows, ["fault", "invariant", "result", "measured bound"])))
    doc = {"params": dataclasses.asdict(params), "results": [r.to_json() for r in results]}
    path = write_json(doc, Path(args.out) if args.out else default_out_path("chaos"))
    print(f"\nJSON written to {path}")
    return 0 if all(r.ok for r in results) else 1


async def _run_bench(params: ChaosParams, names: list[str], *, keep_logs: bool) -> list[FaultResult]:
    fleet = ChaosFleet(params)
    results = []
    try:
        print(f"starting the fleet (logs in {fleet.stack.log_dir}) ...", flush=True)
        await fleet.start()
        for name, round_ in itertools.product(names, range(params.repeat)):
            result = await run_fault(fleet, name, seed=round_)
            print(result.report(), flush=True)
            results.append(result)
    finally:
        await fleet.close(keep_logs=keep_logs)
    return results
