"""Reading a request body within bounds: a size limit checked before and while reading, a deadline for the whole
body, and the ``Content-Encoding`` decoded here (the server runs with aiohttp's ``auto_decompress`` off), so a body
that is not validly encoded is the client's error (400), never a payload exception inside a handler.

Limits are in decoded bytes too: a small gzip body cannot inflate past the limit (a "zip bomb").
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

from aiohttp import web

DECODERS = ("gzip", "x-gzip", "deflate", "identity")
BODY = "flexlb.body"  # request key: the decoded body, read by RequestReader (flexlb/http/middleware.py)


class BodyError(Exception):
    """A body the router refuses: the HTTP status and a message naming what was wrong."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # snake_case, for the OpenAI error shape


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int  # of the body, raw and decoded
    timeout_s: float  # for the whole body, from the end of the headers
    why: str = ""  # where the limit comes from, for the message


def too_large(limits: BodyLimits, what: str) -> BodyError:
    why = f" ({limits.why})" if limits.why else ""
    message = f"request body too large: {what} exceeds the limit of {limits.max_bytes} bytes{why}"
    return BodyError(413, message, code="request_too_large")


def body_late(timeout_s: float) -> BodyError:
    """A body not all in within ``timeout_s`` of its headers."""
    return BodyError(
        408, f"request body not received within {timeout_s:g}s (httpBodyTimeoutMs)", code="request_timeout"
    )


async def request_body(request: web.Request) -> bytes:
    """The body RequestReader read (decoded), or ``request.read()`` in an app without it."""
    body = request.get(BODY)
    return body if body is not None else await request.read()


async def read_body(request: web.BaseRequest, limits: BodyLimits) -> bytes:
    """The request's body, decoded; raises BodyError (408, 413, 400, 415)."""
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:  # refused before a byte is read
        raise too_large(limits, f"Content-Length {declared}")
    encodings = _encodings(request.headers.get("Content-Encoding", ""))
    try:
        async with asyncio.timeout(limits.timeout_s):
            raw = await _read_raw(request, limits)
    except TimeoutError:
        raise body_late(limits.timeout_s) from None
    return decode(raw, encodings, limits)


async def _read_raw(request: web.BaseRequest, limits: BodyLimits) -> bytes:
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limits.max_bytes:
            raise too_large(limits, "the body")
    return bytes(body)


def _encodings(header: str) -> list[str]:
    """The codings applied, in order (``Content-Encoding: gzip, identity``); unknown ones refused with 415."""
    names = [name.strip().lower() for name in header.split(",") if name.strip()]
    for name in names:
        if name not in DECODERS:
            raise BodyError(
                415,
                f"Content-Encoding {name!r} is not supported (supported: {', '.join(DECODERS)})",
                code="unsupported_content_encoding",
            )
    return names


def decode(raw: bytes, encodings: list[str], limits: BodyLimits) -> bytes:
    """Undo ``encodings`` (applied in that order) on ``raw``; BodyError 400 when it is not validly encoded."""
    for name in reversed(encodings):
        if name in ("gzip", "x-gzip"):
            raw = _inflate(raw, 31, name, limits)
        elif name == "deflate":  # zlib-wrapped as HTTP says, or raw deflate as some clients send it
            raw = _inflate(raw, 15 if _zlib_header(raw) else -15, name, limits)
    return raw


def _zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, name: str, limits: BodyLimits) -> bytes:
    limit = limits.max_bytes
    out = bytearray()
    rest = data
    try:
        while True:  # gzip allows several members one after the other
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise too_large(limits, f"the body decoded from {name}")
            if not inflater.eof:
                raise zlib.error("the compressed data ends early (truncated)")
            rest = inflater.unused_data
            if not rest or wbits != 31:
                break
    except zlib.error as exc:
        raise BodyError(
            400, f"request body is not valid {name} (Content-Encoding: {name}): {exc}", code="invalid_content_encoding"
        ) from None
    return bytes(out)
