"""`flexlb bench proxy`, the pure part: the phase plan, the requests of a phase, and what the proxy adds.

The same closed loop (same request shape, same concurrency) runs against the worker directly and through a router's
OpenAI proxy, in alternating phases (direct, proxy, direct, proxy, ...) so a drift of the machine's load affects
both modes alike. Each phase sends fresh prompts of the same length, so no phase finds another's prefix cached and
the engine does the same work in every phase. Added latency is the difference of the two modes' percentiles
(proxy p50 - direct p50, proxy p99 - direct p99), not a percentile of per-request differences: the requests of the
two modes are different requests.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flexlb.bench.report import latency_summary
from flexlb.bench.tables import num, table
from flexlb.bench.workloads import RequestSpec
from flexlb.bench.workloads.text import random_words

MODES = ("direct", "proxy")


# The simulated engine's speed options `flexlb bench proxy` passes on to `flexlb sim-worker` when set (None: the
# simulator's defaults), as (field, option).
ENGINE_OPTIONS = (
    ("prefill_tokens_per_ms", "--prefill-tokens-per-ms"),
    ("prefill_overhead_ms", "--prefill-overhead-ms"),
    ("decode_step_ms_base", "--decode-step-ms-base"),
    ("decode_step_ms_per_seq", "--decode-step-ms-per-seq"),
)


# The parts of the router's work a py-spy sample is counted in (--profile-router): the first part with a frame of
# its stack in one of these files or functions. A coroutine resumed from the event loop shows the frames it was
# awaiting in, so the time of an await is counted in the part that awaited.
PROFILE_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("master polling (this router is the master)", ("flexlb/master/", "grpc/")),
    ("release (Redis)", ("Scheduler._release ", "Scheduler.release ", "flexlb/proxy/releases.py")),
    ("tokenize + block keys", ("flexlb/blocks.py",)),
    ("scheduling (decision, Redis client)", ("flexlb/scheduler.py", "flexlb/queueing.py", "flexlb/routing/",
                                              "flexlb/state/", "redis/")),
    ("parse (JSON, validation)", ("flexlb/proxy/parse.py",)),
    ("relay (streamed chunks)", ("flexlb/proxy/relay.py",)),
    ("upstream client", ("flexlb/proxy/http1.py", "flexlb/proxy/upstream.py", "flexlb/proxy/pd.py")),
    ("proxy handler", ("flexlb/proxy/", "flexlb/http/")),
    ("aiohttp server", ("aiohttp/",)),
)  # fmt: skip
OTHER_PART = "other"
# A sample whose innermost Python frame is the event loop's run call: uvloop's own work (polling, socket reads and
# writes it does itself, callbacks in C), whichever part it serves.
LOOP_PART = "event loop (uvloop: polling, socket I/O)"
LOOP_FRAME = "run_app (aiohttp/web.py"


def profile_parts(collapsed: str) -> tuple[int, dict[str, int]]:
    """Samples and samples per part (LOOP_PART, PROFILE_PARTS, else OTHER_PART) of py-spy's raw output
    ("frame;frame;... n" per line), most first."""
    counts = dict.fromkeys([LOOP_PART] + [name for name, _ in PROFILE_PARTS] + [OTHER_PART], 0)
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        if stack.rpartition(";")[2].startswith(LOOP_FRAME):
            part = LOOP_PART
        else:
            part = next((name for name, marks in PROFILE_PARTS if any(m in stack for m in marks)), OTHER_PART)
        counts[part] += int(n)
    return total, dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1]))


@dataclass(frozen=True, slots=True)
class ProxyBenchParams:
    requests: int = 200  # per phase
    rounds: int = 3  # each round: one direct phase, then one proxy phase
    concurrency: int = 8
    prompt_tokens: int = 256
    max_tokens: int = 16
    time_scale: float = 0.1  # the worker's: its engine time is a tenth of the model's, so the proxy's share shows
    seed: int = 1
    startup_timeout_s: float = 60.0
    stream: bool = True  # False: answers sent whole (no TTFT; E2E is the latency)
    strategy: str | None = None  # the router's loadBalanceStrategy; None: its default
    max_concurrency: int = 64  # the worker's: room for every request in flight, so it never queues
    prefill_tokens_per_ms: float | None = None
    prefill_overhead_ms: float | None = None
    decode_step_ms_base: float | None = None
    decode_step_ms_per_seq: float | None = None
    profile_router: str | None = None  # py-spy's raw samples of the router during the proxy phases go here

    def __post_init__(self) -> None:
        for name in ("requests", "rounds", "concurrency", "prompt_tokens", "max_tokens", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")
        for name, _ in ENGINE_OPTIONS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")

    def engine_argv(self) -> list[str]:
        """The `flexlb sim-worker` speed options that were set, in ENGINE_OPTIONS order."""
        return engine_argv(dataclasses.asdict(self))

    def router_config(self) -> dict[str, Any]:
        """FLEXLB_CONFIG of the router: it polls the worker itself (no master process), with ``strategy``."""
        config: dict[str, Any] = {"contendForMaster": True}
        if self.strategy is not None:
            config["loadBalanceStrategy"] = self.strategy
        return config


def phase_plan(rounds: int) -> list[tuple[int, str]]:
    """(round, mode) in the order they run: direct then proxy, ``rounds`` times."""
    return [(r, mode) for r in range(1, rounds + 1) for mode in MODES]


def phase_specs(params: ProxyBenchParams, phase: int) -> list[RequestSpec]:
    """The requests of phase ``phase`` (0-based): ``requests`` completions of fresh ``prompt_tokens``-word prompts."""
    rng = random.Random(f"proxy:{params.seed}:{phase}")
    return [
        RequestSpec(prompt=random_words(rng, params.prompt_tokens), max_tokens=params.max_tokens, tag=f"phase{phase}")
        for _ in range(params.requests)
    ]


def _diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return a - b


def combine(phases: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    """One mode's totals over its phases: requests, errors, requests/s (ok requests over the phases' summed wall
    time), the latency percentiles of all its requests together (``latencies``: ttft_ms and e2e_ms lists) and,
    when the phases measured it (``router_cpu_s``), the router process's CPU microseconds per request."""
    own = [p for p in phases if p["mode"] == mode]
    ok = sum(p["summary"]["ok"] for p in own)
    seconds = sum(p["summary"]["elapsed_s"] for p in own)
    cpu = [p["router_cpu_s"] for p in own if p.get("router_cpu_s") is not None]
    return {
        "router_cpu_us_per_request": sum(cpu) * 1e6 / ok if ok and cpu and len(cpu) == len(own) else None,
        "phases": len(own),
        "requests": sum(p["summary"]["requests"] for p in own),
        "errors": sum(p["summary"]["errors"] for p in own),
        "elapsed_s": seconds,
        "request_throughput": ok / seconds if seconds > 0 else None,
        "ttft_ms": latency_summary([x for p in own for x in p["latencies"]["ttft_ms"]]),
        "e2e_ms": latency_summary([x for p in own for x in p["latencies"]["e2e_ms"]]),
    }


def added(direct: dict[str, Any], proxy: dict[str, Any]) -> dict[str, float | None]:
    """What going through the proxy adds: latency percentiles (ms) and the throughput ratio (proxy / direct)."""
    out: dict[str, float | None] = {}
    for metric in ("ttft_ms", "e2e_ms"):
        for q in ("p50", "p99", "mean"):
            out[f"{metric.removesuffix('_ms')}_{q}_ms"] = _diff(proxy[metric].get(q), direct[metric].get(q))
    d, p = direct["request_throughput"], proxy["request_throughput"]
    out["throughput_ratio"] = p / d if d and p is not None else None
    return out


def render(result: dict[str, Any]) -> str:
    modes, extra, c = result["modes"], result["added"], result["config"]
    rows = []
    for mode in MODES:
        m = modes[mode]
        rows.append(
            [
                mode,
                str(m["requests"]),
                str(m["errors"]),
                num(m["request_throughput"]),
                num(m["ttft_ms"]["p50"], 2),
                num(m["ttft_ms"]["p99"], 2),
                num(m["e2e_ms"]["p50"], 2),
                num(m["e2e_ms"]["p99"], 2),
            ]
        )
    ratio = extra["throughput_ratio"]
    rows.append(
        [
            "added by the proxy",
            "",
            "",
            "-" if ratio is None else f"x{ratio:.2f}",
            num(extra["ttft_p50_ms"], 2),
            num(extra["ttft_p99_ms"], 2),
            num(extra["e2e_p50_ms"], 2),
            num(extra["e2e_p99_ms"], 2),
        ]
    )
    header = ["", "requests", "errors", "req/s", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99"]
    lines = table(rows, header, [False] + [True] * (len(header) - 1))
    streamed = "streamed" if c.get("stream", True) else "not streamed (no TTFT)"
    engine = " ".join([f"--time-scale {c['time_scale']:g}", *engine_argv(c)])
    lines += [
        "",
        f"{c['rounds']} rounds of a direct then a proxy phase, {c['requests']} requests each, {c['concurrency']} in "
        f"flight; {c['prompt_tokens']}-token prompts, {c['max_tokens']} output tokens, {streamed}; one simulated "
        f"worker at {engine}; times in ms from the client",
        "added: proxy percentile minus direct percentile; req/s: the proxy's throughput as a multiple of direct",
    ]
    cpu = {mode: modes[mode].get("router_cpu_us_per_request") for mode in MODES}
    if cpu["proxy"] is not None:
        idle = "" if cpu["direct"] is None else f" (direct phases: {cpu['direct']:.0f} us, its polling alone)"
        lines.append(f"router process CPU per proxied request: {cpu['proxy']:.0f} us{idle}")
    profile = result.get("router_profile")
    if profile and profile["samples"]:
        lines += [
            "",
            f"router CPU by part (py-spy, {profile['samples']} samples of the proxy phases, which ran slower):",
        ]
        for part, n in profile["parts"].items():
            share = n / profile["samples"]
            per_request = "" if cpu["proxy"] is None else f"  ~{share * cpu['proxy']:.0f} us per request"
            lines.append(f"  {100 * share:5.1f}%  {part}{per_request}")
        lines.append(f"raw samples: {profile['path']}")
    return "\n".join(lines) + "\n"


def engine_argv(config: dict[str, Any]) -> list[str]:
    """The `flexlb sim-worker` speed options set in ``config`` (the params as a dict), in ENGINE_OPTIONS order."""
    argv: list[str] = []
    for name, option in ENGINE_OPTIONS:
        if config.get(name) is not None:
            argv += [option, f"{config[name]:g}"]
    return argv
