"""Fuzzing the gRPC schedule API (enableGrpcPrefillMaster) of a real router process with hypothesis: every call is
answered within its deadline with a status the API documents (OK, INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN; a refused call leaves Redis unchanged; a granted one is released; the
router's log has no traceback. Profiles as in test_fuzz_http.py (FLEXLB_FUZZ_PROFILE)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import RouterProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.proto.flexlb_schedule_pb2 import ReleaseRequestPB, ScheduleRequestPB
from flexlb.proto.flexlb_schedule_pb2_grpc import FlexlbSchedulerStub
from flexlb.state.store import FleetStore

FUZZ = settings(
    derandomize=os.environ.get("FLEXLB_FUZZ_PROFILE", "ci") == "ci",
    max_examples=25 if os.environ.get("FLEXLB_FUZZ_PROFILE", "ci") == "ci" else 300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ANSWERED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
SMALLISH = st.one_of(st.integers(min_value=-5, max_value=200_000), INT64)
WORKERS = (
    WorkerSpec("10.8.0.1", 8000, Role.PREFILL, grpc_port=8001, max_concurrency=4),
    WorkerSpec("10.8.0.2", 8010, Role.DECODE, grpc_port=8011, max_concurrency=4),
)


@pytest.fixture(scope="module")
def grpc_router(redis_server: EmbeddedRedis) -> Iterator[tuple[RouterProcess, int, str]]:
    service = f"fuzzg{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = {"enableGrpcPrefillMaster": True, "grpcHost": "127.0.0.1", "grpcPort": port}
    config |= {"workerStatusMaxAgeMs": 0}  # statuses written once by the test

    async def register() -> None:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        store = FleetStore(client, service)
        for spec in WORKERS:
            await store.register_worker(spec, WorkerStatus(kv_total=100_000, block_size=16))
        await client.aclose()

    asyncio.run(register())
    router = RouterProcess(redis_server.url, service, config).wait_ready()
    yield router, port, service
    router.stop()


def _service_dump(redis_url: str, service: str) -> dict[str, bytes]:
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    try:
        keys = sorted(client.scan_iter(match=f"flexlb:{{{service}}}:*", count=1000))
        # the change stream and its counter move with any write; a refusal must write nothing at all
        return {k.decode(): client.dump(k) for k in keys}
    finally:
        client.close()


def schedule_requests() -> st.SearchStrategy[ScheduleRequestPB]:
    def build(rid, seq_len, keys, timeout, model, request_time) -> ScheduleRequestPB:  # type: ignore[no-untyped-def]
        request = ScheduleRequestPB(request_id=rid, block_cache_keys=keys)
        for name, value in (("seq_len", seq_len), ("generate_timeout", timeout), ("request_time_ms", request_time)):
            if value is not None:
                setattr(request, name, value)
        if model is not None:
            request.model = model
        return request

    return st.builds(
        build,
        st.one_of(st.just(0), SMALLISH),
        st.one_of(st.none(), SMALLISH),
        st.lists(INT64, max_size=40),
        st.one_of(st.none(), SMALLISH),
        st.one_of(st.none(), st.just(""), st.just("engine_service"), st.text(max_size=30)),
        st.one_of(st.none(), SMALLISH),
    )


@FUZZ
@given(request=schedule_requests())
def test_schedule_is_always_answered_and_a_refusal_changes_nothing(
    grpc_router: tuple[RouterProcess, int, str], redis_server: EmbeddedRedis, request: ScheduleRequestPB
) -> None:
    router, port, service = grpc_router
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = FlexlbSchedulerStub(channel)
        before = _service_dump(redis_server.url, service)
        try:
            reply = stub.Schedule(request, timeout=15)
        except grpc.RpcError as exc:
            assert exc.code() in ANSWERED, (exc.code(), exc.details(), request)
            assert _service_dump(redis_server.url, service) == before, f"refused {exc.code()} but Redis changed"
            return
        if reply.success:
            stub.Release(ReleaseRequestPB(request_id=request.request_id), timeout=15)
        else:
            assert reply.code in {8400, 8402, 8403, 8404, 8405, 8502, 8503, 8600, 8601, 8602}, reply
    assert "Traceback" not in Path(router.log_path).read_text(errors="replace")


@FUZZ
@given(request_id=st.one_of(st.just(0), INT64), model=st.one_of(st.none(), st.text(max_size=30)))
def test_release_is_always_answered(
    grpc_router: tuple[RouterProcess, int, str], request_id: int, model: str | None
) -> None:
    router, port, _ = grpc_router
    request = ReleaseRequestPB(request_id=request_id)
    if model is not None:
        request.model = model
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = FlexlbSchedulerStub(channel).Release(request, timeout=15)
        except grpc.RpcError as exc:
            assert exc.code() in ANSWERED, (exc.code(), exc.details(), request)
        else:
            assert reply.released >= 0
    assert "Traceback" not in Path(router.log_path).read_text(errors="replace")
