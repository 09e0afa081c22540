"""The gRPC server of the schedule API in the router's lifecycle: ``create_app`` hooks ``GrpcScheduleApi`` around the
router's own start-up and clean-up when ``enableGrpcPrefillMaster`` is set.

Its port is bound before the router starts anything, it serves once the router's own start-up is done (Redis
scripts loaded, queue running), and at SIGTERM it stops taking calls (as the HTTP listener closes): calls in flight
get ``SHUTDOWN_GRACE_S`` to finish and are cancelled after that, before the router's queue and Redis client go. A
port that cannot be bound (in use by another process, an address not of this host) fails the router's start-up with
GrpcPortUnavailable, a ConfigError naming grpcHost / grpcPort (``flexlb serve`` prints it and exits with 2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from aiohttp import web

from flexlb.grpc_api.service import ScheduleService
from flexlb.http.auth import CLIENT
from flexlb.http.routes import CONTEXT
from flexlb.proto.flexlb_schedule_pb2_grpc import add_FlexlbSchedulerServicer_to_server
from flexlb.settings import ConfigError, FlexlbConfig

log = logging.getLogger("flexlb.grpc_api")

SHUTDOWN_GRACE_S = 5.0  # a Schedule takes milliseconds; a queued one is cancelled after this (the client retries)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # as the HTTP API's body limit: 100k block keys are ~1 MB

# `flexlb serve --processes N` runs N routers on one HTTP port (SO_REUSEPORT, flexlb/supervisor.py) and gives them
# one prometheus_client multiprocess directory in this variable: such siblings share the gRPC port the same way.
SIBLINGS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def shares_port_with_siblings(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a router process that is one of several on one port (``flexlb serve --processes N``)."""
    return bool(environ.get(SIBLINGS_ENV, "").strip())


def _server_options(reuse_port: bool) -> tuple[tuple[str, Any], ...]:
    return (
        # gRPC sets SO_REUSEPORT by default on Linux: a second router on the same port (another service's, say)
        # would bind silently and take half the calls. Only sibling processes of one router share it.
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    )


class GrpcPortUnavailable(ConfigError):
    """grpcHost:grpcPort cannot be bound; the message says why and what to change."""


def _address(host: str, port: int) -> str:
    """``host:port`` in gRPC's target syntax (an IPv6 literal in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _why_not_bound(host: str, port: int) -> str:
    """The operating system's reason ``host:port`` cannot be bound (gRPC's own error does not say)."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((bare, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "gRPC could not listen on it"


def bind_schedule_server(host: str, port: int, *, reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """A gRPC server bound to ``host:port`` (0: any free port), not started and without services yet; must be
    called on the running event loop. Raises GrpcPortUnavailable when the address cannot be bound. ``reuse_port``:
    share the port with other processes that bind it so (SO_REUSEPORT), as the router's HTTP port."""
    server = grpc.aio.server(options=_server_options(reuse_port))
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's way of saying "address in use" or "cannot assign"
        raise GrpcPortUnavailable(
            f"grpcPort / grpcHost: the gRPC schedule API (enableGrpcPrefillMaster) cannot listen on {address}:"
            f" {_why_not_bound(host, port)}. Choose another grpcPort (0 = any free port) or grpcHost."
        ) from None
    return server, bound


class GrpcScheduleApi:
    """The gRPC schedule API of one router, hooked around the router's own lifecycle (see ``create_app``)::

        app.cleanup_ctx.append(api.bind)      # first: claim the port before anything starts
        app.on_shutdown.append(api.shutdown)  # SIGTERM: stop taking calls, as the HTTP listener closes
        app.cleanup_ctx.append(router_lifecycle)
        app.cleanup_ctx.append(api.serve)     # last: serve once the router is up; stopped before it goes

    Binding first makes a port in use fail the start-up before the router has started anything: aiohttp does not
    run the clean-up of the steps already started when a later one fails.
    """

    def __init__(self, host: str, port: int, *, reuse_port: bool = False, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.host = host
        self.requested_port = port
        self.reuse_port = reuse_port
        self.grace_s = grace_s
        self.port: int | None = None  # the bound port, from bind until the server stops
        self._server: grpc.aio.Server | None = None
        self._started = False
        self._stopping: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: FlexlbConfig, *, reuse_port: bool | None = None) -> GrpcScheduleApi:
        """``reuse_port`` None: share the port only with sibling processes (``flexlb serve --processes N``)."""
        if reuse_port is None:
            reuse_port = shares_port_with_siblings()
        return cls(config.grpc_host, config.grpc_port, reuse_port=reuse_port)

    async def bind(self, app: web.Application) -> AsyncIterator[None]:
        self._server, self.port = bind_schedule_server(self.host, self.requested_port, reuse_port=self.reuse_port)
        try:
            yield
        finally:
            await self.stop()  # a no-op after serve; else frees the port a later start-up failure left claimed

    async def serve(self, app: web.Application) -> AsyncIterator[None]:
        if self._server is None:
            raise RuntimeError("GrpcScheduleApi.serve before bind: append api.bind to cleanup_ctx first")
        keyring = app.get(CLIENT)  # set by setup_auth: the HTTP API's keys guard the gRPC one too
        add_FlexlbSchedulerServicer_to_server(ScheduleService(app[CONTEXT], keyring), self._server)
        await self._server.start()
        self._started = True
        log.info("gRPC schedule API (flexlb.v1.FlexlbScheduler) listening on %s", _address(self.host, self.port or 0))
        try:
            yield
        finally:
            await self.stop()

    async def shutdown(self, app: web.Application) -> None:
        """Begin stopping without waiting for it: the router's HTTP requests drain meanwhile."""
        self._begin_stop()

    async def stop(self) -> None:
        """Refuse new calls at once; let calls in flight finish for ``grace_s``, then cancel them. Idempotent."""
        await self._begin_stop()

    def _begin_stop(self) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(), name="gRPC schedule API stop")
        return self._stopping

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if not self._started:
            await server.start()  # gRPC frees a bound port only when a started server stops; no service is added
        await server.stop(self.grace_s)
        if self._started:
            log.info("gRPC schedule API on %s stopped", _address(self.host, self.port or 0))
        self.port = None
