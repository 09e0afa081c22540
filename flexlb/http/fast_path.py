"""The schedule API's two hot routes, POST /rtp_llm/schedule and POST /rtp_llm/release, answered on the connection
itself, without aiohttp's per-request machinery (about half of a router's CPU per decision went there).

Every connection starts here. A request that is exactly what schedule clients send - HTTP/1.1, ``POST`` to one of
the two paths, a ``Content-Length`` body, no ``Content-Encoding`` / ``Transfer-Encoding`` / ``Expect`` /
``Upgrade`` - is answered here with the app's own checks: the schedule API's keys (flexlb/http/auth.py), the body
limits and read deadlines, the drain at shutdown, JSON errors, and the handlers shared with aiohttp
(flexlb/http/routes.py). Anything else hands the connection, with the bytes read so far, to aiohttp, where it stays:
aiohttp answers every other route and every malformed or unusual request with its own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from flexlb.http.auth import Api, Keyring, Refusal, log_refusal, refusal_answer
from flexlb.http.body import body_late
from flexlb.http.drain import InFlightRequests
from flexlb.http.middleware import handler_failure, schedule_error_body
from flexlb.http.routes import Answer, release_answer, schedule_answer
from flexlb.http.server import ConnectionWatch, ReadTimeouts
from flexlb.schedule_api import RouterContext

MAX_HEAD_BYTES = 16 * 1024  # longer heads go to aiohttp, which refuses them with its own limits
Handler = Callable[[RouterContext, bytes, str], Awaitable[Answer]]
_ROUTES: dict[bytes, tuple[str, Handler]] = {
    b"POST /rtp_llm/schedule HTTP/1.1\r": ("/rtp_llm/schedule", schedule_answer),
    b"POST /rtp_llm/release HTTP/1.1\r": ("/rtp_llm/release", release_answer),
}
_LONGEST_LINE = max(len(line) for line in _ROUTES) + 1
_HANDED_OVER_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


@dataclass(frozen=True, slots=True)
class _Head:
    path: str
    handler: Handler
    content_length: int
    authorization: str | None
    close: bool  # Connection: close


def parse_head(head: bytes) -> _Head | None:
    """The head of a request the fast path answers (everything up to the blank line, excluded), or None: the
    connection goes to aiohttp."""
    line_end = head.find(b"\n")
    route = _ROUTES.get(head[: line_end if line_end >= 0 else len(head)])
    if route is None:
        return None
    content_length: int | None = None
    authorization: str | None = None
    close = False
    for line in head[line_end + 1 :].split(b"\r\n") if line_end >= 0 else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            return None  # folded, bare LF or malformed: aiohttp's parser says what is wrong
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            if content_length is not None or not value.isdigit():
                return None
            content_length = int(value)
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"connection":
            token = value.lower()
            if token not in (b"keep-alive", b"close"):
                return None
            close = token == b"close"
        elif name == b"content-encoding":
            if value.lower() != b"identity":
                return None
        elif name in _HANDED_OVER_HEADERS:
            return None
    if content_length is None:
        return None
    return _Head(route[0], route[1], content_length, authorization, close)


class FastPath:
    """The hot routes of one router app; ``wrap`` puts it in front of the server's protocol factory."""

    def __init__(
        self,
        ctx: RouterContext,
        keyring: Keyring,
        in_flight: InFlightRequests,
        watch: ConnectionWatch,
        timeouts: ReadTimeouts,
        body_limits: dict[str, int],
    ) -> None:
        self.ctx = ctx
        self.keyring = keyring
        self.in_flight = in_flight
        self.watch = watch
        self.timeouts = timeouts
        self.body_limits = body_limits
        self.connections: set[_FastConnection] = set()
        self.closing = False

    def wrap(self, fallback: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _FastConnection(self, fallback)

    async def shutdown(self, app: Any = None) -> None:
        """At SIGTERM: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()


class _FastConnection(asyncio.Protocol):
    __slots__ = ("_buf", "_close_after", "_fallback", "_fast", "_task", "_timer", "_timer_kind", "_transport")

    def __init__(self, fast: FastPath, fallback: Callable[[], asyncio.Protocol]) -> None:
        self._fast = fast
        self._fallback = fallback
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: str | None = None  # one timer at a time: "idle", "head" or "body"
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport: not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fast.connections.add(self)
        self._arm(self._fast.timeouts.idle_s, self._idle)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None:
            self._next()

    def eof_received(self) -> None:
        return None  # the transport closes, as aiohttp does: a client that stops sending has left (its task stops)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._fast.connections.discard(self)
        self._transport = None
        if self._task is not None:  # the client left: its request stops (a queued one leaves the queue)
            self._task.cancel()

    def close_when_idle(self) -> None:
        self._close_after = True
        if self._task is None:
            self._close()

    def _next(self) -> None:
        """Answer the next complete request in the buffer, or wait for more bytes, or hand over to aiohttp."""
        if self._transport is None or self._transport.is_closing():  # answered with Connection: close
            return
        buf = self._buf
        if not buf:
            if self._close_after:
                self._close()
            else:
                self._arm(self._fast.timeouts.idle_s, self._idle)
            return
        line_end = buf.find(b"\n", 0, _LONGEST_LINE)
        if line_end < 0:
            if len(buf) >= _LONGEST_LINE:
                self._hand_over()
            elif self._timer_kind != "head":
                self._arm(self._fast.timeouts.header_s, self._head_late, "head")
            return
        if bytes(buf[:line_end]) not in _ROUTES:
            self._hand_over()
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES or b"\n\n" in buf:
                self._hand_over()
            elif self._timer_kind != "head":
                self._arm(self._fast.timeouts.header_s, self._head_late, "head")
            return
        head = parse_head(bytes(buf[:end]))
        if head is None or head.content_length > self._fast.body_limits.get(head.path, 0) or self._fast.closing:
            self._hand_over()  # aiohttp refuses it (413 from Content-Length, 400, ...) or drains it at shutdown
            return
        total = end + 4 + head.content_length
        if len(buf) < total:
            if self._timer_kind != "body":
                self._arm(self._fast.timeouts.body_s, self._body_late, "body")
            return
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self._cancel_timer()
        if head.close:
            self._close_after = True
        self._task = asyncio.get_running_loop().create_task(self._answer(head, body))

    async def _answer(self, head: _Head, body: bytes) -> None:
        fast = self._fast
        task = asyncio.current_task()
        assert task is not None
        fast.in_flight.add(task)
        try:
            answer = await self._answer_for(head, body)
        finally:
            fast.in_flight.discard(task)
            self._task = None
        if self._transport is None:
            return
        self._write(answer)
        if self._transport is not None:
            self._next()

    async def _answer_for(self, head: _Head, body: bytes) -> Answer:
        fast = self._fast
        ctx = fast.ctx
        outcome = fast.keyring.check(Api.SCHEDULE, head.authorization)
        if isinstance(outcome, Refusal):
            peer = self._transport.get_extra_info("peername") if self._transport is not None else None
            log_refusal("POST", head.path, peer[0] if peer else None, outcome)
            payload, headers = refusal_answer(Api.SCHEDULE, outcome, ctx.master_host)
            return Answer(payload, outcome.status, headers)
        try:
            return await head.handler(ctx, body, outcome)
        except Exception as exc:  # answered as json_errors answers it on the aiohttp side
            status, message, _ = handler_failure("POST", head.path, exc)
            return Answer(schedule_error_body(status, message), status)

    def _write(self, answer: Answer) -> None:
        transport = self._transport
        assert transport is not None
        payload = orjson.dumps(answer.body)
        close = self._close_after or self._fast.closing
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (answer.status, _REASONS.get(answer.status, b"")),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload),
            b"Date: %s\r\nServer: flexlb\r\n" % _http_date(),
        ]
        for name, value in (answer.headers or {}).items():
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(payload)
        transport.write(b"".join(lines))
        if close:
            self._close()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting from the bytes not answered here."""
        transport = self._transport
        assert transport is not None
        self._cancel_timer()
        self._fast.connections.discard(self)
        inner = self._fallback()
        transport.set_protocol(inner)
        inner.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        self._transport = None
        if data:
            inner.data_received(data)

    def _close(self) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()

    def _arm(self, delay_s: float, callback: Callable[[], None], kind: str = "idle") -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay_s, callback)
        self._timer_kind = kind

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = None

    def _idle(self) -> None:
        self._timer = None
        if self._task is None and not self._buf:
            self._close()

    def _head_late(self) -> None:
        self._timer = None
        self._fast.watch.closed_late += 1
        self._close()

    def _body_late(self) -> None:
        self._timer = None
        if self._task is not None or self._transport is None:
            return
        late = body_late(self._fast.timeouts.body_s)
        self._buf.clear()
        self._close_after = True
        self._write(Answer(schedule_error_body(late.status, late.message), late.status))


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]
