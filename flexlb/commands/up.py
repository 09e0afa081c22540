"""``flexlb up``: a working local fleet from one command (its parser and command: flexlb/up.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from flexlb.up import add_up_parser

    add_up_parser(sub)
    sub.choices["up"].set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlb.up import cmd_up

    return cmd_up(args)
