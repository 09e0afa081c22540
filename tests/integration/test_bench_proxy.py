"""`flexlb bench proxy` with tiny settings: it runs, answers every request, and writes its JSON (shape only: this is
not a test of speed)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson


def test_bench_proxy_smoke(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    command = [sys.executable, "-m", "flexlb.cli", "bench", "proxy", "--requests", "12", "--rounds", "2"]
    command += ["--concurrency", "2", "--prompt-tokens", "32", "--max-tokens", "3", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "added by the proxy" in proc.stdout

    result = orjson.loads(out.read_bytes())
    assert result["benchmark"] == "proxy" and not result["interrupted"]
    assert result["config"]["requests"] == 12 and result["config"]["rounds"] == 2
    assert [(p["round"], p["mode"]) for p in result["phases"]] == [
        (1, "direct"),
        (1, "proxy"),
        (2, "direct"),
        (2, "proxy"),
    ]
    assert result["phases"][0]["target"] != result["phases"][1]["target"]
    for phase in result["phases"]:
        assert phase["summary"]["ok"] == 12 and phase["summary"]["errors"] == 0
        assert len(phase["latencies"]["ttft_ms"]) == len(phase["latencies"]["e2e_ms"]) == 12
    for mode in ("direct", "proxy"):
        m = result["modes"][mode]
        assert (m["phases"], m["requests"], m["errors"]) == (2, 24, 0)
        assert m["request_throughput"] > 0 and m["ttft_ms"]["count"] == m["e2e_ms"]["count"] == 24
    added = result["added"]
    expected = {f"{m}_{q}_ms" for m in ("ttft", "e2e") for q in ("p50", "p99", "mean")} | {"throughput_ratio"}
    assert set(added) == expected and all(isinstance(v, float) and math.isfinite(v) for v in added.values())
    names = [p["name"] for p in result["processes"]]
    assert names == ["redis", "bench-proxy-pdfusion0", "bench-proxy-router0"]
    assert all(p["returncode"] is not None for p in result["processes"])  # all stopped
