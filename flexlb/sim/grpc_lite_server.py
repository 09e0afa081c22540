"""A light gRPC server for unary status RPCs on plain asyncio, for many simulated workers in one process.

grpcio's asyncio server costs some 0.5 ms of CPU per call, and it cannot tell which of its ports a call came in on;
a fleet of 1,250 simulated workers polled every few tens of milliseconds needs neither. Each worker's port gets
one asyncio server whose connections answer ``/RpcService/<method>`` from that worker's handlers, synchronously
in ``data_received`` (no task per call). The HTTP/2 and HPACK codec is ``flexlb.master.grpc_lite``'s; a peer that
Huffman-codes its header strings gets a connection error (gRPC C-core clients, grpcio's among them, do not).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Mapping

from flexlb.master.grpc_lite import (
    ACK,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INTERNAL,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    UNIMPLEMENTED,
    WINDOW_UPDATE,
    FrameReader,
    HpackDecoder,
    ProtocolError,
    Unsupported,
    encode_headers,
    frame,
    grpc_message,
    parse_grpc_messages,
    parse_settings,
    settings_frame,
    window_update,
)

log = logging.getLogger("flexlb.sim.grpc_lite")

Handler = Callable[[bytes], bytes]  # serialized request -> serialized reply
SERVICE_PREFIX = "/RpcService/"

_RESPONSE_HEADERS = encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
_OK_TRAILERS = encode_headers([(b"grpc-status", b"0")])


def _error_trailers(code: int, message: str) -> bytes:
    return encode_headers(
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", str(code).encode()),
         (b"grpc-message", message.encode("ascii", "replace"))]
    )  # fmt: skip


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = handlers
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.decoder = HpackDecoder()
        self._preface: bytes | None = b""  # None once the client preface was read
        self._streams: dict[int, tuple[str, bytearray]] = {}
        self._max_frame = DEFAULT_MAX_FRAME
        self._initial_window = DEFAULT_WINDOW
        self._conn_window = DEFAULT_WINDOW
        self._windows: dict[int, int] = {}  # stream -> send window, for streams with data still to send
        self._pending: dict[int, bytearray] = {}  # stream -> reply bytes (gRPC message) not yet sent
        self._conn_received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(settings_frame({SETTINGS_MAX_CONCURRENT_STREAMS: 1000, SETTINGS_MAX_FRAME_SIZE: 1 << 20}))

    def data_received(self, data: bytes) -> None:
        if self._preface is not None:
            self._preface += data
            if len(self._preface) < len(PREFACE):
                return
            if not self._preface.startswith(PREFACE):
                self._abort("not an HTTP/2 client")
                return
            data, self._preface = self._preface[len(PREFACE) :], None
        try:
            for kind, flags, sid, payload in self.reader.feed(data):
                self._on_frame(kind, flags, sid, payload)
        except (ProtocolError, Unsupported) as exc:
            self._abort(str(exc))

    def _abort(self, reason: str) -> None:
        log.debug("gRPC connection closed: %s", reason)
        if self.transport is not None:
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 1) + reason.encode()[:200]))
            self.transport.close()

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if kind == HEADERS:
            headers = self.decoder.decode(payload)
            if sid in self._streams:  # trailers of a request: nothing in them matters
                if flags & END_STREAM:
                    self._dispatch(sid)
                return
            path = next((v.decode(errors="replace") for n, v in headers if n == b":path"), "")
            self._streams[sid] = (path, bytearray())
            if flags & END_STREAM:
                self._dispatch(sid)
        elif kind == DATA:
            if payload:
                self._conn_received += len(payload)
                if self._conn_received >= 1 << 15:
                    transport.write(window_update(0, self._conn_received))
                    self._conn_received = 0
            stream = self._streams.get(sid)
            if stream is None:
                return
            stream[1].extend(payload)
            if flags & END_STREAM:
                self._dispatch(sid)
        elif kind == SETTINGS:
            if not flags & ACK:
                values = parse_settings(payload)
                if SETTINGS_INITIAL_WINDOW_SIZE in values:
                    delta = values[SETTINGS_INITIAL_WINDOW_SIZE] - self._initial_window
                    self._initial_window = values[SETTINGS_INITIAL_WINDOW_SIZE]
                    for s in self._windows:
                        self._windows[s] += delta
                self._max_frame = values.get(SETTINGS_MAX_FRAME_SIZE, self._max_frame)
                transport.write(frame(SETTINGS, ACK, 0))
                self._flush()
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4]) & 0x7FFFFFFF
            if sid == 0:
                self._conn_window += increment
            elif sid in self._windows:
                self._windows[sid] += increment
            self._flush()
        elif kind == PING:
            if not flags & ACK:
                transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._streams.pop(sid, None)
            self._pending.pop(sid, None)
            self._windows.pop(sid, None)
        elif kind == GOAWAY:
            transport.close()

    def _dispatch(self, sid: int) -> None:
        path, body = self._streams.pop(sid)
        transport = self.transport
        assert transport is not None
        handler = self.handlers.get(path[len(SERVICE_PREFIX) :]) if path.startswith(SERVICE_PREFIX) else None
        if handler is None:
            transport.write(frame(HEADERS, END_HEADERS | END_STREAM, sid, _error_trailers(UNIMPLEMENTED, path)))
            return
        try:
            reply = grpc_message(handler(parse_grpc_messages(bytes(body))))
        except Exception as exc:
            log.exception("gRPC handler of %s failed", path)
            transport.write(frame(HEADERS, END_HEADERS | END_STREAM, sid, _error_trailers(INTERNAL, repr(exc))))
            return
        headers = frame(HEADERS, END_HEADERS, sid, _RESPONSE_HEADERS)
        if len(reply) <= min(self._conn_window, self._initial_window, self._max_frame):
            self._conn_window -= len(reply)  # the common case: one DATA frame within every window, one write
            trailers = frame(HEADERS, END_HEADERS | END_STREAM, sid, _OK_TRAILERS)
            transport.write(b"".join((headers, frame(DATA, 0, sid, reply), trailers)))
            return
        transport.write(headers)
        self._pending[sid] = bytearray(reply)
        self._windows[sid] = self._initial_window
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        assert transport is not None
        for sid in list(self._pending):
            data = self._pending[sid]
            while data and self._conn_window > 0 and self._windows[sid] > 0:
                n = min(len(data), self._conn_window, self._windows[sid], self._max_frame)
                transport.write(frame(DATA, 0, sid, bytes(data[:n])))
                del data[:n]
                self._conn_window -= n
                self._windows[sid] -= n
            if not data:
                del self._pending[sid], self._windows[sid]
                transport.write(frame(HEADERS, END_HEADERS | END_STREAM, sid, _OK_TRAILERS))


async def start_lite_server(host: str, port: int, handlers: Mapping[str, Handler]) -> asyncio.Server:
    """Serve ``handlers`` (method name -> handler) on ``host:port``; raises OSError when it cannot bind."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _ServerProtocol(handlers), host, port, reuse_address=True)
