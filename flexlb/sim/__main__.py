"""``python -m flexlb.sim``: run one simulated worker, HTTP on ``--port`` and the status gRPC on ``--grpc-port``
(default ``--port`` + 1), or ``--count N`` of them in one process (``flexlb.sim.fleet``). Every EngineConfig field is
an option (``--kv-blocks``).

The options are defined here once; ``flexlb sim-worker`` reuses them (``add_sim_worker_options``, ``run``).
"""

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
import zmq

from flexlb.cli_options import port
from flexlb.domain import Role
from flexlb.sim.engine import EngineConfig
from flexlb.sim.kv_events import KvEventPublisher, drop_range
from flexlb.sim.metrics import SIM_DIALECTS
from flexlb.sim.protocol import LOAD_FORMATS
from flexlb.sim.tokens import use_tokenizer
from flexlb.tokenize.base import TokenizerError


def _role(text: str) -> Role:
    try:
        return Role.parse(text)
    except ValueError as exc:  # argparse shows this message rather than "invalid parse value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sim_worker_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """The worker's options; ``required`` makes ``--role`` and ``--port`` mandatory instead of defaulted."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=None if required else 8000, required=required, help="HTTP port")
    parser.add_argument("--grpc-port", type=port, help="status gRPC port (default: --port + 1)")
    parser.add_argument(
        "--count",
        type=int,
        default=1,
        help="serve this many workers of the same options in one process: worker i on HTTP --port + 2*i and "
        "status gRPC on that + 1 (default 1)",
    )
    parser.add_argument("--model", default="flexlb-sim", help="served model name")
    parser.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer <key>' on every route but /health and /metrics, as an engine started"
        " with --api-key (one worker only; default: none)",
    )
    parser.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default="sglang",
        help="GET /get_load's shape: SGLang's per-rank list, or vllm-router's {\"load\": n} (default sglang)",
    )
    parser.add_argument(
        "--engine",
        choices=SIM_DIALECTS,
        default="rtp_llm",
        help="the engine it passes for: rtp_llm serves RTP-LLM's status gRPC and flexlb_sim_* metrics; vllm and "
        "sglang serve that engine's /metrics names and no status RPC, as the real engines (default rtp_llm)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenise as the model whose tokenizer.json (and tokenizer_config.json's chat template) is at PATH, a"
        " local file or model directory (default: one token per whitespace-separated word)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=port,
        help="--engine vllm|sglang: publish the cache's KV events on ZMQ PUB tcp://HOST:PORT, as vLLM's"
        " --kv-events-config, with the replay ROUTER socket on PORT + 1 (default: no events)",
    )
    parser.add_argument(
        "--kv-wait-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="PD, SGLang's way: a prefill worker records each request's bootstrap room at the bootstrap server its"
        " bootstrap_host:bootstrap_port names (python -m flexlb.sim.bootstrap) once the KV is computed, and a decode"
        " worker waits up to SECONDS there before its first token, then fails the request naming the room and the"
        " prefill (default 0: no bootstrap server; a decode worker takes the KV as transferred at once)",
    )
    parser.add_argument("--kv-events-drop", metavar="A:B", help=argparse.SUPPRESS)  # test hook: lose batches A..B
    for f in dataclasses.fields(EngineConfig):
        option = f"--{f.name.replace('_', '-')}"
        if f.name == "role":
            parser.add_argument(
                option,
                type=_role,
                default=None if required else f.default,
                required=required,
                metavar="{prefill,decode,pdfusion}",
                help=None if required else f"(default {f.default.value.lower()})",
            )
            continue
        parser.add_argument(option, type=type(f.default), default=f.default, help=f"(default {f.default})")


def run(args: argparse.Namespace, prog: str = "flexlb.sim") -> int:
    """Serve the worker the parsed options describe until SIGTERM or SIGINT.

    Exit status: 0 after a clean stop, 1 when a port cannot be bound, 2 on a bad option.
    """
    try:
        config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
        count = getattr(args, "count", 1)
        if count < 1:
            raise ValueError(f"--count must be at least 1, got {count}")
        if count > 1 and getattr(args, "api_key", None):
            raise ValueError("--api-key applies to one worker; not with --count")
        if count > 1 and args.grpc_port is not None:
            raise ValueError("--grpc-port applies to one worker; with --count each worker's is its HTTP port + 1")
        if count > 1 and not 0 < args.port <= 65536 - 2 * count:
            raise ValueError(f"--port {args.port} with --count {count}: ports must stay below 65536")
        if getattr(args, "kv_events_port", None) and (count > 1 or getattr(args, "engine", "rtp_llm") == "rtp_llm"):
            raise ValueError("--kv-events-port applies to one worker with --engine vllm or sglang")
        kv_wait = getattr(args, "kv_wait_timeout", 0.0)
        if kv_wait < 0 or (kv_wait > 0 and count > 1):
            raise ValueError("--kv-wait-timeout: a non-negative number of seconds, for one worker (not with --count)")
        use_tokenizer(getattr(args, "tokenizer", None))
    except (ValueError, TokenizerError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the handler below is installed
            uvloop.run(_serve(config, args))
    except (OSError, zmq.ZMQError) as exc:  # a port in use: say so without a traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: EngineConfig, args: argparse.Namespace) -> None:
    # Imported here: the HTTP and gRPC stacks are not needed by the other `flexlb` commands that import this module.
    from flexlb.sim.dialect import run_engine_worker
    from flexlb.sim.fleet import run_sim_fleet
    from flexlb.sim.http_api import run_sim_worker

    # Both signals only ask for a stop, so a second one cannot interrupt the shutdown half-way.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    count = getattr(args, "count", 1)
    dialect = getattr(args, "engine", "rtp_llm")
    if count > 1:
        await run_sim_fleet(
            config, args.host, args.port, count, args.model, load_format=args.load_format, dialect=dialect, stop=stop
        )
        return
    if dialect != "rtp_llm":
        await run_engine_worker(
            config, args.host, args.port, args.model, dialect=dialect, load_format=args.load_format, stop=stop,
            api_key=getattr(args, "api_key", None), kv_events=_kv_events(args),
            kv_wait_timeout_s=getattr(args, "kv_wait_timeout", 0.0),
        )  # fmt: skip
        return
    await run_sim_worker(
        config,
        args.host,
        args.port,
        args.model,
        grpc_port=args.grpc_port,
        load_format=args.load_format,
        stop=stop,
        api_key=getattr(args, "api_key", None),
        kv_wait_timeout_s=getattr(args, "kv_wait_timeout", 0.0),
    )


def _kv_events(args: argparse.Namespace) -> KvEventPublisher | None:
    events_port = getattr(args, "kv_events_port", None)
    if not events_port:
        return None
    drop = getattr(args, "kv_events_drop", None)
    return KvEventPublisher(args.host, events_port, drop=drop_range(drop) if drop else None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexlb.sim", description=__doc__)
    add_sim_worker_options(parser)
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
