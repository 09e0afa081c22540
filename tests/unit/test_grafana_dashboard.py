"""The Grafana dashboard of deploy/grafana is built from what flexlb exports: it is valid JSON, every flexlb_* name
in its PromQL is a metric (or a histogram's _bucket / _count / _sum, a counter's _total) of the routers' and the
master's registries, every label it selects or groups by is one of those metrics' labels, and it has the panels an
operator looks for (request rate, p50 / p99 latency and TTFT, errors, healthy workers per role, queue depth and wait,
Redis)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from flexlb.metrics import MasterMetrics, SchedulerMetrics, register_fleet_collector
from flexlb.proxy.metrics import ProxyMetrics
from flexlb.queueing import QueueMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "flexlb-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
ALWAYS = {"instance", "job"}  # added by Prometheus to every series it scrapes
NAME = re.compile(r"\bflexlb_[a-z0-9_]+\b")


def exported() -> dict[str, set[str]]:
    """Every series name a router or the master exports -> its labels (``le`` for a histogram's buckets)."""
    registry = CollectorRegistry()
    holders = [SchedulerMetrics(registry), MasterMetrics(registry), QueueMetrics(registry), ProxyMetrics(registry)]
    metrics: dict[str, set[str]] = {}
    for holder in holders:
        for metric in vars(holder).values():
            if isinstance(metric, MetricWrapperBase):
                for suffix in SUFFIXES[metric._type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    metrics[metric._name + suffix] = set(metric._labelnames) | extra
    register_fleet_collector(registry, lambda: [])
    for family in registry.collect():
        for sample in family.samples:  # the fleet collector's gauges (the others have no samples yet)
            metrics.setdefault(sample.name, set()).update(sample.labels)
    return metrics


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def test_the_dashboard_is_valid_and_provisionable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_metric_in_the_queries_is_one_flexlb_exports(dashboard: dict[str, Any]) -> None:
    metrics = exported()
    used = set()
    for title, expr in expressions(dashboard):
        names = NAME.findall(expr)
        assert names, f"{title}: {expr} reads no flexlb metric"
        for name in names:
            assert name in metrics, f"{title}: {name} is not exported by flexlb"
            used.add(name)
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in names), f"{title}: a quantile of something but buckets"
    # the dashboard covers the metrics the issue asks for
    for wanted in (
        "flexlb_proxy_requests_total",
        "flexlb_proxy_request_duration_seconds_bucket",
        "flexlb_proxy_ttft_seconds_bucket",
        "flexlb_proxy_worker_requests_total",
        "flexlb_proxy_retries_exhausted_total",
        "flexlb_workers_healthy",
        "flexlb_queue_size",
        "flexlb_queue_wait_seconds_bucket",
        "flexlb_schedule_requests_total",
        "flexlb_redis_up",
        "flexlb_degraded_schedules_total",
        "flexlb_state_unavailable_total",
    ):
        assert wanted in used, f"no panel shows {wanted}"


def test_every_label_in_the_queries_is_one_of_their_metrics(dashboard: dict[str, Any]) -> None:
    metrics = exported()
    for title, expr in expressions(dashboard):
        available = set(ALWAYS)
        for name in NAME.findall(expr):
            available |= metrics[name]
        for selector in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert label in metrics_of(expr, metrics, selector) | ALWAYS, f"{title}: no label {label!r}: {expr}"
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (part.strip() for part in grouping.split(",")):
                assert label in available, f"{title}: grouped by {label!r}, a label none of its metrics has: {expr}"


def metrics_of(expr: str, metrics: dict[str, set[str]], selector: str) -> set[str]:
    """The labels of the metric written right before ``{selector}`` in ``expr``."""
    name = re.search(r"(flexlb_[a-z0-9_]+)\{" + re.escape(selector) + r"\}", expr)
    assert name, (expr, selector)
    return metrics[name.group(1)]


def test_it_has_the_panels_an_operator_looks_for(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in panels(dashboard))
    for words in (
        "request rate",
        "request duration p50 / p99",
        "ttft p50 / p99",
        "errors",
        "healthy workers per role",
        "queue depth",
        "queue wait p50 / p99",
        "redis",
        "degraded",
    ):
        assert words in titles, f"no panel titled with {words!r}"
