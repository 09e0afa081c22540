"""`flexlb bench peers`: its options, and running it (skipping the peers that are not installed)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from flexlb.bench import peers as pp
from flexlb.bench.argtypes import int_at_least, json_object, positive_float
from flexlb.bench.run_cli import DEFAULT_SEED, add_workload_options, workload_params
from flexlb.bench.workloads import WORKLOADS, Arrivals, WorkloadError, apply_arrivals
from flexlb.domain import Role

PEERS_EPILOG = f"""\
Every run starts fresh processes on 127.0.0.1 (so every cache starts cold): --workers simulated PDFUSION workers
(`flexlb sim-worker --role pdfusion --kv-blocks K --max-concurrency C`) and, in front of them, either flexlb (a
redis-server, a `flexlb master` and --routers `flexlb serve` processes in proxy mode) or a peer (--peer-routers
independent replicas of smg or vllm-router, --policy). The client sends the same requests open-loop (--rate, or
a trace's own timestamps) spread over the replicas in turn. The runs are interleaved (flexlb, smg, vllm-router,
flexlb, ...) --repeats times.

Peers: smg (SGLang's router) and vllm-router, each found by its option, else on PATH, else in
${pp.VENV_VARIABLE}/bin. Install them in a venv of their own:
    python -m venv /tmp/peers && /tmp/peers/bin/pip install smg vllm-router
    export {pp.VENV_VARIABLE}=/tmp/peers
A peer that is not installed is skipped with a line saying so; --peers none runs flexlb alone. The peers run with
the model-hub and proxy variables (HF_ENDPOINT, HF_HUB_OFFLINE, HTTP(S)_PROXY) pointing at a dead local address,
so they never download a tokenizer for the model name the workers report.

Mooncake traces (--workload mooncake --trace PATH) come from {pp.MOONCAKE_TRACES}.

The table: TTFT over the successful requests of all runs, refused (HTTP status other than 200) and errors per run,
the workers' own prefix-hit ratio and the busiest worker's share of the requests (their counters), the router
processes' CPU seconds per run (flexlb's master and redis-server apart). JSON has every run.

Exit status: 0 when every run completed, 1 when a run had refused or failed requests, 2 on a bad option or a
process that did not start, 130 when interrupted.
"""


def add_peers_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "peers",
        help="the same simulated cluster behind flexlb, smg and vllm-router: one workload, one table",
        description="Compare flexlb with SGLang's router (smg) and vLLM's router (vllm-router) on the same "
        "simulated KV-constrained workers and the same workload, repeats interleaved.",
        epilog=PEERS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS), help="what to send (as `bench run`)")
    p.add_argument("--rate", type=positive_float, help="open-loop requests/s (needed but for a trace's timestamps)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson", help="gaps (default poisson)")
    p.add_argument("--num-requests", type=int_at_least(1), help="send at most the first N requests of the workload")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"workload seed (default {DEFAULT_SEED})")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="runs of each router, interleaved (default 3)")
    p.add_argument("--routers", default="1", metavar="N[,N...]", help="flexlb router processes (default 1; e.g. 1,4)")
    p.add_argument(
        "--peer-routers",
        default="1",
        metavar="N[,N...]",
        help="replicas of each peer, each with its own tree, the client spreading requests over them (default 1)",
    )
    p.add_argument("--peers", default="smg,vllm-router", help="peers to run: names, comma-separated, or none")
    p.add_argument("--smg-bin", metavar="PATH", help=f"smg executable (default: PATH, then ${pp.VENV_VARIABLE}/bin)")
    p.add_argument("--vllm-router-bin", metavar="PATH", help="vllm-router executable (default: as --smg-bin)")
    p.add_argument("--policy", default="cache_aware", help="the peers' --policy (default cache_aware)")
    p.add_argument("--strategy", default="SHORTEST_TTFT", help="flexlb's loadBalanceStrategy (default SHORTEST_TTFT)")
    p.add_argument(
        "--flexlb-config",
        type=json_object,
        default={},
        metavar="JSON",
        help="more FLEXLB_CONFIG options for flexlb's routers, e.g. '{\"ttftTieRatio\": 0.3}' (over the bench's own)",
    )
    p.add_argument("--workers", type=int_at_least(1), default=4, help="simulated workers (default 4)")
    p.add_argument("--kv-blocks", type=int_at_least(1), default=192, help="KV blocks per worker (default 192)")
    p.add_argument("--max-concurrency", type=int_at_least(1), default=8, help="running limit per worker (default 8)")
    p.add_argument(
        "--worker-time-scale", type=positive_float, default=1.0, help="the workers' --time-scale (default 1)"
    )
    p.add_argument("--request-timeout", type=positive_float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--startup-timeout", type=positive_float, default=60.0, help="seconds for a process to be ready")
    p.add_argument("--out", help="JSON result file (default bench-results/peers-<timestamp>.json)")
    add_workload_options(p)


def render(result: dict[str, Any]) -> str:
    """The table, the targets and the first refusal and error reasons of each run."""
    from flexlb.bench.tables import workload_text

    c = result["config"]
    lines = [
        f"flexlb bench peers: {workload_text(result)}, {result['requests']} requests, {result['arrivals']}; "
        f"{c['workers']} workers ({' '.join(c['worker_options'])}); flexlb {c['strategy']}, peers {c['policy']}; "
        f"{result['environment']['cpu_count']} CPUs, load average {result['environment']['load_average'][0]:.1f}"
        + (" [interrupted]" if result["interrupted"] else ""),
        "",
        *pp.render_table(result["combined"]),
        "",
        "times in ms, TTFT over all runs' successful requests; refused: HTTP status != 200; requests, refused and "
        "errors per run; worker hit and busiest worker from the workers' own counters; CPU s per run",
    ]
    oracle = result.get("oracle_hit_ratio")
    if oracle is not None:
        lines.append(
            f"oracle bound on the workers' hit ratio: {pp.pct(oracle)} (every request on a worker holding the longest"
            " prefix any earlier request had, infinite KV)"
        )
    hits = [(label, c["router_hits"]) for label, c in result["combined"].items() if c.get("router_hits")]
    lines += [pp.render_router_hits(label, counts) for label, counts in hits]
    lines += [f"skipped: {s}" for s in result["skipped"]]
    targets = pp.render_targets(pp.check_targets(result["combined"], result["peers"], oracle))
    if targets:
        lines += ["", *targets]
    reasons: dict[str, Counter[str]] = {}
    for run in result["runs"]:
        counts = reasons.setdefault(run["label"], Counter())
        for reason, count in [*run["refused_reasons"].items(), *run["error_reasons"].items()]:
            status, sep, text = reason.partition(": ")
            counts[status + sep + re.sub(r"\d+", "N", text)] += count  # one line for one refusal of any size
    shown = [(label, counts) for label, counts in reasons.items() if counts]
    if shown:
        lines += ["", "refused and failed requests, over all runs:"]
    for label, counts in shown:
        lines += [f"  {label}: {count} x {reason}" for reason, count in counts.most_common(3)]
    return "\n".join(lines) + "\n"


def cmd_peers(args: argparse.Namespace) -> int:
    from flexlb.bench.peers_run import PeersParams, run_peers_bench
    from flexlb.bench.report import default_out_path, write_json
    from flexlb.embedded_redis import RedisNotInstalled
    from flexlb.stack.interrupts import Interrupts
    from flexlb.stack.local import StackError
    from flexlb.stack.terminal import Terminal

    workload = WORKLOADS[args.workload]
    try:
        flexlb_routers = pp.parse_counts("--routers", args.routers)
        peer_routers = pp.parse_counts("--peer-routers", args.peer_routers)
        wanted = pp.parse_peers(args.peers)
        explicit = {"smg": args.smg_bin, "vllm-router": args.vllm_router_bin}
        found = [pp.find_peer(peer, explicit[peer.name], os.environ) for peer in wanted]
        params = workload_params(workload, args)
        if args.rate is not None:
            arrivals = Arrivals(args.arrival, rate=args.rate)
        elif workload.has_timestamps:
            arrivals = Arrivals("trace")
        else:
            raise WorkloadError(f"--workload {workload.name} needs --rate (requests/s, open loop)")
        specs = workload.build(params, args.seed)
    except (pp.PeerError, WorkloadError) as exc:
        print(f"flexlb bench peers: error: {exc}", file=sys.stderr)
        return 2
    if args.num_requests is not None:
        specs = specs[: args.num_requests]
    specs = apply_arrivals(specs, arrivals, random.Random(f"{args.seed}/arrivals"))
    skipped = [f.reason for f in found if f.binary is None]
    for reason in skipped:
        print(f"skipping: {reason}")
    binaries = {f.peer.name: f.binary for f in found if f.binary is not None}
    peers = [pp.PEERS[name] for name in binaries]
    targets = pp.plan_targets(flexlb_routers, peers, peer_routers)
    bench = PeersParams(
        workers=args.workers,
        kv_blocks=args.kv_blocks,
        max_concurrency=args.max_concurrency,
        time_scale=args.worker_time_scale,
        strategy=args.strategy,
        flexlb_config=args.flexlb_config,
        policy=args.policy,
        repeats=args.repeats,
        request_timeout_s=args.request_timeout,
        startup_timeout_s=args.startup_timeout,
    )
    print(
        f"flexlb bench peers: {len(specs)} {workload.name} requests ({arrivals.describe()}) through "
        f"{', '.join(t.label for t in targets)}; {bench.repeats} repeats interleaved"
    )
    interrupts = Interrupts()
    term = Terminal()
    kept: list[Path] = []
    result = None
    failed: str | None = None
    interrupts.install()
    try:
        result = run_peers_bench(
            bench, targets, binaries, specs, arrivals, interrupts, term, lambda stack: kept.append(stack.log_dir)
        )
    except KeyboardInterrupt:
        pass
    except (StackError, RedisNotInstalled) as exc:
        failed = str(exc)
    finally:
        interrupts.ignore()
        term.line()
        interrupts.restore()
    if failed is not None:
        logs = f"\nlogs kept in {kept[-1]}" if kept else ""
        print(f"flexlb bench peers: error: {failed}{logs}", file=sys.stderr)
        return 2
    if result is None:
        print("flexlb bench peers: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result |= {
        "workload": workload.name,
        "workload_params": dataclasses.asdict(params),
        "requests": len(specs),
        "seed": args.seed,
        "arrivals": arrivals.describe(),
        "peers": list(binaries),
        "peer_binaries": binaries,
        "skipped": skipped,
        "oracle_hit_ratio": pp.oracle_hit_ratio(specs, bench.worker_options().engine_config(Role.PDFUSION).block_size),
    }
    path = write_json(result, Path(args.out) if args.out else default_out_path("peers"))
    print(render(result), end="")
    print(f"\nJSON written to {path}")
    if result["interrupted"]:
        return 130
    return 1 if any(r["refused"] or r["errors"] for r in result["runs"]) else 0
