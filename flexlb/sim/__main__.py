"""``python -m flexlb.sim``: run one simulated worker. Every EngineConfig field is an option (``--kv-blocks``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop

from flexlb.domain import Role
from flexlb.sim.engine import EngineConfig
from flexlb.sim.http_api import run_sim_worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexlb.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="flexlb-sim", help="served model name")
    parser.add_argument("--log-level", default="info")
    for f in dataclasses.fields(EngineConfig):
        kind = Role.parse if f.name == "role" else type(f.default)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f"(default {f.default})"
        )
    return parser


async def _serve(config: EngineConfig, host: str, port: int, model: str) -> None:
    # SIGTERM takes the Ctrl-C path, so the engine stops and the socket closes cleanly.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run_sim_worker(config, host, port, model)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    except ValueError as exc:
        print(f"flexlb.sim: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(config, args.host, args.port, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
