"""Prometheus metrics of the proxy routes, on the router's registry (served by its /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._request_counts: dict[tuple[str, int], Any] = {}  # (route, status) -> its bound child of requests
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

    def count_request(self, route: str, status: int) -> None:
        """One more request on ``route`` answered ``status``; the labelled child is bound once per pair."""
        child = self._request_counts.get((route, status))
        if child is None:
            child = self._request_counts[route, status] = self.requests.labels(route=route, status=str(status))
        child.inc()
