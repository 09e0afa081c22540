"""Asyncio gRPC client of one engine worker's status RPCs (RTP-LLM's ``RpcService``), used by the master's poller.

One client (one HTTP/2 connection) per worker, kept for the worker's lifetime: the poller calls it every 20 ms, so
the connection must be reused. Every failure surfaces as :class:`WorkerUnreachable`, which the poller turns into
"worker not alive".

The calls go over ``flexlb.master.grpc_lite`` (a small HTTP/2 + gRPC codec: some 30 us of CPU a call instead of
grpcio's ~350 us, which is what lets one process poll 1,250 workers); a worker whose answers it cannot read
(Huffman-coded headers, compression) is switched to a grpcio channel for good. ``transport="grpc"`` uses grpcio
from the start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import grpc

from flexlb.domain import Role, WorkerSpec
from flexlb.master.grpc_lite import ClientProtocol, LiteChannel, RpcFailed, Unsupported
from flexlb.proto.flexlb_worker_pb2 import (
    CacheStatusPB,
    CacheVersionPB,
    StatusVersionPB,
    WorkerStatusPB,
)
from flexlb.proto.flexlb_worker_pb2_grpc import RpcServiceStub

_Reply = TypeVar("_Reply")
log = logging.getLogger("flexlb.master.worker_client")
Transport = Literal["lite", "grpc"]
_STATUS_PATH = "/RpcService/GetWorkerStatus"

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


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class WorkerStatusClient:
    """Status RPCs of one worker at ``address`` (``host:grpc_port``). Close it with :meth:`close`."""

    def __init__(self, address: str, role: Role | None = None, *, transport: Transport = "lite") -> None:
        self.address = address
        self.role = role
        self._lite: LiteChannel | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: RpcServiceStub | None = None
        self._requests: dict[int, bytes] = {}  # latest_finished_version -> serialized StatusVersionPB (the last few)
        if transport == "lite":
            host, port = _split_address(address)
            self._lite = LiteChannel(host, port)
        else:
            self._open_grpc()

    @classmethod
    def for_worker(cls, spec: WorkerSpec) -> WorkerStatusClient:
        return cls(grpc_address(spec), spec.role)

    @property
    def transport(self) -> Transport:
        return "lite" if self._lite is not None else "grpc"

    def _open_grpc(self) -> RpcServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            self._stub = RpcServiceStub(self._channel)
        return self._stub

    def _status_request(self, latest_finished_version: int) -> bytes:
        request = self._requests.get(latest_finished_version)
        if request is None:
            if len(self._requests) > 8:
                self._requests.clear()
            request = StatusVersionPB(latest_finished_version=latest_finished_version).SerializeToString()
            self._requests[latest_finished_version] = request
        return request

    def start_status(self, latest_finished_version: int) -> tuple[ClientProtocol, int, asyncio.Future[bytes]] | None:
        """A status call sent now on the open light connection, without a deadline (``LiteChannel.start``), read
        with :meth:`status_reply`; None when there is none (not connected yet, or switched to grpcio): then
        :meth:`get_worker_status` is the way."""
        if self._lite is None:
            return None
        return self._lite.start(_STATUS_PATH, self._status_request(latest_finished_version))

    def status_reply(self, call: asyncio.Future[bytes]) -> WorkerStatusPB | None:
        """The status a finished :meth:`start_status` call brought; raises WorkerUnreachable; None when the
        light transport cannot read this worker (:meth:`get_worker_status` switches it to grpcio)."""
        try:
            return WorkerStatusPB.FromString(call.result())
        except RpcFailed as exc:
            code = grpc_code(exc.code)
            raise WorkerUnreachable(self.address, "GetWorkerStatus", code, exc.detail, self.role) from exc
        except (Unsupported, asyncio.CancelledError):
            return None

    async def get_worker_status(self, latest_finished_version: int, deadline_s: float) -> WorkerStatusPB:
        """The worker's status; its ``finished_task_list`` holds tasks finished after ``latest_finished_version``."""
        if self._lite is not None:
            request = self._status_request(latest_finished_version)
            try:
                return WorkerStatusPB.FromString(await self._lite.call(_STATUS_PATH, request, deadline_s))
            except RpcFailed as exc:
                raise WorkerUnreachable(
                    self.address, "GetWorkerStatus", grpc_code(exc.code), exc.detail, self.role
                ) from exc
            except Unsupported as exc:
                await self._fall_back(exc)
        stub = self._open_grpc()
        request_pb = StatusVersionPB(latest_finished_version=latest_finished_version)
        return await self._call("GetWorkerStatus", stub.GetWorkerStatus, request_pb, deadline_s)

    async def get_cache_status(
        self, latest_cache_version: int, need_cache_keys: bool, deadline_s: float
    ) -> CacheStatusPB:
        """KV counts; the full key set too when ``need_cache_keys`` and the worker's version differs from ours."""
        request = CacheVersionPB(latest_cache_version=latest_cache_version, need_cache_keys=need_cache_keys)
        if self._lite is not None:
            reply = await self._lite_call("GetCacheStatus", request.SerializeToString(), deadline_s)
            if reply is not None:
                return CacheStatusPB.FromString(reply)
        stub = self._open_grpc()
        return await self._call("GetCacheStatus", stub.GetCacheStatus, request, deadline_s)

    async def _lite_call(self, rpc: str, request: bytes, deadline_s: float) -> bytes | None:
        """The reply over the light transport, or None after switching this client to grpcio."""
        lite = self._lite
        assert lite is not None
        try:
            return await lite.call(f"/RpcService/{rpc}", request, deadline_s)
        except RpcFailed as exc:
            raise WorkerUnreachable(self.address, rpc, grpc_code(exc.code), exc.detail, self.role) from exc
        except Unsupported as exc:
            await self._fall_back(exc)
            return None

    async def _fall_back(self, exc: Exception) -> None:
        log.info("worker %s: %s; polling it with grpcio from now on", self.address, exc)
        lite, self._lite = self._lite, None
        if lite is not None:
            await lite.close()

    async def close(self) -> None:
        """Close the connection; calls still in flight are cancelled."""
        if self._lite is not None:
            await self._lite.close()
        if self._channel is not None:
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
        return f"WorkerStatusClient({self.address!r}, role={self.role}, transport={self.transport!r})"


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a status code number (UNKNOWN for a number gRPC does not define)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)
