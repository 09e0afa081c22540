"""``flexlb demo``: the strategy comparison (its parser and command: flexlb/demo/cli.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from flexlb.demo.cli import add_demo_parser

    add_demo_parser(sub)
    sub.choices["demo"].set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlb.demo.cli import cmd_demo

    return cmd_demo(args)
