"""The gRPC schedule API's servicer: the HTTP handlers' semantics (flexlb/http/routes.py ``schedule`` and
``release``) over gRPC, on the same RouterContext.

Schedule validates as the JSON API does (a bad request or an unknown model fails the call with INVALID_ARGUMENT or
NOT_FOUND and the HTTP API's message), goes through the router's RequestQueue (so queue mode applies) and answers
every scheduling outcome, refusals included, as a reply with the HTTP body's ``success`` and ``code``. Release gives
the request's reservations back through Scheduler.release.

With ``FLEXLB_SCHEDULE_TOKENS`` set, every call needs the metadata ``authorization: Bearer <token>`` (the HTTP API's
header): UNAUTHENTICATED without it or with an unknown token, PERMISSION_DENIED with another API's key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from flexlb.domain import ErrorCode
from flexlb.grpc_api.convert import (
    CODE_METADATA_KEY,
    release_fields,
    release_response_pb,
    schedule_fields,
    schedule_response_pb,
    status_code_for,
)
from flexlb.http.auth import ANONYMOUS, Api, Keyring, Refusal
from flexlb.http.wire import BadRequest, parse_request_id, schedule_body
from flexlb.proto.flexlb_schedule_pb2 import (
    ReleaseRequestPB,
    ReleaseResponsePB,
    ScheduleRequestPB,
    ScheduleResponsePB,
)
from flexlb.proto.flexlb_schedule_pb2_grpc import FlexlbSchedulerServicer
from flexlb.schedule_api import RouterContext, check_model, run_release, run_schedule

log = logging.getLogger("flexlb.grpc_api")

_Reply = TypeVar("_Reply")


class ScheduleService(FlexlbSchedulerServicer):
    """``flexlb.v1.FlexlbScheduler`` on one router. Runs on the router's event loop (it shares its Redis client)."""

    def __init__(self, ctx: RouterContext, keyring: Keyring | None = None) -> None:
        self.ctx = ctx
        self.keyring = keyring

    async def _client(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's client name (its token's fingerprint), or the call is aborted as the HTTP API answers 401 /
        403."""
        if self.keyring is None:
            return ANONYMOUS
        metadata = context.invocation_metadata() or ()
        authorization = next((str(v) for k, v in metadata if k.lower() == "authorization"), None)
        outcome = self.keyring.check(Api.SCHEDULE, authorization)
        if isinstance(outcome, Refusal):
            await _refuse(context, BadRequest(outcome.message, status=outcome.status, code=outcome.code))
        assert isinstance(outcome, str)
        return outcome

    async def Schedule(self, request: ScheduleRequestPB, context: grpc.aio.ServicerContext) -> ScheduleResponsePB:
        return await _guarded("Schedule", context, lambda: self._schedule(request, context))

    async def Release(self, request: ReleaseRequestPB, context: grpc.aio.ServicerContext) -> ReleaseResponsePB:
        return await _guarded("Release", context, lambda: self._release(request, context))

    async def _schedule(self, request: ScheduleRequestPB, context: grpc.aio.ServicerContext) -> ScheduleResponsePB:
        ctx = self.ctx
        client = await self._client(context)

        async def body() -> dict[str, Any]:
            return schedule_fields(request)

        try:
            req, result = await run_schedule(ctx, body(), via=" (gRPC)", client=client)
        except BadRequest as exc:
            await _refuse(context, exc)
        return schedule_response_pb(schedule_body(result, req.request_id, master_host=ctx.master_host))

    async def _release(self, request: ReleaseRequestPB, context: grpc.aio.ServicerContext) -> ReleaseResponsePB:
        ctx = self.ctx
        client = await self._client(context)
        data = release_fields(request)
        try:
            request_id = parse_request_id(data)
            check_model(ctx, data.get("model"))
            # Shielded: a caller that gives up mid-release must not leave the reservations to their TTL.
            released = await asyncio.shield(run_release(ctx, request_id, client))
        except BadRequest as exc:
            await _refuse(context, exc)
        body = {"success": True, "code": int(ErrorCode.OK), "request_id": request_id, "released": released}
        return release_response_pb(body)


async def _refuse(context: grpc.aio.ServicerContext, exc: BadRequest) -> NoReturn:
    """Fail the call as the HTTP API answers 4xx: the message names the field, the flexlb code is in the trailers."""
    await context.abort(status_code_for(exc), exc.message, trailing_metadata=((CODE_METADATA_KEY, str(int(exc.code))),))
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers and readers sure


async def _guarded(rpc: str, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[_Reply]]) -> _Reply:
    """Run ``call``; an unexpected error is logged here and answered INTERNAL without its details, as the HTTP API
    answers a JSON 500 and never a stack trace."""
    try:
        return await call()
    except grpc.aio.AbortError:  # a refusal already sent by _refuse
        raise
    except Exception:
        log.exception("gRPC %s: unexpected error", rpc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}; see the router's log")
        raise AssertionError("context.abort returned") from None
