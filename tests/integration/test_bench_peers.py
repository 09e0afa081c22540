"""`flexlb bench peers` with flexlb alone (the peers made unfindable): it says how to install them, runs flexlb's
repeats on fresh real processes, prints the table and writes its JSON (shape and counts only: not a test of speed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")


def test_bench_peers_with_flexlb_only(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    redis_dir = str(Path(shutil.which("redis-server") or "").parent)
    # Only Python and redis-server on PATH, and an empty venv: smg and vllm-router cannot be found.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), redis_dir])}
    env["FLEXLB_PEERS_VENV"] = str(tmp_path / "no-venv")
    command = [sys.executable, "-m", "flexlb.cli", "bench", "peers", "--workload", "hot-prefix", "--rate", "40"]
    command += ["--hot-requests", "12", "--hot-prefixes", "2", "--hot-prefix-len", "128", "--hot-suffix-len", "8"]
    command += ["--hot-output-len", "3", "--repeats", "2", "--workers", "2", "--out", str(out)]
    command += ["--flexlb-config", '{"ttftTieRatio": 0.25}']
    proc = subprocess.run(command, capture_output=True, text=True, timeout=55, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for peer in ("smg", "vllm-router"):
        assert f"skipping: {peer} is not installed" in proc.stdout
        assert f"pip install {peer}" in proc.stdout
    assert "flexlb x1" in proc.stdout and "worker hit" in proc.stdout

    result = orjson.loads(out.read_bytes())
    assert result["benchmark"] == "peers" and not result["interrupted"]
    assert result["peers"] == [] and len(result["skipped"]) == 2
    assert result["config"]["flexlb_config"] == {"ttftTieRatio": 0.25}
    assert [(p["repeat"], p["label"]) for p in result["plan"]] == [(1, "flexlb x1"), (2, "flexlb x1")]
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert (run["requests"], run["ok"], run["refused"], run["errors"]) == (12, 12, 0, 0)
        assert run["ttft_ms"]["count"] == 12 and run["ttft_ms"]["mean"] > 0
        assert len(run["workers"]) == 2 and sum(w["requests"] for w in run["workers"]) == 12
        assert 0 < run["hit_ratio"] < 1  # each hot prefix computed once, then hit
        assert run["router_cpu_s"] > 0 and run["control_cpu_s"] > 0
        names = [p["name"] for p in run["processes"]]
        assert names[0] == "redis" and sum("router" in n for n in names) == 1
        assert all(p["returncode"] is not None for p in run["processes"])  # all stopped
    # Fresh processes per run (so caches start cold): per run a redis-server, 2 workers, a master and a router.
    ports = {p["command"][p["command"].index("--port") + 1] for r in result["runs"] for p in r["processes"]}
    assert len(ports) == 2 * 5
    combined = result["combined"]["flexlb x1"]
    assert combined["runs"] == 2 and combined["ttft_ms"]["count"] == 24
    assert result["targets"] == []  # nothing to compare with
