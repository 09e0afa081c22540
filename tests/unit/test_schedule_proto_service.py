"""The gRPC schedule servicer on a stand-in router context: refusals carry the HTTP message and code, an unexpected
error is logged and answered INTERNAL without its details, a release is not cut short by the caller leaving."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from flexlb.domain import ErrorCode, ScheduleRequest, ScheduleResult
from flexlb.grpc_api.service import ScheduleService
from flexlb.metrics import SchedulerMetrics
from flexlb.proto.flexlb_schedule_pb2 import ReleaseRequestPB, ScheduleRequestPB


class FakeContext:
    """What the servicer uses of grpc.aio.ServicerContext: abort raises, as gRPC's does."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        self.aborted = (code, details, tuple(trailing_metadata))
        raise grpc.aio.AbortError()


@dataclass
class FakeQueue:
    result: ScheduleResult | Exception
    seen: list[ScheduleRequest] = field(default_factory=list)

    async def schedule(self, request: ScheduleRequest) -> ScheduleResult:
        self.seen.append(request)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@dataclass
class SlowScheduler:
    released: list[int] = field(default_factory=list)

    async def release(self, request_id: int) -> int:
        await asyncio.sleep(0.05)
        self.released.append(request_id)
        return 2


@dataclass
class Context:
    queue: FakeQueue
    scheduler: SlowScheduler = field(default_factory=SlowScheduler)
    metrics: SchedulerMetrics = field(default_factory=lambda: SchedulerMetrics(CollectorRegistry()))
    service_id: str = "svc"
    master_host: str = "10.0.0.1:7001"
    model_names: frozenset[str] = frozenset()
    max_block_cache_keys: int = 65_536  # RouterContext.max_block_cache_keys
    owners: None = None  # RouterContext.owners: no client tokens, no cap


def service(result: ScheduleResult | Exception) -> tuple[ScheduleService, Context]:
    ctx = Context(FakeQueue(result))
    return ScheduleService(ctx), ctx  # type: ignore[arg-type]


async def test_a_refusal_goes_through_the_queue_and_comes_back_as_a_reply() -> None:
    servicer, ctx = service(ScheduleResult(success=False, code=ErrorCode.QUEUE_FULL, message="QUEUE_FULL: 3 waiting"))
    reply = await servicer.Schedule(ScheduleRequestPB(request_id=5, seq_len=9, block_cache_keys=[1, 2]), FakeContext())
    assert (reply.success, reply.code, reply.error_message) == (False, 8502, "QUEUE_FULL: 3 waiting")
    assert reply.real_master_host == "10.0.0.1:7001"
    assert ctx.queue.seen == [ScheduleRequest(request_id=5, seq_len=9, block_cache_keys=(1, 2))]


async def test_bad_input_aborts_before_the_queue_with_the_http_message() -> None:
    servicer, ctx = service(ScheduleResult(success=True))
    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await servicer.Schedule(ScheduleRequestPB(request_id=5, seq_len=9, model="other"), context)
    assert context.aborted == (
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'other': this router serves 'svc'",
        (("flexlb-code", "8601"),),
    )
    assert ctx.queue.seen == []


async def test_an_unexpected_error_is_internal_without_its_details(caplog: pytest.LogCaptureFixture) -> None:
    servicer, _ = service(RuntimeError("secret internals"))
    context = FakeContext()
    with caplog.at_level(logging.ERROR, logger="flexlb.grpc_api"), pytest.raises(grpc.aio.AbortError):
        await servicer.Schedule(ScheduleRequestPB(request_id=5, seq_len=9), context)
    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal error in Schedule; see the router's log", ())
    assert "secret internals" in caplog.text  # logged with its traceback, not sent


async def test_a_release_finishes_when_the_caller_goes_away() -> None:
    servicer, ctx = service(ScheduleResult(success=True))
    call = asyncio.ensure_future(servicer.Release(ReleaseRequestPB(request_id=8), FakeContext()))
    await asyncio.sleep(0.01)
    call.cancel()  # what gRPC does to the handler of a cancelled call
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)
    assert ctx.scheduler.released == [8]
