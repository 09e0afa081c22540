"""A small HTTP/2 + gRPC codec for unary calls, and :class:`LiteChannel`, a client of it on asyncio.

Why: grpcio's asyncio stack costs some 300-400 us of CPU per unary call on each side, so one Python process polling
1,250 workers every few tens of milliseconds would need several cores. A status poll is one tiny unary call on a
long-lived connection; this module does exactly that and nothing else, at a small fraction of the cost.

Scope (what a gRPC C-core peer, RTP-LLM's or grpcio's, sends for unary calls):

- HPACK: the static and dynamic tables and every representation, but **no Huffman-coded strings** (C-core does not
  Huffman-code ordinary header values; a peer that does raises :class:`Unsupported`, and the caller falls back to
  grpcio). Our own header blocks use only literals without indexing, so the peer's decoder state never matters.
- Frames: DATA, HEADERS, CONTINUATION, SETTINGS, PING, GOAWAY, RST_STREAM, WINDOW_UPDATE; flow control in both
  directions (a large reply, e.g. a full cache key set, waits for the peer's window).
- gRPC: length-prefixed, uncompressed messages; ``grpc-status`` / ``grpc-message`` trailers (or trailers-only).

The server side lives in ``flexlb.sim.grpc_lite_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
OUR_WINDOW = 1 << 24  # what we let a peer send on one stream before a WINDOW_UPDATE
OUR_MAX_FRAME = 1 << 20  # frames we accept
CONNECTION_WINDOW_BOOST = (1 << 30) - DEFAULT_WINDOW

# gRPC status codes (grpc.StatusCode values) used here
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 1, 2, 4, 12, 13, 14

_FRAME_HEADER = struct.Struct(">I B B I")  # length (24 bits, packed with type below), type, flags, stream id


class Unsupported(Exception):
    """The peer used something this codec does not implement (Huffman-coded headers, compression, ...)."""


class ProtocolError(Exception):
    """The peer broke HTTP/2 or gRPC framing."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + (stream_id & 0x7FFFFFFF).to_bytes(4) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def grpc_message(payload: bytes) -> bytes:
    """A length-prefixed, uncompressed gRPC message."""
    return b"\x00" + len(payload).to_bytes(4) + payload


def parse_grpc_messages(body: bytes) -> bytes:
    """The one message of a unary request or reply body."""
    if len(body) < 5:
        raise ProtocolError(f"gRPC body of {len(body)} bytes: no message")
    if body[0] != 0:
        raise Unsupported("compressed gRPC message")
    n = int.from_bytes(body[1:5])
    if len(body) != 5 + n:
        raise ProtocolError(f"gRPC message of {n} bytes in a body of {len(body)}")
    return body[5:]


# ---- HPACK (RFC 7541) without Huffman ----

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (n.encode(), v.encode())
    for n, v in (
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
        (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
        (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
        ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
        ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
        ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
        ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
        ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
        ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
        ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
        ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
        ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
    )
)  # fmt: skip
_STATIC_NAME_INDEX = {name: i + 1 for i, (name, _) in reversed(list(enumerate(STATIC_TABLE)))}


def encode_int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer: ``first`` holds the representation's flag bits above the ``prefix_bits``-bit prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_int(data: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    while True:
        if i >= len(data):
            raise ProtocolError("HPACK integer runs past the header block")
        b = data[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
        if shift > 35:
            raise ProtocolError("HPACK integer too large")


def _encode_string(value: bytes) -> bytes:
    return encode_int(len(value), 7, 0) + value


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of literals without indexing (static-table names where there is one): stateless."""
    out = []
    for name, value in headers:
        index = _STATIC_NAME_INDEX.get(name)
        if index is None:
            out.append(b"\x00" + _encode_string(name))
        else:
            out.append(encode_int(index, 4, 0))
        out.append(_encode_string(value))
    return b"".join(out)


class HpackDecoder:
    """HPACK decoder state of one direction of one connection."""

    def __init__(self, max_size: int = 4096) -> None:
        self._table: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._size = 0
        self._limit = max_size  # what our SETTINGS_HEADER_TABLE_SIZE allows
        self._max = max_size  # the encoder's current choice (<= _limit)
        # Peers send the same header block again and again (C-core refers to its dynamic table entries once they
        # exist; our encoder is stateless): a block that does not change the table decodes to what it decoded to
        # last time, as long as the table has not changed since.
        self._generation = 0  # bumped on every change of the dynamic table
        self._cache: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        j = index - len(STATIC_TABLE) - 1
        if 0 <= j < len(self._table):
            return self._table[j]
        raise ProtocolError(f"HPACK index {index} out of range")

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        self._table.appendleft((name, value))
        self._generation += 1
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max and self._table:
            self._generation += 1
            n, v = self._table.pop()
            self._size -= len(n) + len(v) + 32

    @staticmethod
    def _string(data: bytes, i: int) -> tuple[bytes, int]:
        if i >= len(data):
            raise ProtocolError("HPACK string runs past the header block")
        if data[i] & 0x80:
            raise Unsupported("Huffman-coded header string")
        n, i = _decode_int(data, i, 7)
        if i + n > len(data):
            raise ProtocolError("HPACK string runs past the header block")
        return data[i : i + n], i + n

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        cached = self._cache.get(data)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        before = self._generation
        out = self._decode(data)
        if self._generation == before and len(data) <= 1024:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[data] = (before, out)
        return out

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        i, n = 0, len(data)
        while i < n:
            b = data[i]
            if b & 0x80:  # indexed
                index, i = _decode_int(data, i, 7)
                out.append(self._entry(index))
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                size, i = _decode_int(data, i, 5)
                if size > self._limit:
                    raise ProtocolError(f"HPACK table size {size} above the limit {self._limit}")
                self._max = size
                self._generation += 1
                self._evict()
                continue
            incremental = bool(b & 0x40)
            index, i = _decode_int(data, i, 6 if incremental else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, i = self._string(data, i)
            value, i = self._string(data, i)
            if incremental:
                self._add(name, value)
            out.append((name, value))
        return out


# ---- frame reader shared by both sides ----


@dataclass(slots=True)
class FrameReader:
    """Splits a byte stream into frames; joins HEADERS + CONTINUATION into one header block."""

    max_frame: int = OUR_MAX_FRAME
    _buf: bytearray = field(default_factory=bytearray)
    _block: bytearray | None = None  # header block in progress
    _block_stream: int = 0
    _block_flags: int = 0

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """(type, flags, stream id, payload) of every complete frame; a header block comes as one HEADERS frame
        (flags of the first frame plus END_HEADERS), padding and priority removed."""
        buf = self._buf
        buf += data
        frames: list[tuple[int, int, int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes above the maximum {self.max_frame}")
            if end - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9]) & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            if self._block is not None:
                if kind != CONTINUATION or sid != self._block_stream:
                    raise ProtocolError("header block interrupted")
                self._block += payload
                if flags & END_HEADERS:
                    frames.append((HEADERS, self._block_flags | END_HEADERS, sid, bytes(self._block)))
                    self._block = None
                continue
            if kind in (DATA, HEADERS):
                if flags & PADDED:
                    pad = payload[0]
                    payload = payload[1 : len(payload) - pad]
                if kind == HEADERS and flags & PRIORITY_FLAG:
                    payload = payload[5:]
                if kind == HEADERS and not flags & END_HEADERS:
                    self._block, self._block_stream, self._block_flags = bytearray(payload), sid, flags
                    continue
            elif kind == CONTINUATION:
                raise ProtocolError("CONTINUATION without HEADERS")
            frames.append((kind, flags, sid, payload))
        del buf[:pos]
        return frames


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise ProtocolError("SETTINGS payload not a multiple of 6")
    return {k: v for k, v in struct.iter_unpack(">HI", payload)}


# ---- client ----


class RpcFailed(Exception):
    """A unary call that did not return a message; ``code`` is a gRPC status code value."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Call:
    __slots__ = ("body", "future", "got_headers", "message", "status", "timer")

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future
        self.body = bytearray()
        self.status: int | None = None
        self.message = ""
        self.timer: asyncio.TimerHandle | None = None
        self.got_headers = False


class ClientProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[ClientProtocol], None]) -> None:
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.decoder = HpackDecoder()
        self.calls: dict[int, _Call] = {}
        self.next_stream = 1
        self.closed = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._conn_received = 0
        self.failure: BaseException | None = None  # why the connection ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(
            PREFACE
            + settings_frame(
                {
                    SETTINGS_ENABLE_PUSH: 0,
                    SETTINGS_INITIAL_WINDOW_SIZE: OUR_WINDOW,
                    SETTINGS_MAX_FRAME_SIZE: OUR_MAX_FRAME,
                }
            )
            + window_update(0, CONNECTION_WINDOW_BOOST)
        )

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for kind, flags, sid, payload in frames:
                self._on_frame(kind, flags, sid, payload)
        except (ProtocolError, Unsupported) as exc:
            self.abort(exc)

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if kind == DATA:
            call = self.calls.get(sid)
            if payload:
                self._conn_received += len(payload)
                if self._conn_received >= 1 << 29:
                    transport.write(window_update(0, self._conn_received))
                    self._conn_received = 0
            if call is None:
                return
            call.body += payload
            if len(call.body) >= OUR_WINDOW // 2 and not flags & END_STREAM:
                transport.write(window_update(sid, len(payload)))  # a large reply: keep its stream window open
            if flags & END_STREAM:
                self._finish(sid, call)
        elif kind == HEADERS:
            headers = self.decoder.decode(payload)  # always: keeps the HPACK state in step
            call = self.calls.get(sid)
            if call is None:
                return
            self._on_headers(call, headers)
            if flags & END_STREAM:
                self._finish(sid, call)
        elif kind == SETTINGS:
            if not flags & ACK:
                parse_settings(payload)  # validates; nothing in them matters for our tiny requests
                transport.write(frame(SETTINGS, ACK, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
        elif kind == PING:
            if not flags & ACK:
                transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            call = self.calls.pop(sid, None)
            if call is not None:
                code = int.from_bytes(payload[:4]) if len(payload) >= 4 else 0
                self._fail(call, RpcFailed(UNAVAILABLE if code == 7 else INTERNAL, f"stream reset ({code})"))
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4]) & 0x7FFFFFFF if len(payload) >= 4 else 0
            self.closed = True  # no new calls on this connection
            for s in [s for s in self.calls if s > last]:
                self._fail(self.calls.pop(s), RpcFailed(UNAVAILABLE, "connection going away"))
            if not self.calls:
                transport.close()
        # WINDOW_UPDATE, PRIORITY: nothing to do (our requests are tiny); PUSH_PROMISE was disabled

    def _on_headers(self, call: _Call, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b"grpc-status":
                call.status = int(value)
            elif name == b"grpc-message":
                call.message = value.decode(errors="replace")
            elif name == b":status" and value != b"200":
                call.status = call.status if call.status is not None else UNKNOWN
                call.message = call.message or f"HTTP status {value.decode(errors='replace')}"
            elif name == b"grpc-encoding" and value != b"identity":
                raise Unsupported(f"grpc-encoding {value.decode(errors='replace')}")
        call.got_headers = True

    def _finish(self, sid: int, call: _Call) -> None:
        self.calls.pop(sid, None)
        if call.timer is not None:
            call.timer.cancel()
        if call.future.done():
            return
        if call.status is None:
            call.future.set_exception(RpcFailed(INTERNAL, "stream ended without grpc-status"))
        elif call.status != OK:
            call.future.set_exception(RpcFailed(call.status, call.message))
        else:
            try:
                call.future.set_result(parse_grpc_messages(bytes(call.body)))
            except (ProtocolError, Unsupported) as exc:
                call.future.set_exception(exc)
        if self.closed and not self.calls and self.transport is not None:
            self.transport.close()

    def _fail(self, call: _Call, exc: BaseException) -> None:
        if call.timer is not None:
            call.timer.cancel()
        if not call.future.done():
            call.future.set_exception(exc)

    def call(self, path_block: bytes, message: bytes, timeout_s: float | None) -> asyncio.Future[bytes]:
        """Send one call; its future ends with the reply. ``timeout_s`` None: no timer, the caller ends an overdue
        call with :meth:`expire` (the status ticker checks its calls' deadlines itself, one timer fewer a call)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        if self.transport is None or self.transport.is_closing():  # uvloop raises on a write to a closed handle
            self.closed = True
            future.set_exception(RpcFailed(UNAVAILABLE, "connection closed"))
            return future
        sid = self.next_stream
        self.next_stream += 2
        if self.next_stream >= 1 << 30:
            self.closed = True  # ids run out some day: the next call opens a new connection
        call = _Call(future)
        self.calls[sid] = call
        if timeout_s is not None:
            call.timer = loop.call_later(timeout_s, self._expire, sid, True)
        assert self.transport is not None
        sid_bytes = sid.to_bytes(4)
        n, body = len(path_block), grpc_message(message)
        m = len(body)
        self.transport.write(
            b"".join(
                (
                    bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, HEADERS, END_HEADERS)), sid_bytes, path_block,
                    bytes((m >> 16, (m >> 8) & 0xFF, m & 0xFF, DATA, END_STREAM)), sid_bytes, body,
                )
            )
        )  # fmt: skip
        return future

    def expire(self, sid: int) -> None:
        """End call ``sid`` with DEADLINE_EXCEEDED now, if it is still open."""
        self._expire(sid)

    def _expire(self, sid: int, first: bool = False) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        if first:
            # The loop runs due timers before it reads sockets: a reply that arrived while the loop was busy may
            # be waiting unread. Look again once it has polled them.
            call.timer = asyncio.get_running_loop().call_later(0.002, self._expire, sid)
            return
        del self.calls[sid]
        call.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(RST_STREAM, 0, sid, struct.pack(">I", 8)))  # CANCEL
        self._fail(call, RpcFailed(DEADLINE_EXCEEDED, "deadline exceeded"))

    def abort(self, exc: BaseException) -> None:
        self.failure = exc
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = self.failure or exc
        for call in self.calls.values():
            if isinstance(reason, Unsupported):
                self._fail(call, reason)
            else:
                self._fail(call, RpcFailed(UNAVAILABLE, f"connection lost: {reason!r}" if reason else "closed"))
        self.calls.clear()
        if not self.ready.done():
            self.ready.set_exception(RpcFailed(UNAVAILABLE, f"connection lost: {reason!r}"))
            self.ready.exception()  # retrieved: nobody may be waiting
        self._on_lost(self)


class LiteChannel:
    """Unary gRPC calls to one ``host:port`` over one HTTP/2 connection, opened on first use and re-opened after
    a failure (at most every ``reconnect_backoff_s``, so a dead worker fails fast instead of being dialled on every
    poll). Raises :class:`RpcFailed` or :class:`Unsupported`."""

    def __init__(self, host: str, port: int, *, reconnect_backoff_s: float = 0.1, connect_timeout_s: float = 1.0):
        self.host, self.port = host.strip("[]"), port
        self.authority = f"{host}:{port}".encode()
        self.reconnect_backoff_s = reconnect_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self._protocol: ClientProtocol | None = None
        self._connecting: asyncio.Future[ClientProtocol] | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self._blocks: dict[str, bytes] = {}
        self._closed = False

    def header_block(self, path: str) -> bytes:
        block = self._blocks.get(path)
        if block is None:
            block = encode_headers(
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", path.encode()),
                    (b":authority", self.authority),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    (b"user-agent", b"flexlb-grpc-lite"),
                ]
            )
            self._blocks[path] = block
        return block

    async def _connect(self) -> ClientProtocol:
        if time.monotonic() < self._down_until:
            raise RpcFailed(UNAVAILABLE, self._down_reason)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(lambda: ClientProtocol(self._lost), self.host, self.port)
                await protocol.ready
        except (OSError, TimeoutError, RpcFailed) as exc:
            self._down_until = time.monotonic() + self.reconnect_backoff_s
            self._down_reason = f"cannot connect to {self.host}:{self.port}: {exc!r}"
            raise RpcFailed(UNAVAILABLE, self._down_reason) from None
        return protocol

    def _lost(self, protocol: ClientProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    def start(self, path: str, message: bytes) -> tuple[ClientProtocol, int, asyncio.Future[bytes]] | None:
        """The call sent on the open connection as a bare future, without a coroutine or timer of its own (the
        status ticker's polls: flexlb.master.ticker): (connection, stream id, future); the caller ends it when
        overdue (``connection.expire(stream id)``). None when no connection is open (:meth:`call` opens one)."""
        protocol = self._protocol
        if self._closed or protocol is None or protocol.closed:
            return None
        sid = protocol.next_stream
        return protocol, sid, protocol.call(self.header_block(path), message, None)

    async def call(self, path: str, message: bytes, timeout_s: float) -> bytes:
        if self._closed:
            raise RpcFailed(CANCELLED, "channel closed")
        protocol = self._protocol
        if protocol is None or protocol.closed:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
                # a caller may stop waiting (deadline, cancellation) before it ends: its outcome is still read
                self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
            connecting = self._connecting
            try:
                protocol = await asyncio.wait_for(asyncio.shield(connecting), timeout_s)
            except TimeoutError:
                raise RpcFailed(DEADLINE_EXCEEDED, "deadline exceeded while connecting") from None
            finally:
                if self._connecting is connecting and connecting.done():
                    self._connecting = None
            if self._closed:
                protocol.abort(RpcFailed(CANCELLED, "channel closed"))
                raise RpcFailed(CANCELLED, "channel closed")
            self._protocol = protocol
        future = protocol.call(self.header_block(path), message, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def close(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            with contextlib.suppress(Exception):
                protocol.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            protocol.transport.close()
