"""The simulator's snapshot -> protobuf conversions copy every field, and the servicer answers from the engine."""

from __future__ import annotations

import dataclasses

from google.protobuf.message import Message

from flexlb.proto.flexlb_worker_pb2 import CacheVersionPB, StatusVersionPB, TaskInfoPB, WorkerStatusPB
from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.grpc_service import INT32_MAX, SimStatusService, cache_status_pb, task_info_pb, worker_status_pb
from flexlb.sim.status import CacheStatus, EngineStatus, TaskInfo

# Every field differs from its protobuf default, so a field left uncopied shows.
RUNNING = TaskInfo(
    request_id=-(2**63), prefix_length=64, input_length=300, waiting_time_ms=7, iterate_count=2, dp_rank=1
)
WAITING = TaskInfo(
    request_id=12, prefix_length=0, input_length=90, waiting_time_ms=40, iterate_count=0, is_waiting=True
)
FINISHED = TaskInfo(
    request_id=2**63 - 1, prefix_length=128, input_length=200, waiting_time_ms=3, iterate_count=9, end_time_ms=1_700
)
STATUS = EngineStatus(
    role="RoleType.PREFILL",
    available_concurrency=6,
    running_task_info=(RUNNING, WAITING),
    finished_task_list=(FINISHED,),
    waiting_query_len=1,
    running_query_len=1,
    step_latency_ms=12.5,
    iterate_count=41,
    status_version=1_700_000_000_123,
    alive=True,
    latest_finished_version=5,
    available_kv_cache=40_000,
    total_kv_cache=131_072,
    dp_size=2,
    tp_size=4,
    precision="BF16",
    dp_rank=1,
)
CACHE = CacheStatus(
    available_kv_cache=40_000,
    total_kv_cache=131_072,
    block_size=64,
    version=9,
    cache_keys={-4_611_686_018_427_387_904: True, 17: True},
)


def field_names(message: Message) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


# flexlb's own fields of WorkerStatusPB, not in RTP-LLM's status (so not in the engine's snapshot either).
FLEXLB_FIELDS = {"http_port"}


def assert_copied(pb: Message, snapshot: object) -> None:
    """Same field set as the protobuf (but flexlb's own), and every scalar equal."""
    names = {f.name for f in dataclasses.fields(snapshot)}  # type: ignore[arg-type]
    assert names == field_names(pb) - FLEXLB_FIELDS
    for name in names:
        value = getattr(snapshot, name)
        if isinstance(value, (int, float, str, bool)):
            assert getattr(pb, name) == value, name


def test_task_info_copies_every_field() -> None:
    for task in (RUNNING, WAITING, FINISHED):
        pb = task_info_pb(task)
        assert_copied(pb, task)
    assert task_info_pb(WAITING).is_waiting


def test_worker_status_copies_every_field_and_every_task() -> None:
    pb = worker_status_pb(STATUS)
    assert_copied(pb, STATUS)
    assert pb.http_port == 0 and worker_status_pb(STATUS, http_port=8000).http_port == 8000  # the identity
    assert list(pb.running_task_info) == [task_info_pb(RUNNING), task_info_pb(WAITING)]
    assert list(pb.finished_task_list) == [task_info_pb(FINISHED)]
    assert WorkerStatusPB.FromString(pb.SerializeToString()) == pb  # the int64 extremes survive the wire


def test_worker_status_saturates_the_int32_iterate_count() -> None:
    assert worker_status_pb(dataclasses.replace(STATUS, iterate_count=2**40)).iterate_count == INT32_MAX


def test_cache_status_copies_every_field_and_the_keys() -> None:
    pb = cache_status_pb(CACHE)
    assert_copied(pb, CACHE)
    assert dict(pb.cache_keys) == CACHE.cache_keys
    assert dict(cache_status_pb(dataclasses.replace(CACHE, cache_keys={})).cache_keys) == {}


async def test_servicer_answers_from_the_engine() -> None:
    engine = SimEngine(EngineConfig(block_size=4, kv_blocks=64))  # not started: the request stays admitted
    engine.submit(list(range(10)), 5, request_id=77)
    service = SimStatusService(engine)
    status = await service.GetWorkerStatus(StatusVersionPB(latest_finished_version=-1), None)  # type: ignore[arg-type]
    assert status.role == "RoleType.PDFUSION"
    assert [(t.request_id, t.input_length, t.is_waiting) for t in status.running_task_info] == [(77, 10, False)]
    assert status.total_kv_cache == 64 * 4
    assert isinstance(status.running_task_info[0], TaskInfoPB)
    cache = await service.GetCacheStatus(CacheVersionPB(latest_cache_version=-1, need_cache_keys=True), None)  # type: ignore[arg-type]
    assert (cache.block_size, cache.total_kv_cache, dict(cache.cache_keys)) == (4, 256, {})  # nothing prefilled yet
