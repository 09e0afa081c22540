"""flexlb command line: parse arguments -> the sub-command's ``run``. No scheduling logic here.

Each sub-command is one module of flexlb/commands/ (``register`` adds its parser with ``set_defaults(func=run)``);
a command that needs the settings loads them itself (``flexlb.settings.load_settings``), so nothing else reads the
environment's configuration. This module builds the parser, with the options every command shares (``--version``,
``--log-level``, ``--log-format``), and turns the errors commands raise into one line on standard error and an exit
code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from flexlb.cli_options import FlagError, UsageError
from flexlb.embedded_redis import RedisNotInstalled
from flexlb.logs import FORMATS, LEVELS, parse_level, setup_logging
from flexlb.settings import ConfigError
from flexlb.state.errors import REDIS_UNAVAILABLE

__all__ = ["UsageError", "build_parser", "main"]


def _version() -> str:
    try:
        return importlib.metadata.version("flexlb")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _level(text: str) -> str:
    try:
        return parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level / --log-format before the sub-command (``top``) or after it: the sub-command's, when given, wins
    (its defaults are SUPPRESS, so an absent one leaves the top-level value)."""
    default_level, default_format = (None, None) if top else (argparse.SUPPRESS, argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", type=_level, default=default_level, help=f"{', '.join(LEVELS)} (any case; default INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=default_format,
        help="text (default) or json: one object per line (time, level, logger, message, request_id, worker)",
    )


def build_parser() -> argparse.ArgumentParser:
    from flexlb.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="flexlb", description="Fleet-wide load balancer for LLM inference workers.")
    parser.add_argument("--version", action="version", version=f"flexlb {_version()}")
    _add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in {id(p): p for p in sub.choices.values()}.values():
        _add_log_options(command_parser, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        # Each command loads the settings itself, when it needs them: a bad FLEXLB_CONFIG does not stop `flexlb blocks`.
        return args.func(args)
    except (ConfigError, UsageError, FlagError, RedisNotInstalled) as exc:
        print(f"flexlb: error: {exc}", file=sys.stderr)
        return 2
    except REDIS_UNAVAILABLE as exc:
        print(f"flexlb: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
