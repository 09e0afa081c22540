"""Configuration: the environment parsed into frozen dataclasses, compatible with the original FlexLB's variables.

``load_settings()`` reads FLEXLB_CONFIG (camelCase JSON; every field can be overridden by an UPPER_SNAKE variable),
MODEL_SERVICE_CONFIG (the static workers), REDIS_URL and the sync / timeout variables. A bad value raises one
``ConfigError`` naming the field and where it came from; options of the original that flexlb ignores only log a
warning, so an existing deployment's environment keeps working.

Each FLEXLB_CONFIG field is declared once, on ``FlexlbConfig``; ``CONFIG_FIELDS``, the parser and
``render_config_table()`` (pasted into docs/configuration.md, checked by a test) all derive from that declaration.
Run ``python -m flexlb.settings`` to print the table.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from flexlb.domain import EngineKind, Role, WorkerSpec
from flexlb.kv_events.endpoint import KvEventsEndpoint, kv_events_endpoint
from flexlb.state.redis_url import RedisUrlError, parse_redis_url

log = logging.getLogger(__name__)

Scalar = int | float | bool | str


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range; the message names the field and its source."""


# --------------------------------------------------------------------------------------------------- strategies

STRATEGIES: Final[tuple[str, ...]] = (
    "RANDOM",
    "ROUND_ROBIN",
    "LOWEST_CONCURRENCY",
    "SHORTEST_TTFT",
    "WEIGHTED_CACHE",
    "LEAST_KV_USED",
)

# Names from the original's LoadBalanceStrategyEnum (org.flexlb.enums, rtp_llm/flexlb in alibaba/rtp-llm) over its
# history that flexlb does not use, mapped to the flexlb strategy doing the same job. LOWEST_CACHE_USED was the
# original's decode default and picked the worker with the least KV cache used, hence LEAST_KV_USED. Names with no
# clear equivalent (WEIGHTED, MAX_THROUGHPUT_FIRST, the endpoint types) stay errors rather than a guess.
LEGACY_STRATEGIES: Final[Mapping[str, str]] = {
    "ROUND_ROBIN_LOWEST_CONCURRENCY": "LOWEST_CONCURRENCY",
    "LOWEST_CACHE_USED": "LEAST_KV_USED",
    "COST_BASED_DECODE": "WEIGHTED_CACHE",
    "COST_BASED_PREFILL": "SHORTEST_TTFT",
    "CACHE_AFFINITY_FIRST": "SHORTEST_TTFT",
    "FORCE_CHAT_STICKY": "SHORTEST_TTFT",
}


def _squash(name: str) -> str:
    """``ShortestTTFT``, ``shortest_ttft`` and ``SHORTEST-TTFT`` all become ``SHORTESTTTFT``."""
    return re.sub(r"[\s_-]", "", name).upper()


# The original's enum also carries display names ("RoundRobin", "ShortestTtft") and its JSON reader accepts them,
# so names are compared without case or separators.
_CANONICAL_BY_SQUASHED: Final = {_squash(s): s for s in STRATEGIES}
_LEGACY_BY_SQUASHED: Final = {_squash(k): (k, v) for k, v in LEGACY_STRATEGIES.items()}


def parse_strategy(value: str, where: str = "strategy") -> str:
    """Return the canonical strategy for ``value``; an older name is mapped with a warning, an unknown one raises."""
    squashed = _squash(value)
    if squashed in _CANONICAL_BY_SQUASHED:
        return _CANONICAL_BY_SQUASHED[squashed]
    if squashed in _LEGACY_BY_SQUASHED:
        old, new = _LEGACY_BY_SQUASHED[squashed]
        log.warning("%s: strategy %s is an older FlexLB name; flexlb uses %s instead", where, old, new)
        return new
    raise ConfigError(
        f"{where}: unknown strategy {_show(value)}; expected one of {', '.join(STRATEGIES)}"
        f" (older names accepted: {', '.join(LEGACY_STRATEGIES)})"
    )


# ------------------------------------------------------------------------------------------------ FLEXLB_CONFIG


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

_TYPE_WORDS: Final[Mapping[type, str]] = {
    int: "an integer",
    float: "a number",
    bool: "a boolean (true/false/1/0/yes/no)",
    str: "a string",
}
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def _show(value: object) -> str:
    """A value as it would appear in JSON, shortened: ``"abc"``, ``true``, ``null``."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_error(where: str, typ: type, value: object) -> ConfigError:
    return ConfigError(f"{where}: expected {_TYPE_WORDS[typ]}, got {_show(value)}")


def _from_text(text: str, typ: type, where: str) -> Scalar:
    """Coerce a string (an environment variable, or a JSON string) to ``typ``."""
    s = text.strip()
    if typ is str:
        return s
    if typ is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
    elif typ is int:
        if re.fullmatch(r"[+-]?[0-9]+", s):
            return int(s)
    elif typ is float:
        try:
            number = float(s)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise _type_error(where, typ, text)


def _from_json(value: object, typ: type, where: str) -> Scalar:
    """Coerce a decoded JSON value to ``typ``; a bool is never a number."""
    if isinstance(value, str):
        if typ is str:
            return value
        # The original (Jackson) accepted scalars written as strings, e.g. "maxQueueSize": "1000".
        return _from_text(value, typ, where)
    if isinstance(value, bool):
        if typ is bool:
            return value
    elif isinstance(value, int):
        if typ is int:
            return value
        if typ is float and math.isfinite(float(value)):
            return float(value)
    elif isinstance(value, float) and math.isfinite(value):
        if typ is float:
            return value
        if typ is int and value.is_integer():  # 1e6 or 1000.0: JSON has one number type
            return int(value)
    raise _type_error(where, typ, value)


def _check_range(value: float, where: str, low: float | None, high: float | None, positive: bool) -> None:
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {_num(value)}")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{where}: must be between {_num(low)} and {_num(high)}, got {_num(value)}")
    if low is not None and value < low:
        rule = "must not be negative" if low == 0 else f"must be at least {_num(low)}"
        raise ConfigError(f"{where}: {rule}, got {_num(value)}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: must be at most {_num(high)}, got {_num(value)}")


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


def _blank(value: str | None) -> bool:
    # An empty variable (``FOO=`` in a container spec) means "unset", not "the empty string".
    return value is None or not value.strip()


def _load_json(environ: Mapping[str, str], name: str) -> object:
    try:
        return json.loads(environ[name])
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{name}: invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} (char {exc.pos})"
        ) from None


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


# ----------------------------------------------------------------------------------------- MODEL_SERVICE_CONFIG


@dataclass(frozen=True, slots=True)
class StaticWorker:
    """A worker listed in MODEL_SERVICE_CONFIG."""

    ip: str
    http_port: int
    role: Role
    group: str = ""
    engine: EngineKind = EngineKind.RTP_LLM
    grpc_port: int = 0  # the endpoint's worker_status_port; 0: http_port + 1
    kv_events: KvEventsEndpoint | None = None  # where it publishes KV events (the master subscribes); None: none

    @property
    def worker_id(self) -> str:
        return f"{self.ip}:{self.http_port}"

    def to_spec(self) -> WorkerSpec:
        return WorkerSpec(
            ip=self.ip,
            http_port=self.http_port,
            role=self.role,
            group=self.group,
            engine=self.engine,
            grpc_port=self.grpc_port,
        )


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The model service: its id (part of every Redis key) and its statically listed workers."""

    service_id: str = "default"
    endpoints: tuple[StaticWorker, ...] = ()

    @property
    def roles(self) -> tuple[Role, ...]:
        """Roles that have at least one listed worker, in ``Role`` order."""
        present = {w.role for w in self.endpoints}
        return tuple(r for r in Role if r in present)


SERVICE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENDPOINT_KEYS: Final[Mapping[str, Role]] = {
    "prefill_endpoint": Role.PREFILL,
    "decode_endpoint": Role.DECODE,
    "vit_endpoint": Role.VIT,
    "pd_fusion_endpoint": Role.PDFUSION,
}
_SUPPORTED_ENDPOINT_TYPES: Final = frozenset({"SPECIFIEDIPPORTLIST", "SPECIFIEDIPPORT"})  # squashed
# Keys of each level of MODEL_SERVICE_CONFIG; any other key is an error naming the closest of these (a typo such as
# "prefil_endpoint" would otherwise start a router with no workers). Keys of the original flexlb ignores: warned.
_ENDPOINT_FIELDS: Final = frozenset(
    {"address", "protocol", "path", "type", "engine", "worker_status_port", "kv_events", "kv_events_replay"}
)
_ENTRY_FIELDS: Final = frozenset({"group", *_ENDPOINT_KEYS})
_TOP_FIELDS: Final = frozenset({"service_id", "role_endpoints", *_ENDPOINT_KEYS})
_IGNORED_SERVICE_KEYS: Final[Mapping[str, str]] = {
    "multi_engine_num": "flexlb schedules each listed ip:port as one worker",
    "discovery": "flexlb reads the workers listed in address (register others with `flexlb worker add`)",
    "kvcm": "flexlb reads KV cache state from the workers",
    "optimizer": "flexlb has no external optimizer",
}


def _check_keys(raw: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Refuse a key that is not in ``known`` (warn for the original's ignored ones), naming the closest known key."""
    for key in raw:
        if key in known:
            continue
        path = f"{where}.{key}"
        if key in _IGNORED_SERVICE_KEYS:
            log.warning(
                "%s is an option of the original FlexLB that flexlb ignores: %s", path, _IGNORED_SERVICE_KEYS[key]
            )
            continue
        near = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{path}: unknown key{hint} (known here: {', '.join(sorted(known))})")


def _host_port(item: str, where: str) -> tuple[str, int]:
    """Split ``ip:port`` (or ``[v6]:port``) and check both parts."""
    text = item.strip()
    if text.lower().startswith("http://"):  # a worker URL (as smg and vllm-router take them): its host:port
        text = text[len("http://") :].rstrip("/")
    if "://" in text:
        raise ConfigError(f'{where}: {_show(item)} has no valid host (expected "ip:port", without a scheme)')
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f'{where}: {_show(item)}: write an IPv6 address as "[address]:port"')
    if not sep:
        raise ConfigError(
            f'{where}: {_show(item)} has no port (expected "ip:port"; a DNS name is fine, e.g. "worker-0.svc:8000",'
            " resolved whenever a connection is made)"
        )
    if not host or re.search(r"[\s/{}\[\]]", host):
        raise ConfigError(f'{where}: {_show(item)} has no valid host (expected "ip:port")')
    if not re.fullmatch(r"[0-9]+", port):
        raise ConfigError(f"{where}: port {_show(port)} of {_show(item)} is not an integer")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{where}: port {number} of {_show(item)} is out of range (1-65535)")
    return host, number


def _addresses(raw: object, where: str) -> list[tuple[str, int]]:
    """``"[\\"ip:port\\", ...]"`` (a JSON array in a string, as the original), a JSON list, or ``"ip:port"``."""
    items: object = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not a JSON array of addresses: {exc.msg} (char {exc.pos})") from None
        else:
            items = [part for part in text.split(",") if part.strip()]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f'{where}: expected "ip:port", a list of them or a JSON array in a string, got {_show(raw)}')
    if not items:
        raise ConfigError(f"{where}: no addresses listed")
    return [_host_port(i, where) for i in items]


def _endpoint(raw: object, where: str, role: Role, group: str) -> list[StaticWorker]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object with address, protocol, path and type, got {_show(raw)}")
    kind = raw.get("type")
    if kind is not None and not (isinstance(kind, str) and _squash(kind) in _SUPPORTED_ENDPOINT_TYPES):
        raise ConfigError(
            f"{where}.type: endpoint type {_show(kind)} is not supported by flexlb (only SpecifiedIpPortList);"
            " list the workers' ip:port here, or register workers with `flexlb worker add` instead"
        )
    _check_keys(raw, _ENDPOINT_FIELDS, where)
    if "address" not in raw:
        raise ConfigError(f"{where}.address: missing")
    addresses = _addresses(raw["address"], f"{where}.address")
    status_port = raw.get("worker_status_port")
    if status_port is not None:  # the original's: the port of the workers' status gRPC, instead of http_port + 1
        status_port = _from_json(status_port, int, f"{where}.worker_status_port")
        _check_range(status_port, f"{where}.worker_status_port", 1, 65535, False)
    engine = raw.get("engine", EngineKind.RTP_LLM.value)
    try:
        kind = EngineKind.parse(engine) if isinstance(engine, str) else None
    except ValueError:
        kind = None
    if kind is None:
        choices = ", ".join(f'"{k.value}"' for k in EngineKind)
        raise ConfigError(f"{where}.engine: expected one of {choices}, got {_show(engine)}")
    return [
        StaticWorker(
            ip=host,
            http_port=port,
            role=role,
            group=group,
            engine=kind,
            grpc_port=int(status_port or 0),
            kv_events=_kv_events(raw, host, f"{where}.kv_events", single=len(addresses) == 1),
        )
        for host, port in addresses
    ]


def _kv_events(raw: Mapping[str, Any], host: str, where: str, *, single: bool) -> KvEventsEndpoint | None:
    if raw.get("kv_events") is None:
        return None
    try:
        return kv_events_endpoint(raw["kv_events"], raw.get("kv_events_replay"), host, where, single=single)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _endpoints_of(entry: dict[str, Any], where: str, group: str) -> list[tuple[StaticWorker, str]]:
    out = []
    for key, role in _ENDPOINT_KEYS.items():
        if entry.get(key) is not None:
            path = f"{where}.{key}" if where else key
            out += [(w, path) for w in _endpoint(entry[key], f"MODEL_SERVICE_CONFIG.{path}", role, group)]
    return out


def _service_id(document: dict[str, Any], environ: Mapping[str, str]) -> str:
    if not _blank(environ.get("FLEXLB_SERVICE_ID")):
        value: object = environ["FLEXLB_SERVICE_ID"].strip()
        where = "FLEXLB_SERVICE_ID (environment)"
    else:
        value = document.get("service_id", "default")
        where = "MODEL_SERVICE_CONFIG.service_id"
    if not isinstance(value, str) or not SERVICE_ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{where}: {_show(value)} is not a valid service id: 1 to 64 letters, digits, '_', '.' or '-'"
            " (it becomes part of Redis key names)"
        )
    return value


def parse_service_config(environ: Mapping[str, str]) -> ServiceConfig:
    """MODEL_SERVICE_CONFIG (both forms) and FLEXLB_SERVICE_ID from ``environ``."""
    document = {} if _blank(environ.get("MODEL_SERVICE_CONFIG")) else _load_json(environ, "MODEL_SERVICE_CONFIG")
    if not isinstance(document, dict):
        raise ConfigError(f"MODEL_SERVICE_CONFIG: expected a JSON object, got {_show(document)}")
    _check_keys(document, _TOP_FIELDS, "MODEL_SERVICE_CONFIG")
    service_id = _service_id(document, environ)

    # Older form: *_endpoint at the top level, one implicit group. Both forms may appear together.
    found = _endpoints_of(document, "", "")
    entries = document.get("role_endpoints")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise ConfigError(f"MODEL_SERVICE_CONFIG.role_endpoints: expected a list, got {_show(entries)}")
    for i, entry in enumerate(entries):
        where = f"role_endpoints[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"MODEL_SERVICE_CONFIG.{where}: expected an object, got {_show(entry)}")
        _check_keys(entry, _ENTRY_FIELDS, f"MODEL_SERVICE_CONFIG.{where}")
        group = entry.get("group", "")
        if not isinstance(group, str):
            raise ConfigError(f"MODEL_SERVICE_CONFIG.{where}.group: expected a string, got {_show(group)}")
        found += _endpoints_of(entry, where, group)

    # ip:port is a worker's key in Redis, so one worker can appear once, with one role.
    seen: dict[str, str] = {}
    for worker, path in found:
        if worker.worker_id in seen:
            raise ConfigError(
                f"MODEL_SERVICE_CONFIG.{path}.address: {worker.worker_id} is already listed in"
                f" {seen[worker.worker_id]}; a worker (ip:port) can be listed once, with one role"
            )
        seen[worker.worker_id] = path
    return ServiceConfig(service_id=service_id, endpoints=tuple(w for w, _ in found))


# ---------------------------------------------------------------------------------------------- other variables


@dataclass(frozen=True, slots=True)
class EnvVar:
    """An environment variable outside FLEXLB_CONFIG: parsed (when ``default`` is an int) and documented."""

    name: str
    default: int | str | None
    doc: str
    low: int = 1  # integers only: the smallest accepted value


ENV_VARS: Final[tuple[EnvVar, ...]] = (
    EnvVar("FLEXLB_CONFIG", "{}", "The balancer's options: a camelCase JSON object (fields below)."),
    EnvVar("WHALE_MASTER_CONFIG", None, "The original's older name for FLEXLB_CONFIG, read when that is unset."),
    EnvVar("MODEL_SERVICE_CONFIG", None, "The model service and its static workers (see below). Unset: no workers."),
    EnvVar("FLEXLB_SERVICE_ID", "default", "Overrides MODEL_SERVICE_CONFIG's service_id."),
    EnvVar(
        "REDIS_URL",
        None,
        "The shared Redis: redis://, rediss://, unix://; a cluster redis+cluster://host:port[,host:port...]; Sentinel"
        " redis+sentinel://host:port[,...]/<master name>. Unset: start redis-server.",
    ),
    EnvVar("SYNC_STATUS_INTERVAL", 20, "Worker status poll interval, in ms."),
    EnvVar("SYNC_REQUEST_TIMEOUT_MS", 100, "Timeout of one worker status call, in ms."),
    EnvVar("TASK_TIMEOUT_US", 3_000_000, "A task not seen in worker status for this long is dropped, in us."),
    EnvVar("WORKER_TIMEOUT_US", 3_000_000, "A worker not updated for this long is dropped, in us."),
)
_ENV_VAR_BY_NAME: Final = {v.name: v for v in ENV_VARS}


def _int_var(environ: Mapping[str, str], name: str) -> int:
    var = _ENV_VAR_BY_NAME[name]
    assert isinstance(var.default, int)
    text = environ.get(name)
    if _blank(text):
        return var.default
    assert text is not None
    where = f"{name} (environment)"
    value = _from_text(text, int, where)
    assert isinstance(value, int)
    _check_range(value, where, var.low, None, False)
    return value


def _redis_url(environ: Mapping[str, str]) -> str | None:
    text = environ.get("REDIS_URL")
    if _blank(text):
        return None
    assert text is not None
    url = text.strip()
    try:
        parse_redis_url(url)  # the errors echo only the scheme: the rest of a URL may hold a password
    except RedisUrlError as exc:
        raise ConfigError(f"REDIS_URL (environment): {exc}") from None
    return url


# ---------------------------------------------------------------------------------------------- authentication

# Secrets: each variable can also be given as <NAME>_FILE, a file holding the value (Docker / Kubernetes secrets).
# A secret is never echoed in an error or a log line; only the variable is named.
AUTH_VARS: Final[tuple[EnvVar, ...]] = (
    EnvVar("FLEXLB_API_KEYS", None, "Proxy (OpenAI routes): accepted API keys, comma-separated. Unset: open."),
    EnvVar("FLEXLB_SCHEDULE_TOKENS", None, "Schedule API (HTTP and gRPC): accepted client tokens, comma-separated."),
    EnvVar("FLEXLB_ADMIN_TOKEN", None, "Admin API (workers, snapshots): accepted tokens, comma-separated."),
    EnvVar("FLEXLB_ENGINE_API_KEY", None, "Proxy: the key sent to every engine instead of the client's."),
    EnvVar("FLEXLB_ENGINE_API_KEYS", None, 'Proxy: per-engine keys, JSON {"ip:port": "key"}; beats the one above.'),
)
_SECRET_CHARS: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it goes into an HTTP header


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who may call what (docs/security.md). An empty tuple leaves that API open."""

    api_keys: tuple[str, ...] = ()
    schedule_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    engine_api_key: str | None = None
    engine_api_keys: tuple[tuple[str, str], ...] = ()  # (worker id, key)

    def __repr__(self) -> str:  # never the secrets themselves
        return (
            f"AuthSettings(api_keys={len(self.api_keys)}, schedule_tokens={len(self.schedule_tokens)},"
            f" admin_tokens={len(self.admin_tokens)}, engine_api_key={self.engine_api_key is not None},"
            f" engine_api_keys={len(self.engine_api_keys)})"
        )


def _secret_text(environ: Mapping[str, str], name: str) -> tuple[str | None, str]:
    """The variable's value (or its _FILE's content) and where it came from."""
    path = environ.get(f"{name}_FILE")
    if not _blank(path):
        assert path is not None
        where = f"{name}_FILE (environment)"
        if not _blank(environ.get(name)):
            raise ConfigError(f"{where}: set {name} or {name}_FILE, not both")
        try:
            with open(path.strip(), encoding="utf-8") as f:
                return f.read().strip(), where
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path.strip()!r}: {exc.strerror}") from None
    text = environ.get(name)
    return (None if _blank(text) else text.strip()), f"{name} (environment)"  # type: ignore[union-attr]


def _check_secret(value: str, where: str, position: str = "") -> str:
    if not _SECRET_CHARS.fullmatch(value):
        raise ConfigError(f"{where}: key{position} holds a space, a control or a non-ASCII character (not shown)")
    return value


def _secret_list(environ: Mapping[str, str], name: str) -> tuple[tuple[str, ...], str]:
    text, where = _secret_text(environ, name)
    if text is None:
        return (), where
    parts = [part.strip() for part in re.split(r"[,\n]", text)]
    if any(not part for part in parts):
        raise ConfigError(f"{where}: an empty key in the list (two commas, or a trailing one)")
    return tuple(_check_secret(part, where, f" {i + 1}") for i, part in enumerate(parts)), where


def _engine_keys(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    text, where = _secret_text(environ, "FLEXLB_ENGINE_API_KEYS")
    if text is None:
        return ()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:  # the message quotes no part of the document
        raise ConfigError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise ConfigError(f'{where}: expected a JSON object {{"ip:port": "key", ...}}')
    out = []
    for worker_id, key in document.items():
        _host_port(worker_id, where)
        out.append((worker_id.strip(), _check_secret(key.strip(), where, f" of {worker_id.strip()}")))
    return tuple(out)


def parse_auth_settings(environ: Mapping[str, str]) -> AuthSettings:
    """The keys and tokens of every API; one secret in two of them is refused (least privilege)."""
    lists = {
        name: _secret_list(environ, name)
        for name in ("FLEXLB_API_KEYS", "FLEXLB_SCHEDULE_TOKENS", "FLEXLB_ADMIN_TOKEN")
    }
    seen: dict[str, str] = {}
    for name, (values, _) in lists.items():
        for value in values:
            if seen.get(value, name) != name:
                raise ConfigError(f"{name}: a key is also in {seen[value]}; give each API its own keys")
            seen[value] = name
    engine_key, where = _secret_text(environ, "FLEXLB_ENGINE_API_KEY")
    return AuthSettings(
        api_keys=lists["FLEXLB_API_KEYS"][0],
        schedule_tokens=lists["FLEXLB_SCHEDULE_TOKENS"][0],
        admin_tokens=lists["FLEXLB_ADMIN_TOKEN"][0],
        engine_api_key=None if engine_key is None else _check_secret(engine_key, where),
        engine_api_keys=_engine_keys(environ),
    )


# --------------------------------------------------------------------------------------------------- top level


@dataclass(frozen=True, slots=True)
class Settings:
    flexlb: FlexlbConfig
    service: ServiceConfig
    redis_url: str | None  # None: the CLI starts an embedded redis-server
    sync_status_interval_ms: int
    sync_request_timeout_ms: int
    task_timeout_ms: int
    worker_timeout_ms: int
    auth: AuthSettings = AuthSettings()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse ``environ`` (default ``os.environ``) into Settings; raise ConfigError on the first bad value."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return Settings(
        flexlb=parse_flexlb_config(env),
        service=parse_service_config(env),
        redis_url=_redis_url(env),
        sync_status_interval_ms=_int_var(env, "SYNC_STATUS_INTERVAL"),
        sync_request_timeout_ms=_int_var(env, "SYNC_REQUEST_TIMEOUT_MS"),
        # Rounded up so a sub-millisecond value never becomes 0 (no timeout at all).
        task_timeout_ms=-(-_int_var(env, "TASK_TIMEOUT_US") // 1000),
        worker_timeout_ms=-(-_int_var(env, "WORKER_TIMEOUT_US") // 1000),
        auth=parse_auth_settings(env),
    )


# -------------------------------------------------------------------------------------------------------- docs


def _valid(f: ConfigField) -> str:
    if f.strategy:
        return "a strategy"
    if f.type is bool:
        return "true / false"
    if f.type is str:
        return "non-empty"
    if f.low is not None and f.high is not None:
        return f"{_num(f.low)} to {_num(f.high)}"
    if f.positive and f.high is not None:
        return f"> 0, <= {_num(f.high)}"
    if f.positive:
        return "> 0"
    if f.low is not None:
        return f">= {_num(f.low)}"
    return ""


def render_config_table() -> str:
    """Markdown tables of every variable, field, older strategy name and ignored key (docs/configuration.md)."""
    lines = ["### Environment variables", "", "| variable | default | meaning |", "|---|---|---|"]
    for v in (*ENV_VARS, *AUTH_VARS):
        default = "unset" if v.default is None else f"`{v.default}`"
        lines.append(f"| `{v.name}` | {default} | {v.doc} |")
    lines += [
        "",
        "### FLEXLB_CONFIG fields",
        "",
        "| FLEXLB_CONFIG field | environment variable | type | default | valid | from | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in CONFIG_FIELDS:
        lines.append(
            f"| `{f.key}` | `{f.env}` | {f.type.__name__} | `{json.dumps(f.default)}` | {_valid(f)} | {f.origin}"
            f" | {f.doc} |"
        )
    lines += ["", "### Older strategy names", "", "| older strategy name | flexlb strategy |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in LEGACY_STRATEGIES.items()]
    lines += ["", "### Ignored keys of the original", "", "| ignored FLEXLB_CONFIG key | why |", "|---|---|"]
    lines += [f"| `{key}` | {why} |" for key, why in IGNORED_KEYS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_config_table(), end="")
