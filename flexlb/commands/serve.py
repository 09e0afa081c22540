"""``flexlb serve``: a router, or ``--processes N`` of them on one port under a supervisor."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys

import uvloop

from flexlb.cli_options import UsageError, add_operator_flags, flag_environment, port
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.gc_policy import apply_gc_policy
from flexlb.ports import PortInUse, claim_shared, listen
from flexlb.settings import Settings, load_settings


def register(sub: argparse._SubParsersAction) -> None:
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
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The operator flags stand for environment variables, parsed with the rest (flexlb/cli_options.py).
    flag_env = flag_environment(args, os.environ)
    return cmd_serve(args, load_settings({**os.environ, **flag_env}), flag_env)


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
    apply_gc_policy(settings.flexlb.gc_young_threshold)
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
