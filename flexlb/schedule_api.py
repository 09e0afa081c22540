"""The schedule API's work, whatever the transport: what a router's handlers share (RouterContext), the model
check, and run_schedule (validate, schedule through the queue, count, log). HTTP (flexlb/http/routes.py), gRPC
(flexlb/grpc_api/service.py) and the proxy (flexlb/proxy/handler.py) all call these."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexlb.domain import ErrorCode, ScheduleRequest, ScheduleResult
from flexlb.http.wire import MAX_BLOCK_CACHE_KEYS, BadRequest, parse_schedule_request
from flexlb.metrics import SchedulerMetrics
from flexlb.reservation_owners import OwnerRefused, ReservationOwners
from flexlb.scheduler import Scheduler
from flexlb.state.store import FleetStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from flexlb.master.service import MasterService
    from flexlb.queueing import RequestQueue

log = logging.getLogger("flexlb.schedule")

# Names a request may carry for this service besides its id: older RTP-LLM clients send "engine_service".
GENERIC_MODEL_NAMES = frozenset({"engine_service"})


@dataclass(slots=True)
class RouterContext:
    """Everything the handlers use, built once by create_app."""

    scheduler: Scheduler
    store: FleetStore
    metrics: SchedulerMetrics
    service_id: str
    master_host: str  # this router's ip:port, reported as real_master_host (any router can schedule)
    model_names: frozenset[str] = frozenset()
    master: MasterService | None = None  # this process's master election, when it contends
    queue: RequestQueue = None  # type: ignore[assignment]  # set by create_app (queue mode, or a pass-through)
    metrics_registry: CollectorRegistry | None = None  # what /metrics serves; None = metrics.registry
    ready: bool = False  # reached Redis once (scripts loaded): until then /health answers 503 "starting"
    max_block_cache_keys: int = MAX_BLOCK_CACHE_KEYS  # maxBlockCacheKeys
    owners: ReservationOwners | None = None  # per-client bookkeeping (schedule tokens or a cap); None: none


def check_model(ctx: RouterContext, model: str | None) -> None:
    if model is None or model == ctx.service_id or model in ctx.model_names or model in GENERIC_MODEL_NAMES:
        return
    raise BadRequest(
        f"unknown model {model!r}: this router serves {ctx.service_id!r}",
        status=404,
        code=ErrorCode.UNKNOWN_MODEL,
    )


def _refused(exc: OwnerRefused) -> BadRequest:
    code = {429: ErrorCode.TOO_MANY_RESERVATIONS, 403: ErrorCode.PERMISSION_DENIED}.get(exc.status)
    return BadRequest(exc.message, status=exc.status, code=code or ErrorCode.INVALID_REQUEST)


async def run_schedule(
    ctx: RouterContext, body: Awaitable[dict[str, Any]], via: str = "", client: str = "anonymous"
) -> tuple[ScheduleRequest, ScheduleResult]:
    """The schedule API's work, whatever the transport: validate ``body``, take the client's slot
    (``ctx.owners``), schedule through the queue, count and log. Raises BadRequest (counted too) for a request the
    client got wrong or over its cap."""
    started = time.perf_counter()
    owners = ctx.owners
    new_slot = False
    try:
        req = parse_schedule_request(await body, ctx.max_block_cache_keys, lambda: ctx.scheduler.view.block_size())
        check_model(ctx, req.model)
        if owners is not None:
            ttl_ms = max(1, min(ctx.scheduler.options.reservation_ttl_ms, req.generate_timeout_ms))
            try:
                new_slot = owners.take(client, req.request_id, ttl_ms)
            except OwnerRefused as exc:
                raise _refused(exc) from None
    except BadRequest as exc:
        ctx.metrics.schedules_by_code(str(int(exc.code))).inc()
        raise
    result = await ctx.queue.schedule(req)  # cancelled: the slot stays until its TTL (a reservation may exist)
    if owners is not None and new_slot and not result.success:
        owners.give_back(client, req.request_id)  # a refusal reserves nothing
    ctx.metrics.schedules_by_code(str(int(result.code))).inc()
    ctx.metrics.schedule_latency.observe(time.perf_counter() - started)
    if not result.success:
        log.info("request %s%s: %s (%s)", req.request_id, via, result.code.name, result.message)
    return req, result


async def run_release(ctx: RouterContext, request_id: int, client: str = "anonymous") -> int:
    """Release ``request_id``'s reservations, when ``client`` may (BadRequest 403 otherwise); how many were held."""
    owners = ctx.owners
    if owners is not None:
        try:
            owners.check_may_release(client, request_id)
        except OwnerRefused as exc:
            raise _refused(exc) from None
    released = await ctx.scheduler.release(request_id)
    if owners is not None:
        owners.give_back(client, request_id)
    return released
