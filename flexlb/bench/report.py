"""Result helpers of the benchmarks: latency summaries, targets, the plain-text table and the JSON file."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int]:
    """count, mean, p50, p90, p99, max of latencies in ms (NaN fields when there are none)."""
    ordered = sorted(values_ms)
    mean = sum(ordered) / len(ordered) if ordered else math.nan
    return {
        "count": len(ordered),
        "mean": mean,
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
    }


@dataclass(frozen=True, slots=True)
class Target:
    """A goal the benchmark checks: ``value`` must be >= (``at_least``) or <= ``goal``."""

    name: str
    goal: float
    at_least: bool
    value: float | None  # None: not measured in this run

    @property
    def passed(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.goal if self.at_least else self.value <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "goal": f"{'>=' if self.at_least else '<='} {self.goal:g}",
            "value": self.value,
            "result": {True: "PASS", False: "MISS", None: "n/a"}[self.passed],
        }


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if float(x).is_integer() and abs(x) >= 100:
        return f"{int(x)}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _ms(summary: dict[str, Any], *names: str) -> str:
    return " / ".join(_num(summary.get(n)) for n in names) + " ms"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def _top_commands(per_command: dict[str, dict[str, Any]], limit: int = 6) -> str:
    items = sorted(per_command.items(), key=lambda kv: -kv[1]["per_op"])[:limit]
    return ", ".join(f"{name} {data['per_op']:.2f}" for name, data in items) or "-"


def _with_background(redis: dict[str, Any]) -> str:
    own = redis.get("round_trips_per_op_excl_background")
    text = _num(redis["round_trips_per_op"], 3)
    return text if own is None else f"{text} ({_num(own, 3)} excl. background)"


def render_schedule_table(result: dict[str, Any]) -> str:
    """The plain-text report of ``flexlb bench schedule`` (everything in it is also in the JSON)."""
    p, env, res = result["parameters"], result["environment"], result["results"]
    loop, redis = res["loop"], res["loop"]["redis"]
    half = p["workers"] // 2
    lines = [
        f"flexlb bench schedule: 1 router process, {p['workers']} workers ({half} PREFILL + {p['workers'] - half} "
        f"DECODE), {p['concurrency']} concurrent clients in {p['client_processes']} client process(es)",
        f"measured {p['duration_s']:g} s after {p['warmup_s']:g} s warm-up; redis {env['redis_version']} "
        f"({env['redis_mode']}); {env['cpu_count']} CPUs; Python {env['python_version']}",
        "",
    ]
    rows = [
        ["decisions/s (schedule then release, closed loop)", _num(loop["decisions_per_s"], 1)],
        ["decisions in the measured window", str(loop["decisions"])],
        ["schedule latency p50 / p99 / mean", _ms(loop["schedule_latency_ms"], "p50", "p99", "mean")],
        ["release latency p50 / p99", _ms(loop["release_latency_ms"], "p50", "p99")],
        ["errors schedule / release (whole run)", f"{res['errors']['schedule']} / {res['errors']['release']}"],
        ["redis round trips / decision (incl. release)", _num(redis["round_trips_per_decision"])],
        ["redis client commands / decision", _num(redis["client_commands_per_decision"])],
        ["  of which", _top_commands(redis["client_commands"])],
        ["redis commands / decision incl. inside scripts", _num(redis["all_commands_per_decision"], 1)],
        ["redis server time / decision", f"{_num(redis['server_usec_per_decision'], 1)} us"],
    ]
    split = res.get("split")
    if split:
        sched, rel = split["schedule_only"], split["release_only"]
        rows += [
            [
                f"schedule-only phase ({sched['count']} requests)",
                f"{_num(sched['per_s'], 0)}/s, p50 {_num(sched['latency_ms']['p50'])} ms",
            ],
            ["  redis round trips / schedule", _with_background(sched["redis"])],
            ["  redis client commands / schedule", _top_commands(sched["redis"]["client_commands"])],
            [
                f"release-only phase ({rel['count']} requests)",
                f"{_num(rel['per_s'], 0)}/s, p50 {_num(rel['latency_ms']['p50'])} ms",
            ],
            ["  redis round trips / release", _with_background(rel["redis"])],
            ["  redis client commands / release", _top_commands(rel["redis"]["client_commands"])],
        ]
    lines += _table(rows, ["metric", "value"])
    lines.append("")
    target_rows = [[t["name"], t["goal"], _num(t["value"]), t["result"]] for t in result["targets"]]
    lines += _table(target_rows, ["target", "goal", "measured", "result"])
    if split and (split["schedule_only"]["errors"] or split["release_only"]["errors"]):
        lines += [
            "",
            f"errors in the phases: schedule {split['schedule_only']['errors']}, "
            f"release {split['release_only']['errors']}",
        ]
    if res["errors"].get("first_error"):
        lines += ["", f"first error: {res['errors']['first_error']}"]
    lines += ["", *(f"note: {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def default_out_path(kind: str, folder: str = "bench-results") -> Path:
    return Path(folder) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` (NaN becomes null: orjson writes it so, and JSON has no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return path
