"""`flexlb bench run` and `flexlb bench compare`: their options and what each command does with them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import signal
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from flexlb.bench.argtypes import int_at_least, positive_float
from flexlb.bench.workloads import WORKLOADS, Arrivals, Workload, WorkloadError, apply_arrivals

DEFAULT_CONCURRENCY = 4
DEFAULT_SEED = 1

RUN_EPILOG = f"""\
Load: --rate R sends open-loop arrivals (Poisson, or evenly spaced with --arrival fixed); --concurrency C runs a
closed loop of C clients. Without either, the mooncake workload follows the trace's timestamps and the others run
a closed loop of {DEFAULT_CONCURRENCY}. A chat turn is sent only after the session's previous turn finished.

Every request streams (stream_options.include_usage); TTFT is measured to the first chunk with content. The same
--seed gives the same prompts: a worker that already served them answers from its prefix cache, so restart the
workers (or change --seed) between runs you compare.

Exit status: 0 when every request succeeded, 1 when any failed, 2 on a bad option or workload, 130 when interrupted
(the requests finished so far are still written).
"""


def _option(workload: Workload, field: dataclasses.Field[Any]) -> tuple[str, str]:
    name = f"{workload.option_prefix}{field.name.replace('_', '-')}"
    return f"--{name}", name.replace("-", "_")


def add_run_parser(bsub: argparse._SubParsersAction) -> None:
    r = bsub.add_parser(
        "run",
        help="drive an OpenAI-compatible endpoint with a workload; client-side TTFT, latency, throughput",
        description="Send a workload's streaming requests to an OpenAI-compatible endpoint (a simulated worker, "
        "a flexlb proxy, another router) and measure from the client side.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--target", required=True, help="base URL of the endpoint, e.g. http://127.0.0.1:8000")
    r.add_argument("--workload", required=True, choices=sorted(WORKLOADS), help="what to send")
    load = r.add_mutually_exclusive_group()
    load.add_argument("--rate", type=positive_float, help="open loop: requests/s")
    load.add_argument("--concurrency", type=int_at_least(1), help="closed loop: concurrent clients")
    r.add_argument(
        "--arrival", choices=["poisson", "fixed"], default="poisson", help="with --rate: gaps (default poisson)"
    )
    r.add_argument("--duration", type=positive_float, help="start no request after this many seconds")
    r.add_argument("--num-requests", type=int_at_least(1), help="send at most the first N requests of the workload")
    r.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"workload seed (default {DEFAULT_SEED})")
    r.add_argument("--model", help="'model' field of every request (default: none sent)")
    r.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so real engines generate exactly max_tokens (default on)",
    )
    r.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request (default 600)")
    r.add_argument(
        "--worker-metrics",
        action="append",
        default=[],
        metavar="URL,...",
        help="workers whose own counters (prefix-hit and prompt tokens, queue time) to read before and after",
    )
    r.add_argument("--out", help="JSON result file (default bench-results/run-<timestamp>.json)")
    r.add_argument("--plot", metavar="PNG", help="also write a TTFT CDF and throughput chart (needs matplotlib)")
    r.add_argument("--label", help="name of the run in tables (default <workload>@<target host:port>)")
    add_workload_options(r)


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """Every workload's parameters as options, one group per workload (`bench run`, `bench peers`)."""
    for workload in WORKLOADS.values():
        group = parser.add_argument_group(f"--workload {workload.name}", workload.summary)
        for f in dataclasses.fields(workload.params_type):
            option, dest = _option(workload, f)
            kind = type(f.default)
            group.add_argument(
                option,
                dest=dest,
                type=kind,
                default=None,
                metavar="PATH" if kind is str else kind.__name__.upper(),
                help=f"{f.metadata.get('help', '')} (default {f.default})" if f.default != "" else f.metadata["help"],
            )


def add_compare_parser(bsub: argparse._SubParsersAction) -> None:
    c = bsub.add_parser(
        "compare",
        help="one table comparing `bench run` results",
        description="Print one row per `flexlb bench run` result file, named by its label.",
    )
    c.add_argument("results", nargs="+", metavar="RESULT.json")
    c.add_argument("--plot", metavar="PNG", help="also write the runs' TTFT CDFs and throughput in one chart")


def workload_params(workload: Workload, args: argparse.Namespace) -> Any:
    """The workload's parameters from its options; an option of another workload is an error."""
    for other in WORKLOADS.values():
        if other is workload:
            continue
        for f in dataclasses.fields(other.params_type):
            option, dest = _option(other, f)
            if getattr(args, dest, None) is not None:
                raise WorkloadError(f"{option} belongs to --workload {other.name}, not {workload.name}")
    values = {}
    for f in dataclasses.fields(workload.params_type):
        value = getattr(args, _option(workload, f)[1])
        if value is not None:
            values[f.name] = value
    return workload.params_type(**values)


def arrivals_from(args: argparse.Namespace, workload: Workload) -> Arrivals:
    if args.rate is not None:
        return Arrivals(args.arrival, rate=args.rate)
    if args.arrival != "poisson":
        raise WorkloadError("--arrival fixed needs --rate")
    if args.concurrency is not None:
        return Arrivals("closed", concurrency=args.concurrency)
    if workload.has_timestamps:
        return Arrivals("trace")
    return Arrivals("closed", concurrency=DEFAULT_CONCURRENCY)


def _default_label(workload: str, target: str) -> str:
    parts = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
    return f"{workload}@{parts.netloc or target}"


def cmd_run(args: argparse.Namespace) -> int:
    from flexlb.bench.client import base_url
    from flexlb.bench.plot import PlotUnavailable, write_plot
    from flexlb.bench.report import default_out_path, write_json
    from flexlb.bench.result import build_result
    from flexlb.bench.run import RunOptions, run_requests
    from flexlb.bench.tables import render_run

    workload = WORKLOADS[args.workload]
    try:
        params = workload_params(workload, args)
        arrivals = arrivals_from(args, workload)
        specs = workload.build(params, args.seed)
    except WorkloadError as exc:
        print(f"flexlb bench run: error: {exc}", file=sys.stderr)
        return 2
    planned = len(specs)
    if args.num_requests is not None:
        specs = specs[: args.num_requests]
    specs = apply_arrivals(specs, arrivals, random.Random(f"{args.seed}/arrivals"))
    workers = tuple(u.strip() for item in args.worker_metrics for u in item.split(",") if u.strip())
    options = RunOptions(
        target=base_url(args.target),
        arrivals=arrivals,
        duration_s=args.duration,
        model=args.model,
        request_timeout_s=args.request_timeout,
        ignore_eos=args.ignore_eos,
        worker_metrics=workers,
    )
    label = args.label or _default_label(workload.name, args.target)
    print(
        f"flexlb bench run {label!r}: {len(specs)} {workload.name} requests -> {options.target} ({arrivals.describe()})"
    )

    async def main() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await run_requests(specs, options, out=lambda line: print(line, flush=True), stop=stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    outcome = asyncio.run(main())
    result = build_result(
        label=label,
        workload=workload.name,
        workload_params=params,
        options=options,
        seed=args.seed,
        planned=planned,
        num_requests=args.num_requests,
        outcome=outcome,
    )
    path = write_json(result, Path(args.out) if args.out else default_out_path("run"))
    print()
    print(render_run(result), end="")
    print(f"\nJSON written to {path}")
    if args.plot:
        try:
            print(f"plot written to {write_plot([result], args.plot)}")
        except PlotUnavailable as exc:
            print(f"no plot: {exc}")
    if outcome.interrupted:
        return 130
    return 1 if result["summary"]["errors"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flexlb.bench.plot import PlotUnavailable, write_plot
    from flexlb.bench.result import ResultError, load_result
    from flexlb.bench.tables import render_compare

    try:
        results = [load_result(p) for p in args.results]
    except ResultError as exc:
        print(f"flexlb bench compare: error: {exc}", file=sys.stderr)
        return 2
    labels = [r["label"] for r in results]
    for r, path in zip(results, args.results, strict=True):
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({Path(path).name})"
    print(render_compare(results), end="")
    if args.plot:
        try:
            print(f"plot written to {write_plot(results, args.plot)}")
        except PlotUnavailable as exc:
            print(f"no plot: {exc}")
    return 0
