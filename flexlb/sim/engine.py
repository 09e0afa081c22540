"""A simulated LLM inference engine: continuous batching, a prefix KV cache and real (scaled) time.

One asyncio task runs engine iterations like a real engine does: admit waiting requests (FCFS, bounded by
``max_concurrency`` and KV blocks), then either one batched prefill step or, when no prompt is waiting for prefill, one
decode step over every running sequence. Each step sleeps for the modelled compute time, so a client over HTTP
measures a real TTFT and TPOT. Statuses report the engine's own state (see ``flexlb.sim.status``).

A DECODE worker takes a prompt's KV as transferred: at admission, or, for a request submitted ``kv_pending``, once
``kv_ready`` says its prefill peer computed it, plus the transfer of the tokens it does not hold itself (SGLang's
PD disaggregation: the decode side pre-allocates the KV, then waits on the transfer from the bootstrap room).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from flexlb.blocks import block_cache_keys, splitmix64, to_int64
from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.sim.kv_cache import PrefixKVCache
from flexlb.sim.kv_events import KvEventSink
from flexlb.sim.status import CacheStatus, EngineCounters, EngineStatus, TaskInfo

log = logging.getLogger("flexlb.sim")

SIM_ROLES = frozenset({Role.PREFILL, Role.DECODE, Role.PDFUSION})
# A step that follows another one directly, less than this late, starts at the previous step's deadline instead of
# "now", so the event loop's oversleep does not accumulate into a slower engine; later than this (a blocked loop), it
# starts now.
_CONTINUOUS_SLACK_S = 0.005
_VOCABULARY = (
    "the of and to in is that for it as with was on be by at this from or an are not have but they which one you "
    "all were her can there been if more when will would who so no time model token cache block batch prefix decode"
)
_WORDS = _VOCABULARY.split()  # output pseudo-words


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Capacity and timing of one simulated worker. Times are model milliseconds, scaled by ``time_scale``."""

    role: Role = Role.PDFUSION
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    kv_blocks: int = 2048  # KV pool size in blocks
    max_concurrency: int = 8  # running batch
    max_queue: int = 256  # waiting requests; one more is refused with QueueFull
    prefill_tokens_per_ms: float = 20.0
    prefill_overhead_ms: float = 3.0  # per prefill step
    prefill_batch_tokens: int = 8192  # uncached tokens per prefill step (a longer prompt runs alone)
    decode_step_ms_base: float = 8.0
    decode_step_ms_per_seq: float = 0.5
    kv_transfer_ms_per_token: float = 0.002  # DECODE, kv_pending: transfer of each prompt token it does not hold
    time_scale: float = 1.0  # real seconds per model second: 0.1 runs ten times faster
    finished_keep: int = 1024  # finished tasks kept for status pollers

    def __post_init__(self) -> None:
        if isinstance(self.role, str) and not isinstance(self.role, Role):
            object.__setattr__(self, "role", Role.parse(self.role))
        if self.role not in SIM_ROLES:
            raise ValueError(f"role: the simulator runs PREFILL, DECODE or PDFUSION, not {self.role}")
        for name in ("block_size", "kv_blocks", "max_concurrency", "prefill_batch_tokens", "finished_keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("prefill_tokens_per_ms", "time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in (
            "max_queue",
            "prefill_overhead_ms",
            "decode_step_ms_base",
            "decode_step_ms_per_seq",
            "kv_transfer_ms_per_token",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative, got {getattr(self, name)}")

    @property
    def total_kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    def prefill_ms(self, uncached_tokens: int) -> float:
        """Model time of one prefill step computing ``uncached_tokens``."""
        return self.prefill_overhead_ms + uncached_tokens / self.prefill_tokens_per_ms

    def decode_step_ms(self, batch_size: int) -> float:
        """Model time of one decode step over ``batch_size`` sequences (one token each)."""
        return self.decode_step_ms_base + self.decode_step_ms_per_seq * batch_size


def engine_block_hash(key: int) -> int:
    """The simulated engine's own hash of a cached block: not flexlb's key (a real engine's differs too), so its KV
    events' subscriber must hash the tokens itself."""
    return to_int64(splitmix64(key ^ 0x6B76_6576_656E_7473))


class EngineError(Exception):
    """A request the engine refuses; the message says why."""


class QueueFull(EngineError):
    pass


class RequestTooLarge(EngineError, ValueError):
    pass


class EngineStopped(EngineError):
    pass


class KvTransferFailed(EngineError):
    """A DECODE request whose prefill's KV never arrived (the message names the room and the prefill)."""


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


_END = object()  # end of a request's output stream


class EngineRequest:
    """One request inside the engine. Read its attributes; change it only through the engine (``cancel``)."""

    def __init__(
        self, request_id: int, prompt_tokens: int, block_keys: list[int], max_tokens: int, block_size: int, seed: int
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.block_keys = block_keys
        self.max_tokens = max_tokens  # tokens it will produce (1 on a PREFILL worker)
        self.block_size = block_size
        self.state = RequestState.WAITING
        self.finish_reason: str | None = None  # "length" | "cancelled"
        self.arrival_ms = 0.0  # engine time (model ms since start)
        self.admitted_ms: float | None = None
        self.first_token_ms: float | None = None
        self.finished_ms: float | None = None
        self.end_time_ms = 0  # epoch ms when finished or cancelled
        self.matched_blocks = 0  # prefix cache hit at admission
        self.prefill_ms = 0.0  # model compute time of its own prefill (overhead + uncached tokens / rate)
        self.completion_tokens = 0
        self.iterate_count = 0
        self._seed = seed
        self._prefilled = False
        self._kv_pending = False  # DECODE: admitted without KV until kv_ready() and the transfer
        self._kv_arrived = False  # kv_ready() was called (the transfer starts at admission if it had not)
        self._settled = asyncio.Event()  # its prompt's KV is in the cache, or it ended without
        self._pinned: list[int] = []  # cache blocks this request pins
        self._tokens: Sequence[int] = ()  # the prompt (for the KV events of its blocks)
        self._reserved = 0  # anonymous blocks this request holds
        self._out: asyncio.Queue[object] = asyncio.Queue()

    @property
    def cached_tokens(self) -> int:
        return min(self.matched_blocks * self.block_size, self.prompt_tokens)

    @property
    def uncached_tokens(self) -> int:
        """Prompt tokens the prefill computes (at least one: the last position yields the first token)."""
        return max(self.prompt_tokens - self.cached_tokens, 1)

    @property
    def queue_ms(self) -> float | None:
        return None if self.admitted_ms is None else self.admitted_ms - self.arrival_ms

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_ms is None else self.first_token_ms - self.arrival_ms

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED)

    async def stream(self) -> AsyncIterator[str]:
        """Output pieces as the engine produces them (one consumer). Raises EngineStopped if the engine stops."""
        while True:
            item = await self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item

    async def text(self) -> str:
        return "".join([piece async for piece in self.stream()])

    async def prefilled(self) -> bool:
        """Wait until the prompt's KV is computed (True) or the request ended without it (False)."""
        await self._settled.wait()
        return self._prefilled


class SimEngine:
    """The engine: ``start()``, ``submit()`` requests, read ``status()`` / ``cache_status()``, ``stop()``."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.cache = PrefixKVCache(config.kv_blocks)
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._epoch0_ms = time.time() * 1000.0  # wall clock at _t0, for end_time_ms and status versions
        self._waiting: dict[int, EngineRequest] = {}  # FCFS
        self._running: dict[int, EngineRequest] = {}
        self._finished: deque[tuple[int, TaskInfo]] = deque(maxlen=config.finished_keep)
        self._finished_version = 0
        self._status_version = 0
        self._counters = EngineCounters()
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._busy_until: float | None = None  # real-clock deadline of the last step; None after idling
        self._last_step_ms = 0.0
        self._events: KvEventSink | None = None
        self._transfers: set[asyncio.Task[None]] = set()  # KV transfers in flight (kept: the loop holds weak refs)

    def publish_kv_events(self, sink: KvEventSink) -> None:
        """Tell ``sink`` every block this engine's cache stores and evicts, and every clear (vLLM's KV events)."""
        self._events = sink
        self.cache.on_evict = lambda key: sink.removed([engine_block_hash(key)])

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (vLLM's ``POST /reset_prefix_cache``); False while running requests pin some."""
        if not self.cache.clear():
            return False
        if self._events is not None:
            self._events.cleared()
        return True

    # ---- lifecycle ----

    async def start(self) -> None:
        """Start the iteration loop (idempotent)."""
        self.start_now()

    def start_now(self) -> None:
        """``start()`` from synchronous code running on the event loop (a fleet starts its engines lazily)."""
        if self._stopped:
            raise EngineStopped("engine was stopped")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        """Stop iterating; live requests end with EngineStopped and release their KV."""
        self._stopped = True
        for transfer in list(self._transfers):
            transfer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_live(EngineStopped("the engine stopped"))

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopped

    # ---- requests ----

    def submit(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        *,
        request_id: int | None = None,
        block_keys: Sequence[int] | None = None,
        kv_pending: bool = False,
    ) -> EngineRequest:
        """Queue a request. Raises QueueFull, RequestTooLarge, EngineStopped or ValueError (bad arguments).

        ``kv_pending`` (DECODE only): its prompt's KV comes from a prefill peer; it decodes after ``kv_ready``."""
        if self._stopped:
            raise EngineStopped("the engine is stopped")
        if kv_pending and self.config.role is not Role.DECODE:
            raise ValueError(f"kv_pending: only a DECODE worker waits for KV, this one is {self.config.role.value}")
        if not tokens:
            raise ValueError("the prompt is empty")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        cfg = self.config
        if request_id is None:
            request_id = next(i for i in self._ids if not self._is_live(i))
        elif self._is_live(request_id):
            raise ValueError(f"request_id {request_id} is already running or waiting")
        produce = 1 if cfg.role is Role.PREFILL else max_tokens  # a prefill worker hands over after the first token
        need = self._blocks_for(len(tokens), produce)
        if need > cfg.kv_blocks:
            raise RequestTooLarge(
                f"the request needs {need} KV blocks ({len(tokens)} prompt + {produce} output tokens, "
                f"{cfg.block_size} per block) but the worker has {cfg.kv_blocks}"
            )
        if block_keys is None:
            keys = block_cache_keys(tokens, cfg.block_size)
        elif len(block_keys) > len(tokens) // cfg.block_size:
            raise ValueError(f"{len(block_keys)} block keys for {len(tokens)} tokens of {cfg.block_size} per block")
        else:
            keys = list(block_keys)
        req = EngineRequest(request_id, len(tokens), keys, produce, cfg.block_size, self._seed(tokens, keys))
        if self._events is not None:
            req._tokens = tokens
        req._kv_pending = kv_pending
        req.arrival_ms = self.now_ms()
        self._waiting[request_id] = req
        self._admit()
        if req.state is RequestState.WAITING and len(self._waiting) > cfg.max_queue:
            del self._waiting[request_id]
            self._counters.rejected += 1
            raise QueueFull(f"queue full: {cfg.max_queue} requests already waiting (max_queue={cfg.max_queue})")
        self._counters.requests += 1
        self._wakeup.set()
        return req

    def cancel(self, request: EngineRequest | int) -> bool:
        """End a waiting or running request now, freeing its slot and KV. False if it is not live."""
        rid = request if isinstance(request, int) else request.request_id
        req = self._waiting.get(rid) or self._running.get(rid)
        if req is None:
            return False
        self._counters.cancelled += 1
        self._end_cancelled(req, _END)
        return True

    def kv_ready(self, request: EngineRequest) -> None:
        """The prefill peer of a ``kv_pending`` request computed its KV: transfer it (now, or at admission)."""
        if request.done or not request._kv_pending or request._kv_arrived:
            return
        request._kv_arrived = True
        if request.state is RequestState.RUNNING:
            self._start_transfer(request)

    def kv_failed(self, request: EngineRequest, error: KvTransferFailed) -> bool:
        """End a ``kv_pending`` request whose KV will not come: its stream raises ``error``. False if not live."""
        if not self._is_live(request.request_id):
            return False
        self._counters.kv_failures += 1
        self._end_cancelled(request, error)
        return True

    def _end_cancelled(self, request: EngineRequest, last: object) -> None:
        """End a live request early: free its slot and KV, close its stream with ``last`` (the end marker or the
        error it raises), let the next waiters in."""
        self._drop(request)
        request.finish_reason = "cancelled"
        self._record_end(request, RequestState.CANCELLED)
        request._out.put_nowait(last)
        self._admit()
        self._wakeup.set()

    # ---- state ----

    def now_ms(self) -> float:
        """Engine time: model milliseconds since the engine was created."""
        return (self._clock() - self._t0) * 1000.0 / self.config.time_scale

    def epoch_ms(self) -> int:
        return int(self._epoch0_ms + (self._clock() - self._t0) * 1000.0)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def counters(self) -> EngineCounters:
        return dataclasses.replace(self._counters)

    @property
    def last_step_ms(self) -> float:
        """Model duration of the last engine iteration."""
        return self._last_step_ms

    @property
    def latest_finished_version(self) -> int:
        return self._finished_version

    @property
    def available_kv_tokens(self) -> int:
        """Tokens a new request can get: free blocks plus cached blocks no running request pins."""
        return (self.cache.free_blocks + self.cache.evictable_blocks) * self.config.block_size

    @property
    def idle(self) -> bool:
        """No request running or waiting: the status depends on nothing but counters."""
        return not self._running and not self._waiting

    def idle_status_key(self, latest_finished_version: int) -> tuple[object, ...] | None:
        """What an idle engine's status (but its ``status_version``) depends on, or None when not idle: equal keys,
        equal statuses, so a reply can be reused with a new version (``next_status_version``)."""
        if self._running or self._waiting:
            return None
        return (
            latest_finished_version if latest_finished_version <= self._finished_version else -1,
            self._finished_version,
            self.available_kv_tokens,
            self._counters.iterations,
            self._last_step_ms,
            self.alive,
        )

    def next_status_version(self) -> int:
        """A new status version, as ``status()`` takes one."""
        self._status_version = max(self._status_version + 1, self.epoch_ms())
        return self._status_version

    def status(self, latest_finished_version: int = -1) -> EngineStatus:
        """The worker status (``GetWorkerStatus``); finished tasks are those after ``latest_finished_version``."""
        now = self.now_ms()
        tasks = [self._task_info(r, now) for r in self._running.values()]
        tasks += [self._task_info(r, now) for r in self._waiting.values()]
        # Epoch-based, so a restarted worker's reports are not taken for stale ones; +1 keeps it strictly growing.
        self.next_status_version()
        return EngineStatus(
            role=f"RoleType.{self.config.role.value}",
            available_concurrency=max(0, self.config.max_concurrency - len(self._running)),
            running_task_info=tuple(tasks),
            finished_task_list=self.finished_after(latest_finished_version),
            waiting_query_len=len(self._waiting),
            running_query_len=len(self._running),
            step_latency_ms=self._last_step_ms,
            iterate_count=self._counters.iterations,
            status_version=self._status_version,
            alive=self.alive,
            latest_finished_version=self._finished_version,
            available_kv_cache=self.available_kv_tokens,
            total_kv_cache=self.config.total_kv_tokens,
        )

    def cache_status(self, latest_cache_version: int = -1, need_keys: bool = False) -> CacheStatus:
        """The cache status (``GetCacheStatus``): the full key set only when asked and the version moved."""
        version = self.cache.version
        send = need_keys and version != latest_cache_version  # "!=": a restarted worker's version starts over
        return CacheStatus(
            available_kv_cache=self.available_kv_tokens,
            total_kv_cache=self.config.total_kv_tokens,
            block_size=self.config.block_size,
            version=version,
            cache_keys=dict.fromkeys(self.cache.keys(), True) if send else {},
        )

    def finished_after(self, version: int) -> tuple[TaskInfo, ...]:
        """Finished tasks with a finished version above ``version`` (all kept ones if ``version`` is from a
        previous life of the worker, i.e. above the latest)."""
        if version > self._finished_version:
            version = -1
        out = []
        for v, info in reversed(self._finished):
            if v <= version:
                break
            out.append(info)
        return tuple(reversed(out))

    # ---- iteration loop ----

    async def _run(self) -> None:
        try:
            while True:
                self._admit()
                batch = self._next_prefill_batch()
                if batch:
                    await self._prefill_step(batch)
                    continue
                batch = [r for r in self._running.values() if r._prefilled]
                if batch:
                    await self._decode_step(batch)
                    continue
                # No await since _admit(): nothing can have arrived unseen before clear().
                self._busy_until = None
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("simulated engine loop crashed")
            self._fail_live(EngineStopped(f"the engine crashed: {exc!r}"))
            raise

    def _admit(self) -> None:
        """Move waiting requests to running while a slot and their KV are available (FCFS: no overtaking)."""
        while self._waiting and len(self._running) < self.config.max_concurrency:
            req = next(iter(self._waiting.values()))
            if not self._allocate(req):
                break
            del self._waiting[req.request_id]
            self._running[req.request_id] = req
            req.state = RequestState.RUNNING
            req.admitted_ms = self.now_ms()
            c = self._counters
            c.admitted += 1
            c.prompt_tokens += req.prompt_tokens
            c.cached_tokens += req.cached_tokens
            c.queue_time_ms += req.admitted_ms - req.arrival_ms
            if self.config.role is not Role.DECODE:
                continue
            if not req._kv_pending:
                self._cache_prompt(req)  # the KV arrives by transfer: no prefill compute
            elif req._kv_arrived:
                self._start_transfer(req)

    def _allocate(self, req: EngineRequest) -> bool:
        """Pin the cached prefix and reserve the rest of the request's blocks, or change nothing."""
        matched = self.cache.match_prefix(req.block_keys)
        hit = req.block_keys[:matched]
        need = self._blocks_for(req.prompt_tokens, req.max_tokens) - matched
        if not self.cache.can_reserve(need, keep=hit):
            return False
        self.cache.pin(hit)
        reserved = self.cache.reserve(need)
        assert reserved, "can_reserve said yes"
        req._pinned = list(hit)
        req._reserved = need
        req.matched_blocks = matched
        return True

    def _next_prefill_batch(self) -> list[EngineRequest]:
        batch: list[EngineRequest] = []
        tokens = 0
        for req in self._running.values():
            if req._prefilled or req._kv_pending:
                continue
            if batch and tokens + req.uncached_tokens > self.config.prefill_batch_tokens:
                break
            batch.append(req)
            tokens += req.uncached_tokens
        return batch

    async def _prefill_step(self, batch: list[EngineRequest]) -> None:
        cfg = self.config
        tokens = sum(r.uncached_tokens for r in batch)
        ms = cfg.prefill_ms(tokens)
        for req in batch:
            req.prefill_ms = cfg.prefill_ms(req.uncached_tokens)
        await self._advance(ms)
        self._counters.prefill_tokens += tokens
        self._counters.prefill_time_ms += ms
        self._end_step(ms)
        for req in batch:
            if req.state is not RequestState.RUNNING:
                continue  # cancelled during the step
            req.iterate_count += 1
            self._cache_prompt(req)
            self._emit(req)
            if req.completion_tokens >= req.max_tokens:
                self._finish(req)

    async def _decode_step(self, batch: list[EngineRequest]) -> None:
        ms = self.config.decode_step_ms(len(batch))
        await self._advance(ms)
        self._counters.decode_time_ms += ms
        self._end_step(ms)
        for req in batch:
            if req.state is not RequestState.RUNNING:
                continue
            req.iterate_count += 1
            self._emit(req)
            if req.completion_tokens >= req.max_tokens:
                self._finish(req)

    async def _advance(self, model_ms: float) -> None:
        """Take ``model_ms`` of (scaled) real time."""
        now = self._clock()
        last = self._busy_until
        start = last if last is not None and now - last < _CONTINUOUS_SLACK_S else now
        self._busy_until = start + model_ms * self.config.time_scale / 1000.0
        await self._sleep(max(0.0, self._busy_until - now))

    def _end_step(self, ms: float) -> None:
        self._last_step_ms = ms
        self._counters.iterations += 1

    def _start_transfer(self, req: EngineRequest) -> None:
        task = asyncio.create_task(self._transfer(req), name=f"sim-kv-transfer-{req.request_id}")
        self._transfers.add(task)
        task.add_done_callback(self._transfers.discard)

    async def _transfer(self, req: EngineRequest) -> None:
        """The KV of the prompt tokens this worker does not hold arrives; then the request joins the decode batch."""
        ms = req.uncached_tokens * self.config.kv_transfer_ms_per_token
        await self._sleep(ms * self.config.time_scale / 1000.0)
        if req.state is not RequestState.RUNNING:
            return  # cancelled during the transfer
        req._kv_pending = False
        self._counters.kv_transfer_ms += ms
        self._counters.kv_wait_ms += self.now_ms() - req.arrival_ms
        self._cache_prompt(req)
        self._wakeup.set()

    # ---- per-request bookkeeping ----

    def _cache_prompt(self, req: EngineRequest) -> None:
        """The prompt's computed full blocks become shared cache blocks (still pinned by the request)."""
        new = req.block_keys[req.matched_blocks :]
        # Their reserved blocks turn into cache blocks: releasing first leaves room, so the insert evicts nothing.
        self.cache.release(len(new))
        req._reserved -= len(new)
        fresh = [key not in self.cache for key in new] if self._events is not None else []
        inserted = self.cache.insert(new, pin=True)
        req._pinned.extend(new[:inserted])
        req._prefilled = True
        req._settled.set()
        if self._events is not None:
            self._publish_stored(req, fresh[:inserted])

    def _publish_stored(self, req: EngineRequest, fresh: list[bool]) -> None:
        """A BlockStored per run of blocks this prompt newly cached (with its parent and tokens, as vLLM's)."""
        assert self._events is not None
        size, first = self.config.block_size, req.matched_blocks
        i = 0
        while i < len(fresh):
            if not fresh[i]:
                i += 1
                continue
            j = i
            while j < len(fresh) and fresh[j]:
                j += 1
            start, end = first + i, first + j  # block indexes in the prompt
            parent = engine_block_hash(req.block_keys[start - 1]) if start > 0 else None
            hashes = [engine_block_hash(k) for k in req.block_keys[start:end]]
            self._events.stored(hashes, parent, list(req._tokens[start * size : end * size]), size)
            i = j

    def _emit(self, req: EngineRequest) -> None:
        i = req.completion_tokens
        word = _WORDS[splitmix64(req._seed + i) % len(_WORDS)]
        req.completion_tokens += 1
        self._counters.generated_tokens += 1
        if req.first_token_ms is None:
            req.first_token_ms = self.now_ms()
        req._out.put_nowait(word if i == 0 else " " + word)

    def _finish(self, req: EngineRequest) -> None:
        self._drop(req)
        req.finish_reason = "length"
        self._record_end(req, RequestState.FINISHED)
        self._counters.finished += 1
        req._out.put_nowait(_END)

    def _drop(self, req: EngineRequest) -> None:
        """Take a live request out of the queue or the batch and free what it holds."""
        req._settled.set()
        self._waiting.pop(req.request_id, None)
        self._running.pop(req.request_id, None)
        self.cache.unpin(req._pinned)
        self.cache.release(req._reserved)
        req._pinned = []
        req._reserved = 0

    def _fail_live(self, error: EngineError) -> None:
        for req in [*self._waiting.values(), *self._running.values()]:
            self._drop(req)
            req.state, req.finish_reason = RequestState.CANCELLED, "cancelled"
            req._out.put_nowait(error)

    def _record_end(self, req: EngineRequest, state: RequestState) -> None:
        now = self.now_ms()
        req.finished_ms = now
        req.end_time_ms = self.epoch_ms()
        req.state = state
        self._finished_version += 1
        self._finished.append((self._finished_version, self._task_info(req, now)))

    def _task_info(self, req: EngineRequest, now_ms: float) -> TaskInfo:
        waiting = req.state is RequestState.WAITING
        waited = (now_ms if req.admitted_ms is None else req.admitted_ms) - req.arrival_ms
        return TaskInfo(
            request_id=req.request_id,
            prefix_length=0 if waiting else req.cached_tokens,
            input_length=req.prompt_tokens,
            waiting_time_ms=round(waited),
            iterate_count=req.iterate_count,
            end_time_ms=req.end_time_ms,
            is_waiting=waiting,
        )

    def _blocks_for(self, prompt_tokens: int, output_tokens: int) -> int:
        # KV for the whole sequence is reserved at admission, so a running request never runs out mid-decode
        # (no preemption to model); reported KV use is therefore what admission can count on.
        return math.ceil((prompt_tokens + output_tokens) / self.config.block_size)

    def _is_live(self, request_id: int) -> bool:
        return request_id in self._waiting or request_id in self._running

    def _seed(self, tokens: Sequence[int], keys: Sequence[int]) -> int:
        """Deterministic output per prompt: the last block key folded with the partial block's tokens."""
        seed = keys[-1] & ((1 << 64) - 1) if keys else 0
        for t in tokens[len(keys) * self.config.block_size :]:
            seed = splitmix64(seed ^ t)
        return seed
