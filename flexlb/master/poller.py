"""The master's duties: poll every registered worker over gRPC and write what it reports to Redis.

One :class:`WorkerPoller` per worker runs status and cache calls one after the other, so a worker never has two of
our calls in flight, each with a deadline. Every write is fenced by the term's epoch: when a newer master exists the
write is refused (:class:`StaleEpoch`) and :class:`MasterDuties` stops all polling.

Idle workers cost little: a worker whose status did not change since the last poll is polled less often, the
interval doubling from ``status_interval_s`` up to ``idle_interval_s`` (warm), and ``cold_interval_s`` once it has
not changed for ``cold_after_s`` (cold); the first reply that shows a change (or a failed poll) brings it back to
``status_interval_s``. The polls of RTP-LLM workers are sent by one :class:`~flexlb.master.ticker.StatusTicker`,
which takes quiet replies without waking the poller. An unchanged status is not written to Redis, except once per
``heartbeat_s`` so ``updated_ms`` shows the master still sees the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flexlb.domain import WorkerSpec, WorkerView
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.master.engine_load import dialect_for
from flexlb.master.engine_poller import EnginePoller
from flexlb.master.health import HealthOptions, HttpGetter
from flexlb.master.kv_events import KvEventsSubscriber
from flexlb.master.reconcile import (
    Hysteresis,
    StatusUpdate,
    WorkerTrack,
    cache_diff,
    cache_poll_due,
    next_cache_interval,
    quiet_reply,
    reconcile_status,
)
from flexlb.master.ticker import StatusTicker
from flexlb.master.worker_client import WorkerStatusClient, WorkerUnreachable
from flexlb.metrics import MasterMetrics
from flexlb.proto.flexlb_worker_pb2 import WorkerStatusPB
from flexlb.scheduler import REDIS_UNAVAILABLE
from flexlb.settings import Settings
from flexlb.state.store import FleetStore, StaleEpoch

log = logging.getLogger("flexlb.master.poller")

Clock = Callable[[], float]
ClientFactory = Callable[[WorkerSpec], WorkerStatusClient]


@dataclass(frozen=True, slots=True)
class PollOptions:
    status_interval_s: float = 0.02
    # the longest interval between two polls of a worker whose status does not change: bounds how late the first
    # change of an idle worker is seen (the freshness of `flexlb bench control`)
    idle_interval_s: float = 0.06
    # unchanged this long: cold, polled every cold_interval_s (a cold worker's first change shows that late at worst;
    # a request a router sent it is in the routers' view at once, as its reservation)
    cold_after_s: float = 10.0
    cold_interval_s: float = 0.5
    deadline_s: float = 0.1
    cache_min_interval_s: float = 0.05
    cache_max_interval_s: float = 3.0
    down_after_failures: int = 2
    worker_timeout_s: float = 3.0  # silent this long: forgotten (not alive, cache index and reservations dropped)
    task_timeout_s: float = 3.0  # a request id not reported this long is forgotten
    heartbeat_s: float = 5.0  # an unchanged status is still written this often, so updated_ms shows it is fresh
    membership_interval_s: float = 0.5  # how often membership changes are looked for
    redis_concurrency: int = 32  # Redis calls of all pollers in flight at once (each takes a pooled connection)
    hysteresis: Hysteresis = field(default_factory=Hysteresis)
    # vLLM and SGLang workers (EnginePoller): health checks and load reads over HTTP
    health: HealthOptions = field(default_factory=HealthOptions)
    engine_load_interval_s: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> PollOptions:
        c = settings.flexlb
        return cls(
            status_interval_s=settings.sync_status_interval_ms / 1000,
            idle_interval_s=c.status_idle_interval_ms / 1000,
            cold_after_s=c.status_cold_after_ms / 1000,
            cold_interval_s=c.status_cold_interval_ms / 1000,
            deadline_s=settings.sync_request_timeout_ms / 1000,
            cache_min_interval_s=c.cache_sync_min_interval_ms / 1000,
            cache_max_interval_s=c.cache_sync_max_interval_ms / 1000,
            down_after_failures=c.worker_down_after_failed_polls,
            worker_timeout_s=settings.worker_timeout_ms / 1000,
            task_timeout_s=settings.task_timeout_ms / 1000,
            hysteresis=Hysteresis(
                prefill_waiting=c.prefill_queue_size_threshold,
                decode_kv_percent=c.decode_available_memory_threshold,
                bias_percent=c.hysteresis_bias_percent,
            ),
            health=HealthOptions.from_config(c),
            engine_load_interval_s=c.engine_metrics_interval_ms / 1000,
        )


class WorkerPoller:
    """Polls one worker for one master term and writes its status, cache index and liveness."""

    def __init__(
        self,
        spec: WorkerSpec,
        client: WorkerStatusClient,
        store: FleetStore,
        epoch: int,
        options: PollOptions,
        metrics: MasterMetrics,
        clock: Clock = time.monotonic,
        redis_gate: asyncio.Semaphore | None = None,
        ticker: StatusTicker | None = None,
    ) -> None:
        self.spec = spec
        self.client = client
        self.ticker = ticker  # sends this worker's polls and takes its quiet replies (None: the poller does)
        self.store = store
        self.epoch = epoch
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self.track = WorkerTrack()
        self._unwritten_ids: set[int] = set()  # handled ids whose write failed: passed again with the next one
        self._started = clock()
        self._redis_failing = False
        self.interval_s = options.status_interval_s  # until the next status poll: grows while nothing changes
        self.changed_at = clock()  # when its status last changed (or a poll failed): cold after a while
        # shared by the pollers of a term: 1,250 workers changing at once must not open 1,250 Redis connections
        self._gate = redis_gate or asyncio.Semaphore(max(1, options.redis_concurrency))
        role = spec.role.value
        self._status_ok = metrics.polls.labels(rpc="status", result="ok")
        self._status_failed = metrics.polls.labels(rpc="status", result="failed")
        self._cache_ok = metrics.polls.labels(rpc="cache", result="ok")
        self._cache_failed = metrics.polls.labels(rpc="cache", result="failed")
        self._alive_gauge = metrics.worker_alive.labels(worker=spec.worker_id, role=role)
        self._alive_shown: int | None = None
        self.poll_cache = True  # False: its KV events keep its cache index (flexlb.master.kv_events)
        self.on_forget: Callable[[], None] | None = None  # told when the worker was forgotten (its index emptied)

    @property
    def name(self) -> str:
        return f"{self.spec.role.value} worker {self.spec.worker_id}"

    @property
    def address(self) -> str:
        return self.client.address

    def reset(self) -> None:
        """Fresh memory, after a bug restarted this poller."""
        self.track = WorkerTrack()

    async def run(self) -> None:
        """Poll until cancelled; raises StaleEpoch when a newer master exists."""
        clock, sleep, ticker = self.clock, asyncio.sleep, self.ticker
        # a fleet registered at once would otherwise be polled in lockstep bursts
        await sleep(random.uniform(0.0, self.options.status_interval_s))
        due = clock()
        while True:
            if ticker is not None:
                news = await ticker.next_news(self, due)
                reply = news.status or news.error
                if reply is not None:
                    started = clock()
                    await self.handle(reply)
                    due = started + self.interval_s
                    continue
            started = clock()
            await self.poll_once()  # no ticker, or no open light connection: the call itself (it connects)
            due = started + self.interval_s
            await sleep(max(0.0, due - clock()))

    def take_quiet(self, status: WorkerStatusPB, now: float) -> bool:
        """Take a reply in the ticker's callback when it needs no work here: the worker's status did not change,
        no heartbeat and no cache poll is due (``interval_s`` grows). False: nothing was taken, :meth:`handle` it."""
        track, options = self.track, self.options
        if track.failures or self._redis_failing:
            return False
        if track.written is not None and now - track.written_at >= options.heartbeat_s:
            return False
        if self.poll_cache and cache_poll_due(track, now, options.cache_min_interval_s):
            return False
        if not quiet_reply(track, status):
            return False
        self._status_ok.inc()
        track.last_ok = now
        self.interval_s = self._quiet_interval(now)
        return True

    def _quiet_interval(self, now: float) -> float:
        """The next interval after a reply that changed nothing: doubling up to ``idle_interval_s``, then
        ``cold_interval_s`` once the status has not changed for ``cold_after_s``."""
        o = self.options
        if now - self.changed_at >= o.cold_after_s:
            return max(o.cold_interval_s, o.idle_interval_s)
        return min(o.idle_interval_s, max(self.interval_s, o.status_interval_s) * 2)

    async def poll_once(self) -> bool:
        """One status poll, and a cache poll when it is due. Returns whether the worker's status changed;
        ``interval_s`` is set accordingly."""
        try:
            reply: WorkerStatusPB | WorkerUnreachable = await self.client.get_worker_status(
                self.track.finished_version, self.options.deadline_s
            )
        except WorkerUnreachable as exc:
            reply = exc
        return await self.handle(reply)

    async def handle(self, reply: WorkerStatusPB | WorkerUnreachable) -> bool:
        """What :meth:`poll_once` does with the worker's reply (or its failure): write what changed, poll its cache
        when due. Returns whether the worker's status changed; ``interval_s`` is set accordingly."""
        busy: bool | None = True
        try:
            busy = await self._poll_status(reply)
            due = self.poll_cache and cache_poll_due(self.track, self.clock(), self.options.cache_min_interval_s)
            if busy is not None and due:
                await self._poll_cache()
            if self._redis_failing:
                self._redis_failing = False
                log.info("%s: Redis writes work again", self.name)
        except REDIS_UNAVAILABLE as exc:
            if not self._redis_failing:  # once per outage, not every 20 ms
                self._redis_failing = True
                log.warning("%s: cannot write its status to Redis: %r", self.name, exc)
            self.track.written = None
        options = self.options
        if busy:  # changed: follow it closely
            self.interval_s = options.status_interval_s
            self.changed_at = self.clock()
        elif busy is False:
            self.interval_s = self._quiet_interval(self.clock())
        else:  # failed: a dead or overloaded worker gains nothing from faster polls, and must not go cold
            self.changed_at = self.clock()
            self.interval_s = min(options.idle_interval_s, max(self.interval_s, options.status_interval_s) * 2)
        return bool(busy)

    async def _poll_status(self, status: WorkerStatusPB | WorkerUnreachable) -> bool | None:
        """Write the polled status: True when it changed, False when not, None when the poll failed."""
        track, now = self.track, self.clock()
        if isinstance(status, WorkerUnreachable):
            self._status_failed.inc()
            await self._on_failure(status, now)
            return None
        self._status_ok.inc()
        if not track.failures and quiet_reply(track, status):
            track.last_ok = now
            if now - track.written_at >= self.options.heartbeat_s and track.written is not None:
                await self._heartbeat(now)
            return False
        if track.failures:
            log.info("%s answers again after %d failed polls", self.name, track.failures)
        track.failures, track.first_failure, track.last_ok = 0, None, now
        track.marked_down = track.forgotten = False
        update = reconcile_status(
            track, status, self.spec.role, now, self.options.hysteresis, self.options.task_timeout_s
        )
        if update is not None:
            if update.restarted:
                log.info("%s restarted (status_version went back); its earlier reports no longer apply", self.name)
            if update.lost_ids:
                self.metrics.lost_tasks.inc(len(update.lost_ids))
                log.info("%s: requests %s left without finishing (lost)", self.name, update.lost_ids[:10])
        changed = update is not None and await self._write_status(update, now)
        alive = 1 if status.alive else 0
        if alive != self._alive_shown:
            self._alive_gauge.set(alive)
            self._alive_shown = alive
        return changed

    async def _heartbeat(self, now: float) -> None:
        """Write the unchanged status again, so ``updated_ms`` shows the master still sees the worker."""
        track = self.track
        assert track.written is not None
        async with self._gate:
            await self.store.write_worker_status(self.epoch, self.spec.worker_id, track.written)
        track.written_at = now

    async def _write_status(self, update: StatusUpdate, now: float) -> bool:
        """Write what changed (or a heartbeat); returns whether the status changed."""
        track = self.track
        ids = sorted(self._unwritten_ids.union(update.handled_ids)) if update.handled_ids or self._unwritten_ids else []
        changed = bool(ids) or update.fields != track.written or bool(update.lost_ids)
        if not changed and now - track.written_at < self.options.heartbeat_s:
            return False
        self._unwritten_ids.update(ids)
        async with self._gate:
            written = await self.store.write_worker_status(self.epoch, self.spec.worker_id, update.fields, ids)
        self._unwritten_ids.clear()
        track.written, track.written_at = update.fields, now
        if written is not None and written.dropped:
            self.metrics.reservations_handed_over.inc(written.dropped)
        return changed

    async def _poll_cache(self) -> None:
        track = self.track
        track.last_cache_at, track.iterations_at_cache_poll = self.clock(), track.iterations
        try:
            version = -1 if track.cache_version is None else track.cache_version
            reply = await self.client.get_cache_status(version, True, self.options.deadline_s)
        except WorkerUnreachable as exc:
            self._cache_failed.inc()
            log.debug("%s", exc)
            track.next_cache_at = self.clock() + self.options.cache_min_interval_s
            return
        self._cache_ok.inc()
        if reply.block_size > 0:
            track.block_size = reply.block_size
        changed = False
        if reply.version != track.cache_version:
            if track.cache_keys is None:  # first look in this term: diff against what Redis holds
                async with self._gate:
                    track.cache_keys = frozenset(await self.store.cache_blocks(self.spec.worker_id))
            # one pass over the reply's map, iterated directly: .keys() is a Python-level view, ~1.5x slower
            current = frozenset(reply.cache_keys)
            add, remove = cache_diff(track.cache_keys, current)
            if add or remove:
                async with self._gate:
                    await self.store.apply_cache_diff(self.epoch, self.spec.worker_id, add, remove)
                changed = True
            track.cache_keys = current
            track.cache_version = reply.version
        low, high = self.options.cache_min_interval_s, self.options.cache_max_interval_s
        track.cache_interval_s = next_cache_interval(track.cache_interval_s or low, changed, low, high)
        track.next_cache_at = self.clock() + track.cache_interval_s

    async def _on_failure(self, exc: WorkerUnreachable, now: float) -> None:
        track = self.track
        track.failures += 1
        if track.first_failure is None:
            track.first_failure = now
        if track.failures >= self.options.down_after_failures and not track.marked_down:
            log.warning("%s marked not alive after %d failed polls: %s", self.name, track.failures, exc)
            async with self._gate:
                await self.store.write_worker_status(self.epoch, self.spec.worker_id, {"alive": "0"})
            track.marked_down, track.written = True, None
            self._alive_gauge.set(0)
            self._alive_shown = 0
        silent_since = track.last_ok if track.last_ok is not None else self._started
        if not track.forgotten and now - silent_since >= self.options.worker_timeout_s:
            async with self._gate:
                released = await self.store.forget_worker(self.epoch, self.spec.worker_id)
            log.warning(
                "%s silent for %.1fs: forgot its cache index and released %s reservations",
                self.name, now - silent_since, released,
            )  # fmt: skip
            track.forgotten = True
            track.restart()
            track.cache_keys = frozenset()  # forget_worker emptied the set in Redis
            if self.on_forget is not None:
                self.on_forget()

    async def close(self) -> None:
        await self.client.close()


class MasterDuties:
    """Everything the master does during one term: follow membership and run one WorkerPoller per worker."""

    def __init__(
        self,
        store: FleetStore,
        options: PollOptions,
        metrics: MasterMetrics,
        client_factory: ClientFactory = WorkerStatusClient.for_worker,
        clock: Clock = time.monotonic,
        kv_events: Mapping[str, KvEventsEndpoint] | None = None,
        polls: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        self.polls = polls  # which worker ids these duties poll (a shard's: flexlb.master.shards); None: all
        self.options = options
        self.metrics = metrics
        self.client_factory = client_factory
        self.clock = clock
        self.pollers: dict[str, tuple[WorkerPoller | EnginePoller, asyncio.Task[None]]] = {}
        # worker id -> where it publishes KV events: its subscriber keeps its cache index, exactly
        self.kv_events = dict(kv_events or {})
        self.subscribers: dict[str, tuple[KvEventsSubscriber, asyncio.Task[None]]] = {}
        self._http: HttpGetter | None = None  # of the HTTP-polled workers: made on the loop that runs the duties
        self._stale = asyncio.Event()
        self._redis_gate: asyncio.Semaphore | None = None  # made on the loop that runs the duties
        self._ticker: StatusTicker | None = None  # of the term: sends the polls of the RTP-LLM workers
        self._ticker_task: asyncio.Task[None] | None = None

    async def run(self, epoch: int) -> None:
        """The duties of the term ``epoch``: until cancelled, or until a newer master shows up."""
        self._stale.clear()
        self.metrics.epoch.set(epoch)
        self.metrics.is_master.set(1)
        log.info("master duties start: epoch %d", epoch)
        known_version: str | None = None
        self._ticker = StatusTicker(clock=self.clock)
        self._ticker_task = asyncio.create_task(self._ticker.run(), name="status ticker")
        try:
            while not self._stale.is_set():
                try:
                    version = await self.store.members_version()
                    if version != known_version:
                        await self._follow_membership(epoch)
                        known_version = version
                except REDIS_UNAVAILABLE as exc:
                    log.warning("master: cannot read membership from Redis: %r", exc)
                except Exception:
                    # e.g. a worker hash an operator wrote by hand with a bad value: keep polling the others
                    log.exception("master: cannot follow membership; polling the workers known so far")
                # asyncio.timeout, not wait_for: on Python 3.11 a cancellation that lands as wait_for's timeout
                # fires is turned into that TimeoutError and lost, and a busy loop (a thousand pollers) makes it
                # likely: the term's duties then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.membership_interval_s):
                        await self._stale.wait()
            log.warning("master duties stop: a newer master than epoch %d writes now", epoch)
        finally:
            self.metrics.is_master.set(0)
            await self._stop_all()

    async def _follow_membership(self, epoch: int) -> None:
        polls = self.polls
        views = {v.worker_id: v for v in await self.store.list_workers() if polls is None or polls(v.worker_id)}
        moved = [wid for wid, (poller, _) in self.pollers.items() if wid not in views or views[wid].spec != poller.spec]
        for wid in moved:
            await self._stop(wid)
        for wid, view in views.items():
            if wid not in self.pollers:
                if self._redis_gate is None:
                    self._redis_gate = asyncio.Semaphore(max(1, self.options.redis_concurrency))
                poller = self._poller(view, epoch, self._redis_gate)
                task = asyncio.create_task(self._run_poller(poller), name=f"poll {wid}")
                self.pollers[wid] = (poller, task)
                log.info("polling %s at %s", poller.name, poller.address)
                # given with its registration (spec), else by MODEL_SERVICE_CONFIG; a registration that changes it
                # changes the spec: the worker is stopped above and followed again at its new endpoint
                endpoint = view.spec.kv_events or self.kv_events.get(wid)
                if endpoint is not None:
                    self._subscribe(poller, endpoint, epoch)

    def _subscribe(self, poller: WorkerPoller | EnginePoller, endpoint: KvEventsEndpoint, epoch: int) -> None:
        """Follow the worker's KV events: its cache index from them, not from cache polls or nothing."""
        spec = poller.spec
        subscriber = KvEventsSubscriber(spec.worker_id, spec.role.value, endpoint, self.store, epoch)
        poller.on_forget = subscriber.forgotten
        if isinstance(poller, WorkerPoller):
            poller.poll_cache = False
        task = asyncio.create_task(self._run_subscriber(subscriber), name=f"kv events {spec.worker_id}")
        self.subscribers[spec.worker_id] = (subscriber, task)

    def _poller(self, view: WorkerView, epoch: int, gate: asyncio.Semaphore) -> WorkerPoller | EnginePoller:
        """The engine kind's poller: RTP-LLM's status gRPC, or the engine's HTTP API (vLLM, SGLang)."""
        spec, o = view.spec, self.options
        if spec.engine.speaks_status_rpc:
            client = self.client_factory(spec)
            # the ticker drives the real client's light connection; any other client (tests) is called directly
            ticker = self._ticker if isinstance(client, WorkerStatusClient) else None
            return WorkerPoller(spec, client, self.store, epoch, o, self.metrics, self.clock, gate, ticker)
        if self._http is None:
            self._http = HttpGetter(o.health.timeout_s)
        return EnginePoller(
            spec, dialect_for(spec.engine), self._http, self.store, epoch, health=o.health,
            load_interval_s=o.engine_load_interval_s, heartbeat_s=o.heartbeat_s, worker_timeout_s=o.worker_timeout_s,
            hysteresis=o.hysteresis, metrics=self.metrics, initially_up=view.status.alive, clock=self.clock,
            redis_gate=gate,
        )  # fmt: skip

    async def _run_poller(self, poller: WorkerPoller | EnginePoller) -> None:
        while True:
            try:
                await poller.run()
            except StaleEpoch as exc:
                log.warning("%s: write refused: %s", poller.name, exc)
                self._stale.set()
                return
            except Exception:
                # a bug must not silently stop the polling of one worker: log it and start over with fresh memory
                log.exception("%s: poller failed; restarting it", poller.name)
                poller.reset()
                await asyncio.sleep(self.options.membership_interval_s)

    async def _run_subscriber(self, subscriber: KvEventsSubscriber) -> None:
        while True:
            try:
                await subscriber.run()
            except StaleEpoch as exc:
                log.warning("%s: write refused: %s", subscriber.name, exc)
                self._stale.set()
                return
            except Exception:
                log.exception("%s: subscriber failed; restarting it", subscriber.name)
                await asyncio.sleep(self.options.membership_interval_s)

    async def _stop(self, worker_id: str) -> None:
        sub = self.subscribers.pop(worker_id, None)
        if sub is not None:
            sub[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub[1]
            log.info("%s: no longer followed", sub[0].name)
        poller, task = self.pollers.pop(worker_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await poller.close()
        with contextlib.suppress(KeyError), warnings.catch_warnings():  # KeyError: never polled, no series
            # Multi-process mode cannot remove a series (prometheus_client warns); there the next master's writes,
            # the most recent, take over the worker's series.
            warnings.simplefilter("ignore", UserWarning)
            self.metrics.worker_alive.remove(worker_id, poller.spec.role.value)

    async def _stop_all(self) -> None:
        # Cancel every poller first, then wait for all: one at a time, each wait would take a loop iteration that
        # the others still running fill, which with a thousand workers is many seconds.
        tasks = [task for _, task in (*self.pollers.values(), *self.subscribers.values())]
        if self._ticker_task is not None:
            tasks.append(self._ticker_task)
            self._ticker_task = self._ticker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for wid in list(self.pollers):
            await self._stop(wid)
        if self._http is not None:
            await self._http.close()
            self._http = None
