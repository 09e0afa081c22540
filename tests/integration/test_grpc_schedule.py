"""The gRPC schedule API (`enableGrpcPrefillMaster`) of a real router process: the HTTP API's choices, validation and
codes over gRPC, reservations made and given back in Redis, queue mode, Redis down, and the server's lifecycle."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from conftest import RouterProcess
from test_http_api import dump_service

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.grpc_api.convert import to_json
from flexlb.proto.flexlb_schedule_pb2 import ReleaseRequestPB, ScheduleRequestPB, ScheduleResponsePB
from flexlb.proto.flexlb_schedule_pb2_grpc import FlexlbSchedulerStub
from flexlb.state.store import FleetStore

PREFILL = WorkerSpec("10.6.0.1", 8000, Role.PREFILL, grpc_port=8001, group="g1", max_concurrency=8)
DECODE = WorkerSpec("10.6.0.2", 8010, Role.DECODE, grpc_port=8011, group="g1", max_concurrency=8)
LISTENING = re.compile(r"gRPC schedule API \(flexlb\.v1\.FlexlbScheduler\) listening on \S+:(\d+)")


def grpc_config(port: int, **more: object) -> dict[str, object]:
    return {"enableGrpcPrefillMaster": True, "grpcHost": "127.0.0.1", "grpcPort": port, **more}


@pytest.fixture(scope="module")
def grpc_service() -> str:
    return f"grpc{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def router(redis_server: EmbeddedRedis, grpc_service: str) -> Iterator[tuple[RouterProcess, int]]:
    port = free_port()
    # no in-flight prefixes: a request's blocks would count as cached for the next one, and the tests compare the
    # two transports' answers on the same fleet state
    proc = RouterProcess(redis_server.url, grpc_service, {**grpc_config(port), "inflightPrefixTtlMs": 0}).wait_ready()
    yield proc, port
    proc.stop()


@pytest.fixture
async def stub(router: tuple[RouterProcess, int]) -> AsyncIterator[FlexlbSchedulerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router[1]}") as channel:
        yield FlexlbSchedulerStub(channel)


@pytest.fixture
async def fleet(real_redis: aioredis.Redis, grpc_service: str) -> AsyncIterator[FleetStore]:
    store = FleetStore(real_redis, grpc_service)
    for spec in (PREFILL, DECODE):
        await store.register_worker(spec, WorkerStatus(kv_total=100_000, block_size=16, running=1, waiting=2))
    await store.set_cache_blocks(PREFILL.worker_id, [111, 222])
    yield store
    for spec in (PREFILL, DECODE):
        await store.remove_worker(spec.worker_id)


async def reserved(store: FleetStore, worker_id: str) -> int:
    """Live reservations on the worker, counted in Redis."""
    return await store.redis.zcard(store.keys.reservations(worker_id))


async def http_post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json()


REQUEST = {"seq_len": 64, "block_cache_keys": [111, 222, 333], "generate_timeout": 60_000, "model": "engine_service"}


async def test_schedule_and_release_choose_as_http_and_reserve_in_redis(
    router: tuple[RouterProcess, int], stub: FlexlbSchedulerStub, fleet: FleetStore
) -> None:
    proc, _ = router
    status, over_http = await http_post(f"{proc.url}/rtp_llm/schedule", {**REQUEST, "request_id": 1001})
    assert status == 200 and over_http["success"] is True
    await http_post(f"{proc.url}/rtp_llm/release", {"request_id": 1001})

    reply = await stub.Schedule(ScheduleRequestPB(request_id=1002, **REQUEST))

    # the same PD pair, estimates and debug info as the HTTP answer on the same fleet state, field for field
    expected = {**over_http, "server_status": [{**s, "request_id": 1002} for s in over_http["server_status"]]}
    assert to_json(reply) == expected
    by_role = {s.role: s for s in reply.server_status}
    assert set(by_role) == {"PREFILL", "DECODE"}
    assert (by_role["PREFILL"].server_ip, by_role["PREFILL"].grpc_port) == ("10.6.0.1", 8001)
    assert by_role["PREFILL"].debug_info.hit_cache_len == 32
    # the reservation is in Redis, on both workers
    assert await fleet.request_workers(1002) == sorted([PREFILL.worker_id, DECODE.worker_id])
    assert [await reserved(fleet, w.worker_id) for w in (PREFILL, DECODE)] == [1, 1]

    released = await stub.Release(ReleaseRequestPB(request_id=1002))

    assert to_json(released) == {"success": True, "code": 200, "request_id": 1002, "released": 2}
    assert await fleet.request_workers(1002) == []
    assert [await reserved(fleet, w.worker_id) for w in (PREFILL, DECODE)] == [0, 0]
    assert (await stub.Release(ReleaseRequestPB(request_id=1002))).released == 0  # idempotent


BAD: list[tuple[str, dict[str, object], str]] = [
    ("request_id 0", {"request_id": 0, "seq_len": 5}, "request_id: must not be 0"),
    ("request_id unset", {"seq_len": 5}, "request_id: must not be 0"),
    ("seq_len unset", {"request_id": 5}, "seq_len: required"),
    ("seq_len negative", {"request_id": 5, "seq_len": -1}, "seq_len: -1 is out of range"),
    ("timeout 0", {"request_id": 5, "seq_len": 1, "generate_timeout": 0}, "generate_timeout: 0 is out of range"),
    ("request time negative", {"request_id": 5, "seq_len": 1, "request_time_ms": -1}, "request_time_ms: -1 is out"),
]


@pytest.mark.parametrize(("case", "fields", "message"), BAD, ids=[c[0] for c in BAD])
async def test_bad_input_is_invalid_argument_naming_the_field_and_touches_nothing(
    stub: FlexlbSchedulerStub, fleet: FleetStore, case: str, fields: dict[str, object], message: str
) -> None:
    before = await dump_service(fleet.redis, fleet.keys.service)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Schedule(ScheduleRequestPB(**fields))  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")
    assert ("flexlb-code", "8406") in tuple(refused.value.trailing_metadata() or ())
    assert await dump_service(fleet.redis, fleet.keys.service) == before


async def test_release_of_request_id_0_is_invalid_argument(stub: FlexlbSchedulerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Release(ReleaseRequestPB(request_id=0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id: must not be 0" in (refused.value.details() or "")


async def test_unknown_model_is_not_found(stub: FlexlbSchedulerStub, fleet: FleetStore, grpc_service: str) -> None:
    for call in (
        stub.Schedule(ScheduleRequestPB(request_id=7, seq_len=10, model="gpt-9")),
        stub.Release(ReleaseRequestPB(request_id=7, model="gpt-9")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"unknown model 'gpt-9': this router serves '{grpc_service}'" == refused.value.details()
        assert ("flexlb-code", "8601") in tuple(refused.value.trailing_metadata() or ())
    assert await fleet.request_workers(7) == []
    # the service id is this router's model
    reply = await stub.Schedule(ScheduleRequestPB(request_id=8, seq_len=10, model=grpc_service))
    assert reply.success is True
    assert (await stub.Release(ReleaseRequestPB(request_id=8, model=grpc_service))).released == 2


@pytest.mark.parametrize(("dead", "code", "name"), [(PREFILL, 8402, "NO_PREFILL_WORKER"), (DECODE, 8403, "NO_DECODE")])
async def test_no_worker_is_a_reply_with_the_http_code(
    router: tuple[RouterProcess, int],
    stub: FlexlbSchedulerStub,
    fleet: FleetStore,
    dead: WorkerSpec,
    code: int,
    name: str,
) -> None:
    await fleet.update_status(dead.worker_id, {"alive": "false"})
    status, over_http = await http_post(f"{router[0].url}/rtp_llm/schedule", {**REQUEST, "request_id": 31})

    reply = await stub.Schedule(ScheduleRequestPB(request_id=32, **REQUEST))

    assert status == 503 and over_http["code"] == code
    assert (reply.success, reply.code, list(reply.server_status)) == (False, code, [])
    assert reply.error_message.startswith(f"{name}") and "is alive" in reply.error_message
    assert to_json(reply) == {**over_http, "degraded": False}
    assert await fleet.request_workers(32) == []


FUSION = [
    WorkerSpec(f"10.7.0.{i}", 8000, Role.PDFUSION, max_concurrency=limit) for i, limit in ((1, 2), (2, 3), (3, 4))
]
CAPACITY = sum(w.max_concurrency for w in FUSION)


async def test_concurrent_schedules_never_over_commit_and_are_all_released(
    start_router, real_store: FleetStore
) -> None:
    port = free_port()
    start_router(grpc_config(port))
    for spec in FUSION:
        await real_store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = FlexlbSchedulerStub(channel)
        ids = range(5001, 5033)

        replies = await asyncio.gather(*(stub.Schedule(ScheduleRequestPB(request_id=i, seq_len=100)) for i in ids))

        won = {i: r for i, r in zip(ids, replies, strict=True) if r.success}
        assert {r.code for r in replies if not r.success} <= {8404}  # NO_PDFUSION_WORKER: all full
        assert 0 < len(won) <= CAPACITY
        counts = {w.worker_id: await reserved(real_store, w.worker_id) for w in FUSION}
        assert all(counts[w.worker_id] <= w.max_concurrency for w in FUSION), counts
        assert sum(counts.values()) == len(won)
        for i, reply in won.items():  # each winner holds exactly the worker it was told
            (chosen,) = reply.server_status
            assert await real_store.request_workers(i) == [f"{chosen.server_ip}:{chosen.http_port}"]
        # what the burst left is taken one by one, and not one more: capacity neither lost nor exceeded
        extra = 6001
        while (await stub.Schedule(ScheduleRequestPB(request_id=extra, seq_len=100))).success:
            extra += 1
        assert len(won) + extra - 6001 == CAPACITY
        assert [await reserved(real_store, w.worker_id) for w in FUSION] == [w.max_concurrency for w in FUSION]

        releases = await asyncio.gather(
            *(stub.Release(ReleaseRequestPB(request_id=i)) for i in [*ids, *range(6001, extra)])
        )

    assert sum(r.released for r in releases) == CAPACITY
    assert [await reserved(real_store, w.worker_id) for w in FUSION] == [0, 0, 0]
    assert [k async for k in real_store.redis.scan_iter(match=f"{real_store.keys.prefix}:req:*")] == []


async def test_queue_mode_applies_port_0_is_logged_and_shutdown_is_clean(start_router, real_store: FleetStore) -> None:
    proc = start_router(grpc_config(0, enableQueueing=True))
    port = int(LISTENING.search(proc.log()).group(1))  # type: ignore[union-attr]
    await real_store.register_worker(
        WorkerSpec("10.8.0.1", 8000, Role.PDFUSION, max_concurrency=1), WorkerStatus(kv_total=1_000_000)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = FlexlbSchedulerStub(channel)
        assert (await stub.Schedule(ScheduleRequestPB(request_id=1, seq_len=10))).success
        waiting = asyncio.ensure_future(stub.Schedule(ScheduleRequestPB(request_id=2, seq_len=10)))
        for _ in range(200):  # it waits in the router's queue, as an HTTP request would
            _, info = await http_post(f"{proc.url}/rtp_llm/master/info", {})
            if info["queue_length"] == 1:
                break
            await asyncio.sleep(0.01)
        assert info["queue_length"] == 1 and not waiting.done()
        # behind it, a request whose generate_timeout passes in the queue: QUEUE_TIMEOUT, as a reply
        timed_out = await stub.Schedule(ScheduleRequestPB(request_id=3, seq_len=10, generate_timeout=100))
        assert (timed_out.success, timed_out.code) == (False, 8503)

        await stub.Release(ReleaseRequestPB(request_id=1))  # capacity back: the queued request gets it
        reply: ScheduleResponsePB = await asyncio.wait_for(waiting, 5)
        assert reply.success and reply.server_status[0].request_id == 2
        assert await real_store.request_workers(2) == ["10.8.0.1:8000"]
        assert (await stub.Release(ReleaseRequestPB(request_id=2))).released == 1

    proc.stop()
    assert proc.process.returncode == 0, proc.log()
    assert f"gRPC schedule API on 127.0.0.1:{port} stopped" in proc.log()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the port is free again


async def test_redis_down_answers_state_unavailable(start_router) -> None:
    port = free_port()
    proc = start_router(grpc_config(port), redis_url=f"redis://127.0.0.1:{free_port()}/0", wait=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 20)
        except TimeoutError:
            pytest.fail(f"gRPC schedule API not up:\n{proc.log()}")
        reply = await FlexlbSchedulerStub(channel).Schedule(ScheduleRequestPB(request_id=9, seq_len=10))
    assert (reply.success, reply.code) == (False, 8600)
    assert reply.error_message.startswith("STATE_UNAVAILABLE")


def test_a_port_in_use_fails_the_start_up_with_a_clear_message(start_router) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_router(grpc_config(port), wait=False)
        assert proc.process.wait(timeout=20) == 2
    assert (
        f"flexlb: error: grpcPort / grpcHost: the gRPC schedule API (enableGrpcPrefillMaster) cannot listen on"
        f" 127.0.0.1:{port}: Address already in use." in proc.log()
    )
