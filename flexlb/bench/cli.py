"""`flexlb bench ...` argument parsing; the benchmarks themselves live beside this module."""

from __future__ import annotations

import argparse

from flexlb.settings import Settings


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench.add_subparsers(dest="bench_cmd", required=True)


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    raise NotImplementedError
