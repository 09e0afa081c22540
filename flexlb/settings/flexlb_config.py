"""FLEXLB_CONFIG: the balancer's options. Each field is declared once, on ``FlexlbConfig``; ``CONFIG_FIELDS``, the
parser (``parse_flexlb_config``: the camelCase JSON, then an UPPER_SNAKE variable per field) and the docs table
(flexlb.settings.docs) all derive from that declaration."""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from flexlb.domain import Role
from flexlb.settings.common import (
    ConfigError,
    Scalar,
    _blank,
    _check_range,
    _from_json,
    _from_text,
    _load_json,
    _show,
    _squash,
)
from flexlb.settings.strategies import STRATEGIES, parse_strategy

# Every part logs as "flexlb.settings", the one logger of the configuration (operators and tests filter on it).
log = logging.getLogger("flexlb.settings")


@dataclass(frozen=True, slots=True)
class _Meta:
    doc: str
    origin: str  # "original" (the original FlexLB has it) or "flexlb"
    low: float | None = None  # smallest accepted value
    high: float | None = None  # largest accepted value
    positive: bool = False  # must be > 0 (a divisor or a rate)
    strategy: bool = False
    note: str | None = None  # logged as a warning whenever the field is set


def _opt(default: Scalar, doc: str, *, origin: str = "original", **meta: Any) -> Any:
    return field(default=default, metadata={"flexlb": _Meta(doc, origin, **meta)})


_PERCENT: Final = {"low": 0, "high": 100}


@dataclass(frozen=True, slots=True)
class FlexlbConfig:
    """FLEXLB_CONFIG. Every field is ``camelCase`` in the JSON and ``UPPER_SNAKE`` as an environment variable."""

    # --- options of the original FlexLB
    load_balance_strategy: str = _opt("SHORTEST_TTFT", "Strategy for PREFILL and PDFUSION workers.", strategy=True)
    decode_load_balance_strategy: str = _opt("WEIGHTED_CACHE", "Strategy for DECODE workers.", strategy=True)
    vit_load_balance_strategy: str = _opt("RANDOM", "Strategy for VIT (vision) workers.", strategy=True)
    weighted_cache_decay_factor: float = _opt(
        0.001, "WEIGHTED_CACHE: weight = exp(-factor x (KV used - mean KV used)); larger favours idle workers.", low=0
    )
    enable_queueing: bool = _opt(False, "Queue requests that find no capacity instead of failing them at once.")
    max_queue_size: int = _opt(1_000_000, "Queue mode: queued requests per model before QUEUE_FULL.", low=0)
    max_retry_count: int = _opt(0, "Queue mode: retries of a retryable failure; 0 = until generate_timeout.", low=0)
    prefill_queue_size_threshold: int = _opt(
        3, "A prefill worker with this many waiting tasks or more is unavailable.", low=0
    )
    decode_available_memory_threshold: int = _opt(
        90, "A decode worker with this percentage of its KV cache used or more is unavailable.", **_PERCENT
    )
    hysteresis_bias_percent: int = _opt(
        15, "An unavailable worker is available again only this percentage below its threshold.", **_PERCENT
    )
    schedule_worker_size: int = _opt(0, "Queue mode: concurrent schedulers draining the queue; 0 = auto.", low=0)
    resource_check_interval_ms: int = _opt(
        10, "Queue mode: how often admission follows the fleet's water level, in ms.", low=1
    )
    max_prefill_queue_size: int = _opt(
        20, "Queue mode: prefill water level is waiting tasks / this (100% at this many).", low=1
    )
    decode_full_speed_threshold: int = _opt(
        40, "Queue mode: decode water level is 0 at or below this percentage of KV used.", **_PERCENT
    )
    decode_stop_threshold: int = _opt(
        80, "Queue mode: decode water level is 100 (admit nothing) at or above this percentage of KV used.", **_PERCENT
    )
    admission_min_permits: int = _opt(
        1,
        "Queue mode: requests this router lets into scheduling at once when the fleet is full (never fewer).",
        origin="flexlb",
        low=1,
    )
    admission_max_permits: int = _opt(
        1024,
        "Queue mode: requests this router lets into scheduling at once when the fleet is idle.",
        origin="flexlb",
        low=1,
    )
    # --- flexlb's own
    reservation_ttl_ms: int = _opt(
        60_000, "How long a reservation that is never released holds capacity, in ms.", origin="flexlb", low=1
    )
    schedule_retries: int = _opt(
        3,
        "Optimistic retries when a reservation is refused because another router took the capacity first.",
        origin="flexlb",
        low=0,
    )
    default_prefill_tokens_per_ms: float = _opt(
        10.0, "Prefill rate assumed for a worker until its rate is measured.", origin="flexlb", positive=True
    )
    prefill_overhead_ms: float = _opt(5.0, "Per-request overhead in TTFT estimates, in ms.", origin="flexlb", low=0)
    ttft_tie_ratio: float = _opt(
        0.1, "SHORTEST_TTFT: estimates within this fraction of the best count as equal.", origin="flexlb", low=0
    )
    ttft_best_fraction: float = _opt(
        0.3,
        "SHORTEST_TTFT: fraction of the workers (best estimates first) kept as candidates.",
        origin="flexlb",
        positive=True,
        high=1,
    )
    degraded_max_staleness_ms: int = _opt(
        10_000,
        "How long a router keeps scheduling from its fleet view while Redis is unreachable, in ms.",
        origin="flexlb",
        low=0,
    )
    worker_status_max_age_ms: int = _opt(
        15_000,
        "A worker whose last status write (a master's poll or heartbeat, every 5 s at least; a registration) is"
        " older than this is not chosen, in ms; 0 = no bound (statuses that nothing refreshes).",
        origin="flexlb",
        low=0,
    )
    inflight_prefix_ttl_ms: int = _opt(
        10_000,
        "A request's blocks count as cached on the prefill worker it was reserved on, for every router, until the"
        " worker's own cache report confirms them or this time passes, in ms (a burst of one new prefix lands on"
        " one worker); 0 = only reported blocks count.",
        origin="flexlb",
        low=0,
    )
    approx_prefix_ttl_ms: int = _opt(
        600_000,
        "On a prefill worker with no cache report of its own (vLLM / SGLang without kv_events), the blocks the fleet"
        " routed there count as cached this long, in ms: the fleet's approximate view of its cache (as smg's and"
        " vllm-router's trees), bounded by approxPrefixMaxBlocks; 0 = inflightPrefixTtlMs as for other workers.",
        origin="flexlb",
        low=0,
    )
    approx_prefix_max_blocks: int = _opt(
        32_768,
        "Most blocks the approximate view holds per worker (about 100 bytes of Redis each); the oldest go first.",
        origin="flexlb",
        low=1,
    )
    block_mirror: bool = _opt(
        True,
        "Each router keeps a copy of the inverted cache-block index in memory, fed by the change stream, and looks"
        " a request's prefix up there instead of in Redis (about 100 bytes of router memory per cached block of"
        " the fleet); false = every lookup goes to Redis (lua/lookup.lua).",
        origin="flexlb",
    )
    redis_timeout_ms: int = _opt(1000, "Timeout of one Redis call, in ms.", origin="flexlb", low=1)
    http_host: str = _opt(
        "127.0.0.1",
        "Address the HTTP server listens on (`flexlb serve --host` overrides it); 0.0.0.0 serves every interface:"
        " set FLEXLB_ADMIN_TOKEN first (docs/security.md).",
        origin="flexlb",
    )
    http_port: int = _opt(
        7001, "Port the HTTP server listens on; 0 = any free port.", origin="flexlb", low=0, high=65535
    )
    shutdown_timeout_ms: int = _opt(
        30_000,
        "On SIGTERM: how long in-flight requests may still run before they are cancelled (their reservations"
        " released), in ms.",
        origin="flexlb",
        low=0,
    )
    http_header_timeout_ms: int = _opt(
        10_000,
        "A request's headers must be in within this time of its first byte, or the connection is closed (slow"
        " clients, slowloris), in ms.",
        origin="flexlb",
        low=1,
    )
    http_body_timeout_ms: int = _opt(
        15_000,
        "A request's whole body must be in within this time of its headers, or it is answered 408, in ms. Responses"
        " (proxied streams) have no such limit.",
        origin="flexlb",
        low=1,
    )
    http_fast_path: bool = _opt(
        True,
        "Answer POST /rtp_llm/schedule and /rtp_llm/release on the connection itself instead of through aiohttp's"
        " request handling (same checks and answers, about half the CPU per call); false sends them through aiohttp.",
        origin="flexlb",
    )
    gc_young_threshold: int = _opt(
        10_000,
        "Python's garbage collector in router and master processes: a young collection every this many new"
        " container objects, the older generations at Python's ratios (its 700 made a loaded router run a 35-70 ms"
        " full collection about every second); 0 = Python's defaults. docs/performance.md.",
        origin="flexlb",
        low=0,
    )
    http_idle_timeout_ms: int = _opt(
        30_000,
        "A keep-alive connection with no request is closed after this time, in ms; keep it above the idle timeout"
        " of a balancer or client pool in front.",
        origin="flexlb",
        low=1,
    )
    max_block_cache_keys: int = _opt(
        65_536,
        "Most block_cache_keys one schedule request may carry (1M tokens at 16 per block); more is refused with"
        " 400, and a body longer than such a request can be is refused with 413 before it is read.",
        origin="flexlb",
        low=1,
    )
    contend_for_master: bool = _opt(
        True,
        "This router contends for the master lock and, while it holds it, polls the workers. Set false on routers"
        " when a `flexlb master` process does that, or for engines without RTP-LLM's status RPCs.",
        origin="flexlb",
    )
    master_lock_ttl_ms: int = _opt(
        3000, "Master lock TTL: a dead master is replaced within this plus one renew interval, in ms.", origin="flexlb",
        low=100,
    )  # fmt: skip
    master_renew_interval_ms: int = _opt(
        1000, "How often the master renews its lock, in ms; must be below half the TTL.", origin="flexlb", low=10
    )
    worker_down_after_failed_polls: int = _opt(
        2,
        "Failed status polls in a row after which a worker is marked not alive (the original: 1).",
        origin="flexlb",
        low=1,
    )
    status_idle_interval_ms: int = _opt(
        60,
        "Longest interval between two status polls of a worker whose status stopped changing, in ms: bounds how late"
        " its first change shows (warm workers: changed within the last statusColdAfterMs).",
        origin="flexlb",
        low=1,
    )
    status_cold_after_ms: int = _opt(
        10_000,
        "A worker whose status did not change for this long is polled every statusColdIntervalMs, in ms.",
        origin="flexlb",
        low=0,
    )
    status_cold_interval_ms: int = _opt(
        500,
        "Status poll interval of a cold worker, in ms; set it to statusIdleIntervalMs to poll every worker as often.",
        origin="flexlb",
        low=1,
    )
    poll_shards: int = _opt(
        1,
        "Shards the workers' polling is split into, each polled by whichever process holds its lease; 1: the master"
        " polls every worker. Every process of a service must use the same value.",
        origin="flexlb",
        low=1,
    )
    cache_sync_min_interval_ms: int = _opt(
        50, "Cache keys are polled this often while a worker's cache changes, in ms.", origin="flexlb", low=1
    )
    cache_sync_max_interval_ms: int = _opt(
        3000,
        "Cache keys are polled this seldom while a worker's cache does not change, in ms.",
        origin="flexlb",
        low=1,
    )
    # --- engines polled over HTTP (vLLM, SGLang), health checks, the proxy's circuit breaker
    engine_metrics_interval_ms: int = _opt(
        200,
        "How often the master reads the load of a vLLM or SGLang worker (its /metrics, or SGLang's /get_load), in ms.",
        origin="flexlb",
        low=1,
    )
    health_check_interval_ms: int = _opt(
        500,
        "How often a worker's GET /health is checked: by the master for vLLM and SGLang workers, by the routers for"
        " every worker while no master holds the lock, in ms.",
        origin="flexlb",
        low=1,
    )
    health_check_timeout_ms: int = _opt(
        1000, "Timeout of one health check or load read over HTTP, in ms.", origin="flexlb", low=1
    )
    health_failure_threshold: int = _opt(
        3, "Failed health checks in a row after which a worker is marked not alive.", origin="flexlb", low=1
    )
    health_success_threshold: int = _opt(
        2, "Passed health checks in a row after which a worker marked not alive is alive again.", origin="flexlb", low=1
    )
    breaker_failure_threshold: int = _opt(
        3,
        "Proxy: failures in a row of one worker (connect error, reset, timeout, HTTP 5xx) that open its circuit"
        " breaker: this router sends it nothing during breakerCooldownMs, then one probe request.",
        origin="flexlb",
        low=1,
    )
    breaker_cooldown_ms: int = _opt(
        5000, "Proxy: how long an open circuit breaker keeps its worker out, in ms.", origin="flexlb", low=1
    )
    # --- proxy mode (OpenAI / SGLang routes on the router's port, flexlb.proxy)
    tokenizer_path: str = _opt(
        "",
        "Proxy: the served model's Hugging Face tokenizer, a local tokenizer.json or an already-downloaded model"
        " directory (never downloaded); its chat template comes from tokenizer_config.json. Empty: the engines' own"
        " POST /tokenize (cached) while the fleet has vllm / sglang workers, else the simulator's whitespace tokens.",
        origin="flexlb",
    )
    served_model_name: str = _opt(
        "",
        "Proxy: the model name GET /v1/models lists, accepted in requests besides the service id, and written as"
        " `model` into every request sent to a worker. Empty: the service id, and `model` is forwarded unchanged.",
        origin="flexlb",
    )
    proxy_admission_ttft_ms: int = _opt(
        5_000,
        "Proxy: a request goes to a worker whose estimated time to first token (its queue included) is within this"
        " bound, even when the worker is at its concurrency or KV limit (it queues the request); otherwise it waits"
        " in the router's queue. 0 = the workers' limits refuse (503 NO_X_WORKER), as the schedule API does.",
        origin="flexlb",
        low=0,
    )
    proxy_queue_timeout_ms: int = _opt(
        60_000,
        "Proxy: how long a request may wait in the router's queue for a worker within the admission bound before it"
        " is answered 503 QUEUE_TIMEOUT (with Retry-After), in ms.",
        origin="flexlb",
        low=1,
    )
    proxy_retries: int = _opt(
        2,
        "Proxy: times a request is scheduled again, without the worker that failed, when that worker fails before"
        " its first byte (connection refused or reset, no headers in time, HTTP 5xx).",
        origin="flexlb",
        low=0,
    )
    proxy_connect_timeout_ms: int = _opt(
        2000, "Proxy: timeout of the TCP connect to a worker, in ms.", origin="flexlb", low=1
    )
    proxy_headers_timeout_ms: int = _opt(
        30_000,
        "Proxy: streamed requests: time from sending to a worker until its response headers, in ms (streams"
        " themselves have no time limit).",
        origin="flexlb",
        low=1,
    )
    proxy_response_timeout_ms: int = _opt(
        600_000,
        "Proxy: requests that are not streamed (a worker sends the headers with the whole answer): time until the"
        " answer's headers, in ms; 0 = no limit.",
        origin="flexlb",
        low=0,
    )
    bootstrap_port: int = _opt(
        8998,
        "Proxy, disaggregated prefill/decode: `bootstrap_port` written into both requests (SGLang's KV-transfer"
        " bootstrap server on the prefill worker).",
        origin="flexlb",
        low=1,
        high=65535,
    )
    # --- gRPC schedule API (flexlb.grpc_api, protos/flexlb_schedule.proto)
    enable_grpc_prefill_master: bool = _opt(
        False,
        "Serve the schedule API over gRPC too (`flexlb.v1.FlexlbScheduler`: Schedule and Release, the semantics of"
        " POST /rtp_llm/schedule and /rtp_llm/release) on `grpcHost`:`grpcPort`.",
    )
    grpc_host: str = _opt(
        "127.0.0.1",
        "Address the gRPC schedule API listens on (`flexlb serve --host` sets only the HTTP address).",
        origin="flexlb",
    )
    grpc_port: int = _opt(
        7051,
        "Port of the gRPC schedule API; 0 = any free port (the log names it). A port in use fails the start-up.",
        origin="flexlb",
        low=0,
        high=65535,
    )
    # --- authentication (the keys themselves are environment variables: FLEXLB_API_KEYS, ...; docs/security.md)
    max_reservations_per_token: int = _opt(
        0,
        "Schedule API: reservations one client token (FLEXLB_SCHEDULE_TOKENS; without tokens, all clients together)"
        " may hold on this router at once; more are refused with 429 until it releases. 0 = no cap.",
        origin="flexlb",
        low=0,
    )

    def __post_init__(self) -> None:
        # Consumers look strategies up by canonical name; parsing maps older names before construction.
        for name in ("load_balance_strategy", "decode_load_balance_strategy", "vit_load_balance_strategy"):
            if getattr(self, name) not in STRATEGIES:
                raise ConfigError(f"FlexlbConfig.{name}: {getattr(self, name)!r} is not one of {', '.join(STRATEGIES)}")

    def strategy_for(self, role: Role) -> str:
        """The strategy that chooses workers of ``role``."""
        if role is Role.DECODE:
            return self.decode_load_balance_strategy
        if role is Role.VIT:
            return self.vit_load_balance_strategy
        return self.load_balance_strategy  # PREFILL and PDFUSION


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One FLEXLB_CONFIG field, derived from its declaration on ``FlexlbConfig``."""

    attr: str  # snake_case attribute of FlexlbConfig
    key: str  # camelCase key in FLEXLB_CONFIG
    env: str  # UPPER_SNAKE environment variable that overrides it
    type: type
    default: Scalar
    doc: str
    origin: str
    low: float | None
    high: float | None
    positive: bool
    strategy: bool
    note: str | None


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _build_fields() -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(FlexlbConfig)
    out = []
    for f in fields(FlexlbConfig):
        meta: _Meta = f.metadata["flexlb"]
        out.append(
            ConfigField(
                attr=f.name,
                key=_camel(f.name),
                env=f.name.upper(),
                type=hints[f.name],
                default=f.default,  # type: ignore[arg-type]
                doc=meta.doc,
                origin=meta.origin,
                low=meta.low,
                high=meta.high,
                positive=meta.positive,
                strategy=meta.strategy,
                note=meta.note,
            )
        )
    return tuple(out)


CONFIG_FIELDS: Final[tuple[ConfigField, ...]] = _build_fields()
_FIELD_BY_KEY: Final = {f.key: f for f in CONFIG_FIELDS}
_FIELD_BY_SQUASHED: Final = {_squash(f.key): f for f in CONFIG_FIELDS}

# Keys of the original's configuration that flexlb accepts and ignores, with what flexlb does instead.
IGNORED_KEYS: Final[Mapping[str, str]] = {
    "deploy": "the roles that have workers decide the deployment",
    "kvCache": "flexlb uses the KV cache status the workers report",
    "staticCacheBlockSize": "the block size comes from each worker's cache status",
    "batchSize": "flexlb schedules each request on its own",
    "prefillLbTimeoutMs": "flexlb has no such timeout",
    "prefillGenerateTimeoutMs": "the request's generate_timeout is used",
    "prefillBatchWaitTimeMs": "flexlb schedules each request at once, without batching",
}


def _finish(f: ConfigField, value: Scalar, where: str) -> Scalar:
    """Range and strategy checks common to both sources."""
    if f.strategy:
        assert isinstance(value, str)
        return parse_strategy(value, where)
    if f.type is str:
        if not str(value).strip():
            raise ConfigError(f"{where}: must not be empty")
        return str(value).strip()
    if f.type in (int, float):
        assert isinstance(value, int | float)
        _check_range(value, where, f.low, f.high, f.positive)
    return value


def _config_source(environ: Mapping[str, str]) -> str | None:
    """FLEXLB_CONFIG, or WHALE_MASTER_CONFIG (the original's older name) when only that is set."""
    if not _blank(environ.get("FLEXLB_CONFIG")):
        return "FLEXLB_CONFIG"
    if not _blank(environ.get("WHALE_MASTER_CONFIG")):
        log.warning("WHALE_MASTER_CONFIG is the original FlexLB's older name; read it as FLEXLB_CONFIG")
        return "WHALE_MASTER_CONFIG"
    return None


def parse_flexlb_config(environ: Mapping[str, str]) -> FlexlbConfig:
    """FLEXLB_CONFIG with its UPPER_SNAKE overrides from ``environ``."""
    name = _config_source(environ)
    document = _load_json(environ, name) if name else {}
    name = name or "FLEXLB_CONFIG"
    if not isinstance(document, dict):
        raise ConfigError(f"{name}: expected a JSON object, got {_show(document)}")

    values: dict[str, Scalar] = {}
    sources: dict[str, str] = {}
    for key, raw in document.items():
        where = f"{name}.{key}"
        f = _FIELD_BY_KEY.get(key)
        if f is not None:
            values[f.attr] = _finish(f, _from_json(raw, f.type, where), where)
            sources[f.attr] = where
        elif key in IGNORED_KEYS:
            log.warning("%s is an option of the original FlexLB that flexlb ignores: %s", where, IGNORED_KEYS[key])
        else:
            near = _FIELD_BY_SQUASHED.get(_squash(key))
            hint = f"; did you mean {near.key}?" if near else ""
            log.warning("%s: unknown key ignored%s", where, hint)

    for f in CONFIG_FIELDS:
        text = environ.get(f.env)
        if _blank(text):
            continue
        assert text is not None
        where = f"{f.env} (environment)"
        values[f.attr] = _finish(f, _from_text(text, f.type, where), where)
        sources[f.attr] = where

    for f in CONFIG_FIELDS:
        if f.note and f.attr in sources:
            log.warning("%s: %s", sources[f.attr], f.note)

    config = FlexlbConfig(**values)  # type: ignore[arg-type]
    if config.decode_full_speed_threshold >= config.decode_stop_threshold:
        where = sources.get("decode_full_speed_threshold") or sources.get("decode_stop_threshold") or name
        raise ConfigError(
            f"{where}: decodeFullSpeedThreshold ({config.decode_full_speed_threshold}) must be below"
            f" decodeStopThreshold ({config.decode_stop_threshold})"
        )
    if not config.master_renew_interval_ms < config.master_lock_ttl_ms / 2:
        where = sources.get("master_renew_interval_ms") or sources.get("master_lock_ttl_ms") or name
        raise ConfigError(
            f"{where}: masterRenewIntervalMs ({config.master_renew_interval_ms}) must be below half of"
            f" masterLockTtlMs ({config.master_lock_ttl_ms}), so one lost renew does not cost the lock"
        )
    if config.admission_min_permits > config.admission_max_permits:
        where = sources.get("admission_min_permits") or sources.get("admission_max_permits") or name
        raise ConfigError(
            f"{where}: admissionMinPermits ({config.admission_min_permits}) must not exceed"
            f" admissionMaxPermits ({config.admission_max_permits})"
        )
    if config.cache_sync_min_interval_ms > config.cache_sync_max_interval_ms:
        where = sources.get("cache_sync_min_interval_ms") or sources.get("cache_sync_max_interval_ms") or name
        raise ConfigError(
            f"{where}: cacheSyncMinIntervalMs ({config.cache_sync_min_interval_ms}) must not exceed"
            f" cacheSyncMaxIntervalMs ({config.cache_sync_max_interval_ms})"
        )
    return config
