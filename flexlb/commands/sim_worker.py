"""``flexlb sim-worker``: a simulated engine worker (the options are flexlb/sim/__main__.py's, defined there once)."""

from __future__ import annotations

import argparse

from flexlb.sim.__main__ import add_sim_worker_options
from flexlb.sim.__main__ import run as run_sim_worker


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser(
        "sim-worker",
        help="run a simulated engine worker: HTTP on --port, status gRPC on --grpc-port (default --port + 1)",
    )
    add_sim_worker_options(sim, required=True)
    sim.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_sim_worker(args, prog="flexlb sim-worker")
