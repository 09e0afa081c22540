"""`flexlb bench control ...` argument parsing; the benchmark is ``flexlb.bench.control_plane``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexlb.bench.argtypes import int_at_least, non_negative_float, positive_float
from flexlb.settings import Settings
from flexlb.stack.interrupts import sigterm_as_ctrl_c

CONTROL_EPILOG = """\
Starts a private stack (redis-server unless REDIS_URL / --redis-url is given; --workers simulated workers in one
`flexlb sim-worker --count` process, registered under a fresh service id; one `flexlb master`, or --poll-shards of
them sharing the polling), then measures an
idle phase (master CPU) and a busy phase (requests straight to a fraction of the workers; the freshness of each
state change in Redis; master CPU), prints a table and writes JSON, and stops everything it started.

Targets: freshness p99 <= 100 ms and the master(s) <= 1 core in all at 1,250 workers; <= 0.05 core for 4 idle
workers.

Exit status: 0 when the run completed, 1 when requests failed or changes never showed, 2 when the stack failed.
"""


def add_control_parser(bsub: argparse._SubParsersAction) -> None:
    c = bsub.add_parser(
        "control",
        help="freshness of the fleet status in Redis and the master's CPU, for an idle and a busy fleet",
        description="Benchmark the control plane: one master polling --workers simulated workers.",
        epilog=CONTROL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--workers", type=int_at_least(1), default=4, help="simulated workers (default 4)")
    c.add_argument("--duration", type=positive_float, default=10.0, help="seconds of each phase (default 10)")
    c.add_argument(
        "--busy-fraction",
        type=positive_float,
        default=0.2,
        help="fraction of the workers that get requests in the busy phase (default 0.2, at least one worker)",
    )
    c.add_argument(
        "--rate", type=positive_float, help="requests/s in the busy phase (default 2 per busy worker, at most 250)"
    )
    c.add_argument("--request-tokens", type=int_at_least(1), default=16, help="max_tokens of each request (default 16)")
    c.add_argument(
        "--settle", type=non_negative_float, default=2.0, help="seconds after the first polls before measuring"
    )
    c.add_argument(
        "--watch-interval-ms", type=positive_float, default=2.0, help="how often Redis is read for changes (2)"
    )
    c.add_argument("--redis-url", help="Redis to use (default: REDIS_URL; unset: start a private redis-server)")
    c.add_argument("--out", help="JSON result file (default bench-results/control-<timestamp>.json)")
    c.add_argument("--startup-timeout", type=positive_float, default=60.0, help="seconds (default 60)")
    c.add_argument("--seed", type=int, help="random seed (default: random, written to the JSON)")
    c.add_argument(
        "--poll-shards",
        type=int_at_least(1),
        default=1,
        help="`flexlb master` processes sharing the polling as that many shards (pollShards; default 1: one master)",
    )


def cmd_control(args: argparse.Namespace, settings: Settings) -> int:
    from flexlb.bench.control_plane import BenchError, ControlBenchParams, render_control_table, run_control_bench
    from flexlb.bench.report import default_out_path, write_json

    params = ControlBenchParams(
        workers=args.workers,
        duration_s=args.duration,
        busy_fraction=min(1.0, args.busy_fraction),
        rate=args.rate,
        request_tokens=args.request_tokens,
        settle_s=args.settle,
        watch_interval_ms=args.watch_interval_ms,
        redis_url=args.redis_url or settings.redis_url,
        startup_timeout_s=args.startup_timeout,
        seed=args.seed,
        poll_shards=args.poll_shards,
    )
    try:
        with sigterm_as_ctrl_c():
            result = run_control_bench(params, out=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("flexlb bench control: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"flexlb bench control: error: {exc}", file=sys.stderr)
        return 2
    path = write_json(result, Path(args.out) if args.out else default_out_path("control"))
    print()
    print(render_control_table(result), end="")
    print(f"\nJSON written to {path}")
    busy = result["results"]["busy"]
    return 1 if busy["request_errors"] or busy["changes_unseen"] else 0
