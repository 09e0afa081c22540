"""`flexlb bench proxy`'s pure part (flexlb/bench/proxy_overhead.py; it runs on the demo's stack): the phase plan,
the requests of a phase, combining phases and what the proxy adds, the table and the options."""

from __future__ import annotations

import dataclasses

import pytest

from flexlb.bench.proxy_overhead import ProxyBenchParams, added, combine, phase_plan, phase_specs, render
from flexlb.blocks import tokenize
from flexlb.cli import build_parser


def test_phases_alternate_direct_and_proxy() -> None:
    assert phase_plan(2) == [(1, "direct"), (1, "proxy"), (2, "direct"), (2, "proxy")]


def test_each_phase_sends_fresh_prompts_of_the_same_shape() -> None:
    params = ProxyBenchParams(requests=5, prompt_tokens=40, max_tokens=3)
    first, second = phase_specs(params, 0), phase_specs(params, 1)
    assert len(first) == 5 and all(len(tokenize(s.rendered())) == 40 and s.max_tokens == 3 for s in first)
    assert not {s.prompt for s in first} & {s.prompt for s in second}  # no phase finds another's prompts cached
    assert phase_specs(params, 0) == first  # deterministic per seed


def _phase(mode: str, ttft: list[float], e2e: list[float], elapsed: float, errors: int = 0) -> dict:
    summary = {"requests": len(ttft) + errors, "ok": len(ttft), "errors": errors, "elapsed_s": elapsed}
    return {"mode": mode, "summary": summary, "latencies": {"ttft_ms": ttft, "e2e_ms": e2e}}


def test_combine_and_added() -> None:
    phases = [
        _phase("direct", [1.0, 3.0], [10.0, 12.0], 1.0),
        _phase("proxy", [2.0, 6.0], [11.0, 15.0], 2.0, errors=1),
        _phase("direct", [2.0, 2.0], [10.0, 10.0], 1.0),
        _phase("proxy", [4.0, 4.0], [12.0, 12.0], 2.0),
    ]
    direct, proxy = combine(phases, "direct"), combine(phases, "proxy")
    assert (direct["phases"], direct["requests"], direct["errors"], direct["request_throughput"]) == (2, 4, 0, 2.0)
    assert (proxy["requests"], proxy["errors"], proxy["request_throughput"]) == (5, 1, 1.0)
    assert direct["ttft_ms"]["p50"] == 2.0 and proxy["ttft_ms"]["p50"] == 4.0  # nearest rank over all 4 requests
    extra = added(direct, proxy)
    assert extra["ttft_p50_ms"] == 2.0 and extra["ttft_p99_ms"] == 3.0 and extra["e2e_p50_ms"] == 2.0
    assert extra["throughput_ratio"] == 0.5
    none = combine([], "direct")
    assert none["request_throughput"] is None and added(none, none)["ttft_p50_ms"] is None


def test_render_shows_both_modes_and_the_difference() -> None:
    phases = [_phase("direct", [1.0], [10.0], 1.0), _phase("proxy", [3.0], [14.0], 2.0)]
    modes = {m: combine(phases, m) for m in ("direct", "proxy")}
    config = dataclasses.asdict(ProxyBenchParams())
    result = {"config": config, "modes": modes, "added": added(modes["direct"], modes["proxy"])}
    lines = render(result).splitlines()
    assert lines[2].split() == ["direct", "1", "0", "1.0", "1.00", "1.00", "10.00", "10.00"]
    assert lines[3].split() == ["proxy", "1", "0", "0.5", "3.00", "3.00", "14.00", "14.00"]
    assert lines[4].split() == ["added", "by", "the", "proxy", "x0.50", "2.00", "2.00", "4.00", "4.00"]


def test_options_and_validation() -> None:
    args = build_parser().parse_args(["bench", "proxy", "--requests", "10", "--rounds", "1", "--time-scale", "0.5"])
    assert (args.bench_cmd, args.requests, args.rounds, args.time_scale, args.concurrency) == ("proxy", 10, 1, 0.5, 8)
    with pytest.raises(ValueError, match="requests"):
        ProxyBenchParams(requests=0)
    with pytest.raises(ValueError, match="time_scale"):
        ProxyBenchParams(time_scale=0)
