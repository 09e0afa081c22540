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


class VllmCollector(Collector):
    """The names and labels a vLLM (v1) engine serves on ``/metrics``, from the simulated engine's state."""

    def __init__(self, engine: SimEngine, model_name: str) -> None:
        self._engine = engine
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        engine, labels = self._engine, ["model_name", "engine"]
        c, cache, cfg = engine.counters, engine.cache, engine.config
        held = cache.used_blocks - cache.evictable_blocks
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", engine.running_count),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.waiting_count),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", held / cache.total_blocks),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric([self._model, "0"], value)
            yield gauge
        counters = (  # prometheus_client exposes them with _total, as vLLM's
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                c.prompt_tokens,
            ),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", c.cached_tokens),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", c.generated_tokens),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric([self._model, "0"], value)
            yield counter
        info = {
            "block_size": str(cfg.block_size),
            "num_gpu_blocks": str(cfg.kv_blocks),
            "enable_prefix_caching": "True",
            "cache_dtype": "auto",
            "engine": "0",
        }
        gauge = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(info)
        )
        gauge.add_metric(list(info.values()), 1.0)
        yield gauge


class SglangCollector(Collector):
    """The names and labels an SGLang engine serves on ``/metrics`` (``--enable-metrics``), from the engine's state."""

    def __init__(self, engine: SimEngine, model_name: str) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}

    def collect(self) -> Iterator[Metric]:
        engine, names, values = self._engine, list(self._labels), list(self._labels.values())
        c, cache, cfg = engine.counters, engine.cache, engine.config
        held_tokens = (cache.used_blocks - cache.evictable_blocks) * cfg.block_size
        step_s = engine.last_step_ms / 1000
        gauges = (
            ("sglang:num_running_reqs", "The number of running requests.", engine.running_count),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", engine.waiting_count),
            ("sglang:num_used_tokens", "The number of used tokens.", held_tokens),
            ("sglang:token_usage", "The token usage.", held_tokens / cfg.total_kv_tokens),
            (
                "sglang:max_total_num_tokens",
                "Maximum total number of tokens in the KV cache pool.",
                cfg.total_kv_tokens,
            ),
            (
                "sglang:cache_hit_rate",
                "The prefix cache hit rate.",
                c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            ),
            (
                "sglang:gen_throughput",
                "The generation throughput (token/s).",
                engine.running_count / step_s if step_s and engine.running_count else 0.0,
            ),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, value)
            yield gauge
        counters = (
            ("sglang:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens),
            ("sglang:generation_tokens", "Number of generation tokens processed.", c.generated_tokens),
            ("sglang:cached_tokens", "Number of cached prompt tokens.", c.cached_tokens),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, value)
            yield counter


SIM_DIALECTS = ("rtp_llm", "vllm", "sglang")  # sim-worker --engine: which engine the worker passes for
_COLLECTORS = {"rtp_llm": EngineCollector, "vllm": VllmCollector, "sglang": SglangCollector}


def dialect_registry(engine: SimEngine, model_name: str, dialect: str) -> CollectorRegistry:
    """``/metrics`` of a worker passing for ``dialect``: flexlb_sim_* for rtp_llm, else that engine's names."""
    if dialect not in _COLLECTORS:
        raise ValueError(f"engine: one of {', '.join(SIM_DIALECTS)}, not {dialect!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_COLLECTORS[dialect](engine, model_name))
    return registry
