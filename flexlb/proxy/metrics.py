"""Prometheus metrics of the proxy routes, on the router's registry (served by its /metrics).

Latency buckets are sized for LLM requests: a TTFT from tens of milliseconds (a cached prefix) to a minute (a long
prompt behind a queue), a whole request up to the ten minutes of proxyResponseTimeoutMs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flexlb.metrics import Children

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# predicted minus reported cached tokens: negative, the index missed what the engine had; positive, it claimed more
HIT_ERROR_BUCKETS = (-4096.0, -1024.0, -256.0, -64.0, -1.0, 0.0, 64.0, 256.0, 1024.0, 4096.0)
NO_WORKER = "none"  # the role label of a request no worker answered (refused, or every worker failed)
# flexlb_proxy_breaker_state's values: the higher, the further from taking requests
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(slots=True)
class RequestTimer:
    """One proxied request's clock: started on arrival; the answering worker's role once chosen."""

    route: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    role: str = NO_WORKER
    first_byte: float | None = None


TIMER_KEY = web.RequestKey("flexlb_proxy_timer", RequestTimer)  # the request's RequestTimer


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "flexlb_proxy_requests_total",
            "Proxied requests by route and the HTTP status sent to the client (499: the client went away).",
            ["route", "status"],
            registry=registry,
        )
        self.upstream_failures = Counter(
            "flexlb_proxy_upstream_failures_total",
            "Worker failures by role and reason (connect, connect_timeout, headers_timeout, reset, http_5xx before"
            " the first byte; mid_stream after it).",
            ["role", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "flexlb_proxy_retries_total",
            "Requests scheduled again without a worker that failed before its first byte, by that worker's role.",
            ["role"],
            registry=registry,
        )
        self.retries_exhausted = Counter(
            "flexlb_proxy_retries_exhausted_total",
            "Requests answered 502 because every attempt's worker failed before its first byte (proxyRetries used"
            " up), by route.",
            ["route"],
            registry=registry,
        )
        self.duration = Histogram(
            "flexlb_proxy_request_duration_seconds",
            "Proxied requests from arrival to the end of the answer, by route, model and the answering worker's role"
            " (none: no worker answered).",
            ["route", "model", "role"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "flexlb_proxy_ttft_seconds",
            "Streamed requests (2xx) from arrival to their first byte sent to the client, by route, model and the"
            " answering worker's role.",
            ["route", "model", "role"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.worker_requests = Counter(
            "flexlb_proxy_worker_requests_total",
            "Requests sent to each worker by the class of its answer's status (2xx, 4xx, 5xx; error: no answer, a"
            " connect error, reset or timeout before its headers).",
            ["worker", "role", "status_class"],
            registry=registry,
        )

        self.predicted_hit_tokens = Counter(
            "flexlb_proxy_predicted_hit_tokens_total",
            "Cached prompt tokens the router predicted (its cache index) on the workers that answered, by role:"
            " compare with flexlb_proxy_reported_cached_tokens_total, a drifting index shows as a gap.",
            ["role"],
            registry=registry,
        )
        self.reported_cached_tokens = Counter(
            "flexlb_proxy_reported_cached_tokens_total",
            "Cached prompt tokens the workers reported (usage.prompt_tokens_details.cached_tokens) for the same"
            " requests, by role.",
            ["role"],
            registry=registry,
        )
        self.hit_error = Histogram(
            "flexlb_proxy_hit_prediction_error_tokens",
            "Per request: predicted minus reported cached prompt tokens, by role.",
            ["role"],
            buckets=HIT_ERROR_BUCKETS,
            registry=registry,
        )

        # the per-request series, each child looked up once (a histogram's labels() cost ~8 us, per request)
        self._requests_by = Children(self.requests)  # (route, status)
        self._duration_by = Children(self.duration)  # (route, model, role)
        self._ttft_by = Children(self.ttft)
        self._worker_requests_by = Children(self.worker_requests)  # (worker, role, status class)
        self._predicted_by = Children(self.predicted_hit_tokens)  # (role)
        self._reported_by = Children(self.reported_cached_tokens)
        self._hit_error_by = Children(self.hit_error)

        # flexlb.proxy.breaker tells both (ProxyMetrics is its observer); a worker's series start at its first trip
        self.breaker_state = Gauge(
            "flexlb_proxy_breaker_state",
            "Each worker's circuit breaker in this router's proxy: 0 closed, 1 half open (its probe request is out),"
            " 2 open (left out of this router's choices; after breakerCooldownMs the next request to it is the"
            " probe). Several router processes: the highest of the live ones.",
            ["worker"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.breaker_trips = Counter(
            "flexlb_proxy_breaker_trips_total",
            "Times each worker's circuit breaker opened: breakerFailureThreshold failed requests in a row, or a"
            " failed probe.",
            ["worker"],
            registry=registry,
        )

    def breaker_changed(self, worker_id: str, state: str, *, tripped: bool) -> None:
        """``worker_id``'s circuit breaker is now ``state`` (flexlb.proxy.breaker's observer)."""
        self.breaker_state.labels(worker_id).set(BREAKER_STATES[state])
        if tripped:
            self.breaker_trips.labels(worker_id).inc()

    def hit_reported(self, role: str, predicted: int, reported: int) -> None:
        """A worker reported ``reported`` cached tokens for a request the router predicted ``predicted`` for."""
        self._predicted_by(role).inc(predicted)
        self._reported_by(role).inc(reported)
        self._hit_error_by(role).observe(predicted - reported)

    def count_request(self, route: str, status: int) -> None:
        """One more request on ``route`` answered ``status``."""
        self._requests_by(route, str(status)).inc()

    def first_byte(self, timer: RequestTimer) -> None:
        """The first byte of a streamed answer went to the client."""
        if timer.first_byte is None:
            timer.first_byte = time.perf_counter()
            self._ttft_by(timer.route, timer.model, timer.role).observe(timer.first_byte - timer.started)

    def finished(self, timer: RequestTimer) -> None:
        self._duration_by(timer.route, timer.model, timer.role).observe(time.perf_counter() - timer.started)

    def worker_answered(self, worker: str, role: str, status: int | None) -> None:
        """``worker`` answered with ``status`` (None: it did not answer)."""
        status_class = "error" if status is None else f"{status // 100}xx"
        self._worker_requests_by(worker, role, status_class).inc()
