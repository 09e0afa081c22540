"""Workers' own counters before and after a run: prefix-cache hit tokens, prompt tokens, queue time, requests.

Read from a flexlb simulated worker's ``/get_server_info`` (its engine counters), else from Prometheus ``/metrics``
(the simulator's, vLLM's or SGLang's counter names; a counter the engine does not export stays absent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from flexlb.bench.client import base_url

COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "queue_time_ms", "generated_tokens")

# sample name -> (counter, factor to its unit); samples of one name are summed over their labels.
PROMETHEUS_SAMPLES: dict[str, tuple[str, float]] = {
    "flexlb_sim_requests_total": ("requests", 1),
    "flexlb_sim_prompt_tokens_total": ("prompt_tokens", 1),
    "flexlb_sim_cached_prompt_tokens_total": ("cached_tokens", 1),
    "flexlb_sim_queue_time_seconds_total": ("queue_time_ms", 1000),
    "flexlb_sim_generation_tokens_total": ("generated_tokens", 1),
    "vllm:request_success_total": ("requests", 1),
    "vllm:prompt_tokens_total": ("prompt_tokens", 1),
    "vllm:prefix_cache_hits_total": ("cached_tokens", 1),
    "vllm:request_queue_time_seconds_sum": ("queue_time_ms", 1000),
    "vllm:generation_tokens_total": ("generated_tokens", 1),
    "sglang:num_requests_total": ("requests", 1),
    "sglang:prompt_tokens_total": ("prompt_tokens", 1),
    "sglang:cached_tokens_total": ("cached_tokens", 1),
    "sglang:generation_tokens_total": ("generated_tokens", 1),
}


class WorkerMetricsError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class WorkerReading:
    url: str
    source: str  # "get_server_info" or "metrics"
    counters: dict[str, float]


def counters_from_server_info(info: dict[str, Any]) -> dict[str, float] | None:
    """The simulator's engine counters, summed over ``internal_states``; None when the answer has none."""
    states = info.get("internal_states")
    if not isinstance(states, list):
        return None
    found = [s["counters"] for s in states if isinstance(s, dict) and isinstance(s.get("counters"), dict)]
    if not found:
        return None
    return {name: float(sum(c.get(name, 0) for c in found)) for name in COUNTERS}


def counters_from_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            known = PROMETHEUS_SAMPLES.get(sample.name)
            if known is not None:
                name, factor = known
                out[name] = out.get(name, 0.0) + sample.value * factor
    return out


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def read_worker(session: aiohttp.ClientSession, url: str) -> WorkerReading:
    """Counters of the worker at ``url``; raises WorkerMetricsError when neither endpoint gives any."""
    base = base_url(url)
    try:
        status, body = await _get(session, f"{base}/get_server_info")
        if status == 200:
            counters = counters_from_server_info(orjson.loads(body))
            if counters is not None:
                return WorkerReading(base, "get_server_info", counters)
        status, body = await _get(session, f"{base}/metrics")
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        raise WorkerMetricsError(f"{base}: {type(exc).__name__}: {exc}") from None
    if status != 200:
        raise WorkerMetricsError(f"{base}: /get_server_info has no counters and /metrics answered HTTP {status}")
    counters = counters_from_prometheus(body.decode("utf-8", "replace"))
    if not counters:
        raise WorkerMetricsError(f"{base}: /metrics has none of the known counters")
    return WorkerReading(base, "metrics", counters)


async def read_workers(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[WorkerReading | str]:
    """One reading per URL, or the error text for a worker that could not be read."""
    results = await asyncio.gather(*(read_worker(session, u) for u in urls), return_exceptions=True)
    out: list[WorkerReading | str] = []
    for result in results:
        if isinstance(result, WorkerMetricsError):
            out.append(str(result))
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append(result)
    return out


def worker_deltas(
    urls: Sequence[str], before: Sequence[WorkerReading | str], after: Sequence[WorkerReading | str]
) -> list[dict[str, Any]]:
    """Per worker: counter deltas over the run, hit ratio, mean queue time and share of all workers' requests."""
    rows: list[dict[str, Any]] = []
    for url, b, a in zip(urls, before, after, strict=True):
        if isinstance(b, str) or isinstance(a, str):
            rows.append({"url": base_url(url), "error": b if isinstance(b, str) else a})
            continue
        delta = {n: a.counters[n] - b.counters[n] for n in COUNTERS if n in a.counters and n in b.counters}
        requests, prompt = delta.get("requests"), delta.get("prompt_tokens")
        cached, queue = delta.get("cached_tokens"), delta.get("queue_time_ms")
        rows.append(
            {
                "url": a.url,
                "source": a.source,
                **delta,
                "hit_ratio": cached / prompt if cached is not None and prompt else None,
                "mean_queue_ms": queue / requests if queue is not None and requests else None,
            }
        )
    total = sum(r.get("requests") or 0 for r in rows)
    for r in rows:
        r["share"] = (r.get("requests") or 0) / total if total and "error" not in r else None
    return rows
