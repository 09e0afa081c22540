"""Passing a worker's answer to the client: a stream chunk by chunk as it arrives, anything else whole.

Past this point the worker has started answering, so nothing is retried: a worker failing mid-stream ends the
stream with an error event (SSE) or a 502 (an answer not yet sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import hdrs, web

from flexlb.proxy.errors import ClientGone, ProxyError, sse_error_event
from flexlb.proxy.http1 import Response
from flexlb.proxy.upstream import UPSTREAM_ERRORS, Target
from flexlb.proxy.usage import USAGE_MARK

log = logging.getLogger("flexlb.proxy")

# Headers of the worker's answer the client gets, as (the worker's lower-case name, the name sent); hop-by-hop ones
# (Transfer-Encoding, Connection) are the server's.
PASSED_HEADERS = tuple(
    (str(name).lower(), name) for name in (hdrs.CONTENT_TYPE, hdrs.CONTENT_ENCODING, hdrs.CACHE_CONTROL)
)


async def relay(
    request: web.Request,
    upstream: Response,
    target: Target,
    *,
    stream: bool,
    request_id: int,
    on_mid_stream_failure: Callable[[Target], None],
    on_first_chunk: Callable[[], None] | None = None,
    on_usage: Callable[[bytes], None] | None = None,
) -> web.StreamResponse:
    """Send ``upstream`` to the client: streamed when the client asked for a stream and the worker said 2xx;
    ``on_first_chunk`` is called once the stream's first chunk is written (its TTFT), ``on_usage`` with the bytes
    that carry the answer's ``usage`` (a 2xx body, the stream's chunk naming it), after they are sent."""
    received = upstream.headers
    headers = {name: received[key] for key, name in PASSED_HEADERS if key in received}
    headers["X-Request-Id"] = str(request_id)
    if not (stream and 200 <= upstream.status < 300):
        try:
            body = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            on_mid_stream_failure(target)
            log.warning("request %s: %s failed while sending its answer: %r", request_id, target, exc)
            message = f"{target} failed while sending its answer: {exc!r}"
            raise ProxyError(502, message, code="upstream_failed") from None
        if on_usage is not None and 200 <= upstream.status < 300 and USAGE_MARK in body:
            on_usage(body)
        return web.Response(body=body, status=upstream.status, headers=headers)

    headers.setdefault(hdrs.CACHE_CONTROL, "no-cache")
    out = web.StreamResponse(status=upstream.status, headers=headers)
    try:
        await out.prepare(request)
    except ConnectionResetError:
        raise ClientGone from None
    tail = b"\n\n"  # the end of the last chunk sent: an error event must start on an event boundary
    usage_chunk = b""
    while True:
        try:
            chunk = await upstream.readany()
        except UPSTREAM_ERRORS as exc:
            on_mid_stream_failure(target)
            log.warning("request %s: %s failed mid-stream: %r", request_id, target, exc)
            if upstream.content_type == "text/event-stream":
                prefix = b"" if tail.endswith(b"\n\n") else b"\n\n"
                await _write(out, prefix + sse_error_event(f"{target} failed mid-stream: {exc!r}"))
            break
        if not chunk:
            break
        await _write(out, chunk)
        if on_usage is not None and USAGE_MARK in chunk:  # the last such chunk has the final count
            usage_chunk = chunk
        if on_first_chunk is not None:
            on_first_chunk()
            on_first_chunk = None
        tail = chunk[-2:]
    try:
        await out.write_eof()
    except ConnectionResetError:
        raise ClientGone from None
    if usage_chunk and on_usage is not None:
        on_usage(usage_chunk)
    return out


async def _write(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except ConnectionResetError:
        raise ClientGone from None
