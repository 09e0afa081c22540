"""Many simulated workers in one process: ``flexlb sim-worker --count N``.

Worker ``i`` serves HTTP on ``port + 2 * i`` and its status gRPC on that port + 1 (RTP-LLM's convention), so
``--count 3 --port 8000`` gives workers at 8000/8001, 8002/8003 and 8004/8005. They share one event loop, one
aiohttp app (a middleware finds the worker from the port a request came in on) and, for the status RPCs, the light
gRPC server of ``flexlb.sim.grpc_lite_server`` (grpcio's costs ~0.5 ms of CPU a call and cannot tell its ports
apart). An engine is created on its worker's first request or poll, and an idle one answers a poll from a cached
reply with a new ``status_version``, so 1,250 idle workers polled every 50 ms fit on well under a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiohttp import web
from aiohttp.typedefs import Handler

from flexlb.proto.flexlb_worker_pb2 import CacheVersionPB, StatusVersionPB, WorkerStatusPB
from flexlb.sim import protocol as p
from flexlb.sim.dialect import use_dialect
from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.grpc_lite_server import start_lite_server
from flexlb.sim.grpc_service import cache_status_pb, worker_status_pb
from flexlb.sim.http_api import MAX_BODY_BYTES, REQUEST_SIM, SimContext, add_sim_routes, json_errors, new_sim_context

log = logging.getLogger("flexlb.sim.fleet")


def worker_ports(port: int, count: int) -> list[tuple[int, int]]:
    """(HTTP port, gRPC port) of each of ``count`` workers from ``port`` on."""
    return [(port + 2 * i, port + 2 * i + 1) for i in range(count)]


class FleetWorker:
    """One simulated worker of a fleet: its engine (made on first use) and status RPC handlers."""

    def __init__(self, fleet: SimFleet, http_port: int, grpc_port: int) -> None:
        self.fleet = fleet
        self.http_port = http_port
        self.grpc_port = grpc_port
        self._ctx: SimContext | None = None
        self._idle_key: tuple[object, ...] | None = None
        self._idle_reply: WorkerStatusPB | None = None

    @property
    def started(self) -> bool:
        return self._ctx is not None

    @property
    def context(self) -> SimContext:
        if self._ctx is None:
            fleet = self.fleet
            engine = SimEngine(fleet.config)
            engine.start_now()
            self._ctx = new_sim_context(engine, fleet.model_name, fleet.load_format)
            use_dialect(self._ctx, fleet.dialect)
        return self._ctx

    @property
    def engine(self) -> SimEngine:
        return self.context.engine

    def get_worker_status(self, request: bytes) -> bytes:
        engine = self.engine
        version = StatusVersionPB.FromString(request).latest_finished_version
        key = engine.idle_status_key(version)
        if key is not None and key == self._idle_key and self._idle_reply is not None:
            reply = self._idle_reply
            reply.status_version = engine.next_status_version()
            return reply.SerializeToString()
        reply = worker_status_pb(engine.status(version), self.http_port)
        self._idle_key, self._idle_reply = key, reply if key is not None else None
        return reply.SerializeToString()

    def get_cache_status(self, request: bytes) -> bytes:
        ask = CacheVersionPB.FromString(request)
        cache = self.engine.cache_status(ask.latest_cache_version, ask.need_cache_keys)
        return cache_status_pb(cache).SerializeToString()

    async def stop(self) -> None:
        if self._ctx is not None:
            await self._ctx.engine.stop()


class SimFleet:
    """``count`` simulated workers of one configuration on consecutive port pairs from ``port``."""

    def __init__(
        self,
        config: EngineConfig,
        host: str = "127.0.0.1",
        port: int = 8000,
        count: int = 1,
        model_name: str = "flexlb-sim",
        *,
        load_format: str = "sglang",
        dialect: str = "rtp_llm",
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if load_format not in p.LOAD_FORMATS:
            raise ValueError(f"load_format: one of {', '.join(p.LOAD_FORMATS)}, not {load_format!r}")
        if port <= 0 or port + 2 * count > 65536:
            raise ValueError(f"ports {port}..{port + 2 * count - 1} are not all valid ports")
        self.config = config
        self.host = host
        self.model_name = model_name
        self.load_format = load_format
        self.dialect = dialect  # rtp_llm: status gRPC on each HTTP port + 1; vllm, sglang: none, as those engines
        self.workers = [FleetWorker(self, h, g) for h, g in worker_ports(port, count)]
        self._by_http_port = {w.http_port: w for w in self.workers}
        self._servers: list[asyncio.Server] = []
        self._runner: web.AppRunner | None = None

    def __iter__(self) -> Iterator[FleetWorker]:
        return iter(self.workers)

    def worker_for_port(self, http_port: int) -> FleetWorker | None:
        return self._by_http_port.get(http_port)

    def create_app(self) -> web.Application:
        @web.middleware
        async def resolve_worker(request: web.Request, handler: Handler) -> web.StreamResponse:
            sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
            worker = self.worker_for_port(int(sockname[1])) if isinstance(sockname, tuple) else None
            if worker is None:
                raise web.HTTPNotFound()
            request[REQUEST_SIM] = worker.context
            return await handler(request)

        app = web.Application(middlewares=[json_errors, resolve_worker], client_max_size=MAX_BODY_BYTES)
        add_sim_routes(app)
        return app

    async def start(self) -> None:
        """Listen on every port (gRPC first: once a worker's HTTP answers, so do its status RPCs). Raises OSError
        when a port cannot be bound, after closing what was opened."""
        try:
            for w in self.workers if self.dialect == "rtp_llm" else ():
                handlers = {"GetWorkerStatus": w.get_worker_status, "GetCacheStatus": w.get_cache_status}
                try:
                    self._servers.append(await start_lite_server(self.host, w.grpc_port, handlers))
                except OSError as exc:
                    raise OSError(f"status gRPC: cannot bind {self.host}:{w.grpc_port}: {exc}") from None
            self._runner = web.AppRunner(self.create_app(), access_log=None, handler_cancellation=True)
            await self._runner.setup()
            for w in self.workers:
                await web.TCPSite(self._runner, self.host, w.http_port).start()
        except BaseException:
            await self.stop()
            raise
        first, last = self.workers[0], self.workers[-1]
        log.info(
            "%d simulated %s workers for %r on http://%s:%d..%d (status gRPC on each port + 1)",
            len(self.workers), self.config.role.value, self.model_name, self.host, first.http_port, last.http_port,
        )  # fmt: skip

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for w in self.workers:
            with contextlib.suppress(Exception):
                await w.stop()


async def run_sim_fleet(
    config: EngineConfig,
    host: str,
    port: int,
    count: int,
    model_name: str = "flexlb-sim",
    *,
    load_format: str = "sglang",
    dialect: str = "rtp_llm",
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``count`` workers until ``stop`` is set or the task is cancelled."""
    fleet = SimFleet(config, host, port, count, model_name, load_format=load_format, dialect=dialect)
    await fleet.start()
    try:
        print(f"flexlb sim-worker: {count} workers ready on ports {port}..{port + 2 * count - 1}", flush=True)
        await (stop or asyncio.Event()).wait()
    finally:
        await fleet.stop()
