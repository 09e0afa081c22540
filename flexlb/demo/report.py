"""`flexlb demo`'s results: one row per strategy from its request records and its workers' counters, the oracle's
row, the progress line and the printed table (pure: strings and dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flexlb.bench.client import RequestRecord
from flexlb.bench.oracle import OracleBound
from flexlb.bench.stats import summarize
from flexlb.bench.tables import num, pct, table

PROGRESS_WIDTH = 24
LINE_WIDTH = 100

HEADER = [
    "strategy", "requests", "errors", "req/s", "TTFT mean", "TTFT p50", "TTFT p99", "E2E mean", "E2E p99",
    "worker hit", "busiest worker",
]  # fmt: skip

ORACLE_ASSUMES = [
    "a perfect fleet-wide prefix cache: every prompt block an earlier request had is cached wherever this one runs",
    "no queueing and no interference: an idle worker, a prefill step of its own, no decode step in progress",
    "no routing, HTTP or network time; the simulator's own costs (EngineConfig) times --time-scale",
    "E2E: the first token, then output_tokens - 1 decode steps of a batch of one",
]


def progress_line(step: int, steps: int, strategy: str, done: int, total: int, errors: int, elapsed_s: float) -> str:
    """``[2/4] ROUND_ROBIN  [#######.........]  120/384 done  0 errors  3.1 s``, padded to overwrite a longer one."""
    filled = PROGRESS_WIDTH * done // total if total else PROGRESS_WIDTH
    bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
    text = f"[{step}/{steps}] {strategy:<18} [{bar}] {done:>5}/{total} done  {errors} errors  {elapsed_s:5.1f} s"
    return text.ljust(LINE_WIDTH)


def status_line(step: int, steps: int, strategy: str, text: str) -> str:
    return f"[{step}/{steps}] {strategy:<18} {text}".ljust(LINE_WIDTH)


def fleet_counters(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over workers' counter deltas (``worker_deltas`` rows): their combined hit ratio and the busiest one's share
    of their requests (None when no worker could be read or none got a request)."""
    readable = [r for r in rows if "error" not in r]
    prompt = sum(r.get("prompt_tokens") or 0 for r in readable)
    cached = sum(r.get("cached_tokens") or 0 for r in readable)
    requests = [r.get("requests") or 0 for r in readable]
    total = sum(requests)
    return {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_ratio": cached / prompt if prompt else None,
        "requests": total,
        "busiest_share": max(requests) / total if total else None,
        "unreadable": len(rows) - len(readable),
    }


def strategy_result(
    strategy: str,
    service_id: str,
    records: Sequence[RequestRecord],
    elapsed_s: float,
    interrupted: bool,
    compute_workers: list[dict[str, Any]],
    decode_workers: list[dict[str, Any]],
    startup_s: float,
) -> dict[str, Any]:
    """What one strategy measured: the client's summary and the prefilling workers' own counters."""
    return {
        "strategy": strategy,
        "service_id": service_id,
        "interrupted": interrupted,
        "startup_s": startup_s,
        "summary": summarize(records, elapsed_s),
        "workers": compute_workers,
        "decode_workers": decode_workers,
        "fleet": fleet_counters(compute_workers),
        "requests": [r.to_json() for r in records],
    }


def cpu_usage(before: dict[str, float | None], after: dict[str, float | None], elapsed_s: float) -> dict[str, Any]:
    """CPU seconds each process used over the load (``name -> seconds``), their sum and the cores that makes."""
    used: dict[str, float] = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            used[name] = end - start
    total = sum(used.values())
    return {"seconds": used, "total_s": total, "cores": total / elapsed_s if elapsed_s > 0 else None}


def oracle_result(bound: OracleBound, *, ttft_comparable: bool) -> dict[str, Any]:
    return {**bound.summary(), "ttft_comparable": ttft_comparable, "assumes": ORACLE_ASSUMES}


def _row(r: dict[str, Any]) -> list[str]:
    s, fleet = r["summary"], r["fleet"]
    return [
        r["strategy"] + (" (interrupted)" if r["interrupted"] else ""),
        str(s["requests"]),
        str(s["errors"]),
        num(s["request_throughput"], 1),
        num(s["ttft_ms"].get("mean")),
        num(s["ttft_ms"].get("p50")),
        num(s["ttft_ms"].get("p99")),
        num(s["e2e_ms"].get("mean")),
        num(s["e2e_ms"].get("p99")),
        pct(fleet["hit_ratio"]),
        pct(fleet["busiest_share"]),
    ]


def _oracle_row(o: dict[str, Any]) -> list[str]:
    ttft, e2e = o["ttft_ms"], o["e2e_ms"]
    shown = o["ttft_comparable"]
    return [
        "oracle (bound)",
        str(o["requests"]),
        "-",
        "-",
        num(ttft["mean"]) if shown else "-",
        num(ttft["p50"]) if shown else "-",
        num(ttft["p99"]) if shown else "-",
        num(e2e["mean"]) if shown else "-",
        num(e2e["p99"]) if shown else "-",
        pct(o["hit_ratio"]),
        "-",
    ]


def render_table(result: dict[str, Any]) -> str:
    """The table printed at the end, with a legend."""
    rows = [_row(r) for r in result["strategies"]]
    if result.get("oracle"):
        rows.append(_oracle_row(result["oracle"]))
    lines = table(rows, HEADER, [False] + [True] * (len(HEADER) - 1))
    c = result["config"]
    fleet = c["fleet"]
    lines += [
        "",
        f"{c['workload']}, {c['requests']} requests, {c['concurrency']} in flight through {c['routers']} routers in "
        f"turn; {fleet['description']}, each {' '.join(c['worker_options'][fleet['prefilling_role']])}",
        "times in ms, from the client; worker hit: prompt tokens served from the prefilling workers' prefix caches "
        "(their own counters); busiest worker: its share of their requests",
        "oracle: a lower bound from the simulator's cost model: perfect fleet-wide cache, no queueing, no HTTP",
    ]
    if fleet["decode_workers"]:
        lines.append(
            "disaggregated fleet: each decode worker starts after its prefill's KV arrived (through the bootstrap "
            "room, plus a per-token transfer), so the client's TTFT includes where and how fast the prefill ran; the "
            "oracle's bound leaves the transfer and the decode worker's first step out"
        )
    if not result["oracle"]["ttft_comparable"]:
        lines.append(
            "disaggregated fleet: the simulated decode worker starts decoding without waiting for the prefill, so "
            "the client's TTFT and E2E do not include it (no oracle bound for them); the worker hit ratio does"
        )
    return "\n".join(lines) + "\n"
