"""``flexlb master``: a master candidate that contends for the lock and polls the workers while it holds it."""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

from flexlb.cli_options import UsageError, port
from flexlb.gc_policy import apply_gc_policy
from flexlb.ports import PortInUse, listen
from flexlb.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    master = sub.add_parser(
        "master", help="contend for the master lock and poll the workers while holding it (REDIS_URL required)"
    )
    master.add_argument("--host", default="127.0.0.1", help="listen address of /health and /metrics")
    master.add_argument("--port", type=port, default=7100, help="listen port of /health and /metrics (default 7100)")
    master.add_argument("--holder", help="name in the lock (default host:pid:master)")
    master.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    from flexlb.app import create_master_app

    if settings.redis_url is None:
        raise UsageError("set REDIS_URL to the fleet's Redis: the master polls workers for routers that share it")
    try:  # the port first, as for a router: a port in use is one clear error before anything starts
        sock = listen(args.host, args.port)
    except PortInUse as exc:
        raise UsageError(str(exc)) from None
    uvloop.install()
    apply_gc_policy(settings.flexlb.gc_young_threshold)
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
