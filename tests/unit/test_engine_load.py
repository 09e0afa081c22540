# ruff: noqa: E501  (the metric pages are quoted as engines serve them, one sample a line)
"""Load of vLLM and SGLang workers from their own APIs (real-format pages), the health thresholds and the proxy's
circuit breaker: all pure."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flexlb.domain import Role
from flexlb.master.engine_load import (
    EngineLoad,
    Holds,
    NotThisEngine,
    SglangDialect,
    SglangInfo,
    load_fields,
    parse_sglang_load,
    parse_sglang_metrics,
    parse_sglang_server_info,
    parse_vllm_metrics,
)
from flexlb.master.health import HealthTracker
from flexlb.master.prom_text import read_samples
from flexlb.master.reconcile import Hysteresis
from flexlb.proxy.breaker import Breakers

# vLLM v1 with data parallel 2 (engine="0", "1"), as /metrics serves it: counters with _total, histograms, info gauge.
VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 4.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="Qwen/Qwen3-8B"} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} 500.0
vllm:prefix_cache_hits_total{engine="1",model_name="Qwen/Qwen3-8B"} 300.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen3-8B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 1.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="1000",prefix_caching_hash_algo="sha256"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",engine="1",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="1000",prefix_caching_hash_algo="sha256"} 1.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
"""

# vLLM 0.6 (v0 engine): gpu_cache_usage_perc, no engine label.
VLLM_OLD_PAGE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.1
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="500",model_name="m"} 1.0
"""

SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 2.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 45000.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 0.28
# HELP sglang:max_total_num_tokens Maximum total number of tokens in the KV cache pool.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 161721.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 0.007507552643049313
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 1234.5
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
"""


def test_read_samples_agrees_with_prometheus_client_on_the_series_it_reads() -> None:
    names = {"vllm:num_requests_running", "vllm:cache_config_info", "vllm:prefix_cache_hits_total"}
    ours = read_samples(VLLM_PAGE, names).series
    reference: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(VLLM_PAGE):
        for s in family.samples:
            if s.name in names:
                reference.setdefault(s.name, []).append((dict(s.labels), s.value))
    assert ours == reference and set(ours) == names


def test_read_samples_escapes_infinities_and_labelless_lines() -> None:
    page = 'a:x{path="C:\\\\dir",q="say \\"hi\\""} +Inf\na:y 3 1700000000000\na:z{} NaN\n'
    s = read_samples(page, {"a:x", "a:y", "a:z"}).series
    assert s["a:x"] == [({"path": "C:\\dir", "q": 'say "hi"'}, math.inf)]
    assert s["a:y"] == [({}, 3.0)]
    assert math.isnan(s["a:z"][0][1])
    with pytest.raises(ValueError, match="no sample value"):
        read_samples('a:x{l="v"}\n', {"a:x"})


def test_vllm_load_sums_data_parallel_engines_and_sizes_kv_from_the_cache_config() -> None:
    load = parse_vllm_metrics(VLLM_PAGE)
    # 2000 blocks of 16 tokens; usage 0.375 on average
    assert load == EngineLoad(running=5, waiting=4, kv_used=12_000, kv_total=32_000, block_size=16,
                              prefix_hit_rate=0.4)  # fmt: skip


def test_older_vllm_reports_gpu_cache_usage_perc() -> None:
    load = parse_vllm_metrics(VLLM_OLD_PAGE)
    assert (load.running, load.waiting, load.kv_total, load.kv_used) == (1, 2, 8000, 800)
    assert load.prefix_hit_rate is None


def test_a_page_without_the_engine_s_gauges_is_not_this_engine() -> None:
    with pytest.raises(NotThisEngine, match="not a vLLM worker"):
        parse_vllm_metrics(SGLANG_PAGE)
    with pytest.raises(NotThisEngine, match="not an SGLang worker"):
        parse_sglang_metrics(VLLM_PAGE)
    with pytest.raises(NotThisEngine):
        parse_sglang_load({"load": 3})


def test_sglang_metrics_and_get_load() -> None:
    load = parse_sglang_metrics(SGLANG_PAGE, SglangInfo(kv_total=1, page_size=1))
    assert (load.running, load.waiting, load.kv_used, load.kv_total) == (7, 2, 45_000, 161_721)
    assert load.prefix_hit_rate == pytest.approx(0.0075, abs=1e-4) and load.gen_tokens_per_s == 1234.5
    info = parse_sglang_server_info({"max_total_num_tokens": 161721, "page_size": 64, "tp_size": 1})
    ranks = [
        {"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 1000},
        {"dp_rank": 1, "num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 24},
    ]
    assert parse_sglang_load(ranks, info) == EngineLoad(4, 2, 1024, 161_721, 64)


async def test_sglang_dialect_falls_back_to_get_load_without_metrics() -> None:
    asked: list[str] = []
    pages = {
        "/get_server_info": (200, b'{"max_total_num_tokens": 1000, "page_size": 1}'),
        "/metrics": (404, b"{}"),
        "/get_load": (200, b'[{"num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 100}]'),
    }

    async def fetch(path: str) -> tuple[int, bytes]:
        asked.append(path)
        return pages[path]

    dialect = SglangDialect()
    assert await dialect.read(fetch) == EngineLoad(2, 1, 100, 1000, 1)
    assert await dialect.read(fetch) == EngineLoad(2, 1, 100, 1000, 1)
    assert asked == ["/get_server_info", "/metrics", "/get_load", "/get_load"]  # /metrics is not asked again


def test_load_fields_hold_back_by_hysteresis_and_never_use_a_tiny_page_as_block_size() -> None:
    holds, h = Holds(), Hysteresis(prefill_waiting=3, decode_kv_percent=90, bias_percent=15)
    fields = load_fields(EngineLoad(2, 3, 100, 1000, 1), Role.PDFUSION, holds, h)
    assert fields["available"] == "0" and fields["block_size"] == "64" and fields["kv_used"] == "100"
    assert load_fields(EngineLoad(2, 2, 100, 1000, 16), Role.PDFUSION, holds, h)["available"] == "1"
    assert load_fields(EngineLoad(0, 0, 950, 1000, 16), Role.DECODE, holds, h)["available"] == "0"
    assert load_fields(EngineLoad(0, 0, 800, 1000, 16), Role.DECODE, holds, h)["available"] == "0"  # above 76.5%
    assert load_fields(EngineLoad(0, 0, 700, 1000, 16), Role.DECODE, holds, h)["available"] == "1"


def test_health_tracker_needs_the_failure_threshold_to_go_and_the_success_threshold_to_come_back() -> None:
    t = HealthTracker(failure_threshold=3, success_threshold=2)
    assert [t.record(ok) for ok in (False, False, True, False, False)] == [False] * 5 and t.up
    assert t.record(False) and not t.up and t.settled
    assert not t.record(True) and not t.up and not t.settled
    assert not t.record(False) and not t.record(True)  # a failure in between starts the count again
    assert t.record(True) and t.up


def test_breaker_opens_after_the_threshold_then_lets_one_probe_through() -> None:
    now = [0.0]
    b = Breakers(failure_threshold=2, cooldown_s=5.0, clock=lambda: now[0])
    b.failed("w1", "PDFUSION worker w1")
    assert b.excluded() == frozenset()
    b.answered("w1", "w1")  # a success in between: the count starts again
    b.failed("w1", "w1")
    assert b.excluded() == frozenset()
    b.failed("w1", "w1")
    assert b.excluded() == {"w1"} and b.is_open("w1")
    now[0] = 5.0  # cool-down over: half open
    assert b.excluded() == frozenset()
    b.sending(["w1"])
    assert b.excluded() == {"w1"}  # its probe is out: the others wait
    b.failed("w1", "w1")  # the probe failed: open again for a cool-down
    now[0] = 9.0
    assert b.excluded() == {"w1"}
    now[0] = 10.0
    b.sending(["w1"])
    b.answered("w1", "w1")
    assert b.excluded() == frozenset() and not b.is_open("w1")
    now[0] = 12.0
    b.sending(["w2"])  # never failed: nothing to track
    assert b.excluded() == frozenset()
