"""Prometheus metrics of one router process, on a registry passed in (tests make their own).

``flexlb serve --processes N`` runs prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR): counters and
histograms are summed over every process, live or dead; each gauge says how its processes' values combine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from flexlb.domain import Role

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: with PROMETHEUS_MULTIPROC_DIR set, the aggregate of every process's metric files;
    otherwise ``registry``, this process's own."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return registry
    aggregate = CollectorRegistry()
    MultiProcessCollector(aggregate, directory)
    return aggregate


def register_process_collectors(registry: CollectorRegistry) -> None:
    """This process's ``python_gc_*`` (collections and objects collected per generation: a full collection shows
    as ``generation="2"``) and ``process_*`` (CPU seconds, resident memory, open files) on its registry. Not in
    multiprocess mode: /metrics serves the processes' summed files there, and one process's own figures would pass
    for all of them."""
    if not os.environ.get(MULTIPROC_DIR_ENV):
        registry.register(GC_COLLECTOR)
        registry.register(PROCESS_COLLECTOR)


class Children:
    """A labelled metric's children by label values (in the metric's label order), each looked up once: ``labels()``
    with keywords costs a few microseconds, on every decision."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.schedules = Counter(
            "flexlb_schedule_requests_total", "Schedule requests by result code.", ["code"], registry=registry
        )
        self.schedule_latency = Histogram(
            "flexlb_schedule_latency_seconds",
            "Time to answer a schedule request.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.reserve_refused = Counter(
            "flexlb_reservations_refused_total",
            "Reservations refused by Redis (a concurrent router took the capacity), by role and reason.",
            ["role", "reason"],
            registry=registry,
        )
        self.schedules_degraded = Counter(
            "flexlb_degraded_schedules_total",
            "Requests scheduled from the fleet view while Redis was unreachable.",
            registry=registry,
        )
        self.schedules_unavailable = Counter(
            "flexlb_state_unavailable_total",
            "Requests refused because Redis was unreachable and the fleet view too old.",
            registry=registry,
        )
        self.redis_errors = Counter("flexlb_redis_errors_total", "Failed Redis calls.", registry=registry)
        self.in_flight = Gauge(
            "flexlb_reservations_in_flight",
            "Requests this router reserved capacity for and has not released yet.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.hit_tokens = Counter(
            "flexlb_cache_hit_tokens_total",
            "Prefix-cache hit tokens of the chosen workers ('chosen') and of the best worker for the request"
            " ('available'), by role: their ratio shows what load balancing gives up of cache affinity.",
            ["role", "kind"],
            registry=registry,
        )
        self.schedules_by_code = Children(self.schedules)  # (code)
        self.hit_tokens_by = Children(self.hit_tokens)  # (role, kind)
        # several processes: 0 when any live one cannot reach Redis
        self.redis_up = Gauge(
            "flexlb_redis_up",
            "1 while Redis answers, 0 while it does not.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.redis_up.set(1)


class MasterMetrics:
    """What the master process (the lock holder) does: polls, liveness, hand-over of reservations."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.is_master = Gauge(
            "flexlb_master_is_master",
            "1 while this process holds the master lock.",
            registry=registry,
            multiprocess_mode="livemax",  # several processes: 1 when one of them is master
        )
        self.epoch = Gauge(
            "flexlb_master_epoch",
            "Epoch of this process's current or last master term.",
            registry=registry,
            multiprocess_mode="max",  # the latest term any process (even one since restarted) held
        )
        self.polls = Counter(
            "flexlb_master_polls_total",
            "Worker status and cache polls by result.",
            ["rpc", "result"],
            registry=registry,
        )
        # Several processes: the value written last wins, i.e. the current master's (it writes on every poll); a
        # deposed process's max would keep saying alive after the worker died.
        self.worker_alive = Gauge(
            "flexlb_worker_alive",
            "1 while a worker answers its status polls.",
            ["worker", "role"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.lost_tasks = Counter(
            "flexlb_master_lost_tasks_total",
            "Requests a worker reported running or waiting that later vanished without finishing.",
            registry=registry,
        )
        self.reservations_handed_over = Counter(
            "flexlb_master_reservations_handed_over_total",
            "Reservations dropped because the worker itself reported the request (its counts carry it from then).",
            registry=registry,
        )


class FleetCollector(Collector):
    """Gauges read from the router's fleet view at each scrape: the fleet is one for every router process, so any
    process's view answers (under ``--processes N`` it is registered on the aggregate registry, beside the files)."""

    def __init__(self, workers: Callable[[], Iterable[Any]]) -> None:
        self._workers = workers  # the fleet view's worker views (``FleetView.all``)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily(
            "flexlb_workers_healthy",
            "Workers of each role in this router's fleet view that are alive (answer their status polls or health"
            " checks) and available (below their queue and KV thresholds).",
            labels=["role"],
        )
        registered = GaugeMetricFamily(
            "flexlb_workers_registered", "Workers of each role in this router's fleet view.", labels=["role"]
        )
        counts = {role: [0, 0] for role in Role}
        for view in self._workers():
            count = counts[view.spec.role]
            count[0] += 1
            count[1] += bool(view.status.alive and view.status.available)
        for role, (total, ok) in counts.items():
            registered.add_metric([role.value], total)
            healthy.add_metric([role.value], ok)
        yield healthy
        yield registered


def register_fleet_collector(registry: CollectorRegistry, workers: Callable[[], Iterable[Any]]) -> None:
    registry.register(FleetCollector(workers))
