"""Statistics of a run's request records: the summary, the TTFT CDF and output throughput over time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from flexlb.bench.client import RequestRecord
from flexlb.bench.report import latency_summary, percentile

__all__ = ["cdf", "latency_summary", "percentile", "summarize", "throughput_series"]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(records: Sequence[RequestRecord], elapsed_s: float) -> dict[str, Any]:
    """Counts, throughput (over ``elapsed_s``, the run's wall time), latency summaries (nearest-rank percentiles)
    and the cached-token ratio of the successful requests that reported usage (None when none did)."""
    ok = [r for r in records if r.ok]
    reasons = Counter(r.error for r in records if r.error is not None)
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in with_usage)
    cached_tokens = sum(r.cached_tokens or 0 for r in with_usage)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_reasons": dict(reasons.most_common()),
        "elapsed_s": elapsed_s,
        "request_throughput": _ratio(len(ok), elapsed_s),
        "output_throughput": _ratio(output_tokens, elapsed_s),
        "output_tokens": output_tokens,
        "usage_reported": len(with_usage),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "cached_token_ratio": _ratio(cached_tokens, prompt_tokens) if with_usage else None,
        "ttft_ms": latency_summary([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "e2e_ms": latency_summary([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "tpot_ms": latency_summary([t for r in ok if (t := r.tpot_ms) is not None]),
    }


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of values <= each one."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def throughput_series(records: Sequence[RequestRecord], bucket_s: float) -> tuple[list[float], list[float]]:
    """Output tokens/s of the successful requests per ``bucket_s`` window (bucket start times, rates).

    A request's tokens are spread evenly from its first token to its end (the first one at the first token)."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be positive, got {bucket_s}")
    ok = [r for r in records if r.ok and r.ttft_ms is not None and r.e2e_ms is not None]
    if not ok:
        return [], []
    buckets = [0.0] * (math.floor(max(r.end_s for r in ok) / bucket_s) + 1)
    for r in ok:
        first = r.start_s + (r.ttft_ms or 0.0) / 1000
        end = r.end_s
        buckets[min(len(buckets) - 1, math.floor(first / bucket_s))] += 1
        rest = r.output_tokens - 1
        if rest <= 0:
            continue
        if end <= first:
            buckets[min(len(buckets) - 1, math.floor(end / bucket_s))] += rest
            continue
        rate = rest / (end - first)
        for b in range(math.floor(first / bucket_s), min(len(buckets) - 1, math.floor(end / bucket_s)) + 1):
            overlap = min(end, (b + 1) * bucket_s) - max(first, b * bucket_s)
            if overlap > 0:
                buckets[b] += rate * overlap
    return [i * bucket_s for i in range(len(buckets))], [tokens / bucket_s for tokens in buckets]


def pick_bucket_s(elapsed_s: float, points: int = 50) -> float:
    """A bucket width giving about ``points`` buckets, rounded to 1, 2 or 5 times a power of ten."""
    raw = max(elapsed_s, 1e-3) / points
    scale = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 5, 10):
        if raw <= step * scale:
            return step * scale
    return 10 * scale
