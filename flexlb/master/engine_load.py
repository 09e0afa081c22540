"""The load of vLLM and SGLang workers, read from their own HTTP APIs: pure parsing, and one dialect object per worker
that says what to fetch (the fetching itself is injected, see ``flexlb.master.engine_poller``).

- vLLM: ``GET /metrics``: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
  (older: ``vllm:gpu_cache_usage_perc``; a fraction despite the name), the ``vllm:prefix_cache_queries`` /
  ``vllm:prefix_cache_hits`` counters (tokens) and ``vllm:cache_config_info`` (labels ``block_size``,
  ``num_gpu_blocks``). Series differing by the ``engine`` label (data parallel) are summed.
- SGLang: ``GET /metrics`` (only with ``--enable-metrics``): ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:num_used_tokens`` / ``sglang:token_usage``, ``sglang:max_total_num_tokens``, ``sglang:cache_hit_rate``,
  ``sglang:gen_throughput``; without metrics, ``GET /get_load`` (per data-parallel rank: ``num_reqs``,
  ``num_waiting_reqs``, ``num_tokens``). ``GET /get_server_info`` gives the KV pool size and page size once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from flexlb.domain import DEFAULT_BLOCK_SIZE, EngineKind, Role
from flexlb.master.prom_text import read_samples
from flexlb.master.reconcile import Hysteresis, update_hold

# An engine page smaller than this is not used as flexlb's block size (SGLang's default page is 1 token: one block key
# per prompt token would make every lookup huge); its workers get DEFAULT_BLOCK_SIZE until KV events give exact keys.
MIN_BLOCK_SIZE = 16


class NotThisEngine(ValueError):
    """The worker answered, but not with what its engine kind serves (wrong ``engine`` in the configuration?)."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One reading of a worker's load, in flexlb's units (KV in tokens; 0 = unknown)."""

    running: int
    waiting: int
    kv_used: int = 0
    kv_total: int = 0
    block_size: int = 0
    prefix_hit_rate: float | None = None  # prompt tokens served from the prefix cache / prompt tokens
    gen_tokens_per_s: float | None = None


# ---- vLLM ----

VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # newer, older
VLLM_HITS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")  # prometheus_client adds _total
VLLM_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
VLLM_CACHE_INFO = "vllm:cache_config_info"
_VLLM_NAMES = (VLLM_RUNNING, VLLM_WAITING, *VLLM_KV_USAGE, *VLLM_HITS, *VLLM_QUERIES, VLLM_CACHE_INFO)


def _int_label(labels: dict[str, str], name: str) -> int:
    try:
        return int(float(labels.get(name, "")))
    except ValueError:  # "None" before the engine profiled its memory
        return 0


def parse_vllm_metrics(text: str) -> EngineLoad:
    """A vLLM ``/metrics`` page -> its load. Raises NotThisEngine when the page has no vLLM scheduler gauges."""
    s = read_samples(text, _VLLM_NAMES)
    running, waiting = s.total(VLLM_RUNNING), s.total(VLLM_WAITING)
    if running is None or waiting is None:
        raise NotThisEngine(f"no {VLLM_RUNNING} / {VLLM_WAITING} in /metrics: not a vLLM worker?")
    blocks, block_size = 0, 0
    for labels, _ in s.series.get(VLLM_CACHE_INFO, ()):
        blocks += _int_label(labels, "num_gpu_blocks")
        block_size = block_size or _int_label(labels, "block_size")
    kv_total = blocks * block_size
    usage = s.mean(*VLLM_KV_USAGE)
    kv_used = round(min(max(usage, 0.0), 1.0) * kv_total) if usage is not None else 0
    hits, queries = s.total(*VLLM_HITS), s.total(*VLLM_QUERIES)
    rate = hits / queries if hits is not None and queries else None
    return EngineLoad(int(running), int(waiting), kv_used, kv_total, block_size, rate)


# ---- SGLang ----

SGLANG_RUNNING = "sglang:num_running_reqs"
SGLANG_WAITING = "sglang:num_queue_reqs"
SGLANG_USED = "sglang:num_used_tokens"
SGLANG_USAGE = "sglang:token_usage"
SGLANG_TOTAL = "sglang:max_total_num_tokens"
SGLANG_HIT_RATE = "sglang:cache_hit_rate"
SGLANG_THROUGHPUT = "sglang:gen_throughput"
_SGLANG_NAMES = (
    SGLANG_RUNNING, SGLANG_WAITING, SGLANG_USED, SGLANG_USAGE, SGLANG_TOTAL, SGLANG_HIT_RATE, SGLANG_THROUGHPUT,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SglangInfo:
    """What ``GET /get_server_info`` says once: the KV pool in tokens and the page size."""

    kv_total: int = 0
    page_size: int = 0


def parse_sglang_server_info(body: Any) -> SglangInfo:
    if not isinstance(body, dict):
        raise NotThisEngine("/get_server_info is not a JSON object: not an SGLang worker?")

    def number(name: str) -> int:
        value = body.get(name)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    return SglangInfo(kv_total=number("max_total_num_tokens"), page_size=number("page_size"))


def parse_sglang_metrics(text: str, info: SglangInfo = SglangInfo()) -> EngineLoad:
    """An SGLang ``/metrics`` page -> its load (series of several data-parallel ranks summed)."""
    s = read_samples(text, _SGLANG_NAMES)
    running, waiting = s.total(SGLANG_RUNNING), s.total(SGLANG_WAITING)
    if running is None or waiting is None:
        raise NotThisEngine(f"no {SGLANG_RUNNING} / {SGLANG_WAITING} in /metrics: not an SGLang worker?")
    kv_total = int(s.total(SGLANG_TOTAL) or info.kv_total)
    used = s.total(SGLANG_USED)
    if used is None:
        usage = s.mean(SGLANG_USAGE)
        used = usage * kv_total if usage is not None else 0
    return EngineLoad(
        int(running), int(waiting), int(used), kv_total, info.page_size, s.mean(SGLANG_HIT_RATE),
        s.total(SGLANG_THROUGHPUT),
    )  # fmt: skip


def parse_sglang_load(body: Any, info: SglangInfo = SglangInfo()) -> EngineLoad:
    """SGLang's ``GET /get_load``: a list with one object per data-parallel rank (or one object)."""
    ranks = body if isinstance(body, list) else [body]
    if not ranks or not all(isinstance(r, dict) and "num_reqs" in r for r in ranks):
        raise NotThisEngine("/get_load has no num_reqs per rank: not an SGLang worker?")

    def total(name: str) -> int:
        return sum(int(r.get(name) or 0) for r in ranks)

    reqs, waiting = total("num_reqs"), total("num_waiting_reqs")
    return EngineLoad(max(reqs - waiting, 0), waiting, total("num_tokens"), info.kv_total, info.page_size)


# ---- dialects: what to fetch per engine kind ----

Fetch = Callable[[str], Awaitable[tuple[int, bytes]]]  # GET path -> (HTTP status, body); raises OSError-likes


class Dialect(Protocol):
    kind: EngineKind

    async def read(self, fetch: Fetch) -> EngineLoad: ...


class FetchFailed(Exception):
    """A load read got an HTTP error status."""


async def _get(fetch: Fetch, path: str) -> bytes:
    status, body = await fetch(path)
    if status != 200:
        raise FetchFailed(f"GET {path}: HTTP {status}")
    return body


class VllmDialect:
    kind = EngineKind.VLLM

    async def read(self, fetch: Fetch) -> EngineLoad:
        return parse_vllm_metrics((await _get(fetch, "/metrics")).decode("utf-8", "replace"))


class SglangDialect:
    """``/metrics`` while it is served; ``/get_load`` when it is not (SGLang started without ``--enable-metrics``)."""

    kind = EngineKind.SGLANG

    def __init__(self) -> None:
        self.info: SglangInfo | None = None
        self.metrics_served: bool | None = None  # None: not tried yet

    async def read(self, fetch: Fetch) -> EngineLoad:
        if self.info is None:
            status, body = await fetch("/get_server_info")
            # a worker without it still has a load; the KV pool stays unknown unless /metrics says
            self.info = parse_sglang_server_info(json.loads(body)) if status == 200 else SglangInfo()
        if self.metrics_served is not False:
            status, body = await fetch("/metrics")
            if status == 200:
                self.metrics_served = True
                return parse_sglang_metrics(body.decode("utf-8", "replace"), self.info)
            if status != 404 or self.metrics_served:
                raise FetchFailed(f"GET /metrics: HTTP {status}")
            self.metrics_served = False
        return parse_sglang_load(json.loads(await _get(fetch, "/get_load")), self.info)


def dialect_for(kind: EngineKind) -> Dialect:
    if kind is EngineKind.VLLM:
        return VllmDialect()
    if kind is EngineKind.SGLANG:
        return SglangDialect()
    raise ValueError(f"engine {kind.value} is polled over RTP-LLM's status RPC, not HTTP")


# ---- onto flexlb's status fields ----


@dataclass(slots=True)
class Holds:
    """The availability hysteresis of one worker (as ``WorkerTrack`` keeps it for RTP-LLM workers)."""

    prefill: bool = False
    decode: bool = False


def load_fields(load: EngineLoad, role: Role, holds: Holds, hysteresis: Hysteresis) -> dict[str, str]:
    """The status hash fields of a worker that answers health checks and reported ``load`` (``holds`` updated)."""
    if role in (Role.PREFILL, Role.PDFUSION):
        holds.prefill = update_hold(holds.prefill, load.waiting, hysteresis.prefill_waiting, hysteresis)
    if role in (Role.DECODE, Role.PDFUSION) and load.kv_total:
        percent = 100 * load.kv_used / load.kv_total
        holds.decode = update_hold(holds.decode, percent, hysteresis.decode_kv_percent, hysteresis)
    block = load.block_size if load.block_size >= MIN_BLOCK_SIZE else DEFAULT_BLOCK_SIZE
    return {
        "alive": "1",
        "available": "0" if holds.prefill or holds.decode else "1",
        "running": str(load.running),
        "waiting": str(load.waiting),
        "queued_tokens": "0",  # neither engine reports the prompt tokens it still has to prefill
        "kv_used": str(min(load.kv_used, load.kv_total) if load.kv_total else 0),
        "kv_total": str(load.kv_total),
        "block_size": str(block),
    }
