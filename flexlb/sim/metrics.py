"""Prometheus metrics of a simulated worker, read from the engine's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flexlb.sim.engine import SimEngine


class EngineCollector(Collector):
    """Every value comes from the engine when scraped, so nothing can drift from the engine's state."""

    def __init__(self, engine: SimEngine, model_name: str) -> None:
        self._engine = engine
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        c = engine.counters
        cache = engine.cache
        held = cache.used_blocks - cache.evictable_blocks  # pinned or reserved by running requests
        gauges = (
            ("flexlb_sim_requests_running", "Requests in the running batch.", engine.running_count),
            ("flexlb_sim_requests_waiting", "Requests waiting for a slot or KV.", engine.waiting_count),
            (
                "flexlb_sim_kv_cache_usage_ratio",
                "KV blocks held by running requests / all KV blocks (evictable cached blocks count as free).",
                held / cache.total_blocks,
            ),
            ("flexlb_sim_kv_cache_cached_blocks", "Blocks in the prefix cache.", cache.cached_blocks),
            (
                "flexlb_sim_prefix_cache_hit_rate",
                "Prompt tokens served from the prefix cache / prompt tokens, since start.",
                c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            ),
            ("flexlb_sim_step_latency_seconds", "Duration of the last engine iteration.", engine.last_step_ms / 1000),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model], value)
            yield gauge
        counters = (
            ("flexlb_sim_requests", "Requests accepted.", c.requests),
            ("flexlb_sim_requests_rejected", "Requests refused because the queue was full.", c.rejected),
            ("flexlb_sim_requests_finished", "Requests that finished.", c.finished),
            ("flexlb_sim_requests_cancelled", "Requests cancelled (client gone).", c.cancelled),
            ("flexlb_sim_prompt_tokens", "Prompt tokens of admitted requests.", c.prompt_tokens),
            ("flexlb_sim_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", c.cached_tokens),
            ("flexlb_sim_generation_tokens", "Tokens generated.", c.generated_tokens),
            ("flexlb_sim_queue_time_seconds", "Time admitted requests spent waiting.", c.queue_time_ms / 1000),
            ("flexlb_sim_iterations", "Engine iterations (prefill and decode steps).", c.iterations),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self._model], value)
            yield counter


def sim_registry(engine: SimEngine, model_name: str) -> CollectorRegistry:
    """A registry of its own (never the global one), so several workers can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry
