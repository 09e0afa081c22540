"""The master's poller of one vLLM or SGLang worker: ``GET /health`` every ``healthCheckIntervalMs`` (with failure and
success thresholds) and its load from the engine's own API every ``engineMetricsIntervalMs``, written with the term's
epoch as the RTP-LLM poller writes (``flexlb.master.poller``). Such a worker has no cache polls: its prefix hits are
only its in-flight blocks (``inflight:``) unless it publishes KV events (``flexlb.master.kv_events``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from flexlb.domain import WorkerSpec
from flexlb.master.engine_load import Dialect, EngineLoad, FetchFailed, Holds, NotThisEngine, load_fields
from flexlb.master.health import HealthOptions, HealthTracker, HttpGetter
from flexlb.master.reconcile import Hysteresis
from flexlb.metrics import MasterMetrics
from flexlb.scheduler import REDIS_UNAVAILABLE
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.master.engine_poller")

Clock = Callable[[], float]
_READ_ERRORS = (OSError, aiohttp.ClientError, TimeoutError, FetchFailed, ValueError)  # ValueError: a bad page


class EnginePoller:
    """Health and load of one HTTP-polled worker for one master term (same interface as ``WorkerPoller``)."""

    def __init__(
        self,
        spec: WorkerSpec,
        dialect: Dialect,
        http: HttpGetter,
        store: FleetStore,
        epoch: int,
        *,
        health: HealthOptions,
        load_interval_s: float,
        heartbeat_s: float,
        worker_timeout_s: float,
        hysteresis: Hysteresis,
        metrics: MasterMetrics,
        initially_up: bool = True,
        clock: Clock = time.monotonic,
        redis_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.spec = spec
        self.dialect = dialect
        self.http = http
        self.store = store
        self.epoch = epoch
        self.health_options = health
        self.load_interval_s = load_interval_s
        self.heartbeat_s = heartbeat_s
        self.worker_timeout_s = worker_timeout_s
        self.hysteresis = hysteresis
        self.metrics = metrics
        self.clock = clock
        self._gate = redis_gate or asyncio.Semaphore(32)
        self._write_lock = asyncio.Lock()
        self._initially_up = initially_up
        self._alive_gauge = metrics.worker_alive.labels(worker=spec.worker_id, role=spec.role.value)
        self._health_ok = metrics.polls.labels(rpc="health", result="ok")
        self._health_failed = metrics.polls.labels(rpc="health", result="failed")
        self._load_ok = metrics.polls.labels(rpc="load", result="ok")
        self._load_failed = metrics.polls.labels(rpc="load", result="failed")
        self.on_forget: Callable[[], None] | None = None  # told when the worker was forgotten (its index emptied)
        self.reset()

    def reset(self) -> None:
        """Fresh memory (a new term, or after a bug restarted this poller)."""
        h = self.health_options
        self.tracker = HealthTracker(h.failure_threshold, h.success_threshold, up=self._initially_up)
        self.holds = Holds()
        self.load: EngineLoad | None = None
        self.written: dict[str, str] | None = None
        self.written_at = 0.0
        self.last_ok: float | None = None
        self.forgotten = False
        self._started = self.clock()
        self._load_failing = False

    @property
    def name(self) -> str:
        return f"{self.spec.role.value} worker {self.spec.worker_id} ({self.spec.engine.value})"

    @property
    def address(self) -> str:
        return f"http://{self.spec.worker_id}"

    async def run(self) -> None:
        """Check health and read the load until cancelled; raises StaleEpoch when a newer master exists."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._every(self.health_options.interval_s, self.check_health))
            group.create_task(self._every(self.load_interval_s, self.read_load))

    async def _every(self, interval_s: float, step: Callable[[], object]) -> None:
        while True:
            started = self.clock()
            try:
                await step()  # type: ignore[misc]
            except REDIS_UNAVAILABLE as exc:
                log.warning("%s: cannot write its status to Redis: %r", self.name, exc)
                self.written = None
            await asyncio.sleep(max(0.0, interval_s - (self.clock() - started)))

    async def _fetch(self, path: str) -> tuple[int, bytes]:
        return await self.http.get(self.spec.ip, self.spec.http_port, path)

    async def check_health(self) -> None:
        ok, why = await self.http.healthy(self.spec.ip, self.spec.http_port)
        now = self.clock()
        (self._health_ok if ok else self._health_failed).inc()
        tracker = self.tracker
        moved = tracker.record(ok)
        if ok:
            self.last_ok = now
        if moved and tracker.up:
            log.info("%s is healthy again after %d passed checks", self.name, tracker.successes)
            self.forgotten = False
            await self._write(self._fields(), now)
        elif moved:
            log.warning("%s marked not alive after %d failed health checks: %s", self.name, tracker.failures, why)
            await self._write({"alive": "0"}, now)
        if not tracker.up:
            silent_since = self.last_ok if self.last_ok is not None else self._started
            if not self.forgotten and now - silent_since >= self.worker_timeout_s:
                async with self._gate:
                    released = await self.store.forget_worker(self.epoch, self.spec.worker_id)
                log.warning("%s unhealthy for %.1fs: released %s reservations", self.name, now - silent_since, released)
                self.forgotten = True
                self.written = None
                if self.on_forget is not None:
                    self.on_forget()

    async def read_load(self) -> None:
        try:
            load = await self.dialect.read(self._fetch)
        except NotThisEngine as exc:
            self._load_failed.inc()
            if not self._load_failing:
                log.error("%s: %s", self.name, exc)
            self._load_failing = True
            return
        except _READ_ERRORS as exc:
            self._load_failed.inc()
            if not self._load_failing:  # the health checks decide liveness; the load just stays as it was
                log.warning("%s: cannot read its load: %s: %s", self.name, type(exc).__name__, exc)
            self._load_failing = True
            return
        self._load_ok.inc()
        if self._load_failing:
            log.info("%s: its load reads again", self.name)
            self._load_failing = False
        self.load = load
        now = self.clock()
        if self.tracker.up:
            fields = self._fields()
            if fields != self.written or now - self.written_at >= self.heartbeat_s:
                await self._write(fields, now)

    def _fields(self) -> dict[str, str]:
        if self.load is None:
            return {"alive": "1"}
        return load_fields(self.load, self.spec.role, self.holds, self.hysteresis)

    async def _write(self, fields: dict[str, str], now: float) -> None:
        async with self._write_lock, self._gate:
            await self.store.write_worker_status(self.epoch, self.spec.worker_id, fields)
        self.written, self.written_at = fields, now
        self._alive_gauge.set(1 if fields.get("alive") == "1" else 0)

    async def close(self) -> None:
        """The HTTP client is shared by the term's pollers: the duties close it."""
