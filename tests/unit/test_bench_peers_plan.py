"""`flexlb bench peers`' pure parts: peer discovery and skip lines, the interleaved plan, the peers' command lines and
environment, one run's row, the rows combined, the issue's targets and the table."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flexlb.bench import peers as pp
from flexlb.bench.client import RequestRecord


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_peer_on_path_then_in_the_venv_else_skipped_with_how_to_install(tmp_path: Path) -> None:
    smg = pp.PEERS["smg"]
    on_path = _executable(tmp_path / "bin" / "smg")
    assert pp.find_peer(smg, None, {"PATH": str(tmp_path / "bin")}).binary == str(on_path)

    in_venv = _executable(tmp_path / "venv" / "bin" / "smg")
    env = {"PATH": str(tmp_path / "empty"), pp.VENV_VARIABLE: str(tmp_path / "venv")}
    assert pp.find_peer(smg, None, env).binary == str(in_venv)

    missing = pp.find_peer(pp.PEERS["vllm-router"], None, env)
    assert missing.binary is None
    assert "vllm-router is not installed" in missing.reason
    assert "pip install vllm-router" in missing.reason and "--vllm-router-bin" in missing.reason
    assert pp.VENV_VARIABLE in missing.reason


def test_an_explicit_binary_wins_and_a_wrong_one_is_an_error(tmp_path: Path) -> None:
    mine = _executable(tmp_path / "elsewhere" / "my-smg")
    _executable(tmp_path / "bin" / "smg")
    found = pp.find_peer(pp.PEERS["smg"], str(mine), {"PATH": str(tmp_path / "bin")})
    assert found.binary == str(mine)
    with pytest.raises(pp.PeerError, match=r"--smg-bin .*no-such: no such executable"):
        pp.find_peer(pp.PEERS["smg"], str(tmp_path / "no-such"), {"PATH": ""})


def test_parse_peers_and_counts() -> None:
    assert [p.name for p in pp.parse_peers("vllm-router,smg,smg")] == ["vllm-router", "smg"]
    assert pp.parse_peers("none") == []
    with pytest.raises(pp.PeerError, match="--peers 'sgl'"):
        pp.parse_peers("sgl")
    assert pp.parse_counts("--routers", "4,1,4") == (4, 1)
    for bad in ("0", "one", ""):
        with pytest.raises(pp.PeerError, match="--routers"):
            pp.parse_counts("--routers", bad)


def test_plan_interleaves_every_router_once_per_repeat() -> None:
    peers = [pp.PEERS["smg"], pp.PEERS["vllm-router"]]
    targets = pp.plan_targets((1, 4), peers, (1,))
    assert [t.label for t in targets] == ["flexlb x1", "smg x1", "vllm-router x1", "flexlb x4"]
    order = [(r, t.label) for r, t in pp.run_order(targets, 2)]
    assert order == [
        (1, "flexlb x1"), (1, "smg x1"), (1, "vllm-router x1"), (1, "flexlb x4"),
        (2, "flexlb x1"), (2, "smg x1"), (2, "vllm-router x1"), (2, "flexlb x4"),
    ]  # fmt: skip
    assert [t.label for t in pp.plan_targets((1,), [], (1, 4))] == ["flexlb x1"]


def test_peer_commands_bind_loopback_and_the_environment_blocks_downloads() -> None:
    urls = ["http://127.0.0.1:9000", "http://127.0.0.1:9002"]
    smg = pp.PEERS["smg"].command("/v/bin/smg", 30000, 30001, urls, "cache_aware")
    assert smg[:2] == ["/v/bin/smg", "launch"]
    vllm = pp.PEERS["vllm-router"].command("/v/bin/vllm-router", 30002, 30003, urls, "cache_aware")
    for command, port, metrics in ((smg, "30000", "30001"), (vllm, "30002", "30003")):
        assert command[command.index("--host") + 1] == "127.0.0.1"
        assert command[command.index("--prometheus-host") + 1] == "127.0.0.1"
        assert command[command.index("--port") + 1] == port
        assert command[command.index("--prometheus-port") + 1] == metrics
        assert command[command.index("--worker-urls") + 1 : command.index("--worker-urls") + 3] == urls
        assert command[command.index("--policy") + 1] == "cache_aware"
    env = pp.peer_environment({"PATH": "/bin", "HTTPS_PROXY": "http://proxy.example:3128"})
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_ENDPOINT"] == env["HTTPS_PROXY"] == env["HTTP_PROXY"] == pp.DEAD_ADDRESS
    assert "127.0.0.1" in env["NO_PROXY"]  # the workers stay reachable through the dead proxy


def _record(i: int, *, ttft: float | None = 10.0, status: int | None = 200, error: str | None = None) -> RequestRecord:
    return RequestRecord(i, "t", "completions", 8, ttft_ms=ttft, e2e_ms=50.0, status=status, error=error)


def _workers(*rows: tuple[int, int, int]) -> list[dict[str, object]]:
    total = sum(r[0] for r in rows)
    return [
        {"url": f"w{i}", "requests": n, "prompt_tokens": p, "cached_tokens": c, "share": n / total}
        for i, (n, p, c) in enumerate(rows)
    ]


def test_run_row_tells_refused_from_errors_and_reads_the_workers() -> None:
    records = [
        _record(0, ttft=10.0),
        _record(1, ttft=30.0),
        _record(2, ttft=None, status=503, error="HTTP 503: NO_PDFUSION_WORKER"),
        _record(3, ttft=None, status=200, error="timeout (--request-timeout)"),
        _record(4, ttft=None, status=None, error="ClientConnectorError: refused"),
    ]
    row = pp.run_row(records, 2.0, _workers((3, 1000, 600), (1, 1000, 200)), 1.5, 0.25)
    assert (row["requests"], row["ok"], row["refused"], row["errors"]) == (5, 2, 1, 2)
    assert row["refused_reasons"] == {"HTTP 503: NO_PDFUSION_WORKER": 1}
    assert row["ttft_ms"]["mean"] == 20.0 and row["ttft_values_ms"] == [10.0, 30.0]
    assert row["hit_ratio"] == pytest.approx(0.4) and row["busiest_share"] == pytest.approx(0.75)
    assert (row["router_cpu_s"], row["control_cpu_s"]) == (1.5, 0.25)


def _run(ttfts: list[float], refused: int, cached: int, cpu: float) -> dict[str, object]:
    records = [_record(i, ttft=t) for i, t in enumerate(ttfts)]
    records += [_record(100 + i, ttft=None, status=503, error="HTTP 503") for i in range(refused)]
    return pp.run_row(records, 1.0, _workers((len(records), 1000, cached)), cpu)


def test_combine_pools_the_runs() -> None:
    c = pp.combine([_run([10.0, 20.0], 0, 500, 1.0), _run([30.0, 40.0], 2, 700, 3.0)])
    assert c["runs"] == 2 and c["refused_per_run"] == [0, 2] and c["requests_per_run"] == [2, 4]
    assert c["ttft_ms"]["mean"] == 25.0 and c["ttft_mean_per_run_ms"] == [15.0, 35.0]
    assert c["hit_ratio"] == pytest.approx(0.6) and c["router_cpu_s"] == 2.0 and c["control_cpu_s"] is None


def test_targets_against_the_better_peer() -> None:
    combined = {
        "flexlb x1": pp.combine([_run([70.0], 0, 800, 1.0)]),
        "smg x1": pp.combine([_run([100.0], 0, 700, 1.0)]),
        "vllm-router x1": pp.combine([_run([90.0], 0, 750, 1.0)]),
        "flexlb x4": pp.combine([_run([50.0], 1, 600, 1.0)]),
    }
    targets = pp.check_targets(combined, ["smg", "vllm-router"])
    results = {t.name: t for t in targets}
    assert len(targets) == 5
    ttft1 = next(t for t in targets if t.name.startswith("flexlb x1: mean TTFT"))
    assert ttft1.goal == pytest.approx(0.75 * 90.0) and ttft1.value == 70.0 and ttft1.passed is False
    hit1 = next(t for t in targets if t.name.startswith("flexlb x1: workers' hit"))
    assert hit1.goal == pytest.approx(0.75) and hit1.passed is True
    # Four flexlb routers, no peer run with four replicas: compared with the peers' single replica, at 0.5x.
    ttft4 = next(t for t in targets if t.name.startswith("flexlb x4: mean TTFT"))
    assert "smg x1" in ttft4.name and ttft4.goal == pytest.approx(45.0) and ttft4.passed is False
    refused4 = next(t for t in targets if t.name.startswith("flexlb x4: requests refused"))
    assert refused4.value == 1 and refused4.passed is False
    assert not any(name.startswith("flexlb x4: workers' hit") for name in results)
    # A peer that refused requests lifts the zero-refusal target.
    combined["smg x1"] = pp.combine([_run([100.0], 3, 700, 1.0)])
    assert not any("refused" in t.name for t in pp.check_targets(combined, ["smg", "vllm-router"]))
    assert pp.check_targets({"flexlb x1": combined["flexlb x1"]}, []) == []


def test_table_has_one_row_per_router() -> None:
    combined = {
        "flexlb x1": pp.combine([_run([10.0, 20.0], 0, 500, 1.0), _run([30.0], 1, 500, 1.0)]),
        "smg x1": pp.combine([_run([12.0], 0, 400, 0.5)]),
    }
    lines = pp.render_table(combined)
    assert lines[0].split()[:2] == ["router", "runs"] and set(lines[1]) <= {"-", " "}
    assert lines[2].startswith("flexlb x1") and lines[3].startswith("smg x1")
    cells = lines[2].split()
    assert cells[2:5] == ["2", "2", "0-1"]  # runs; requests and refused per run
    assert "50.0%" in lines[2] and "40.0%" in lines[3]
    targets = pp.render_targets(pp.check_targets(combined, ["smg"]))
    assert targets[0].split()[0] == "target" and any("MISS" in line or "PASS" in line for line in targets[2:])


def test_router_hits_sum_the_routers_own_metrics_pages() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from flexlb.metrics import SchedulerMetrics
    from flexlb.proxy.metrics import ProxyMetrics

    pages = []
    for chosen, available, predicted, reported in ((900, 1000, 800, 700), (100, 100, 50, 50)):
        registry = CollectorRegistry()
        scheduler, proxy = SchedulerMetrics(registry), ProxyMetrics(registry)
        scheduler.hit_tokens.labels(role="PDFUSION", kind="chosen").inc(chosen)
        scheduler.hit_tokens.labels(role="PDFUSION", kind="available").inc(available)
        proxy.hit_reported("PDFUSION", predicted, reported)
        pages.append(generate_latest(registry).decode())
    hits = pp.router_hits(pages)
    assert hits == {"chosen": 1000, "available": 1100, "predicted": 850, "reported": 750}
    line = pp.render_router_hits("flexlb x2", hits)
    assert "holding 90.9% of the best available" in line and "reported 750 (88.2%)" in line
    combined = pp.combine([{**_run([10.0], 0, 500, 1.0), "router_hits": hits}, _run([20.0], 0, 500, 1.0)])
    assert combined["router_hits"] == hits  # a run without the pages adds nothing
    assert pp.combine([_run([10.0], 0, 500, 1.0)])["router_hits"] is None
