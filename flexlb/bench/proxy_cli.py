"""`flexlb bench proxy` argument parsing, signals and exit status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexlb.bench.argtypes import int_at_least, non_negative_float, positive_float
from flexlb.bench.proxy_overhead import ENGINE_OPTIONS, ProxyBenchParams

PROXY_EPILOG = """\
Starts a private stack: a redis-server, one simulated PDFUSION worker and one `flexlb serve` router (it contends
for the master lock and polls the worker itself). Then, for each round, the same closed loop of streaming (or, with
--no-stream, whole) /v1/completions requests runs against the worker directly and through the router's proxy, and
the table shows what the proxy adds: latency (p50 / p99 of TTFT and end-to-end), throughput, and the router
process's CPU time per request. Everything it started is stopped at the end, also on Ctrl-C. The load generator,
the router and the worker share this machine's CPUs: the numbers are this machine's, not a router on its own cores.

The setting of the proxy's targets (issue 9): one fast worker, 32 clients, short prompts, round robin:

  flexlb bench proxy --concurrency 32 --prompt-tokens 32 --max-tokens 8 --time-scale 1 --strategy ROUND_ROBIN \\
    --prefill-tokens-per-ms 1000 --prefill-overhead-ms 0.5 --decode-step-ms-base 1 --decode-step-ms-per-seq 0.02 \\
    [--no-stream]

Exit status: 0 when every request succeeded, 1 when any failed, 2 when the stack failed, 130 when interrupted.
"""


def add_proxy_parser(bsub: argparse._SubParsersAction) -> None:
    defaults = ProxyBenchParams()
    p = bsub.add_parser(
        "proxy",
        help="latency and throughput the router's OpenAI proxy adds over calling a worker directly",
        description="Measure what going through a router's proxy adds, against one simulated worker.",
        epilog=PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int_at_least(1), default=defaults.requests, help="per phase (default 200)")
    p.add_argument("--rounds", type=int_at_least(1), default=defaults.rounds, help="direct + proxy phases (3)")
    p.add_argument("--concurrency", type=int_at_least(1), default=defaults.concurrency, help="in flight (8)")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=defaults.prompt_tokens, help="(default 256)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=defaults.max_tokens, help="(default 16)")
    p.add_argument("--time-scale", type=positive_float, default=defaults.time_scale, help="the worker's (default 0.1)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="answers sent whole (E2E only, no TTFT)")
    p.add_argument("--strategy", help="the router's loadBalanceStrategy (default: the router's default)")
    p.add_argument(
        "--max-concurrency", type=int_at_least(1), default=defaults.max_concurrency, help="the worker's (64)"
    )
    for name, option in ENGINE_OPTIONS:
        p.add_argument(option, dest=name, type=non_negative_float, help="the worker's (default: sim-worker's)")
    p.add_argument(
        "--profile-router",
        metavar="PATH",
        help="sample the router with py-spy (on PATH) during the proxy phases: raw stacks to PATH, CPU by part",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="prompt seed (default 1)")
    p.add_argument("--out", help="JSON result file (default bench-results/proxy-<timestamp>.json)")
    p.add_argument("--startup-timeout", type=positive_float, default=60.0, help="seconds (default 60)")


def cmd_proxy(args: argparse.Namespace) -> int:
    from flexlb.bench.proxy_overhead import render
    from flexlb.bench.proxy_run import run_proxy_bench
    from flexlb.bench.report import default_out_path, write_json
    from flexlb.embedded_redis import RedisNotInstalled
    from flexlb.stack.interrupts import Interrupts
    from flexlb.stack.local import Stack, StackError
    from flexlb.stack.terminal import Terminal

    params = ProxyBenchParams(
        requests=args.requests,
        rounds=args.rounds,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        time_scale=args.time_scale,
        seed=args.seed,
        startup_timeout_s=args.startup_timeout,
        stream=args.stream,
        strategy=args.strategy,
        max_concurrency=args.max_concurrency,
        profile_router=args.profile_router,
        **{name: getattr(args, name) for name, _ in ENGINE_OPTIONS},
    )
    interrupts = Interrupts()
    stack = Stack(startup_timeout_s=params.startup_timeout_s, checkpoint=interrupts.check)
    term = Terminal()
    result = None
    failed: str | None = None
    interrupts.install()
    try:
        result = run_proxy_bench(params, stack, interrupts, term)
    except KeyboardInterrupt:
        pass
    except (StackError, RedisNotInstalled) as exc:
        failed = str(exc)
    finally:
        interrupts.ignore()
        term.line()
        stack.close(keep_logs=failed is not None)
        interrupts.restore()
    if failed is not None:
        print(f"flexlb bench proxy: error: {failed}\nlogs kept in {stack.log_dir}", file=sys.stderr)
        return 2
    if result is None:
        print("flexlb bench proxy: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result["processes"] = [child.describe() for child in stack.started]
    path = write_json(result, Path(args.out) if args.out else default_out_path("proxy"))
    print(render(result), end="")
    print(f"\nJSON written to {path}")
    if result["interrupted"]:
        return 130
    return 1 if any(result["modes"][m]["errors"] for m in result["modes"]) else 0
