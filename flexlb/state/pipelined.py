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

Two more deployments (flexlb/state/redis_url.py), at no cost per call while nothing moves:

- **Redis Cluster** (``redis+cluster://``): every key of a service is in one slot, so the one connection goes to
  that slot's owner. A ``MOVED`` reply (the slot has a new owner: reshard, failover) switches the connection to the
  named node and sends the call again there, as every call of the batch that got one does; ``ASK`` (the slot is
  migrating and the keys are on the importing node) sends ``ASKING`` and the call to that node, once; ``TRYAGAIN``
  (the keys are split between the two nodes for a moment) sends it again after a short pause, within the call's
  timeout. When the owner cannot be reached (failover), the next connect asks the other nodes it knows
  (``CLUSTER SLOTS``) who owns the slot now.
- **Sentinel** (``redis+sentinel://``): every (re)connect asks the sentinels for the primary's address; a
  ``READONLY`` reply (the node was demoted) sends the call again to the primary they name now.

A redirected call had not run where it was refused, so sending it again is safe; a call whose reply was lost with
its connection is never sent again (it may have run): it fails as unavailable, as on one Redis.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import AskError, ConnectionError, MovedError, ReadOnlyError, RedisError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flexlb.state.errors import SlotMoving, slot_moving
from flexlb.state.redis_url import RedisTarget, parse_redis_url

log = logging.getLogger("flexlb.redis")

SUPPORTED_SCHEMES = ("redis", "unix", "redis+cluster", "redis+sentinel")
MAX_REDIRECTS = 16  # as redis-py's cluster client: a slot cannot move more often than that during one call
TRYAGAIN_DELAY_S = 0.01
_REDIRECTS = (AskError, TryAgainError, ReadOnlyError, SlotMoving)  # MovedError is an AskError
_ASKING = hiredis.pack_command(("ASKING",))
_CLUSTER_SLOTS = hiredis.pack_command(("CLUSTER", "SLOTS"))

Address = tuple[str, int]


class _ReplyError(Exception):
    """What hiredis returns (not raises) for an error reply; turned into redis-py's exception of that error."""


def _error(text: str) -> Exception:
    return SlotMoving(text) if slot_moving(text) else BaseParser.parse_error(text)


class _Connection(asyncio.Protocol):
    def __init__(self, name: str, address: Address | None = None) -> None:
        self.name = name
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", replyError=_ReplyError)
        # None: a reply nobody waits for (ASKING's), dropped in order
        self.waiting: collections.deque[asyncio.Future[Any] | None] = collections.deque()
        self.unsent: list[bytes] = []
        self.lost: Exception | None = None
        self.retired = False

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
                break
            if not waiting:  # a reply nobody asked for: the stream can no longer be matched
                self.close(ConnectionError(f"Redis {self.name}: unexpected reply"))
                return
            future = waiting.popleft()
            if future is None or future.done():  # its caller gave up (cancelled): the reply is dropped, the order kept
                continue
            if isinstance(reply, _ReplyError):
                future.set_exception(_error(str(reply)))
            else:
                future.set_result(reply)
        if self.retired and not waiting:
            self.close(ConnectionError(f"Redis {self.name}: closed (the slot moved to another node)"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_waiting(ConnectionError(f"Redis {self.name}: connection lost" + (f": {exc}" if exc else "")))

    def send(self, packed: bytes, future: asyncio.Future[Any] | None) -> None:
        if self.lost is not None:
            if future is not None:
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

    def retire(self) -> None:
        """No new calls come here; closed once the replies still due are in (they redirect their callers)."""
        self.retired = True
        if not self.waiting and not self.unsent:
            self.close(ConnectionError(f"Redis {self.name}: closed (the slot moved to another node)"))

    def close(self, exc: Exception) -> None:
        self._fail_waiting(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        while self.waiting:
            future = self.waiting.popleft()
            if future is not None and not future.done():
                future.set_exception(exc)
        self.unsent.clear()


class PipelinedRedis:
    """``await client.execute("EVALSHA", sha, 2, k1, k2, a1)`` -> the decoded reply (str, int, list, None)."""

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float | None = None) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"PipelinedRedis supports {', '.join(SUPPORTED_SCHEMES)} URLs, not {scheme!r}")
        self._target: RedisTarget = parse_redis_url(url)
        self._kind = self._target.kind
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s or timeout_s
        self._address: Address | None = None  # the node the connection goes to (None: a unix socket, or ask)
        self._known: list[Address] = list(self._target.nodes)  # cluster: every node seen; sentinel: the sentinels
        if self._kind == "single":
            self._params = parse_url(url)
            path = self._params.get("path")
            if not path:
                self._address = (self._params.get("host", "localhost"), self._params.get("port", 6379))
            self._name = path or f"{self._address[0]}:{self._address[1]}"  # type: ignore[index]
        else:
            t = self._target
            self._params = {"username": t.username, "password": t.password, "db": t.db}
            self._address = t.nodes[0] if self._kind == "cluster" else None
            self._name = t.describe()
        self._slot: int | None = None  # cluster: the slot of the keys this client was given (from MOVED, or a key)
        self._url = url
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._others: dict[Address, asyncio.Future[_Connection]] = {}  # ASK targets
        self._closed = False
        self._siblings: list[PipelinedRedis] = []

    @classmethod
    def supports(cls, url: str) -> bool:
        return urlsplit(url).scheme in SUPPORTED_SCHEMES

    @property
    def address(self) -> Address | None:
        """The node calls go to now (tests, logs)."""
        return self._address

    async def execute(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connection(args)
        packed = hiredis.pack_command(args)
        # inline, not through _send: the common path costs one coroutine less per call
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn.send(packed, future)
        timer = loop.call_later(self._timeout_s, self._time_out, conn, future)
        try:
            return await future
        except _REDIRECTS as exc:
            if self._kind == "single":  # a redirection from one Redis: nowhere else to go (unavailable)
                raise
            return await self._redirected(args, packed, exc)
        finally:
            timer.cancel()

    def submit(self, *args: Any) -> asyncio.Future[Any] | None:
        """Send a call now and return its reply's future (no coroutine, no task: the batch path's), or None when
        there is no connection up; the future fails with the same errors :meth:`execute` raises, but a redirection
        is not followed (the caller retries through execute)."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn.send(hiredis.pack_command(args), future)
        timer = loop.call_later(self._timeout_s, self._time_out, conn, future)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    @staticmethod
    def redirected(exc: BaseException) -> bool:
        """Whether a call failed because its slot is elsewhere (execute follows that; a submitted call does not)."""
        return isinstance(exc, _REDIRECTS)

    def sibling(self) -> PipelinedRedis:
        """A client of the same server on a connection of its own (for blocking reads), closed with this one."""
        other = PipelinedRedis(self._url, timeout_s=self._timeout_s, connect_timeout_s=self._connect_timeout_s)
        self._siblings.append(other)
        return other

    async def aclose(self) -> None:
        self._closed = True
        for other in self._siblings:
            await other.aclose()
        closed = ConnectionError(f"Redis {self._name}: client closed")
        if self._conn is not None:
            self._conn.close(closed)
            self._conn = None
        for pending in self._others.values():
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                pending.result().close(closed)
        self._others.clear()

    # ---- redirections (cluster, sentinel): the slow path, taken only when a node refused a call ----

    async def _redirected(self, args: tuple[Any, ...], packed: bytes, exc: Exception) -> Any:
        deadline = time.monotonic() + self._timeout_s
        for _ in range(MAX_REDIRECTS):
            try:
                if isinstance(exc, MovedError):
                    self._slot = exc.slot_id
                    self._move_to((exc.host, exc.port), f"slot {exc.slot_id} moved")
                    return await self._send(await self._connection(args), packed)
                if isinstance(exc, AskError):  # this call's keys are on the importing node already
                    return await self._send(await self._node((exc.host, exc.port)), packed, asking=True)
                if isinstance(exc, ReadOnlyError):  # the node is a replica now: nothing ran; find the primary
                    self._forget_primary(f"{self._conn_name()} answered READONLY (demoted)")
                    return await self._send(await self._connection(args), packed)
                # TRYAGAIN / a script that met a key of its slot on the other node: the slot is being migrated
                if time.monotonic() + TRYAGAIN_DELAY_S > deadline:
                    break
                await asyncio.sleep(TRYAGAIN_DELAY_S)
                return await self._send(await self._connection(args), packed)
            except _REDIRECTS as again:
                exc = again
        where = f"slot {self._slot}" if self._slot is not None else "the slot"
        raise ConnectionError(f"Redis {self._name}: {where} still moving after {MAX_REDIRECTS} redirections or "
                              f"{self._timeout_s:.3g}s: {exc}") from exc  # fmt: skip

    async def _send(self, conn: _Connection, packed: bytes, *, asking: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if asking:
            conn.send(_ASKING, None)
        conn.send(packed, future)
        timer = loop.call_later(self._timeout_s, self._time_out, conn, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _move_to(self, address: Address, why: str) -> None:
        if address == self._address:
            return
        log.warning("Redis Cluster: %s from %s to %s:%d; calls follow it", why, self._conn_name(), *address)
        self._address = address
        if address not in self._known:
            self._known.append(address)
        old, self._conn = self._conn, None
        if old is not None:
            old.retire()

    def _forget_primary(self, why: str) -> None:
        log.warning("Redis %s: %s; asking for the primary again", self._name, why)
        if self._kind == "sentinel":
            self._address = None
        old, self._conn = self._conn, None
        if old is not None:
            old.retire()

    def _conn_name(self) -> str:
        return "?" if self._address is None else f"{self._address[0]}:{self._address[1]}"

    async def _node(self, address: Address) -> _Connection:
        """A connection to another node of the cluster (an ASK target), one per node."""
        if address == self._address:
            return await self._connection(())
        pending = self._others.get(address)
        if pending is None or (pending.done() and (pending.exception() is not None or pending.result().lost)):
            pending = self._others[address] = asyncio.ensure_future(self._open(address))
        return await asyncio.shield(pending)

    # ---- connecting ----

    def _time_out(self, conn: _Connection, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(RedisTimeoutError(f"Redis {conn.name}: no reply within {self._timeout_s:.3g}s"))
            conn.close(ConnectionError(f"Redis {conn.name}: closed after a timed-out call"))

    async def _connection(self, args: tuple[Any, ...]) -> _Connection:
        while True:
            if self._closed:
                raise ConnectionError(f"Redis {self._name}: client closed")
            conn = self._conn
            if conn is not None and conn.lost is None:
                return conn
            if self._connecting is None:  # one connect at a time; concurrent callers wait for it
                self._connecting = asyncio.ensure_future(self._connect(args))
            connecting = self._connecting
            try:
                conn = await asyncio.shield(connecting)
            finally:
                if connecting.done() and self._connecting is connecting:
                    self._connecting = None
            if conn.address == self._address or self._address is None:
                self._conn = conn
                return conn
            conn.retire()  # the slot moved while this connect was under way: connect again, to the new owner

    async def _connect(self, args: tuple[Any, ...]) -> _Connection:
        if self._kind == "single":
            return await self._open(self._address, self._params.get("path"))
        if self._kind == "sentinel":
            self._address = await self._primary_from_sentinels()
            return await self._open(self._address)
        assert self._address is not None
        try:
            conn = await self._open(self._address)
            # every node the cluster has now: those to ask when this one is lost (one round trip per connect)
            self._learn(await self._send(conn, _CLUSTER_SLOTS), self._address)
            return conn
        except (ConnectionError, RedisTimeoutError) as exc:  # failover: someone else may own the slot now
            failed = self._address
            owner = await self._owner_from_cluster(args, failed)
            if owner is None or owner == failed:
                raise ConnectionError(
                    f"Redis Cluster: node {failed[0]}:{failed[1]}, owner of slot {self._slot}, unreachable ({exc}); "
                    "no other node names a new owner yet"
                ) from exc
            self._move_to(owner, f"owner of slot {self._slot} unreachable, the cluster names a new one")
            return await self._open(owner)

    async def _open(self, address: Address | None, path: str | None = None, *, sentinel: bool = False) -> _Connection:
        loop = asyncio.get_running_loop()
        name = path or (f"{address[0]}:{address[1]}" if address else self._name)
        conn = _Connection(name, address)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if path:
                    await loop.create_unix_connection(lambda: conn, path)
                else:
                    assert address is not None
                    await loop.create_connection(lambda: conn, *address)
                await self._handshake(conn, sentinel)
        except TimeoutError as exc:  # asyncio's, the builtin: reported as redis-py's
            conn.close(ConnectionError(f"Redis {name}: connect timed out"))
            raise RedisTimeoutError(f"Redis {name}: no connection within {self._connect_timeout_s:.3g}s") from exc
        except OSError as exc:
            conn.close(ConnectionError(f"Redis {name}: cannot connect"))
            raise ConnectionError(f"Redis {name}: cannot connect: {exc}") from exc
        except RedisError:  # AUTH or SELECT refused
            conn.close(ConnectionError(f"Redis {name}: handshake refused"))
            raise
        return conn

    async def _handshake(self, conn: _Connection, sentinel: bool) -> None:
        loop = asyncio.get_running_loop()
        commands: list[tuple[Any, ...]] = []
        if sentinel:
            password, username = self._target.sentinel_password, None
        else:
            password, username = self._params.get("password"), self._params.get("username")
        if password:
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if self._params.get("db") and not sentinel:
            commands.append(("SELECT", self._params["db"]))
        futures = []
        for command in commands:
            future: asyncio.Future[Any] = loop.create_future()
            conn.send(hiredis.pack_command(command), future)
            futures.append(future)
        for future in futures:
            await future

    async def _primary_from_sentinels(self) -> Address:
        name = self._target.master_name
        failures = []
        for sentinel in self._known:
            try:
                conn = await self._open(sentinel, sentinel=True)
                try:
                    reply = await self._send(conn, hiredis.pack_command(("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)))
                finally:
                    conn.close(ConnectionError(f"Redis sentinel {conn.name}: done"))
            except (RedisError, OSError) as exc:
                failures.append(f"{sentinel[0]}:{sentinel[1]}: {exc}")
                continue
            if reply:
                return reply[0], int(reply[1])
            failures.append(f"{sentinel[0]}:{sentinel[1]}: does not know {name!r}")
        raise ConnectionError(f"Redis {self._name}: no sentinel names the primary of {name!r} ({'; '.join(failures)})")

    async def _owner_from_cluster(self, args: tuple[Any, ...], failed: Address) -> Address | None:
        """The slot's owner as the first reachable other node sees it (``CLUSTER SLOTS``)."""
        if self._slot is None:
            key = _first_key(args)
            if key is None:
                return next((a for a in self._known if a != failed), None)  # a keyless call: any node
            self._slot = key_slot(key.encode() if isinstance(key, str) else key)
        for node in [a for a in self._known if a != failed]:
            try:
                conn = await self._open(node)
                try:
                    owner = self._learn(await self._send(conn, _CLUSTER_SLOTS), node)
                finally:
                    conn.close(ConnectionError(f"Redis {conn.name}: done"))
            except (RedisError, OSError):
                continue
            if owner is not None:
                return owner
        return None

    def _learn(self, ranges: list[Any], node: Address) -> Address | None:
        """Remember every node of a ``CLUSTER SLOTS`` reply (asked of ``node``); the owner of our slot, if known."""
        owner = None
        for start, end, primary, *replicas in ranges:
            for host, port, *_ in (primary, *replicas):
                address = (host or node[0], int(port))  # an empty host: the node asked
                if address not in self._known:
                    self._known.append(address)
            if self._slot is not None and start <= self._slot <= end:
                owner = (primary[0] or node[0], int(primary[1]))
        return owner


def _first_key(args: tuple[Any, ...]) -> Any:
    """The first key of a command (for its slot), None when it has none."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name == "XREAD":
        upper = [str(a).upper() for a in args]
        return args[upper.index("STREAMS") + 1] if "STREAMS" in upper else None
    if name in ("PING", "SCRIPT", "CLUSTER", "INFO", "TIME", "ASKING", "ROLE"):
        return None
    return args[1] if len(args) > 1 else None
