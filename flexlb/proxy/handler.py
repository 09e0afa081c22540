"""One proxied request: validate, schedule, forward to the chosen worker(s), relay the answer, release.

The reservation is released however the request ends (answered, failed, client gone): the ``finally`` around
everything after scheduling starts it once the answer was sent whole (an answer not streamed is sent by the handler
itself, not after it returns), as a task of its own, so neither the answer nor the connection's next request waits
for Redis (the scheduler's shutdown waits for it before Redis closes); a request the scheduler refused holds nothing
and costs no release. A worker that fails before its first byte is released at once, and waited for, before the
request is scheduled again without it (the new reservation has the same request id), ``retries`` times at most.

A client that disconnects cancels its handler (the router's server runs with ``handler_cancellation``, see
``flexlb serve``): the cancellation unwinds through the ``finally`` blocks, which close the upstream connection (the
worker cancels the request) and release the reservation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from flexlb.blocks import block_cache_keys
from flexlb.domain import Choice, Role, ScheduleRequest
from flexlb.http.body import request_body
from flexlb.http.wire import BadRequest
from flexlb.proxy.context import PROXY, ProxyContext
from flexlb.proxy.errors import ClientGone, ProxyError, error_response, from_schedule, invalid
from flexlb.proxy.http1 import Response
from flexlb.proxy.metrics import TIMER_KEY, RequestTimer
from flexlb.proxy.parse import ProxiedRequest, Route, parse_body, with_tokens
from flexlb.proxy.pd import PrefillRefused, UpstreamFailures, bootstrap_fields, drain, open_pair
from flexlb.proxy.plan import forward_body, plan
from flexlb.proxy.relay import relay
from flexlb.proxy.upstream import Target, UpstreamFailure, open_response
from flexlb.proxy.usage import cached_tokens
from flexlb.schedule_api import check_model
from flexlb.scheduler import Scheduler
from flexlb.tokenize import TokenizerError

log = logging.getLogger("flexlb.proxy")

CLIENT_CLOSED = 499  # nginx's status for "the client went away", in metrics only


def handler_for(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await proxy_request(request, route)

    return handle


@dataclass(slots=True)
class _Streamed:
    """The status of a stream sent whole: a client closing the connection after that (while the reservation is
    released) did not abort anything."""

    status: int | None = None


async def proxy_request(request: web.Request, route: Route) -> web.StreamResponse:
    pctx = request.app[PROXY]
    status = 500
    request_id: int | None = None
    streamed = _Streamed()
    timer = request[TIMER_KEY] = RequestTimer(route.value, pctx.model_name)
    try:
        parsed = await _parse(request, route, pctx)
        request_id = pctx.new_id()
        response = await _serve(request, pctx, parsed, request_id, streamed)
        status = response.status
        return response
    except ProxyError as exc:
        status = exc.status
        if exc.status >= 500:
            log.info("request %s on %s: HTTP %d: %s", request_id, route.value, exc.status, exc.message)
        return error_response(exc, request_id)
    except ClientGone:  # noticed by a failed write
        status = CLIENT_CLOSED
        log.info("request %s on %s: the client went away; upstream cancelled", request_id, route.value)
        return web.Response(status=CLIENT_CLOSED)  # not sent: the connection is gone
    except asyncio.CancelledError:  # the server cancels the handler of a client that disconnected
        if streamed.status is not None:
            status = streamed.status
        elif request.transport is None or request.transport.is_closing():
            status = CLIENT_CLOSED
            log.info("request %s on %s: the client went away; upstream cancelled", request_id, route.value)
        raise
    except Exception:
        log.exception("request %s on %s: unexpected error", request_id, route.value)
        error = ProxyError(500, f"internal error in {route.value}; see the router's log", code="internal_error")
        return error_response(error, request_id)
    finally:
        pctx.metrics.count_request(route.value, status)
        pctx.metrics.finished(timer)


async def _parse(request: web.Request, route: Route, pctx: ProxyContext) -> ProxiedRequest:
    try:
        raw = await request_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise ProxyError(413, f"request body too large: {exc.text}", code="request_too_large") from None
    parsed = parse_body(route, raw)
    try:
        check_model(pctx.router, parsed.model)
    except BadRequest:  # check_model's one refusal: a model this router does not serve
        message = f"unknown model {parsed.model!r}: this router serves {pctx.model_name!r} (GET /v1/models)"
        raise ProxyError(404, message, code="model_not_found", param="model") from None
    assert parsed.prompt is not None
    try:  # the engine's tokens (flexlb.tokenize): its block keys are what the fleet's cache index holds
        tokens = await pctx.tokenizer.tokens(parsed.prompt)
    except TokenizerError as exc:
        raise invalid(str(exc)) from None
    return with_tokens(parsed, tokens)


async def _serve(
    request: web.Request, pctx: ProxyContext, parsed: ProxiedRequest, request_id: int, streamed: _Streamed
) -> web.StreamResponse:
    router = pctx.router
    body = forward_body(parsed, request_id, pctx.options.served_model_name)
    keys = tuple(block_cache_keys(parsed.tokens, router.scheduler.view.block_size()))
    failures: list[UpstreamFailure] = []
    breakers = pctx.breakers
    retries = pctx.options.retries
    held = False  # a reservation may be held: from the start of a schedule until its refusal or release
    try:
        for attempt in range(retries + 1):
            # seq_len is the prompt: it is what the TTFT estimate computes, and the reservation lives only until
            # the worker reports the request (then its own KV counts carry the growing output).
            failed = frozenset(f.target.worker_id for f in failures)
            tripped = breakers.excluded() - failed if breakers is not None else frozenset()
            schedule_request = ScheduleRequest(
                request_id=request_id,
                seq_len=len(parsed.tokens),
                block_cache_keys=keys,
                generate_timeout_ms=pctx.options.queue_timeout_ms,
                exclude_workers=failed | tripped,
                output_tokens=parsed.output_tokens,
                ttft_bound_ms=pctx.options.admission_ttft_ms,
            )
            held = True  # also when cancelled meanwhile: the reservation may have been made
            # The first attempt may wait in the router's queue (admission by estimated wait, or queue mode); a retry
            # does not: with its failed workers excluded it could wait for capacity that never comes.
            if attempt == 0 and router.queue is not None:
                admission = bool(pctx.options.admission_ttft_ms)
                result = await router.queue.schedule(schedule_request, hold=admission or None, busy_only=admission)
            else:
                result = await router.scheduler.schedule(schedule_request)
            if not result.success and tripped:
                # open breakers left no worker: rather one of theirs than none (a breaker never refuses alone)
                result = await router.scheduler.schedule(replace(schedule_request, exclude_workers=failed))
            if not result.success:  # a refusal reserves nothing (all roles or none)
                held = False
                raise _no_worker(from_schedule(result), failures)
            chosen = [c.worker.worker_id for c in result.choices.values()]
            if breakers is not None:
                breakers.sending(chosen)
            try:
                response = await _attempt(request, pctx, parsed, body, request_id, result.choices, streamed)
            except UpstreamFailures as exc:
                await _release(router.scheduler, request_id)
                held = False
                failures += exc.failures
                for failure in exc.failures if breakers is not None else ():
                    breakers.failed(failure.target.worker_id, str(failure.target))
                again = attempt < retries
                then = f"scheduling again without it (retry {attempt + 1} of {retries})" if again else "no retries left"
                for failure in exc.failures:
                    _count_failure(pctx, failure.target, failure.reason, retried=again)
                    log.warning(
                        "request %s: %s failed before its first byte (%s: %s); %s",
                        request_id,
                        failure.target,
                        failure.reason,
                        failure.detail,
                        then,
                    )
            else:
                for wid in chosen if breakers is not None else ():
                    breakers.answered(wid, f"worker {wid}")
                return response
        pctx.metrics.retries_exhausted.labels(route=parsed.route.value).inc()
        raise _no_worker(None, failures)
    finally:
        # The answer was sent whole (or the client is gone): the release runs on its own, so neither the answer nor
        # the next request on the client's connection (aiohttp serves a connection's requests one after the other)
        # waits for Redis; the scheduler's shutdown (finish_releases) waits for it before Redis closes.
        if held:
            router.scheduler.release_soon(request_id).add_done_callback(partial(_release_done, request_id))


async def _attempt(
    request: web.Request,
    pctx: ProxyContext,
    parsed: ProxiedRequest,
    body: dict[str, Any],
    request_id: int,
    choices: Mapping[Role, Choice],
    streamed: _Streamed,
) -> web.StreamResponse:
    """Send the request to the chosen worker(s) and relay the answer; UpstreamFailures before the first byte."""
    answering, prefill = plan(choices)
    session = pctx.session
    assert session is not None, "the proxy's client session opens with the app"
    timeout = pctx.options.headers_timeout_s if parsed.stream else pctx.options.response_timeout_s
    path = parsed.route.value
    client_auth = request.headers.get("Authorization")

    def on_late_failure(target: Target) -> None:
        _count_failure(pctx, target, "mid_stream", retried=False)

    drainer: asyncio.Task[None] | None = None
    if prefill is None:
        try:
            auth = pctx.upstream_auth.header(answering.worker_id, client_auth)
            upstream = await open_response(session, answering, path, orjson.dumps(body), request_id, timeout, auth)
        except UpstreamFailure as exc:
            raise UpstreamFailures([exc]) from None
    else:
        payload = orjson.dumps(body | bootstrap_fields(prefill, pctx.options.bootstrap_port, pctx.rng))

        def open_one(target: Target) -> Awaitable[Response]:
            auth = pctx.upstream_auth.header(target.worker_id, client_auth)
            return open_response(session, target, path, payload, request_id, timeout, auth)

        try:
            prefill_response, upstream = await open_pair(open_one, prefill, answering)
        except PrefillRefused as exc:  # the engine refused the request itself: the client gets why
            upstream, answering = exc.response, prefill
        else:
            drainer = asyncio.create_task(drain(prefill_response, prefill, request_id, on_late_failure))
    timer: RequestTimer = request[TIMER_KEY]
    timer.role = answering.role.value  # the worker whose answer the client gets (prefill, when it refused)
    try:
        response = await relay(
            request,
            upstream,
            answering,
            stream=parsed.stream,
            request_id=request_id,
            on_mid_stream_failure=on_late_failure,
            on_first_chunk=lambda: pctx.metrics.first_byte(timer),
            on_usage=_hit_check(pctx, choices.get(answering.role)),
        )
        pctx.metrics.worker_answered(answering.worker_id, answering.role.value, upstream.status)
        if not response.prepared:  # an answer not streamed: sent now, so the release after it does not hold it up
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionResetError:
                raise ClientGone from None
        streamed.status = response.status
        return response
    finally:
        upstream.close()  # a no-op once the answer was read whole; otherwise the worker sees the disconnect
        if drainer is not None:
            # Once the decode side is done its prefill is too; if not (client gone, decode failed), cancel it.
            drainer.cancel()
            await asyncio.wait([drainer])


def _hit_check(pctx: ProxyContext, choice: Choice | None) -> Callable[[bytes], None] | None:
    """Compares the cached prefix the router predicted for the answering worker with what the worker reports, for
    prefill-type workers (the ones that compute the prompt); None for the others."""
    if choice is None or choice.worker.spec.role not in (Role.PREFILL, Role.PDFUSION):
        return None
    predicted, role = choice.worker.hit_tokens, choice.worker.spec.role.value

    def check(data: bytes) -> None:
        reported = cached_tokens(data)
        if reported is not None:
            pctx.metrics.hit_reported(role, predicted, reported)

    return check


def _no_worker(refusal: ProxyError | None, failures: list[UpstreamFailure]) -> ProxyError:
    """No worker answered: 502 naming the ones that failed, or the scheduler's refusal when none was tried."""
    if not failures:
        assert refusal is not None
        return refusal
    tried = "; ".join(f"{f.target} failed ({f.detail})" for f in failures)
    rest = f"; no other worker: {refusal.message}" if refusal is not None else ""
    return ProxyError(502, f"{tried}{rest}", code="upstream_failed")


def _count_failure(pctx: ProxyContext, target: Target, reason: str, *, retried: bool) -> None:
    pctx.metrics.upstream_failures.labels(role=target.role.value, reason=reason).inc()
    if reason != "mid_stream":  # before its headers: no answer, or a 5xx one
        pctx.metrics.worker_answered(target.worker_id, target.role.value, 500 if reason == "http_5xx" else None)
    if retried:
        pctx.metrics.retries.labels(role=target.role.value).inc()


async def _release(scheduler: Scheduler, request_id: int) -> None:
    # Shielded: a client disconnect or shutdown cancelling the handler must not leave the reservation to its TTL.
    await asyncio.shield(scheduler.release(request_id))


def _release_done(request_id: int, task: asyncio.Task[int]) -> None:
    """The release once the answer is out: its failure is logged, not answered (the client has its answer)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("release of request %s failed; its reservation expires by its TTL", request_id, exc_info=exc)
