"""`flexlb demo` argument parsing, signals and exit status; the run itself is flexlb.demo.run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flexlb.bench.argtypes import int_at_least, positive_float
from flexlb.demo.params import DEFAULT_REQUESTS, DEMO_WORKLOADS, QUICK_REQUESTS, STRATEGIES, DemoParams, Fleet
from flexlb.settings import parse_strategy

DEFAULT_OUT = "demo-results.json"

EPILOG = """\
Per strategy it starts a fresh fleet on its own redis-server (simulated workers with empty KV caches, one
`flexlb master` polling them, routers with contendForMaster false and that loadBalanceStrategy), sends the same
workload through the routers' OpenAI proxy in turn, reads the workers' own counters, and stops the fleet before the
next strategy. The oracle row is a lower bound from the simulator's cost model (see flexlb/bench/oracle.py).

Default fleet: 4 PDFUSION workers (each prefills and decodes, as a vLLM or SGLang fleet without disaggregation).
--pd (or --prefill-workers / --decode-workers) runs PREFILL + DECODE workers behind the PD proxy instead; a decode
worker waits for its prefill's KV through a bootstrap server, so the client's TTFT shows where the prefill ran.

Exit status: 0 when every request succeeded, 1 when any failed, 2 when the stack could not start or an option is
wrong, 130 when interrupted (SIGINT / SIGTERM; every process it started is stopped, what finished is written).
"""


def _strategies(text: str) -> tuple[str, ...]:
    try:
        names = tuple(parse_strategy(part.strip(), "--strategies") for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("name at least one strategy")
    return names


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="start a local stack and compare routing strategies on a prefix-heavy workload (about a minute)",
        description="Compare flexlb's routing strategies on simulated workers whose KV caches are under pressure.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--workload", choices=DEMO_WORKLOADS, default="shared-prefix", help="(default shared-prefix)")
    d.add_argument(
        "--requests",
        type=int_at_least(1),
        help=f"requests per strategy (default {DEFAULT_REQUESTS}; --quick {QUICK_REQUESTS})",
    )
    d.add_argument("--routers", type=int_at_least(1), default=2, help="router processes, used in turn (default 2)")
    d.add_argument("--workers", type=int_at_least(1), help="PDFUSION workers (default 4)")
    d.add_argument(
        "--pd", action="store_true", help="a disaggregated fleet: 4 PREFILL + 2 DECODE workers behind the PD proxy"
    )
    d.add_argument("--prefill-workers", type=int_at_least(1), help="PREFILL workers of a disaggregated fleet (4)")
    d.add_argument("--decode-workers", type=int_at_least(1), help="DECODE workers of a disaggregated fleet (2)")
    d.add_argument("--concurrency", type=int_at_least(1), default=8, help="requests in flight (default 8)")
    d.add_argument(
        "--time-scale", type=positive_float, default=1.0, help="workers' real seconds per model second (default 1)"
    )
    d.add_argument("--kv-blocks", type=int_at_least(1), help="KV blocks of each prefilling worker (default 192)")
    d.add_argument(
        "--strategies",
        type=_strategies,
        default=STRATEGIES,
        help=f"comma-separated, run in this order (default {','.join(STRATEGIES)})",
    )
    d.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    d.add_argument("--out", default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    d.add_argument("--quick", action="store_true", help="small and fast, for CI: a few seconds per strategy")
    d.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (always kept on failure)")
    d.add_argument("--startup-timeout", type=positive_float, default=60.0, help="seconds per fleet start (60)")


def params_from(args: argparse.Namespace) -> DemoParams:
    pd = getattr(args, "pd", False) or args.prefill_workers is not None or args.decode_workers is not None
    if args.workers is not None and pd:
        raise ValueError("--workers (a PDFUSION fleet) does not go with --pd / --prefill-workers / --decode-workers")
    fleet = Fleet(args.prefill_workers or 4, args.decode_workers or 2) if pd else Fleet(args.workers or 4)
    requests = args.requests if args.requests is not None else QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    return DemoParams(
        workload=args.workload,
        requests=requests,
        routers=args.routers,
        fleet=fleet,
        concurrency=args.concurrency,
        time_scale=args.time_scale,
        kv_blocks=args.kv_blocks,
        strategies=args.strategies,
        seed=args.seed,
        quick=args.quick,
        startup_timeout_s=args.startup_timeout,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: every flexlb process builds the parser, only the demo needs these.
    from flexlb.bench.report import write_json
    from flexlb.demo import report
    from flexlb.demo.params import build_workload
    from flexlb.demo.run import DemoRun, build_result, oracle, run_demo
    from flexlb.embedded_redis import RedisNotInstalled
    from flexlb.stack.interrupts import Interrupts
    from flexlb.stack.local import Stack, StackError
    from flexlb.stack.terminal import Terminal

    try:
        params = params_from(args)
    except ValueError as exc:
        print(f"flexlb demo: error: {exc}", file=sys.stderr)
        return 2
    started_at = time.time()
    specs = build_workload(params)
    interrupts = Interrupts()
    stack = Stack(startup_timeout_s=params.startup_timeout_s, checkpoint=interrupts.check)
    run = DemoRun(params, stack, specs, interrupts)
    term = Terminal()
    # SIGTERM takes the Ctrl-C path; while a strategy's load runs, both only end that load (flexlb.demo.run).
    interrupts.install()
    try:
        run_demo(run, term)
    except KeyboardInterrupt:
        run.interrupted = True
    except (StackError, RedisNotInstalled) as exc:
        run.failed = str(exc)
    finally:
        interrupts.ignore()  # nothing interrupts the clean-up: a second Ctrl-C would leave processes behind
        term.line()
        if run.interrupted or run.failed:
            term.line("flexlb demo: stopping every process it started ...")
        stack.close(keep_logs=args.keep_logs or run.failed is not None)
        interrupts.restore()
    run.interrupted = run.interrupted or interrupts.requested
    result = build_result(run, oracle(params, specs), started_at)
    path = write_json(result, Path(args.out))
    if run.strategies:
        print()
        print(report.render_table(result), end="")
    print(f"\nJSON written to {path}")
    if run.failed:
        print(f"flexlb demo: error: {run.failed}\nlogs kept in {run.stack.log_dir}", file=sys.stderr)
        return 2
    if run.interrupted:
        print("flexlb demo: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 1 if any(r["summary"]["errors"] for r in run.strategies) else 0
