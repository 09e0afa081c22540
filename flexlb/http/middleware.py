"""Every error leaves as JSON: OpenAI's shape on the proxied routes (``/v1/...``, ``/generate``), the schedule API's
elsewhere; no HTML pages, no stack traces to clients. ``RequestReader`` reads each body up front, within its limits
(flexlb/http/body.py), and tells the connection's watchdog that the headers are in (flexlb/http/server.py)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from flexlb.domain import ErrorCode
from flexlb.http.body import BODY, BodyError, BodyLimits, read_body
from flexlb.http.routes import json_response
from flexlb.http.server import WATCH
from flexlb.http.wire import error_body
from flexlb.proxy.errors import error_body as openai_error_body
from flexlb.proxy.parse import Route
from flexlb.state.errors import REDIS_UNAVAILABLE

log = logging.getLogger("flexlb.http")

OPENAI_PATHS = frozenset(route.value for route in Route)

_OPENAI_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path in OPENAI_PATHS


def error_response(request: web.BaseRequest, status: int, message: str, *, code: str | None = None) -> web.Response:
    """``status`` with ``message`` in the shape the path's clients expect; ``code``: OpenAI's snake_case code."""
    if is_openai_path(request.path):
        type_ = "invalid_request_error" if status < 500 else "server_error"
        if status == 404 and code is None:  # no such route: OpenAI answers an unknown URL with code null
            return json_response({"error": {"message": message, "type": type_, "param": None, "code": None}}, 404)
        code = code or _OPENAI_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
        return json_response(openai_error_body(message, type_=type_, code=code), status)
    return json_response(schedule_error_body(status, message), status)


def schedule_error_body(status: int, message: str) -> dict[str, Any]:
    """An error in the schedule API's shape, its code from the HTTP status."""
    return error_body(ErrorCode.STATE_UNAVAILABLE if status == 503 else ErrorCode.INVALID_REQUEST, message)


def handler_failure(method: str, path: str, exc: Exception) -> tuple[int, str, str | None]:
    """What a handler's escaped exception is answered with (status, message, OpenAI code), logged: Redis
    unreachable is a 503, anything else a bug (500, its traceback in the log, never in the answer)."""
    if isinstance(exc, REDIS_UNAVAILABLE):
        log.warning("%s %s: Redis unreachable: %s", method, path, exc)
        return 503, f"STATE_UNAVAILABLE: Redis is unreachable ({type(exc).__name__}: {exc})", "state_unavailable"
    log.error("unhandled error in %s %s", method, path, exc_info=exc)
    return 500, f"internal error in {method} {path}; see the router's log", None


class RequestReader:
    """Reads every request's body before its handler: the whole body within ``timeout_s`` (408), at most the
    path's limit (413, refused from Content-Length before reading when it says so), ``Content-Encoding`` decoded
    (400 when not validly encoded, 415 when unknown). Handlers get it from ``request_body``."""

    def __init__(self, timeout_s: float, max_bytes: int, limits: dict[str, tuple[int, str]] | None = None) -> None:
        """``limits``: path -> (max bytes, where that limit comes from) for the paths whose limit is not
        ``max_bytes``."""
        self._default = BodyLimits(max_bytes, timeout_s)
        self._by_path = {path: BodyLimits(n, timeout_s, why) for path, (n, why) in (limits or {}).items()}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        watch = request.app.get(WATCH)
        conn = watch.of(request) if watch is not None else None
        if conn is not None:
            conn.request_started()
        try:
            if request.body_exists:
                try:
                    request[BODY] = await read_body(request, self._by_path.get(request.path, self._default))
                except BodyError as exc:
                    response = error_response(request, exc.status, exc.message, code=exc.code)
                    if exc.status != 400:  # the body was not read to its end: this connection cannot go on
                        response.force_close()
                    return response
            return await handler(request)
        finally:
            if conn is not None:
                conn.request_finished()


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(request, 413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, exc.status, f"{exc.reason}: {request.method} {request.path}")
    except Exception as exc:
        status, message, code = handler_failure(request.method, request.path, exc)
        return error_response(request, status, message, code=code)
