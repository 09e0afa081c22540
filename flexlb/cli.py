"""flexlb command line: parse arguments -> settings -> run. No scheduling logic here."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import socket
import sys
from collections.abc import Sequence

import orjson
import uvloop
from aiohttp import web

from flexlb.cli_options import FlagError, add_operator_flags, flag_environment, port
from flexlb.domain import EngineKind, Role, WorkerSpec, check_host
from flexlb.embedded_redis import EmbeddedRedis, RedisNotInstalled
from flexlb.logs import FORMATS, LEVELS, parse_level, setup_logging
from flexlb.ports import PortInUse, claim_shared, listen
from flexlb.settings import ConfigError, Settings, load_settings
from flexlb.sim.__main__ import add_sim_worker_options
from flexlb.sim.__main__ import run as run_sim_worker
from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.store import FleetStore, WorkerNotFound
from flexlb.status_bounds import check_status_text

log = logging.getLogger("flexlb")


class UsageError(Exception):
    pass


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


def _advertised(host: str, port: int) -> str:
    """The ip:port clients reach this router on (reported as real_master_host)."""
    if host not in ("0.0.0.0", "::", ""):
        return f"{host}:{port}"
    try:
        return f"{socket.gethostbyname(socket.gethostname())}:{port}"
    except OSError:
        return f"127.0.0.1:{port}"


def cmd_serve(args: argparse.Namespace, settings: Settings, flag_env: dict[str, str] | None = None) -> int:
    from flexlb.supervisor import follow_supervisor

    config = settings.flexlb
    host = args.host or config.http_host
    port = args.port if args.port is not None else config.http_port
    if args.processes < 1:
        raise UsageError(f"--processes must be at least 1, got {args.processes}")
    if args.supervisor_pid is not None:
        follow_supervisor(args.supervisor_pid)
    # The port first, before Redis or anything else starts: a port in use is one clear error (flexlb/ports.py).
    # A child of --processes N shares its supervisor's port (SO_REUSEPORT, in serve()); any other router owns its own.
    sock = None
    try:
        if args.processes > 1:
            sock = claim_shared(host, port)
            port = sock.getsockname()[1]
        elif args.supervisor_pid is None:
            sock = listen(host, port)
            port = sock.getsockname()[1]
    except PortInUse as exc:
        raise UsageError(str(exc)) from None
    embedded: EmbeddedRedis | None = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis().start()
            settings = dataclasses.replace(settings, redis_url=embedded.url)
            print(f"flexlb: REDIS_URL not set; started redis-server at {embedded.url}", flush=True)
            print(f"flexlb: to use it from another shell: export REDIS_URL={embedded.url}", flush=True)
        if args.processes > 1:
            return _supervise(args, settings, host, port, flag_env or {})
        _run_router(args, settings, host, port, sock)
    finally:
        if sock is not None:
            sock.close()
        if embedded is not None:
            embedded.close()
    return 0


def _run_router(args: argparse.Namespace, settings: Settings, host: str, port: int, sock: socket.socket | None) -> None:
    from flexlb.app import create_app, read_timeouts
    from flexlb.http.auth import warn_if_open
    from flexlb.http.drain import AIOHTTP_SHUTDOWN_TIMEOUT_S
    from flexlb.http.server import runner_options, serve

    uvloop.install()
    app = create_app(settings, master_host=args.advertise or _advertised(host, port))
    grpc = [("gRPC", settings.flexlb.grpc_host)] if settings.flexlb.enable_grpc_prefill_master else []
    warn_if_open(settings.auth, [("HTTP", host), *grpc])
    print(f"flexlb: router for service {settings.service.service_id!r} on http://{host}:{port}", flush=True)
    # handler_cancellation: a client that disconnects cancels its handler, so a queued request leaves the queue
    # and a proxied one stops its upstream call (aiohttp's default lets handlers run on). SIGTERM: the app's
    # on_shutdown drains the requests in flight up to shutdownTimeoutMs (flexlb/http/drain.py).
    # Read timeouts (headers, body, idle connections): flexlb/http/server.py.
    serve(
        app,
        host,
        port,
        sock=sock,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=AIOHTTP_SHUTDOWN_TIMEOUT_S,
        **runner_options(read_timeouts(settings.flexlb)),
    )


def _supervise(args: argparse.Namespace, settings: Settings, host: str, port: int, flag_env: dict[str, str]) -> int:
    """``--processes N``: N children, each a ``flexlb serve`` on the same port and Redis, restarted when they die."""
    from flexlb.supervisor import RouterSupervisor

    assert settings.redis_url is not None
    # Each child's own --processes 1 run; exec'd, not forked, so each has its own event loop and Redis client.
    command = [
        sys.executable, "-m", "flexlb.cli", "--log-level", args.log_level or "INFO",
        "--log-format", args.log_format or "text", "serve", "--processes", "1", "--host", host, "--port", str(port),
        "--advertise", args.advertise or _advertised(host, port), "--supervisor-pid", str(os.getpid()),
    ]  # fmt: skip
    print(
        f"flexlb: {args.processes} router processes for service {settings.service.service_id!r} on"
        f" http://{host}:{port}",
        flush=True,
    )
    supervisor = RouterSupervisor(
        command,
        {**os.environ, **flag_env, "REDIS_URL": settings.redis_url},  # the flags reach the children as variables
        args.processes,
        shutdown_timeout_s=settings.flexlb.shutdown_timeout_ms / 1000,
    )
    return supervisor.run()


def cmd_master(args: argparse.Namespace, settings: Settings) -> int:
    from flexlb.app import create_master_app

    if settings.redis_url is None:
        raise UsageError("set REDIS_URL to the fleet's Redis: the master polls workers for routers that share it")
    try:  # the port first, as for a router: a port in use is one clear error before anything starts
        sock = listen(args.host, args.port)
    except PortInUse as exc:
        raise UsageError(str(exc)) from None
    uvloop.install()
    app = create_master_app(settings, holder=args.holder)
    port = sock.getsockname()[1]
    print(
        f"flexlb: master candidate for service {settings.service.service_id!r}; health on http://{args.host}:{port}",
        flush=True,
    )
    try:
        web.run_app(app, sock=sock, print=None, access_log=None)
    finally:
        sock.close()
    return 0


def cmd_blocks(args: argparse.Namespace) -> int:
    from flexlb.blocks import block_cache_keys, tokenize

    if args.block_size <= 0:
        raise UsageError(f"--block-size must be positive, got {args.block_size}")
    text = sys.stdin.read() if args.text == "-" else args.text
    print(orjson.dumps(block_cache_keys(tokenize(text), args.block_size)).decode())
    return 0


# ---- worker admin (writes the same Redis keys as the admin API) ----


def _parse_assignments(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected field=value, got {item!r}")
        try:
            out[name] = check_status_text(name.strip(), value.strip())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out


def _split_address(address: str) -> tuple[str, int]:
    ip, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected a worker address ip:http_port, got {address!r}")
    try:
        return check_host(ip), int(port)
    except ValueError as exc:
        raise UsageError(f"{address!r}: {exc}") from None


async def _worker_command(args: argparse.Namespace, settings: Settings) -> int:
    from flexlb.app import make_redis

    url = args.redis_url or settings.redis_url
    if url is None:
        raise UsageError("set REDIS_URL (or --redis-url) to the fleet's Redis; `flexlb serve` prints it")
    redis = make_redis(url, settings.flexlb.redis_timeout_ms)
    store = FleetStore(redis, args.service or settings.service.service_id)
    try:
        if args.worker_cmd == "list":
            for view in await store.list_workers():
                s = view.status
                print(
                    f"{view.worker_id:<22} {view.spec.role.value:<8} group={view.spec.group or '-':<6} "
                    f"alive={int(s.alive)} running={s.running} waiting={s.waiting} kv={s.kv_used}/{s.kv_total} "
                    f"pending={view.pending_count} ({view.pending_tokens} tokens)"
                )
            return 0
        if args.worker_cmd == "add":
            ip, port = _split_address(args.address)
            try:
                role = Role.parse(args.role)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            try:
                engine = EngineKind.parse(args.engine)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            from flexlb.http.admin import parse_kv_events

            try:
                kv_events = parse_kv_events(args.kv_events, args.kv_events_replay, ip)
            except ValueError as exc:
                raise UsageError(f"--{str(exc).replace('_', '-')}") from None
            spec = WorkerSpec(ip, port, role, args.grpc_port, args.group, args.max_concurrency, engine, kv_events)
            await store.register_worker(spec, _parse_assignments(args.set))
            print(f"registered {role.value} worker {spec.worker_id} ({engine.value}) in service {store.keys.service!r}")
        elif args.worker_cmd == "update":
            _split_address(args.address)
            changes = _parse_assignments(args.fields)
            if not changes:
                raise UsageError("give at least one field=value")
            try:
                await store.update_status(args.address, changes)
            except WorkerNotFound:
                raise UsageError(f"unknown worker {args.address} in service {store.keys.service!r}") from None
            print(f"updated {args.address}: {orjson.dumps(changes).decode()}")
        elif args.worker_cmd == "remove":
            if not await store.remove_worker(args.address):
                raise UsageError(f"unknown worker {args.address} in service {store.keys.service!r}")
            print(f"removed {args.address}")
        return 0
    finally:
        await redis.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlb", description="Fleet-wide load balancer for LLM inference workers.")
    parser.add_argument("--version", action="version", version=f"flexlb {_version()}")
    _add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a router (starts its own redis-server when REDIS_URL is not set)")
    serve.add_argument(
        "--host",
        help="listen address (default: FLEXLB_CONFIG httpHost, 127.0.0.1; 0.0.0.0 for every interface: set"
        " FLEXLB_ADMIN_TOKEN first, docs/security.md)",
    )
    serve.add_argument("--port", type=port, help="listen port, 0-65535 (default: FLEXLB_CONFIG httpPort, 7001)")
    serve.add_argument("--advertise", help="ip:port reported as real_master_host (default: this host's address)")
    serve.add_argument(
        "--processes",
        type=int,
        default=1,
        help="router processes on the one port (SO_REUSEPORT), supervised by this one (default 1: no supervisor)",
    )
    serve.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)  # set by --processes for its children
    add_operator_flags(serve)

    master = sub.add_parser(
        "master", help="contend for the master lock and poll the workers while holding it (REDIS_URL required)"
    )
    master.add_argument("--host", default="127.0.0.1", help="listen address of /health and /metrics")
    master.add_argument("--port", type=port, default=7100, help="listen port of /health and /metrics (default 7100)")
    master.add_argument("--holder", help="name in the lock (default host:pid:master)")

    worker = sub.add_parser("worker", help="register, update, remove or list workers in Redis")
    worker.add_argument("--redis-url", help="default: REDIS_URL")
    worker.add_argument("--service", help="model service id (default: from MODEL_SERVICE_CONFIG, else 'default')")
    wsub = worker.add_subparsers(dest="worker_cmd", required=True)
    add = wsub.add_parser("add", help="register a worker (or replace its identity)")
    add.add_argument("address", help="ip:http_port")
    add.add_argument("--role", required=True, help="prefill, decode, pdfusion or vit")
    add.add_argument("--grpc-port", type=int, default=0, help="default: http_port + 1")
    add.add_argument("--group", default="")
    add.add_argument("--max-concurrency", type=int, default=0, help="0 = unlimited")
    add.add_argument(
        "--engine",
        default=EngineKind.RTP_LLM.value,
        help="how the master polls it: rtp_llm or sim (status gRPC), vllm or sglang (their HTTP API); default rtp_llm",
    )
    add.add_argument(
        "--kv-events",
        metavar="tcp://HOST:PORT",
        help="where it publishes KV events (vLLM --kv-events-config, SGLang), for the master to subscribe; a port:"
        " on the worker's host (default: none)",
    )
    add.add_argument(
        "--kv-events-replay", metavar="tcp://HOST:PORT", help="its replay socket (default: the publisher's port + 1)"
    )
    add.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="initial status field")
    update = wsub.add_parser("update", help="set status fields, e.g. running=3 kv_used=2048 alive=false")
    update.add_argument("address", help="ip:http_port")
    update.add_argument("fields", nargs="*", metavar="FIELD=VALUE")
    remove = wsub.add_parser("remove", help="remove a worker and its reservations")
    remove.add_argument("address", help="ip:http_port")
    wsub.add_parser("list", help="list workers with status and pending load")

    blocks = sub.add_parser(
        "blocks", help="print the block_cache_keys of a prompt as JSON (the tokeniser and hashing of the simulator)"
    )
    blocks.add_argument("text", help="prompt text ('-' reads standard input)")
    blocks.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")

    sim = sub.add_parser(
        "sim-worker",
        help="run a simulated engine worker: HTTP on --port, status gRPC on --grpc-port (default --port + 1)",
    )
    add_sim_worker_options(sim, required=True)

    from flexlb.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from flexlb.demo.cli import add_demo_parser

    add_demo_parser(sub)
    from flexlb.up import add_up_parser

    add_up_parser(sub)
    from flexlb.launch.cli import add_launch_parser

    add_launch_parser(sub)
    for command in {id(p): p for p in sub.choices.values()}.values():
        _add_log_options(command, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        if args.command == "serve":
            flag_env = flag_environment(args, os.environ)
            return cmd_serve(args, load_settings({**os.environ, **flag_env}), flag_env)
        settings = load_settings()
        if args.command == "master":
            return cmd_master(args, settings)
        if args.command == "worker":
            return asyncio.run(_worker_command(args, settings))
        if args.command == "blocks":
            return cmd_blocks(args)
        if args.command == "sim-worker":
            return run_sim_worker(args, prog="flexlb sim-worker")
        if args.command == "bench":
            from flexlb.bench.cli import run_bench

            return run_bench(args, settings)
        if args.command == "demo":
            from flexlb.demo.cli import cmd_demo

            return cmd_demo(args)
        if args.command == "up":
            from flexlb.up import cmd_up

            return cmd_up(args)
        if args.command == "launch":
            from flexlb.launch.cli import cmd_launch

            return cmd_launch(args, settings, dict(os.environ))
    except (ConfigError, UsageError, FlagError, RedisNotInstalled) as exc:
        print(f"flexlb: error: {exc}", file=sys.stderr)
        return 2
    except REDIS_UNAVAILABLE as exc:
        print(f"flexlb: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
