"""`flexlb bench run` / `compare` options, result files, tables and plots (no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flexlb.bench.client import RequestRecord
from flexlb.bench.plot import PlotUnavailable, write_plot
from flexlb.bench.report import write_json
from flexlb.bench.result import ResultError, build_result, load_result
from flexlb.bench.run import RunOptions, RunOutcome
from flexlb.bench.run_cli import arrivals_from, workload_params
from flexlb.bench.tables import render_compare, render_run
from flexlb.bench.workloads import WORKLOADS, Arrivals, WorkloadError
from flexlb.bench.workloads.hot_prefix import HotPrefixParams
from flexlb.bench.workloads.mooncake import MooncakeParams
from flexlb.bench.workloads.shared_prefix import SharedPrefixParams
from flexlb.cli import build_parser, main


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["bench", "run", "--target", "http://127.0.0.1:9", *argv])


def test_workload_options_become_parameters() -> None:
    args = parse("--workload", "shared-prefix", "--gsp-num-groups", "3", "--gsp-output-len", "5")
    assert workload_params(WORKLOADS["shared-prefix"], args) == SharedPrefixParams(num_groups=3, output_len=5)
    args = parse("--workload", "mooncake", "--trace", "t.jsonl", "--time-scale", "0.1", "--limit", "9")
    assert workload_params(WORKLOADS["mooncake"], args) == MooncakeParams(trace="t.jsonl", time_scale=0.1, limit=9)
    args = parse("--workload", "hot-prefix", "--hot-fraction", "0.5")
    assert workload_params(WORKLOADS["hot-prefix"], args) == HotPrefixParams(fraction=0.5)


def test_an_option_of_another_workload_is_refused() -> None:
    args = parse("--workload", "shared-prefix", "--mt-turns", "3")
    with pytest.raises(WorkloadError, match="--mt-turns belongs to --workload multi-turn"):
        workload_params(WORKLOADS["shared-prefix"], args)


def test_arrivals_from_options() -> None:
    sp, mc = WORKLOADS["shared-prefix"], WORKLOADS["mooncake"]
    assert arrivals_from(parse("--workload", "shared-prefix", "--rate", "5"), sp) == Arrivals("poisson", rate=5.0)
    fixed = parse("--workload", "shared-prefix", "--rate", "5", "--arrival", "fixed")
    assert arrivals_from(fixed, sp) == Arrivals("fixed", rate=5.0)
    closed = parse("--workload", "mooncake", "--concurrency", "2")
    assert arrivals_from(closed, mc) == Arrivals("closed", concurrency=2)
    assert arrivals_from(parse("--workload", "mooncake"), mc) == Arrivals("trace")
    assert arrivals_from(parse("--workload", "shared-prefix"), sp) == Arrivals("closed", concurrency=4)
    with pytest.raises(WorkloadError, match="--arrival fixed needs --rate"):
        arrivals_from(parse("--workload", "shared-prefix", "--arrival", "fixed"), sp)
    with pytest.raises(SystemExit):
        parse("--workload", "shared-prefix", "--rate", "5", "--concurrency", "2")


def test_bench_schedule_still_parses() -> None:
    args = build_parser().parse_args(["bench", "schedule", "--duration", "2", "--workers", "4"])
    assert (args.bench_cmd, args.duration, args.workers) == ("schedule", 2.0, 4)


def test_bad_workload_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "run", "--target", "127.0.0.1:9", "--workload", "mooncake"])
    assert code == 2
    assert "--trace PATH is required" in capsys.readouterr().err


def make_result(label: str, ttft: list[float], workers: list[dict] | None = None) -> dict:
    records = [
        RequestRecord(i, "g0", "completions", 4, None, 0.1 * i, t, t + 100, 4, 100, 64) for i, t in enumerate(ttft)
    ]
    records.append(RequestRecord(len(ttft), "g0", "completions", 4, None, 0.0, None, 1.0, 0, error="HTTP 503: busy"))
    outcome = RunOutcome(records, elapsed_s=2.0, interrupted=False, workers=workers)
    options = RunOptions(target="http://127.0.0.1:9", arrivals=Arrivals("closed", concurrency=2))
    return build_result(
        label=label,
        workload="shared-prefix",
        workload_params=SharedPrefixParams(),
        options=options,
        seed=1,
        planned=len(records),
        num_requests=None,
        outcome=outcome,
    )


WORKERS = [
    {"url": "http://a", "source": "get_server_info", "requests": 3, "prompt_tokens": 300, "cached_tokens": 150,
     "queue_time_ms": 3.0, "hit_ratio": 0.5, "mean_queue_ms": 1.0, "share": 0.75},
    {"url": "http://b", "source": "get_server_info", "requests": 1, "prompt_tokens": 100, "cached_tokens": 50,
     "queue_time_ms": 0.0, "hit_ratio": 0.5, "mean_queue_ms": 0.0, "share": 0.25},
    {"url": "http://c", "error": "http://c: ClientConnectorError", "share": None},
]  # fmt: skip


def test_run_table_shows_the_summary_workers_and_errors() -> None:
    text = render_run(make_result("mine", [10.0, 20.0, 30.0], WORKERS))
    assert "flexlb bench run 'mine': shared-prefix -> http://127.0.0.1:9 (closed loop, concurrency 2)" in text
    assert "4 (ok 3, errors 1)" in text
    assert "20.0 / 20.0 / 30.0 ms" in text  # TTFT mean / p50 / p99
    assert "64.0% (192 of 300 prompt tokens, usage of 3 requests)" in text
    assert "75.0%" in text and "unreadable: http://c: ClientConnectorError" in text
    assert "1  HTTP 503: busy" in text


def test_result_file_round_trip_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_json(make_result("router-a", [10.0, 20.0], WORKERS), tmp_path / "a.json")
    b = write_json(make_result("router-b", [50.0, 70.0]), tmp_path / "b.json")
    assert load_result(a)["label"] == "router-a"
    text = render_compare([load_result(a), load_result(b)])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "requests", "errors"]
    row_a = next(line for line in lines if line.startswith("router-a "))
    assert "50.0%" in row_a and "75.0%" in row_a  # worker hit ratio, busiest worker's share
    assert any(line.startswith("router-b ") for line in lines)
    assert main(["bench", "compare", str(a), str(b), str(a)]) == 0
    out = capsys.readouterr().out
    assert "router-a (a.json)" in out and "router-b" in out


def test_compare_refuses_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "schedule"}')
    with pytest.raises(ResultError, match="not a `flexlb bench run` result"):
        load_result(other)
    assert main(["bench", "compare", str(other)]) == 2
    assert main(["bench", "compare", str(tmp_path / "missing.json")]) == 2
    assert "error" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_plot([make_result("a", [10.0, 20.0]), make_result("b", [15.0, 900.0, 1000.0])], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(PlotUnavailable, match=r"pip install 'flexlb\[plot\]'"):
        write_plot([make_result("a", [1.0])], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
