"""`flexlb bench ...` argument parsing; the benchmarks themselves live beside this module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexlb.bench.argtypes import int_at_least, non_negative_float, positive_float
from flexlb.bench.proxy_cli import add_proxy_parser, cmd_proxy
from flexlb.bench.run_cli import add_compare_parser, add_run_parser, cmd_compare, cmd_run
from flexlb.settings import Settings, load_settings
from flexlb.stack.interrupts import sigterm_as_ctrl_c

SCHEDULE_EPILOG = """\
Starts a private stack (redis-server unless REDIS_URL / --redis-url is given, --workers workers under a fresh
service id 'bench-<random>', one `flexlb serve` subprocess), runs a closed loop of schedule + release requests,
prints a table and writes JSON, then stops everything it started (also on Ctrl-C). Redis round trips are read from
the server (INFO stats / commandstats) at the edges of the measured window.

Targets: >= 5,000 decisions/s and <= 2 Redis round trips per schedule decision, for one router process with 16
workers. The load generator runs on the same machine as the router and competes with it for CPU.

Exit status: 0 when the run completed without errors, 1 when any request failed, 2 when the stack failed.
"""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    s = bsub.add_parser(
        "schedule",
        help="throughput, latency and Redis round trips of POST /rtp_llm/schedule + release on one router",
        description="Benchmark one router process: schedule + release decisions/s, latency and Redis round trips.",
        epilog=SCHEDULE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--workers",
        type=int_at_least(2),
        default=16,
        help="workers to register, half PREFILL and half DECODE (default 16)",
    )
    s.add_argument(
        "--concurrency",
        type=int_at_least(1),
        default=64,
        help="concurrent client tasks in the closed loop, over all client processes (default 64)",
    )
    s.add_argument("--duration", type=positive_float, default=10.0, help="measured seconds (default 10)")
    s.add_argument(
        "--warmup", type=non_negative_float, default=1.0, help="seconds run first and not counted (default 1)"
    )
    s.add_argument(
        "--client-processes",
        type=int_at_least(1),
        default=1,
        help="load generator processes sharing --concurrency, for when one Python process cannot saturate "
        "the router (default 1)",
    )
    s.add_argument("--seq-len", type=int_at_least(1), default=2000, help="seq_len of every request (default 2000)")
    s.add_argument(
        "--blocks",
        type=int_at_least(1),
        default=30,
        help="block_cache_keys per request, at most seq_len / 64; two thirds of them are a prefix shared by "
        "a group of requests (default 30)",
    )
    s.add_argument(
        "--prefix-groups",
        type=int_at_least(1),
        default=4,
        help="distinct shared prefixes; each worker caches one of them in full and half of another (default 4)",
    )
    s.add_argument(
        "--split-requests",
        type=int_at_least(0),
        default=2000,
        help="after the loop, schedule this many requests, then release them, to count the Redis round trips "
        "of each apart; 0 skips it (default 2000)",
    )
    s.add_argument(
        "--idle-baseline",
        type=non_negative_float,
        default=6.0,
        help="seconds with no request between those two phases, to measure the router's own background Redis "
        "traffic (its reservation sweep, every 5 s by default) and subtract it; 0 skips it (default 6)",
    )
    s.add_argument(
        "--redis-url",
        help="Redis to use (default: REDIS_URL; unset: start a private redis-server); the bench's keys are "
        "deleted from it afterwards",
    )
    s.add_argument("--out", help="JSON result file (default bench-results/schedule-<timestamp>.json)")
    s.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=30.0,
        help="seconds to wait for the router's GET /health to answer 200 (default 30)",
    )
    s.add_argument(
        "--profile-router",
        metavar="FILE",
        help="run the router under cProfile and write its stats to FILE (read them with python -m pstats FILE); "
        "slows the router down",
    )
    s.add_argument("--seed", type=int, help="random seed of the workload (default: random, written to the JSON)")
    add_run_parser(bsub)
    add_compare_parser(bsub)
    add_proxy_parser(bsub)
    from flexlb.bench.control_cli import add_control_parser

    add_control_parser(bsub)
    from flexlb.bench.chaos import add_chaos_parser

    add_chaos_parser(bsub)
    from flexlb.bench.peers_cli import add_peers_parser

    add_peers_parser(bsub)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``flexlb bench <bench_cmd>``; schedule and control read the settings (REDIS_URL, and the routers they start
    inherit the environment), so they load them first; the others start their stacks with their own configuration."""
    if args.bench_cmd == "schedule":
        return _run_schedule(args, load_settings())
    if args.bench_cmd == "run":
        return cmd_run(args)
    if args.bench_cmd == "compare":
        return cmd_compare(args)
    if args.bench_cmd == "proxy":
        return cmd_proxy(args)
    if args.bench_cmd == "control":
        from flexlb.bench.control_cli import cmd_control

        return cmd_control(args, load_settings())
    if args.bench_cmd == "chaos":
        from flexlb.bench.chaos import cmd_chaos

        return cmd_chaos(args)
    if args.bench_cmd == "peers":
        from flexlb.bench.peers_cli import cmd_peers

        return cmd_peers(args)
    raise NotImplementedError(args.bench_cmd)


def _run_schedule(args: argparse.Namespace, settings: Settings) -> int:
    import aiohttp

    from flexlb.bench.report import default_out_path, render_schedule_table, write_json
    from flexlb.bench.schedule import BenchError, ScheduleBenchParams, run_schedule_bench

    params = ScheduleBenchParams(
        workers=args.workers,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        client_processes=args.client_processes,
        seq_len=args.seq_len,
        blocks=args.blocks,
        prefix_groups=args.prefix_groups,
        split_requests=args.split_requests,
        idle_baseline_s=args.idle_baseline,
        redis_url=args.redis_url or settings.redis_url,
        startup_timeout_s=args.startup_timeout,
        profile_router=args.profile_router,
        seed=args.seed,
    )
    try:
        with sigterm_as_ctrl_c():  # the finally blocks stop the router and redis-server
            result = run_schedule_bench(params, out=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("flexlb bench schedule: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (BenchError, aiohttp.ClientError) as exc:
        print(f"flexlb bench schedule: error: {exc}", file=sys.stderr)
        return 2
    path = write_json(result, Path(args.out) if args.out else default_out_path("schedule"))
    print()
    print(render_schedule_table(result), end="")
    print(f"\nJSON written to {path}")
    res = result["results"]
    split = res["split"] or {}
    failures = res["errors"]["schedule"] + res["errors"]["release"]
    failures += sum(split[phase]["errors"] for phase in ("schedule_only", "release_only") if phase in split)
    return 1 if failures else 0
