"""PNG charts of `flexlb bench run` results: TTFT CDF and output throughput over time, one line per run.

Needs matplotlib, an optional extra (``pip install 'flexlb[plot]'``): without it PlotUnavailable says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlb.bench.result import records_of
from flexlb.bench.stats import cdf, pick_bucket_s, throughput_series

PLOT_HINT = "plots need matplotlib: pip install 'flexlb[plot]' (or pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    pass


def write_plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the two charts of ``results`` (run result documents) to the PNG ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(PLOT_HINT) from None
    path = Path(path)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ttft_ax, tput_ax = fig.subplots(1, 2)
    longest = max((r["summary"]["elapsed_s"] or 0.0 for r in results), default=0.0)
    bucket_s = pick_bucket_s(longest)
    spread = []
    for result in results:
        records = records_of(result)
        xs, ys = cdf([r.ttft_ms for r in records if r.ok and r.ttft_ms is not None])
        if xs:
            ttft_ax.step(xs, ys, where="post", label=result["label"])
            spread.append(xs[-1] / max(xs[0], 1e-9))
        times, rates = throughput_series(records, bucket_s)
        tput_ax.plot(times, rates, drawstyle="steps-post", label=result["label"])
    if spread and max(spread) > 50:
        ttft_ax.set_xscale("log")
    ttft_ax.set(title="TTFT CDF", xlabel="time to first token (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
    tput_ax.set(
        title=f"output throughput ({bucket_s:g} s buckets)", xlabel="seconds since start", ylabel="output tokens/s"
    )
    for ax in (ttft_ax, tput_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
