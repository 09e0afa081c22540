"""``flexlb blocks``: the block_cache_keys of a prompt, as the router and the simulated workers compute them."""

from __future__ import annotations

import argparse
import sys

import orjson

from flexlb.cli_options import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    blocks = sub.add_parser(
        "blocks", help="print the block_cache_keys of a prompt as JSON (the tokeniser and hashing of the simulator)"
    )
    blocks.add_argument("text", help="prompt text ('-' reads standard input)")
    blocks.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")
    blocks.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flexlb.blocks import block_cache_keys, tokenize

    if args.block_size <= 0:
        raise UsageError(f"--block-size must be positive, got {args.block_size}")
    text = sys.stdin.read() if args.text == "-" else args.text
    print(orjson.dumps(block_cache_keys(tokenize(text), args.block_size)).decode())
    return 0
