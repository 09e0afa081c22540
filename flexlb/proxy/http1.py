"""A lean HTTP/1.1 client for the proxy's requests to its workers: one pool of keep-alive connections per worker.

The proxy sends one kind of request (a POST of a JSON body it built) to engines it knows, and passes their answers
through byte for byte, so a general-purpose client (aiohttp's: URL objects, cookie jar, auto headers, redirects,
trace hooks, decompression) spends most of its time on what is not needed here; this one costs a fraction of it per
request. What it does:

- a request is one ``transport.write`` of a head built from a per-worker, per-path prefix and its body;
- the answer's head is parsed once; its body is framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the
  end of the connection, and handed out as the bytes arrived (``readany``), never decoded;
- an answer read to its end returns its connection to the worker's pool (unless the worker said ``Connection:
  close``); ``close()`` before that closes the connection, so the worker sees the client go and cancels;
- a pooled connection the worker closed meanwhile (its idle timeout) is retried once on a fresh connection when it
  answered nothing; idle connections close after ``keepalive_s``; at most ``max_per_worker`` connections per worker,
  requests beyond that wait for one;
- TCP_NODELAY on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Any

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of an answer
HIGH_WATER_BYTES = 1 << 20  # answer bytes buffered before reading from the worker pauses (a slow client)

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamError(Exception):
    """The worker's connection failed or its answer is not HTTP/1.x."""


class ConnectFailed(UpstreamError):
    """No connection to the worker (refused, unreachable)."""


class ConnectTimeout(UpstreamError):
    """The connection to the worker was not established in time."""


class Disconnected(UpstreamError):
    """The worker closed the connection before its answer was complete."""


class BadResponse(UpstreamError):
    """The worker's answer is not well-formed HTTP/1.x."""


class Response:
    """A worker's answer: ``status`` and ``headers`` (lower-case names) once it is returned; the body through
    ``readany()`` / ``read()``. ``close()`` when done with it (a no-op once the body was read to its end)."""

    __slots__ = (
        "_body",
        "_buf",
        "_buffered",
        "_conn",
        "_error",
        "_head_done",
        "_keep_alive",
        "_paused",
        "_remaining",
        "_state",
        "_waiter",
        "got_bytes",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._buf = bytearray()  # bytes not parsed yet (head, chunk framing)
        self._state = _HEAD
        self._remaining = 0  # of the body (Content-Length) or of the current chunk
        self._body: list[bytes] = []  # body bytes not handed out yet
        self._buffered = 0
        self._paused = False
        self._head_done: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._keep_alive = False
        self.got_bytes = False  # the worker sent any byte of its answer

    @property
    def content_type(self) -> str:
        """The media type of the answer, lower case, without parameters ("" when not said)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" at the end of the body. Raises
        Disconnected (or BadResponse) once what arrived before the failure was handed out."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (what is left of it)."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the answer: a connection whose answer was not read to its end is closed (the worker sees
        the disconnect and cancels the request)."""
        conn, self._conn = self._conn, None
        if self._state != _DONE:
            self._state = _DONE
            self._error = self._error or Disconnected("the answer was closed before its end")
            self._wake()
            if conn is not None:
                conn.response = None
                conn.close()

    # ---- fed by the connection ----

    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        if self._state == _LENGTH and not self._buf:  # the common case: body bytes of a known length
            self._take_length(data)
            return
        self._buf += data
        try:
            self._parse()
        except (BadResponse, ValueError) as exc:
            self._fail(exc if isinstance(exc, BadResponse) else BadResponse(f"malformed answer: {exc}"))

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed."""
        self._conn = None
        if self._state == _UNTIL_CLOSE:  # the end of the connection is the end of the body
            self._state = _DONE
            self._wake()
        elif self._state != _DONE:
            detail = f": {exc}" if exc is not None else ""
            self._fail(Disconnected(f"the worker closed the connection before its answer was complete{detail}"))

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._state = _DONE
        if not self._head_done.done():
            self._head_done.set_exception(exc)
            self._head_done.exception()  # retrieved: the sender raises it from its own await
        self._wake()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            conn.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _push(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER_BYTES and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _take_length(self, data: bytes) -> None:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            self._push(data)
            return
        extra = len(data) > self._remaining
        self._push(data[: self._remaining] if extra else data)
        self._remaining = 0
        self._finish(reusable=not extra)

    def _finish(self, *, reusable: bool = True) -> None:
        self._state = _DONE
        self._wake()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            if reusable and self._keep_alive and not self._buf:
                conn.release()
            else:
                conn.close()

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadResponse(f"answer head longer than {MAX_HEAD_BYTES} bytes")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._parse_head(head)
            elif state == _LENGTH:
                if not buf:
                    return
                data = bytes(buf)
                buf.clear()
                self._take_length(data)
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise BadResponse("chunk size line too long")
                    return
                size = int(bytes(buf[:end]).partition(b";")[0].strip(), 16)
                del buf[: end + 2]
                if size < 0:
                    raise BadResponse("negative chunk size")
                self._state, self._remaining = (_TRAILER, 0) if size == 0 else (_CHUNK_DATA, size)
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                n = min(self._remaining, len(buf))
                self._push(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise BadResponse("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadResponse("trailer too long")
                    return
                line = buf[:end]
                del buf[: end + 2]
                if not line:
                    self._finish()
                    return
            elif state == _UNTIL_CLOSE:
                if buf:
                    self._push(bytes(buf))
                    buf.clear()
                return
            else:  # _DONE: bytes after the end of the answer
                if buf:
                    buf.clear()
                return

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise BadResponse(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadResponse(f"malformed header line {line[:80]!r}")
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if 100 <= status < 200:  # 100 Continue and the like: the answer follows
            return
        self.status, self.headers = status, headers
        connection = headers.get("connection", "").lower()
        self._keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
        no_body = status in (204, 304)
        if not no_body and "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif not no_body and "content-length" in headers:
            self._remaining = int(headers["content-length"])
            if self._remaining < 0:
                raise BadResponse(f"negative Content-Length {self._remaining}")
            self._state = _LENGTH
            no_body = self._remaining == 0
        elif not no_body:
            self._state, self._keep_alive = _UNTIL_CLOSE, False
        self._head_done.set_result(None)
        if no_body:
            self._finish()


class _Connection(asyncio.Protocol):
    __slots__ = ("closed", "idle_since", "pool", "response", "transport", "used")

    def __init__(self, pool: _WorkerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # has carried a request before: may have been closed by the worker while idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not TCP after all
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes while idle: the worker is confused; the connection is not reused
            self.close()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is not None:
            response.lost(exc)
        self.pool.forget(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def release(self) -> None:
        """The answer was read to its end: back to the worker's pool."""
        self.pool.put_back(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)


class _WorkerPool:
    """The connections to one worker."""

    __slots__ = ("host", "idle", "open", "owner", "port", "waiters")

    def __init__(self, owner: UpstreamPool, host: str, port: int) -> None:
        self.owner = owner
        self.host, self.port = host, port
        self.idle: list[_Connection] = []  # most recently used last
        self.open: set[_Connection] = set()  # idle or carrying a request
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, *, fresh: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            while self.idle and not fresh:
                conn = self.idle.pop()
                if not conn.closed and loop.time() - conn.idle_since < self.owner.keepalive_s:
                    return conn
                conn.close()
            if len(self.open) < self.owner.max_per_worker:
                return await self._connect()
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.cancelled():
                    with contextlib.suppress(ValueError):  # not woken yet: leave the queue
                        self.waiters.remove(waiter)
                else:  # woken, and cancelled before it could take its turn: pass the turn on
                    self._wake_one()
                raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        self.open.add(conn)  # counted while connecting
        try:
            async with asyncio.timeout(self.owner.connect_timeout_s):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            self.forget(conn)
            raise ConnectTimeout(f"connect timed out after {self.owner.connect_timeout_s:g}s") from None
        except OSError as exc:
            self.forget(conn)
            raise ConnectFailed(str(exc) or type(exc).__name__) from None
        except BaseException:
            self.forget(conn)
            raise
        return conn

    def put_back(self, conn: _Connection) -> None:
        if conn.closed or self.owner.closed:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)
        self.owner.schedule_sweep()
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self._wake_one()

    def sweep(self, now: float) -> None:
        """Close the connections idle for ``keepalive_s`` or more."""
        keep = [c for c in self.idle if not c.closed and now - c.idle_since < self.owner.keepalive_s]
        for conn in self.idle:
            if conn not in keep:
                conn.close()
        self.idle = keep

    def close(self) -> None:
        for conn in list(self.open):
            if conn.response is not None:
                conn.response.close()
            conn.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the proxy's client is closed"))

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class UpstreamPool:
    """The proxy's client to its workers: a pool of keep-alive connections per worker (host, port)."""

    def __init__(self, *, connect_timeout_s: float, max_per_worker: int, keepalive_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_per_worker = max_per_worker
        self.keepalive_s = keepalive_s
        self.closed = False
        self._pools: dict[tuple[str, int], _WorkerPool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def send(self, host: str, port: int, data: bytes) -> Response:
        """Write ``data`` (a whole request: head and body) to a connection to ``host:port`` and return the answer
        once its head arrived. Raises ConnectFailed, ConnectTimeout, Disconnected or BadResponse."""
        if self.closed:
            raise ConnectFailed("the proxy's client is closed")
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[host, port] = _WorkerPool(self, host, port)
        loop = asyncio.get_running_loop()
        fresh = False
        while True:
            conn = await pool.acquire(fresh=fresh)
            reused = conn.used
            conn.used = True
            response = conn.response = Response(conn, loop)
            try:
                assert conn.transport is not None
                conn.transport.write(data)
                await response._head_done
            except Disconnected:
                if reused and not response.got_bytes and not fresh:
                    fresh = True  # a pooled connection the worker had closed: once more on a new one
                    continue
                raise
            except BaseException:  # cancelled (client gone, headers timeout) or a bad answer: not reusable
                response.close()
                raise
            return response

    def schedule_sweep(self) -> None:
        if self._sweeper is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.keepalive_s, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, pool in list(self._pools.items()):
            pool.sweep(now)
            if not pool.open and not pool.waiters:
                del self._pools[key]
        if any(pool.idle for pool in self._pools.values()):
            self.schedule_sweep()

    def connections(self) -> dict[str, Any]:
        """Open and idle connections per worker (for tests and debugging)."""
        return {f"{h}:{p}": {"open": len(w.open), "idle": len(w.idle)} for (h, p), w in self._pools.items()}

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
