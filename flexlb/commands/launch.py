"""``flexlb launch``: start engines on their GPUs and register them (its parser and command: flexlb/launch/cli.py)."""

from __future__ import annotations

import argparse
import os

from flexlb.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    from flexlb.launch.cli import add_launch_parser

    add_launch_parser(sub)
    sub.choices["launch"].set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlb.launch.cli import cmd_launch

    return cmd_launch(args, load_settings(), dict(os.environ))
