"""Every error leaves as JSON in the schedule API's shape: no HTML pages, no stack traces to clients."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from flexlb.domain import ErrorCode
from flexlb.http.routes import json_response
from flexlb.http.wire import error_body
from flexlb.state.errors import REDIS_UNAVAILABLE

log = logging.getLogger("flexlb.http")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        msg = f"request body too large: {exc.text}"
        return json_response(error_body(ErrorCode.INVALID_REQUEST, msg), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        msg = f"{exc.reason}: {request.method} {request.path}"
        return json_response(error_body(ErrorCode.INVALID_REQUEST, msg), exc.status)
    except REDIS_UNAVAILABLE as exc:
        log.warning("%s %s: Redis unreachable: %s", request.method, request.path, exc)
        msg = f"STATE_UNAVAILABLE: Redis is unreachable ({type(exc).__name__}: {exc})"
        return json_response(error_body(ErrorCode.STATE_UNAVAILABLE, msg), 503)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        msg = f"internal error in {request.method} {request.path}; see the router's log"
        return json_response(error_body(ErrorCode.INVALID_REQUEST, msg), 500)
