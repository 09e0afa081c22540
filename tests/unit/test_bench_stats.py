"""Statistics of `flexlb bench run`: percentiles on known data, the summary, CDF and throughput over time."""

from __future__ import annotations

import math

import pytest

from flexlb.bench.client import RequestRecord
from flexlb.bench.stats import cdf, latency_summary, percentile, pick_bucket_s, summarize, throughput_series


def rec(i: int, **kw: object) -> RequestRecord:
    base: dict[str, object] = {"index": i, "tag": "t", "api": "completions", "max_tokens": 8}
    return RequestRecord(**{**base, **kw})  # type: ignore[arg-type]


def test_percentiles_on_known_data() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2  # nearest rank: ceil(0.5 * 4) = 2nd value
    assert math.isnan(percentile([], 50))


def test_latency_summary_on_known_data() -> None:
    s = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"count": 5, "mean": 3.0, "p50": 3.0, "p90": 5.0, "p99": 5.0, "max": 5.0}


def test_summarize_counts_throughput_latency_and_cache_ratio() -> None:
    records = [
        rec(0, start_s=0.0, ttft_ms=100.0, e2e_ms=1000.0, output_tokens=10, prompt_tokens=200, cached_tokens=128),
        rec(1, start_s=0.5, ttft_ms=300.0, e2e_ms=1500.0, output_tokens=10, prompt_tokens=200, cached_tokens=0),
        rec(2, start_s=1.0, ttft_ms=200.0, e2e_ms=1000.0, output_tokens=5, prompt_tokens=100, cached_tokens=72),
        rec(3, start_s=1.0, e2e_ms=3.0, error="HTTP 503: queue full"),
        rec(4, start_s=1.1, e2e_ms=3.0, error="HTTP 503: queue full"),
    ]
    s = summarize(records, elapsed_s=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 3, 2)
    assert s["error_reasons"] == {"HTTP 503: queue full": 2}
    assert s["request_throughput"] == 1.5
    assert s["output_throughput"] == 12.5
    assert s["cached_token_ratio"] == pytest.approx(200 / 500)
    assert (s["prompt_tokens"], s["cached_tokens"], s["usage_reported"]) == (500, 200, 3)
    assert s["ttft_ms"]["p50"] == 200.0 and s["ttft_ms"]["mean"] == 200.0
    assert s["e2e_ms"]["p99"] == 1500.0
    assert s["tpot_ms"]["max"] == 200.0  # (1000 - 200) ms / 4 tokens after the first


def test_summarize_without_usage_or_requests() -> None:
    s = summarize([rec(0, ttft_ms=1.0, e2e_ms=2.0, output_tokens=3)], elapsed_s=1.0)
    assert s["cached_token_ratio"] is None and s["usage_reported"] == 0
    empty = summarize([], elapsed_s=0.0)
    assert empty["requests"] == 0 and empty["request_throughput"] is None
    assert math.isnan(empty["ttft_ms"]["p50"])


def test_throughput_series_spreads_tokens_from_first_token_to_end() -> None:
    # first token at 1 s, 4 more tokens evenly until 3 s
    times, rates = throughput_series([rec(0, start_s=0.0, ttft_ms=1000.0, e2e_ms=3000.0, output_tokens=5)], 1.0)
    assert times == [0.0, 1.0, 2.0, 3.0]
    assert rates == pytest.approx([0.0, 3.0, 2.0, 0.0])
    records = [
        rec(0, start_s=0.3, ttft_ms=10.0, e2e_ms=730.0, output_tokens=7),
        rec(1, start_s=0.1, ttft_ms=5.0, e2e_ms=5.0, output_tokens=3),  # all at once
        rec(2, start_s=0.0, e2e_ms=1.0, error="x", output_tokens=99),  # not counted
    ]
    times, rates = throughput_series(records, 0.1)
    assert sum(rates) * 0.1 == pytest.approx(10)
    assert throughput_series([], 1.0) == ([], [])


def test_cdf_and_bucket_width() -> None:
    assert cdf([3.0, 1.0, 2.0, 4.0]) == ([1.0, 2.0, 3.0, 4.0], [0.25, 0.5, 0.75, 1.0])
    assert pick_bucket_s(100.0) == 2.0
    assert pick_bucket_s(7.0) == pytest.approx(0.2)
    assert pick_bucket_s(60.0, points=60) == 1.0
