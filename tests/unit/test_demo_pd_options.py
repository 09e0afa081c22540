"""`flexlb demo --pd`: the disaggregated fleet it means, and a report that keeps the oracle's TTFT bound for it."""

from __future__ import annotations

import pytest

from flexlb.cli import build_parser
from flexlb.demo.cli import params_from
from flexlb.demo.params import DemoParams, Fleet, build_workload, describe
from flexlb.demo.report import render_table
from flexlb.demo.run import oracle


def parse(*argv: str) -> DemoParams:
    return params_from(build_parser().parse_args(["demo", *argv]))


def test_pd_is_four_prefill_and_two_decode_workers_and_not_a_fused_fleet() -> None:
    assert parse("--pd").fleet == Fleet(4, 2) and parse("--pd").fleet.disaggregated
    assert parse("--pd", "--decode-workers", "3").fleet == Fleet(4, 3)
    with pytest.raises(ValueError, match="--pd"):
        parse("--pd", "--workers", "4")


def test_a_pd_report_shows_the_oracle_ttft_and_says_the_decode_waits_for_the_prefill() -> None:
    params = parse("--pd", "--requests", "16")
    bound = oracle(params, build_workload(params))
    assert bound["ttft_comparable"] is True
    summary = {
        "requests": 16, "errors": 0, "request_throughput": 10.0,
        "ttft_ms": {"mean": 90.0, "p50": 80.0, "p99": 200.0}, "e2e_ms": {"mean": 300.0, "p99": 600.0},
    }  # fmt: skip
    fleet = {"hit_ratio": 0.3, "busiest_share": 0.3}
    row = {"strategy": "RANDOM", "interrupted": False, "summary": summary, "fleet": fleet}
    text = render_table({"config": describe(params), "strategies": [row], "oracle": bound})
    oracle_row = next(line for line in text.splitlines() if line.startswith("oracle"))
    assert oracle_row.split()[5] == f"{bound['ttft_ms']['mean']:.1f}"  # the TTFT bound is shown, not "-"
    assert "each decode worker starts after its prefill's KV arrived" in text
    assert "without waiting" not in text
