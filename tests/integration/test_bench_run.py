"""`flexlb bench run` and `bench compare` as a user runs them: subprocesses against real simulated workers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import orjson

TRACE = [
    {"timestamp": 0, "input_length": 1100, "output_length": 40, "hash_ids": [0, 1, 2]},
    {"timestamp": 200, "input_length": 900, "output_length": 30, "hash_ids": [0, 1]},
    {"timestamp": 500, "input_length": 1400, "output_length": 20, "hash_ids": [0, 1, 3]},
    {"timestamp": 900, "input_length": 600, "output_length": 25, "hash_ids": [4, 5]},
    {"timestamp": 1000, "input_length": 1200, "output_length": 30, "hash_ids": [0, 1, 2]},
]


def flexlb(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexlb.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def bench_run(cwd: Path, target: str, label: str, *args: str) -> dict:
    out = cwd / f"{label}.json"
    proc = flexlb("bench", "run", "--target", target, "--label", label, "--out", str(out), *args, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"flexlb bench run {label!r}" in proc.stdout and "TTFT mean / p50 / p99" in proc.stdout
    return orjson.loads(out.read_bytes())


def check_ok(result: dict, count: int) -> dict:
    s = result["summary"]
    assert (s["requests"], s["ok"], s["errors"]) == (count, count, 0), s["error_reasons"]
    assert len(result["requests"]) == count
    assert all(r["ttft_ms"] > 0 and r["e2e_ms"] >= r["ttft_ms"] and r["output_tokens"] > 0 for r in result["requests"])
    assert s["ttft_ms"]["p50"] > 0 and s["output_throughput"] > 0
    return s


def test_bench_run_and_compare_against_simulated_workers(start_sim_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = start_sim_worker(), start_sim_worker()
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(b"\n".join(orjson.dumps(row) for row in TRACE) + b"\n")

    # Shared prefix, 2 groups x 4 with 2 clients: a group's third request starts after one of its first two ended,
    # so the group's system prompt is in the cache by then.
    shared = bench_run(
        tmp_path, a.url, "shared", "--workload", "shared-prefix", "--concurrency", "2",
        "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4", "--gsp-system-prompt-len", "256",
        "--gsp-question-len", "16", "--gsp-output-len", "4", "--worker-metrics", a.url, "--plot", "shared.png",
    )  # fmt: skip
    s = check_ok(shared, 8)
    assert s["cached_token_ratio"] > 0 and s["usage_reported"] == 8
    assert s["prompt_tokens"] == 8 * (256 + 16)
    (worker,) = shared["workers"]
    assert worker["source"] == "get_server_info" and worker["requests"] == 8 and worker["share"] == 1.0
    assert worker["prompt_tokens"] == s["prompt_tokens"] and worker["cached_tokens"] == s["cached_tokens"]
    # The PNG needs the optional matplotlib; without it the run still succeeds and writes its JSON.
    assert (tmp_path / "shared.png").exists() == (importlib.util.find_spec("matplotlib") is not None)

    # Multi-turn chat, Poisson arrivals: turn 2 is sent after turn 1 ended, and hits its prefix.
    chat = bench_run(
        tmp_path, a.url, "chat", "--workload", "multi-turn", "--rate", "50", "--mt-sessions", "2",
        "--mt-turns", "2", "--mt-first-len", "100", "--mt-question-len", "10", "--mt-output-len", "5", "--seed", "2",
    )  # fmt: skip
    s = check_ok(chat, 4)
    assert s["cached_token_ratio"] > 0
    assert chat["config"]["arrivals"]["kind"] == "poisson"

    # Trace replay on the other worker, one request at a time: requests 2, 3 and 5 reuse request 1's blocks.
    replay = bench_run(
        tmp_path, b.url, "trace", "--workload", "mooncake", "--trace", str(trace), "--length-scale", "0.125",
        "--concurrency", "1", "--worker-metrics", b.url,
    )  # fmt: skip
    s = check_ok(replay, 5)
    assert [r["prompt_tokens"] for r in replay["requests"]] == [round(r["input_length"] / 8) for r in TRACE]
    assert [r["cached_tokens"] for r in replay["requests"]] == [0, 64, 128, 0, 128]
    assert replay["workers"][0]["cached_tokens"] == 320

    proc = flexlb("bench", "compare", "shared.json", "chat.json", "trace.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"shared", "chat", "trace"} <= rows
