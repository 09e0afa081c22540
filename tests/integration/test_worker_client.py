"""WorkerStatusClient against an in-process gRPC worker that answers with RTP-LLM's semantics."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from flexlb.domain import Role, WorkerSpec
from flexlb.master.worker_client import WorkerStatusClient, WorkerUnreachable, grpc_address
from flexlb.proto.flexlb_worker_pb2 import (
    CacheStatusPB,
    CacheVersionPB,
    StatusVersionPB,
    TaskInfoPB,
    WorkerStatusPB,
)
from flexlb.proto.flexlb_worker_pb2_grpc import RpcServiceServicer, add_RpcServiceServicer_to_server

CACHE_KEYS = {-4_611_686_018_427_387_904: True, 17: True, 2**62: False}
FINISHED = [(21, 1_000), (22, 2_000), (23, 3_000)]  # (request_id, end_time_ms)


class FakeWorker(RpcServiceServicer):
    """A prefill worker with two running tasks and three finished ones; the finish version is ``end_time_ms``."""

    def __init__(self) -> None:
        self.status_version = 100
        self.cache_version = 7
        self.running = [
            TaskInfoPB(request_id=11, input_length=900, prefix_length=64, iterate_count=1),
            TaskInfoPB(request_id=12, input_length=300, waiting_time_ms=40, is_waiting=True),
        ]
        self.finished = [TaskInfoPB(request_id=rid, input_length=100, end_time_ms=end) for rid, end in FINISHED]

    async def GetWorkerStatus(self, request: StatusVersionPB, context: grpc.aio.ServicerContext) -> WorkerStatusPB:
        self.status_version += 1  # grows with every report
        return WorkerStatusPB(
            role="RoleType.PREFILL",
            running_task_info=self.running,
            finished_task_list=[t for t in self.finished if t.end_time_ms > request.latest_finished_version],
            waiting_query_len=sum(t.is_waiting for t in self.running),
            running_query_len=sum(not t.is_waiting for t in self.running),
            step_latency_ms=12.5,
            status_version=self.status_version,
            alive=True,
            latest_finished_version=max(t.end_time_ms for t in self.finished),
            available_kv_cache=40_000,
            total_kv_cache=65_536,
        )

    async def GetCacheStatus(self, request: CacheVersionPB, context: grpc.aio.ServicerContext) -> CacheStatusPB:
        reply = CacheStatusPB(available_kv_cache=40_000, total_kv_cache=65_536, block_size=64, version=7)
        if request.need_cache_keys and request.latest_cache_version != self.cache_version:
            reply.cache_keys.update(CACHE_KEYS)  # the full set, only when asked and it moved
        return reply


class StuckWorker(RpcServiceServicer):
    """Accepts the call, then never answers."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.never = asyncio.Event()

    async def GetWorkerStatus(self, request: StatusVersionPB, context: grpc.aio.ServicerContext) -> WorkerStatusPB:
        self.entered.set()
        await self.never.wait()
        return WorkerStatusPB()


async def serve(servicer: RpcServiceServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add_RpcServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")  # port 0: the OS picks a free one, no race
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def client() -> AsyncIterator[WorkerStatusClient]:
    server, address = await serve(FakeWorker())
    client = WorkerStatusClient(address, Role.PREFILL)
    yield client
    await client.close()
    await server.stop(grace=None)


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address where nothing listens: a socket bound but not listening holds the port, so nobody else takes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_worker_status_round_trip(client: WorkerStatusClient) -> None:

    first = await client.get_worker_status(latest_finished_version=0, deadline_s=5)

    assert first.role == "RoleType.PREFILL"
    assert first.alive
    assert [t.request_id for t in first.running_task_info] == [11, 12]
    assert [t.is_waiting for t in first.running_task_info] == [False, True]
    assert first.running_task_info[0].input_length == 900
    assert (first.waiting_query_len, first.running_query_len) == (1, 1)
    assert first.step_latency_ms == 12.5
    assert (first.available_kv_cache, first.total_kv_cache) == (40_000, 65_536)
    assert [t.request_id for t in first.finished_task_list] == [21, 22, 23]
    assert first.latest_finished_version == 3_000

    # Asking from a version returns only the tasks finished after it, and the status version moves on.
    later = await client.get_worker_status(latest_finished_version=2_000, deadline_s=5)
    assert [t.request_id for t in later.finished_task_list] == [23]
    assert later.status_version > first.status_version
    caught_up = await client.get_worker_status(latest_finished_version=first.latest_finished_version, deadline_s=5)
    assert list(caught_up.finished_task_list) == []


async def test_cache_status_round_trip(client: WorkerStatusClient) -> None:

    full = await client.get_cache_status(latest_cache_version=0, need_cache_keys=True, deadline_s=5)
    assert (full.available_kv_cache, full.total_kv_cache, full.block_size, full.version) == (40_000, 65_536, 64, 7)
    assert dict(full.cache_keys) == CACHE_KEYS

    # Same version: counts only. Not asked: counts only.
    unchanged = await client.get_cache_status(latest_cache_version=full.version, need_cache_keys=True, deadline_s=5)
    assert unchanged.version == 7 and dict(unchanged.cache_keys) == {}
    assert unchanged.available_kv_cache == 40_000
    not_asked = await client.get_cache_status(latest_cache_version=0, need_cache_keys=False, deadline_s=5)
    assert not_asked.total_kv_cache == 65_536 and dict(not_asked.cache_keys) == {}


async def test_deadline_exceeded_is_unreachable() -> None:
    stuck = StuckWorker()
    server, address = await serve(stuck)
    deadline_s = 0.3
    try:
        async with WorkerStatusClient(address, Role.DECODE) as client:
            started = time.monotonic()
            # The outer timeout only turns "the client ignored its deadline" into a quick failure, not a hang.
            with pytest.raises(WorkerUnreachable) as caught:
                async with asyncio.timeout(deadline_s + 5):
                    await client.get_worker_status(latest_finished_version=0, deadline_s=deadline_s)
            elapsed = time.monotonic() - started
    finally:
        await server.stop(grace=None)

    assert stuck.entered.is_set()  # the call reached the worker: it was the answer that never came
    error = caught.value
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.address == address and error.rpc == "GetWorkerStatus" and error.role == Role.DECODE
    assert "DEADLINE_EXCEEDED" in str(error) and address in str(error) and "GetWorkerStatus" in str(error)
    assert elapsed < deadline_s + 1.0  # bounded by the deadline (plus scheduling slack), not by the worker


async def test_closed_port_is_unreachable(refused_address: str) -> None:
    async with WorkerStatusClient(refused_address) as client:
        started = time.monotonic()
        with pytest.raises(WorkerUnreachable) as caught:
            await client.get_cache_status(latest_cache_version=0, need_cache_keys=True, deadline_s=10)
        elapsed = time.monotonic() - started

    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert refused_address in str(error) and "GetCacheStatus" in str(error) and "UNAVAILABLE" in str(error)
    assert elapsed < 5  # a refused connection fails at once, it does not wait for the deadline


async def test_unimplemented_rpc_is_unreachable() -> None:
    """A server without the status RPCs (e.g. a wrong method path) is reported, not mistaken for an empty status."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with WorkerStatusClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(WorkerUnreachable, match="UNIMPLEMENTED"):
                await client.get_worker_status(latest_finished_version=0, deadline_s=5)
    finally:
        await server.stop(grace=None)


async def test_grpc_address_uses_grpc_port() -> None:
    assert grpc_address(WorkerSpec("10.0.0.5", 8000, Role.PREFILL)) == "10.0.0.5:8001"  # HTTP port + 1
    assert grpc_address(WorkerSpec("10.0.0.5", 8000, Role.DECODE, grpc_port=9100)) == "10.0.0.5:9100"
    assert grpc_address(WorkerSpec("fd00::5", 8000, Role.DECODE)) == "[fd00::5]:8001"
    async with WorkerStatusClient.for_worker(WorkerSpec("10.0.0.5", 8000, Role.VIT)) as client:
        assert (client.address, client.role) == ("10.0.0.5:8001", Role.VIT)
