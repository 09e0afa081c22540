"""Asyncio gRPC client of one engine worker's status RPCs (RTP-LLM's ``RpcService``), used by the master's poller.

One client (one HTTP/2 channel) per worker, kept for the worker's lifetime: the poller calls it every 20 ms, so the
connection must be reused. Every failure surfaces as :class:`WorkerUnreachable`, which the poller turns into
"worker not alive".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from flexlb.domain import Role, WorkerSpec
from flexlb.proto.flexlb_worker_pb2 import (
    CacheStatusPB,
    CacheVersionPB,
    StatusVersionPB,
    WorkerStatusPB,
)
from flexlb.proto.flexlb_worker_pb2_grpc import RpcServiceStub

_Reply = TypeVar("_Reply")

_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # CacheStatusPB carries a worker's full cache key set (up to 15 bytes a key); gRPC's 4 MiB default would refuse the
    # reply of a worker with a large KV cache.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    # gRPC's default reconnect backoff grows to 120 s: a restarted worker would look dead for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Workers are reached directly; an http_proxy variable meant for other traffic must not reroute these calls.
    ("grpc.enable_http_proxy", 0),
)


class WorkerUnreachable(Exception):
    """A status RPC to a worker failed: connection refused, deadline exceeded, worker error, ..."""

    def __init__(
        self,
        address: str,
        rpc: str,
        code: grpc.StatusCode | None,
        detail: str = "",
        role: Role | None = None,
    ) -> None:
        self.address = address
        self.rpc = rpc
        self.code = code
        self.detail = detail
        self.role = role
        who = f"{role.value} worker {address}" if role is not None else f"worker {address}"
        status = code.name if code is not None else "UNKNOWN"
        super().__init__(f"{who}: {rpc} failed with {status}" + (f": {detail}" if detail else ""))


def grpc_address(spec: WorkerSpec) -> str:
    """``host:grpc_port`` of a worker, with an IPv6 literal in brackets as gRPC's target syntax requires."""
    host = f"[{spec.ip}]" if ":" in spec.ip and not spec.ip.startswith("[") else spec.ip
    return f"{host}:{spec.effective_grpc_port}"


class WorkerStatusClient:
    """Status RPCs of one worker at ``address`` (``host:grpc_port``). Close it with :meth:`close`."""

    def __init__(self, address: str, role: Role | None = None) -> None:
        self.address = address
        self.role = role
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = RpcServiceStub(self._channel)

    @classmethod
    def for_worker(cls, spec: WorkerSpec) -> WorkerStatusClient:
        return cls(grpc_address(spec), spec.role)

    async def get_worker_status(self, latest_finished_version: int, deadline_s: float) -> WorkerStatusPB:
        """The worker's status; its ``finished_task_list`` holds tasks finished after ``latest_finished_version``."""
        request = StatusVersionPB(latest_finished_version=latest_finished_version)
        return await self._call("GetWorkerStatus", self._stub.GetWorkerStatus, request, deadline_s)

    async def get_cache_status(
        self, latest_cache_version: int, need_cache_keys: bool, deadline_s: float
    ) -> CacheStatusPB:
        """KV counts; the full key set too when ``need_cache_keys`` and the worker's version differs from ours."""
        request = CacheVersionPB(latest_cache_version=latest_cache_version, need_cache_keys=need_cache_keys)
        return await self._call("GetCacheStatus", self._stub.GetCacheStatus, request, deadline_s)

    async def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> WorkerStatusClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, rpc: str, method: Callable[..., Awaitable[_Reply]], request: object, deadline_s: float
    ) -> _Reply:
        try:
            # wait_for_ready stays False: a worker that cannot be connected fails at once (UNAVAILABLE) instead of
            # holding the poller until the deadline.
            return await method(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnreachable(self.address, rpc, exc.code(), exc.details() or "", self.role) from exc

    def __repr__(self) -> str:
        return f"WorkerStatusClient({self.address!r}, role={self.role})"
