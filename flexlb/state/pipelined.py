"""A lean Redis client for the decision path: one connection, commands pipelined automatically.

Every command issued during one turn of the event loop is written with a single ``write`` at the end of the turn;
replies come back in order on the same connection and are matched to their callers first in, first out. Under load
the concurrent requests' script calls (lookup, reserve, release) share round trips, and each call costs a few
microseconds of Python instead of redis-py's pool checkout, per-call lock and response callbacks (about 0.1-0.2 ms
per call on the reference machine, the largest part of the router's CPU per decision).

Only what the decision path needs: plain TCP (``redis://``) and unix sockets (``unix://``) with AUTH and SELECT,
non-blocking commands, a per-call timeout. Errors are redis-py's exception types (``ConnectionError``,
``TimeoutError``, ``NoScriptError``, ...), so callers handle both clients alike. A timed-out call closes the
connection (a later reply could no longer be matched); the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

SUPPORTED_SCHEMES = ("redis", "unix")


class _ReplyError(Exception):
    """What hiredis returns (not raises) for an error reply; turned into redis-py's exception of that error."""


class _Connection(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", replyError=_ReplyError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.unsent: list[bytes] = []
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(ConnectionError(f"Redis {self.name}: protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream can no longer be matched
                self.close(ConnectionError(f"Redis {self.name}: unexpected reply"))
                return
            future = waiting.popleft()
            if future.done():  # its caller gave up (cancelled): the reply is dropped, the order kept
                continue
            if isinstance(reply, _ReplyError):
                future.set_exception(BaseParser.parse_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_waiting(ConnectionError(f"Redis {self.name}: connection lost" + (f": {exc}" if exc else "")))

    def send(self, packed: bytes, future: asyncio.Future[Any]) -> None:
        if self.lost is not None:
            future.set_exception(self.lost)
            return
        if not self.unsent:
            asyncio.get_running_loop().call_soon(self.flush)
        self.unsent.append(packed)
        self.waiting.append(future)

    def flush(self) -> None:
        if self.unsent and self.transport is not None and self.lost is None:
            self.transport.write(b"".join(self.unsent))
        self.unsent.clear()

    def close(self, exc: Exception) -> None:
        self._fail_waiting(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        self.unsent.clear()


class PipelinedRedis:
    """``await client.execute("EVALSHA", sha, 2, k1, k2, a1)`` -> the decoded reply (str, int, list, None)."""

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float | None = None) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"PipelinedRedis supports {', '.join(SUPPORTED_SCHEMES)} URLs, not {scheme!r}")
        self._params = parse_url(url)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s or timeout_s
        path = self._params.get("path")
        self._name = path or f"{self._params.get('host', 'localhost')}:{self._params.get('port', 6379)}"
        self._url = url
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False
        self._siblings: list[PipelinedRedis] = []

    @classmethod
    def supports(cls, url: str) -> bool:
        return urlsplit(url).scheme in SUPPORTED_SCHEMES

    async def execute(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connection()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn.send(hiredis.pack_command(args), future)
        timer = loop.call_later(self._timeout_s, self._time_out, conn, future)
        try:
            return await future
        finally:
            timer.cancel()

    def sibling(self) -> PipelinedRedis:
        """A client of the same server on a connection of its own (for blocking reads), closed with this one."""
        other = PipelinedRedis(self._url, timeout_s=self._timeout_s, connect_timeout_s=self._connect_timeout_s)
        self._siblings.append(other)
        return other

    async def aclose(self) -> None:
        self._closed = True
        for other in self._siblings:
            await other.aclose()
        if self._conn is not None:
            self._conn.close(ConnectionError(f"Redis {self._name}: client closed"))
            self._conn = None

    def _time_out(self, conn: _Connection, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(RedisTimeoutError(f"Redis {self._name}: no reply within {self._timeout_s:.3g}s"))
            conn.close(ConnectionError(f"Redis {self._name}: closed after a timed-out call"))

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ConnectionError(f"Redis {self._name}: client closed")
        if self._connecting is None:  # one connect at a time; concurrent callers wait for it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        return conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self._name)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._params.get("path"):
                    await loop.create_unix_connection(lambda: conn, self._params["path"])
                else:
                    await loop.create_connection(
                        lambda: conn, self._params.get("host", "localhost"), self._params.get("port", 6379)
                    )
                await self._handshake(conn)
        except TimeoutError as exc:  # asyncio's, the builtin: reported as redis-py's
            conn.close(ConnectionError(f"Redis {self._name}: connect timed out"))
            raise RedisTimeoutError(f"Redis {self._name}: no connection within {self._connect_timeout_s:.3g}s") from exc
        except OSError as exc:
            conn.close(ConnectionError(f"Redis {self._name}: cannot connect"))
            raise ConnectionError(f"Redis {self._name}: cannot connect: {exc}") from exc
        except RedisError:  # AUTH or SELECT refused
            conn.close(ConnectionError(f"Redis {self._name}: handshake refused"))
            raise
        self._conn = conn
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        commands: list[tuple[Any, ...]] = []
        password, username = self._params.get("password"), self._params.get("username")
        if password:
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if self._params.get("db"):
            commands.append(("SELECT", self._params["db"]))
        futures = []
        for command in commands:
            future: asyncio.Future[Any] = loop.create_future()
            conn.send(hiredis.pack_command(command), future)
            futures.append(future)
        for future in futures:
            await future
