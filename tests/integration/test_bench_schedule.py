"""`flexlb bench schedule` runs end to end: its own redis-server and router, no errors, two Redis round trips per
schedule decision (the JSON is checked, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_schedule_runs_without_errors_and_reports_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "schedule.json"
    command = [sys.executable, "-m", "flexlb.cli", "bench", "schedule", "--workers", "4", "--concurrency", "8",
               "--duration", "1.5", "--warmup", "0.5", "--split-requests", "200", "--idle-baseline", "0.5",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: the 5,000/s target missed, as it is here
    results = json.loads(out.read_text())["results"]
    assert "Traceback" not in done.stderr
    # over 2 s a router that polled the benchmark's engine-less workers would have marked them down: errors
    assert results["errors"]["schedule"] == results["errors"]["release"] == 0, results["errors"]
    assert results["loop"]["decisions"] > 0
    split = results["split"]
    assert split["schedule_only"]["errors"] == split["release_only"]["errors"] == 0
    # the reservation (the prefix is looked up in the router's block mirror), and one release script; the router's
    # periodic sweep adds a little to either. The view's tail of the change stream reads in batches beside them, at
    # most once per change
    schedule_only, release_only = split["schedule_only"]["redis"], split["release_only"]["redis"]
    assert 1.0 <= schedule_only["decision_commands_per_op"] < 1.2
    assert 1.0 <= release_only["decision_commands_per_op"] < 1.2
    assert 0 < schedule_only["view_reads_per_op"] <= 1.05 and release_only["view_reads_per_op"] <= 1.05
