"""`flexlb bench control` end to end, tiny: real redis-server, a real `flexlb sim-worker --count 4` process and a
real `flexlb master`. Checks the JSON's shape and that changes were seen, never the figures (wall-clock bound)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson


def test_bench_control_runs_tiny_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    command = [
        sys.executable, "-m", "flexlb.cli", "bench", "control", "--workers", "4", "--duration", "1.5",
        "--settle", "0.2", "--busy-fraction", "1", "--rate", "20", "--request-tokens", "4", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert "freshness p50 / p99" in done.stdout

    result = orjson.loads(out.read_bytes())
    assert result["benchmark"] == "control"
    assert result["parameters"]["workers"] == 4 and result["parameters"]["busy_workers"] == 4
    idle, busy = result["results"]["idle"], result["results"]["busy"]
    for phase in (idle, busy):
        assert {
            "wall_s",
            "master_cpu_s",
            "master_cores",
            "sim_cores",
            "redis_cores",
            "status_polls_per_s",
        } <= phase.keys()
        assert phase["master_cpu_s"] >= 0 and phase["wall_s"] > 0
    assert {"p50", "p99", "count", "max"} <= busy["freshness_ms"].keys()
    assert busy["requests"] > 0 and busy["request_errors"] == 0
    assert busy["changes_seen"] > 0  # the master did write the workers' changes to Redis
    assert busy["freshness_ms"]["count"] == busy["changes_seen"]
    assert [t["name"] for t in result["targets"]] == ["master cores, 4 idle workers"]
