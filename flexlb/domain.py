"""Domain model: roles, worker identity and status, the schedule request, error codes.

Everything here is plain data with no I/O, shared by the strategies (pure), the state store (Redis) and the HTTP
layer. Wire names follow the original FlexLB (see docs and ``../shared/FLEXLB_REFERENCE.md``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from flexlb.kv_events.endpoint import KvEventsEndpoint

DEFAULT_BLOCK_SIZE = 64  # tokens per KV block when a worker has not said (RTP-LLM's seq_size_per_block)


class Role(enum.StrEnum):
    PREFILL = "PREFILL"
    DECODE = "DECODE"
    PDFUSION = "PDFUSION"
    VIT = "VIT"

    @classmethod
    def parse(cls, value: str) -> Role:
        """Accept ``PREFILL``, ``prefill`` and RTP-LLM's ``RoleType.PREFILL``; raise ValueError otherwise."""
        name = value.strip().upper().removeprefix("ROLETYPE.")
        aliases = {"PD_FUSION": "PDFUSION", "FUSION": "PDFUSION", "VISION": "VIT"}
        name = aliases.get(name, name)
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown role {value!r}; expected one of {', '.join(r.value for r in cls)}") from None


class EngineKind(enum.StrEnum):
    """How the master learns a worker's load and health: RTP-LLM's status gRPC (``rtp_llm``, also flexlb's simulator
    in its default mode, ``sim``), or the engine's own HTTP API (``vllm``: Prometheus /metrics; ``sglang``: /metrics
    or /get_load)."""

    RTP_LLM = "rtp_llm"
    VLLM = "vllm"
    SGLANG = "sglang"
    SIM = "sim"

    @classmethod
    def parse(cls, value: str) -> EngineKind:
        """Accept any case and ``-`` for ``_`` (``RTP-LLM``); raise ValueError naming the kinds otherwise."""
        try:
            return cls(value.strip().lower().replace("-", "_"))
        except ValueError:
            raise ValueError(f"unknown engine {value!r}; expected one of {', '.join(k.value for k in cls)}") from None

    @property
    def speaks_status_rpc(self) -> bool:
        """Polled over RTP-LLM's GetWorkerStatus / GetCacheStatus (else over the engine's HTTP API)."""
        return self in (EngineKind.RTP_LLM, EngineKind.SIM)


# Order in which roles are chosen for one request (as the original): a later role is limited to the group of
# the earlier choice.
ROLE_ORDER: tuple[Role, ...] = (Role.PDFUSION, Role.DECODE, Role.PREFILL, Role.VIT)


class ErrorCode(enum.IntEnum):
    """Numeric codes of the original FlexLB, plus flexlb's own (>= 8600)."""

    OK = 200
    CONNECT_FAILED = 8202
    CONNECT_TIMEOUT = 8203
    NO_AVAILABLE_WORKER = 8400
    NO_PREFILL_WORKER = 8402
    NO_DECODE_WORKER = 8403
    NO_PDFUSION_WORKER = 8404
    NO_VIT_WORKER = 8405
    INVALID_REQUEST = 8406
    QUEUE_FULL = 8502
    QUEUE_TIMEOUT = 8503
    REQUEST_CANCELLED = 8504
    # flexlb: Redis (the fleet's shared state) unreachable and the local snapshot too old to schedule from.
    STATE_UNAVAILABLE = 8600
    # flexlb: the request names a model this router does not serve.
    UNKNOWN_MODEL = 8601
    # flexlb: the prompt (plus the output asked for) is larger than the KV cache of every worker of a role: it can
    # never be served, so it is refused at once (HTTP 400), not queued.
    CONTEXT_LENGTH_EXCEEDED = 8602
    # flexlb: no credential, or one this API does not accept (HTTP 401), or one of another API (HTTP 403).
    UNAUTHENTICATED = 8610
    PERMISSION_DENIED = 8611
    # flexlb: the client's token holds maxReservationsPerToken reservations already (HTTP 429).
    TOO_MANY_RESERVATIONS = 8612

    @property
    def retryable(self) -> bool:
        return 8400 <= self.value <= 8405


NO_WORKER_CODE: dict[Role, ErrorCode] = {
    Role.PREFILL: ErrorCode.NO_PREFILL_WORKER,
    Role.DECODE: ErrorCode.NO_DECODE_WORKER,
    Role.PDFUSION: ErrorCode.NO_PDFUSION_WORKER,
    Role.VIT: ErrorCode.NO_VIT_WORKER,
}


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def check_host(host: str) -> str:
    """A worker's host name or address as it goes into Redis keys: no braces (hash tags), spaces or ports."""
    if not _HOST.fullmatch(host):
        raise ValueError(f"expected a host name or address (IPv6 in brackets) without port, got {host!r}")
    return host


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Identity of one engine worker. ``worker_id`` (``ip:http_port``) is its key in Redis."""

    ip: str
    http_port: int
    role: Role
    grpc_port: int = 0  # 0: http_port + 1, RTP-LLM's convention
    group: str = ""
    # Admission limit: reservations + reported running/waiting tasks must stay at or below it. 0 = unlimited.
    max_concurrency: int = 0
    engine: EngineKind = EngineKind.RTP_LLM  # which API the master polls for load and health
    # where it publishes KV events (vLLM / SGLang over ZMQ), given at registration: the master subscribes to them
    # (MODEL_SERVICE_CONFIG's ``kv_events`` for a configured worker); None: none registered
    kv_events: KvEventsEndpoint | None = None
    # ``ip:http_port``, computed once: every decision reads it for every worker it looks at
    worker_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_id", f"{self.ip}:{self.http_port}")

    @property
    def effective_grpc_port(self) -> int:
        return self.grpc_port or self.http_port + 1


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """Last measured state of a worker, as reported by the worker (or registered by an operator)."""

    alive: bool = True  # answers its status polls (or registered by an operator as alive)
    # False while the master's hysteresis holds it back: a prefill worker with too many waiting tasks, a decode
    # worker with too little KV left. It keeps serving what it has but is not chosen for new requests.
    available: bool = True
    running: int = 0  # tasks the worker is running
    waiting: int = 0  # tasks in the worker's queue
    queued_tokens: int = 0  # prompt tokens still to prefill on the worker (running + waiting); 0 if unknown
    kv_used: int = 0  # KV cache in tokens
    kv_total: int = 0  # 0 = unknown / unlimited
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block (seq_size_per_block)
    step_latency_ms: float = 0.0
    prefill_tokens_per_ms: float = 0.0  # measured prefill throughput; 0 = not measured yet
    status_version: int = 0
    updated_ms: int = 0  # Redis server time of the last status write


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as a strategy sees it for one request: identity, status, this fleet's pending load, cache hit."""

    spec: WorkerSpec
    status: WorkerStatus
    pending_count: int = 0  # live reservations made by any router and not yet released
    pending_tokens: int = 0  # tokens of those reservations
    hit_blocks: int = 0  # longest cached prefix of the request's block keys, in blocks

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.status.block_size

    @property
    def load(self) -> int:
        """Tasks on the worker or on their way to it."""
        return self.status.running + self.status.waiting + self.pending_count

    @property
    def kv_free(self) -> int:
        """KV tokens not used and not reserved; a large number when the total is unknown."""
        if self.status.kv_total <= 0:
            return 1 << 62
        return self.status.kv_total - self.status.kv_used - self.pending_tokens


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    """The body of ``POST /rtp_llm/schedule`` after validation."""

    request_id: int
    seq_len: int
    block_cache_keys: tuple[int, ...] = ()
    generate_timeout_ms: int = 3_600_000
    model: str | None = None
    request_time_ms: int | None = None
    # Worker ids not to choose: the proxy's retry of a request whose previous worker failed before answering.
    exclude_workers: frozenset[str] = frozenset()
    # The original frontend's request_priority, as given (0: not given). The queue orders by it (flexlb.queueing:
    # 1-100, higher first, others count as 50, as the original's levels); the choice of workers does not use it.
    priority: int = 0
    output_tokens: int = 0  # output tokens asked for (max_tokens), when known: part of the KV a worker must hold
    # > 0: admission by estimated wait (the proxy's default): a worker at its concurrency or KV limit still queues
    # the request, so those limits do not refuse it; the chosen prefill-type worker's estimated TTFT must be within
    # this bound instead (flexlb.routing.decide). 0: the limits are hard (the schedule API, as the original).
    ttft_bound_ms: float = 0.0
    explain: bool = False  # the decision says why (Choice.explanation): the schedule API's `debug`, the decision log


@dataclass(frozen=True, slots=True)
class Choice:
    """A strategy's pick for one role."""

    worker: WorkerView
    estimate_ttft_ms: float = 0.0
    reserve_tokens: int = 0  # tokens the reservation holds on the worker (KV it will need)
    explanation: dict[str, Any] | None = None  # why, when the request asked (flexlb.routing.explain)


@dataclass(frozen=True, slots=True)
class QueueStay:
    """A request's time in the router's queue (flexlb.queueing), for its ``debug_info``."""

    waited_ms: float
    position: int  # 1 = it entered at the head: the requests ahead of it, plus one
    depth: int  # requests in the queue when it left, itself included


@dataclass(slots=True)
class ScheduleResult:
    """Outcome of scheduling one request over all roles."""

    success: bool
    code: ErrorCode = ErrorCode.OK
    message: str = ""
    choices: dict[Role, Choice] = field(default_factory=dict)
    degraded: bool = False  # chosen from the local snapshot while Redis was unreachable
    attempts: int = 1
    # refused while workers that could take the request exist but are busy (at their limits, or above the admission
    # bound): waiting helps. False for a fleet with no such worker (none registered, alive or fresh).
    busy: bool = False
    queue: QueueStay | None = None  # set when it waited in the router's queue
