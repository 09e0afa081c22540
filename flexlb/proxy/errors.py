"""Errors of the proxy routes, answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

``code`` is a short snake_case name a client can match on: OpenAI's own where one exists (``model_not_found``),
else flexlb's error code name (``no_pdfusion_worker``, ``state_unavailable``) or the proxy's (``upstream_failed``).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flexlb.domain import ErrorCode, ScheduleResult
from flexlb.http.wire import RETRY_AFTER_S, http_status_for


class ClientGone(Exception):
    """The client disconnected while its answer was being written; nothing more can be sent to it."""


class ProxyError(Exception):
    """A request the proxy answers with an error and this HTTP status; the message says what was wrong."""

    def __init__(
        self, status: int, message: str, *, code: str, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None) -> ProxyError:
    """400: the client's body is wrong."""
    return ProxyError(400, message, code="invalid_request", param=param)


def from_schedule(result: ScheduleResult) -> ProxyError:
    """A failed schedule (no worker: 503, Redis unreachable with a stale snapshot: 503 / state_unavailable, the queue
    full or its wait over: 429 / 503 with Retry-After, a prompt no worker can ever hold: 400
    context_length_exceeded, OpenAI's code for it)."""
    param = "messages" if result.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED else None
    return ProxyError(
        http_status_for(result.code),
        result.message,
        code=result.code.name.lower(),
        param=param,
        retry_after_s=RETRY_AFTER_S.get(result.code),
    )


def error_response(exc: ProxyError, request_id: int | None = None) -> web.Response:
    headers = {"X-Request-Id": str(request_id)} if request_id is not None else {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return web.Response(
        body=orjson.dumps(exc.body()), status=exc.status, content_type="application/json", headers=headers
    )


def sse_error_event(message: str) -> bytes:
    """The event that ends a stream whose worker failed after its first byte (as OpenAI does mid-stream)."""
    return b"data: " + orjson.dumps(error_body(message, type_="server_error", code="upstream_failed")) + b"\n\n"
