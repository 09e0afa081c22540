"""Plain-text tables of `flexlb bench run` results: one run, its workers, and several runs side by side."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from flexlb.bench.workloads import WORKLOADS


def num(x: float | None, digits: int = 1) -> str:
    """A number for a table: '-' when missing, no decimals from 1000 up."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: Sequence[Sequence[str]], header: Sequence[str], right: Sequence[bool] | None = None) -> list[str]:
    """Aligned columns with a dashed rule under the header; ``right`` aligns those columns to the right."""
    right = right or [False] * len(header)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def workload_text(config: dict[str, Any]) -> str:
    """The workload's name and the parameters that differ from their defaults (a trace by its file name)."""
    name, params = config["workload"], config.get("workload_params") or {}
    workload = WORKLOADS.get(name)
    if workload is None:
        return name
    defaults = {f.name: f.default for f in dataclasses.fields(workload.params_type)}
    changed = [
        f"{key}={PurePath(value).name if key == 'trace' else value}"
        for key, value in params.items()
        if key in defaults and defaults[key] != value
    ]
    return f"{name} ({', '.join(changed)})" if changed else name


def _three(summary: dict[str, Any]) -> str:
    return f"{num(summary.get('mean'))} / {num(summary.get('p50'))} / {num(summary.get('p99'))} ms"


def _cached(s: dict[str, Any]) -> str:
    if s.get("cached_token_ratio") is None:
        return "- (the endpoint reported no usage)"
    return (
        f"{pct(s['cached_token_ratio'])} ({s['cached_tokens']:,} of {s['prompt_tokens']:,} prompt tokens, "
        f"usage of {s['usage_reported']} requests)"
    )


def render_run(result: dict[str, Any]) -> str:
    """The report printed at the end of `flexlb bench run`."""
    c, s = result["config"], result["summary"]
    lines = [
        f"flexlb bench run {result['label']!r}: {workload_text(c)} -> {c['target']} ({c['arrivals']['description']})"
        + (" [interrupted]" if result.get("interrupted") else ""),
        "",
    ]
    rows = [
        ["requests", f"{s['requests']} (ok {s['ok']}, errors {s['errors']})"],
        ["elapsed", f"{num(s['elapsed_s'], 2)} s"],
        ["throughput", f"{num(s['request_throughput'], 2)} req/s, {num(s['output_throughput'])} output tok/s"],
        ["TTFT mean / p50 / p99", _three(s["ttft_ms"])],
        ["E2E latency mean / p50 / p99", _three(s["e2e_ms"])],
        ["time per output token mean / p50 / p99", _three(s["tpot_ms"])],
        ["cached-token ratio", _cached(s)],
    ]
    lines += table(rows, ["metric", "value"])
    if result.get("workers"):
        lines += ["", *render_workers(result["workers"])]
    if s["error_reasons"]:
        lines += ["", "errors:"]
        lines += [f"  {count:>6}  {reason}" for reason, count in list(s["error_reasons"].items())[:10]]
    return "\n".join(lines) + "\n"


def render_workers(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The workers' own counters over the run (deltas)."""
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["url"], f"unreadable: {r['error']}", "", "", "", "", ""])
            continue
        out.append(
            [
                r["url"],
                num(r.get("requests"), 0),
                pct(r.get("share")),
                num(r.get("prompt_tokens"), 0),
                num(r.get("cached_tokens"), 0),
                pct(r.get("hit_ratio")),
                num(r.get("mean_queue_ms")),
            ]
        )
    header = ["worker", "requests", "share", "prompt tokens", "prefix-hit tokens", "hit ratio", "mean queue ms"]
    return table(out, header, [False, True, True, True, True, True, True])


def worker_balance(result: dict[str, Any]) -> tuple[float | None, float | None]:
    """Over the readable workers: their combined hit ratio and the busiest one's share of requests."""
    rows = [r for r in result.get("workers") or [] if "error" not in r]
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    cached = sum(r.get("cached_tokens") or 0 for r in rows)
    shares = [r["share"] for r in rows if r.get("share") is not None]
    return (cached / prompt if prompt else None), (max(shares) if shares else None)


def render_compare(results: Sequence[dict[str, Any]]) -> str:
    """One row per run, named by its label; the runs' configurations below."""
    rows = []
    for r in results:
        s = r["summary"]
        hit, busiest = worker_balance(r)
        ttft, e2e = s["ttft_ms"], s["e2e_ms"]
        rows.append(
            [
                r["label"],
                str(s["requests"]),
                str(s["errors"]),
                num(s["request_throughput"], 2),
                num(s["output_throughput"]),
                num(ttft.get("mean")),
                num(ttft.get("p50")),
                num(ttft.get("p99")),
                num(e2e.get("mean")),
                num(e2e.get("p50")),
                num(e2e.get("p99")),
                pct(s.get("cached_token_ratio")),
                pct(hit),
                pct(busiest),
            ]
        )
    header = [
        "run", "requests", "errors", "req/s", "out tok/s", "TTFT mean", "TTFT p50", "TTFT p99",
        "E2E mean", "E2E p50", "E2E p99", "cached", "worker hit", "busiest worker",
    ]  # fmt: skip
    lines = table(rows, header, [False] + [True] * (len(header) - 1))
    lines += [
        "",
        "times in ms; cached: usage cached tokens / prompt tokens; worker hit and busiest worker (its share "
        "of the requests): from --worker-metrics",
        "",
    ]
    for r in results:
        c = r["config"]
        lines.append(
            f"{r['label']}: {workload_text(c)}, {c['requests_planned']} requests, seed {c['seed']}, "
            f"{c['arrivals']['description']}, target {c['target']}" + (" [interrupted]" if r.get("interrupted") else "")
        )
    return "\n".join(lines) + "\n"
