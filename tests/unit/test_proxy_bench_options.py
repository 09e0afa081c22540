"""`flexlb bench proxy`'s options for the setting of the proxy's targets: answers not streamed, the worker's engine
speed, the router's strategy, and the router's CPU time per request (pure parts)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from flexlb.bench.proxy_overhead import LOOP_PART, OTHER_PART, ProxyBenchParams, added, combine, profile_parts, render
from flexlb.bench.proxy_run import BenchWorkerOptions
from flexlb.cli import build_parser
from flexlb.stack.processes import process_cpu_seconds

TARGET_SETTING = (
    "bench proxy --concurrency 32 --prompt-tokens 32 --max-tokens 8 --time-scale 1 --strategy ROUND_ROBIN "
    "--prefill-tokens-per-ms 1000 --prefill-overhead-ms 0.5 --decode-step-ms-base 1 --decode-step-ms-per-seq 0.02 "
    "--no-stream"
)


def test_the_target_setting_parses_into_the_worker_and_router_options() -> None:
    args = build_parser().parse_args(TARGET_SETTING.split())
    assert (args.stream, args.strategy, args.max_concurrency, args.concurrency) == (False, "ROUND_ROBIN", 64, 32)
    params = ProxyBenchParams(
        stream=args.stream,
        strategy=args.strategy,
        prefill_tokens_per_ms=args.prefill_tokens_per_ms,
        prefill_overhead_ms=args.prefill_overhead_ms,
        decode_step_ms_base=args.decode_step_ms_base,
        decode_step_ms_per_seq=args.decode_step_ms_per_seq,
    )
    assert params.engine_argv() == [
        "--prefill-tokens-per-ms", "1000", "--prefill-overhead-ms", "0.5",
        "--decode-step-ms-base", "1", "--decode-step-ms-per-seq", "0.02",
    ]  # fmt: skip
    assert params.router_config() == {"contendForMaster": True, "loadBalanceStrategy": "ROUND_ROBIN"}
    worker = BenchWorkerOptions(kv_blocks=4096, max_concurrency=64, time_scale=1, engine=tuple(params.engine_argv()))
    assert worker.argv()[:6] == ["--kv-blocks", "4096", "--max-concurrency", "64", "--time-scale", "1"]
    assert worker.argv()[6:] == params.engine_argv()


def test_defaults_stay_as_before() -> None:
    args = build_parser().parse_args(["bench", "proxy"])
    assert args.stream and args.strategy is None and args.prefill_tokens_per_ms is None
    params = ProxyBenchParams()
    assert params.engine_argv() == [] and params.router_config() == {"contendForMaster": True}
    with pytest.raises(ValueError, match="prefill_overhead_ms"):
        ProxyBenchParams(prefill_overhead_ms=-1)


def _phase(mode: str, e2e: list[float], elapsed: float, cpu: float | None) -> dict:
    summary = {"requests": len(e2e), "ok": len(e2e), "errors": 0, "elapsed_s": elapsed}
    return {"mode": mode, "router_cpu_s": cpu, "summary": summary, "latencies": {"ttft_ms": [], "e2e_ms": e2e}}


def test_router_cpu_per_request_and_the_table_of_answers_not_streamed() -> None:
    phases = [_phase("direct", [1.0, 2.0], 1.0, 0.01), _phase("proxy", [3.0, 4.0], 2.0, 0.004)]
    modes = {m: combine(phases, m) for m in ("direct", "proxy")}
    assert modes["proxy"]["router_cpu_us_per_request"] == pytest.approx(2000.0)
    assert modes["direct"]["router_cpu_us_per_request"] == pytest.approx(5000.0)
    unmeasured = combine([_phase("proxy", [1.0], 1.0, None)], "proxy")
    assert unmeasured["router_cpu_us_per_request"] is None

    config = dataclasses.asdict(ProxyBenchParams(stream=False, prefill_overhead_ms=0.5))
    text = render({"config": config, "modes": modes, "added": added(modes["direct"], modes["proxy"])})
    assert "not streamed (no TTFT)" in text and "--time-scale 0.1 --prefill-overhead-ms 0.5" in text
    assert "router process CPU per proxied request: 2000 us (direct phases: 5000 us" in text


def test_cpu_seconds_of_this_process() -> None:
    first = process_cpu_seconds(os.getpid())
    if first is None:
        pytest.skip("no /proc here")
    sum(i * i for i in range(200_000))  # some CPU work
    second = process_cpu_seconds(os.getpid())
    assert second is not None and second >= first >= 0


LOOP = "main (flexlb/cli.py:1);run_app (aiohttp/web.py:502)"
HANDLER = f"{LOOP};proxy_request (flexlb/proxy/handler.py:65)"
RAW = "\n".join(
    [
        f"{LOOP} 10",
        f"{HANDLER};_serve (flexlb/proxy/handler.py:120);Scheduler.schedule (flexlb/scheduler.py:90) 6",
        f"{LOOP};Scheduler._release (flexlb/scheduler.py:163);Scripts.call (flexlb/state/scripts.py:54) 3",
        f"{LOOP};_Connection.data_received (flexlb/proxy/http1.py:330) 2",
        f"{LOOP};RequestHandler.data_received (aiohttp/web_protocol.py:446) 4",
        f"{HANDLER};parse_request (flexlb/proxy/parse.py:56);tokenize (flexlb/blocks.py:30) 1",
        "Thread.run (threading.py:982) 1",
        "not a sample line",
    ]
)


def test_profile_samples_are_counted_in_the_part_they_serve() -> None:
    total, parts = profile_parts(RAW)
    assert total == 27
    assert parts == {
        LOOP_PART: 10,
        "scheduling (decision, Redis client)": 6,
        "aiohttp server": 4,
        "release (Redis)": 3,
        "upstream client": 2,
        "tokenize + block keys": 1,
        OTHER_PART: 1,
    }
    assert next(iter(parts)) == LOOP_PART  # most first

    phases = [_phase("direct", [1.0], 1.0, 0.0), _phase("proxy", [2.0], 1.0, 0.001)]
    modes = {m: combine(phases, m) for m in ("direct", "proxy")}
    profile = {"path": "/tmp/p.txt", "samples": total, "parts": parts}
    config = dataclasses.asdict(ProxyBenchParams())
    text = render(
        {
            "config": config,
            "modes": modes,
            "added": {**added(modes["direct"], modes["proxy"])},
            "router_profile": profile,
        }
    )
    assert "router CPU by part (py-spy, 27 samples of the proxy phases" in text
    assert "scheduling (decision, Redis client)  ~222 us per request" in text  # 6/27 of 1000 us
