"""``flexlb bench ...``: the benchmarks (their parsers and commands: flexlb/bench/cli.py, which loads the settings for
the benchmarks that read them)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from flexlb.bench.cli import add_bench_parser

    add_bench_parser(sub)
    sub.choices["bench"].set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlb.bench.cli import run_bench

    return run_bench(args)
