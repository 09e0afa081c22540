"""Status RPCs of a simulated worker: RTP-LLM's ``RpcService`` (``GetWorkerStatus``, ``GetCacheStatus``) on a
SimEngine.

The engine's snapshots (``flexlb.sim.status``) mirror the protobufs field for field, so the conversions are plain
copies. The servicer must run on the engine's event loop: the engine is not thread-safe and the handlers call it
directly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc

from flexlb.proto.flexlb_worker_pb2 import (
    CacheStatusPB,
    CacheVersionPB,
    StatusVersionPB,
    TaskInfoPB,
    WorkerStatusPB,
)
from flexlb.proto.flexlb_worker_pb2_grpc import RpcServiceServicer, add_RpcServiceServicer_to_server
from flexlb.sim.engine import SimEngine
from flexlb.sim.status import CacheStatus, EngineStatus, TaskInfo

log = logging.getLogger("flexlb.sim.grpc")

INT32_MAX = (1 << 31) - 1
GRPC_SHUTDOWN_GRACE_S = 1.0  # status RPCs answer at once; this only lets a reply in flight finish

_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC sets SO_REUSEPORT by default on Linux: a second worker on the same port would bind silently and steal
    # half the polls. Fail at startup instead, like the HTTP side does.
    ("grpc.so_reuseport", 0),
)


def _fields(snapshot: Any) -> dict[str, Any]:
    """A dataclass snapshot's fields by name (shallow, unlike ``dataclasses.asdict``)."""
    return {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}


def task_info_pb(task: TaskInfo) -> TaskInfoPB:
    return TaskInfoPB(**_fields(task))


def worker_status_pb(status: EngineStatus, http_port: int = 0) -> WorkerStatusPB:
    """``WorkerStatusPB`` with every field of ``status`` (a field the protobuf lacks raises ValueError), and the
    worker's HTTP port (flexlb's identity field: a registration naming another HTTP port is refused)."""
    fields = _fields(status)
    fields["http_port"] = http_port
    fields["running_task_info"] = [task_info_pb(t) for t in status.running_task_info]
    fields["finished_task_list"] = [task_info_pb(t) for t in status.finished_task_list]
    # int32 on the wire (as RTP-LLM): saturate rather than fail every later status call of a long-running worker.
    fields["iterate_count"] = min(status.iterate_count, INT32_MAX)
    return WorkerStatusPB(**fields)


def cache_status_pb(cache: CacheStatus) -> CacheStatusPB:
    """``CacheStatusPB`` with every field of ``cache``; ``cache_keys`` is empty unless the engine sent the key set."""
    return CacheStatusPB(**_fields(cache))


class SimStatusService(RpcServiceServicer):
    """Answers the master's status polls from the engine's live state."""

    def __init__(self, engine: SimEngine, http_port: int = 0) -> None:
        self.engine = engine
        self.http_port = http_port

    async def GetWorkerStatus(self, request: StatusVersionPB, context: grpc.aio.ServicerContext) -> WorkerStatusPB:
        return worker_status_pb(self.engine.status(request.latest_finished_version), self.http_port)

    async def GetCacheStatus(self, request: CacheVersionPB, context: grpc.aio.ServicerContext) -> CacheStatusPB:
        cache = self.engine.cache_status(request.latest_cache_version, request.need_cache_keys)
        return cache_status_pb(cache)


def _bind_address(host: str, port: int) -> str:
    """``host:port`` in gRPC's target syntax (an IPv6 literal in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def start_grpc_server(engine: SimEngine, host: str, port: int, http_port: int = 0) -> grpc.aio.Server:
    """Serve ``engine``'s status RPCs on ``host:port`` (insecure, like RTP-LLM's) on the running event loop; the
    replies name ``http_port`` as the worker's.

    Raises OSError when the address cannot be bound (as a busy HTTP port does). Stop it with ``await server.stop()``.
    """
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    add_RpcServiceServicer_to_server(SimStatusService(engine, http_port), server)
    address = _bind_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # gRPC's way of saying "address in use" or "cannot assign"
        raise OSError(f"status gRPC: cannot bind {address}: {exc}") from None
    await server.start()
    log.info("status gRPC of the simulated worker on %s", _bind_address(host, bound))
    return server
