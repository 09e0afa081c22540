"""Plain snapshots of the simulated engine's state, field for field what RTP-LLM's status protobufs carry.

A gRPC layer maps them 1:1 onto ``WorkerStatusPB`` / ``TaskInfoPB`` / ``CacheStatusPB`` (see FLEXLB_REFERENCE.md).
Durations are in simulated milliseconds (wall time divided by the engine's ``time_scale``); ``end_time_ms`` is a
wall-clock epoch timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One request as the worker reports it (``TaskInfoPB``)."""

    request_id: int
    prefix_length: int  # prompt tokens served from the prefix cache (0 while waiting: matched at admission)
    input_length: int  # prompt tokens
    waiting_time_ms: int  # time in the queue so far (waiting) or before admission (running, finished)
    iterate_count: int  # engine iterations (prefill and decode steps) the request took part in
    end_time_ms: int = 0  # epoch ms when it finished or was cancelled; 0 while live
    dp_rank: int = 0
    is_waiting: bool = False


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """The answer to ``GetWorkerStatus`` (``WorkerStatusPB``)."""

    role: str  # "RoleType.PREFILL" | "RoleType.DECODE" | "RoleType.PDFUSION"
    available_concurrency: int
    running_task_info: tuple[TaskInfo, ...]  # running and waiting requests (``is_waiting`` tells them apart)
    finished_task_list: tuple[TaskInfo, ...]  # finished after the asked version
    waiting_query_len: int
    running_query_len: int
    step_latency_ms: float  # duration of the last engine iteration
    iterate_count: int  # engine iterations so far
    status_version: int  # grows with every report
    alive: bool
    latest_finished_version: int
    available_kv_cache: int  # tokens a new request can get: free blocks plus evictable cached blocks
    total_kv_cache: int  # tokens
    dp_size: int = 1
    tp_size: int = 1
    precision: str = "FP16"
    dp_rank: int = 0


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """The answer to ``GetCacheStatus`` (``CacheStatusPB``); ``cache_keys`` only when asked and the version moved."""

    available_kv_cache: int
    total_kv_cache: int
    block_size: int
    version: int
    cache_keys: dict[int, bool] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCounters:
    """Cumulative counters since the engine started (token and time totals of admitted requests)."""

    requests: int = 0  # accepted by submit()
    rejected: int = 0  # refused: queue full
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0  # of admitted requests
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    queue_time_ms: float = 0.0  # summed over admitted requests
    prefill_tokens: int = 0  # prompt tokens actually computed
    prefill_time_ms: float = 0.0  # time spent in prefill steps
    decode_time_ms: float = 0.0  # time spent in decode steps
    kv_wait_ms: float = 0.0  # DECODE, kv_pending: arrival until the prefill's KV landed, summed
    kv_transfer_ms: float = 0.0  # DECODE, kv_pending: of which the transfer itself
    kv_failures: int = 0  # DECODE, kv_pending: requests whose prefill's KV never came
    iterations: int = 0
