"""The proxy's HTTP/1.1 client to its workers (flexlb.proxy.http1) against a scripted raw TCP server: body framings,
keep-alive reuse, a stale pooled connection, closing early, failures, the per-worker limit and TCP_NODELAY.

Every test runs on asyncio's own loop and on uvloop (the router's)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from flexlb.proxy.http1 import BadResponse, ConnectFailed, Disconnected, UpstreamPool
from flexlb.proxy.upstream import request_head

GUARD_S = 10.0  # a failure guard only


def request(port: int, body: bytes = b'{"x": 1}', request_id: int = 1) -> bytes:
    head = request_head("127.0.0.1", port, "/v1/completions")
    return head + b"Content-Length: %d\r\nX-Request-Id: %d\r\n\r\n" % (len(body), request_id) + body


class Script:
    """A raw server: each accepted connection runs ``handler(reader, writer, server)``; what it saw is recorded."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Script], Awaitable[None]]):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # heads and bodies received, one per request
        self.closed_by_client = asyncio.Event()
        self.events: dict[str, asyncio.Event] = {}
        self.server: asyncio.Server | None = None

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def start(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and body), or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return None
        length = next(
            int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")) if k == b"Content-Length"
        )
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def both_loops(test: Callable[[], Awaitable[None]]) -> Callable[..., None]:
    @pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
    def run(loop_name: str) -> None:
        factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(test(), GUARD_S))

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


def pool(**kwargs: Any) -> UpstreamPool:
    return UpstreamPool(**({"connect_timeout_s": 5.0, "max_per_worker": 8, "keepalive_s": 30.0} | kwargs))


async def keep_alive_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    while await script.read_request(reader) is not None:
        body = b'{"ok": true}'
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
        writer.write(head % len(body) + body)
        await writer.drain()


@both_loops
async def test_a_content_length_answer_and_its_connection_reused() -> None:
    script = Script(keep_alive_json)
    port = await script.start()
    client = pool()
    for rid in (1, 2, 3):
        response = await client.send("127.0.0.1", port, request(port, request_id=rid))
        assert (response.status, response.content_type) == (200, "application/json")
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert await response.read() == b'{"ok": true}'
        response.close()
    assert script.connections == 1 and len(script.requests) == 3
    assert script.requests[1].startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"X-Request-Id: 2\r\n" in script.requests[1] and script.requests[1].endswith(b'\r\n\r\n{"x": 1}')
    assert client.connections() == {f"127.0.0.1:{port}": {"open": 1, "idle": 1}}
    await client.close()
    await script.close()


@both_loops
async def test_a_chunked_stream_is_handed_out_as_it_arrives() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await script.event(f"read {i}").wait()  # the client has it before the next one is sent
        writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        await writer.drain()
        await script.read_request(reader)  # the connection stays open for the next request

    script = Script(stream)
    port = await script.start()
    client = pool()
    response = await client.send("127.0.0.1", port, request(port))
    assert response.content_type == "text/event-stream"
    for i in range(3):
        assert await response.readany() == b"data: %d\n\n" % i
        script.event(f"read {i}").set()
    assert await response.readany() == b""
    assert client.connections()[f"127.0.0.1:{port}"] == {"open": 1, "idle": 1}  # back in the pool
    await client.close()
    await script.close()


@both_loops
async def test_a_body_until_the_connection_closes_and_a_204_without_body() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await script.read_request(reader)
        if script.connections == 1:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        else:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            await script.read_request(reader)

    script = Script(until_close)
    port = await script.start()
    client = pool()
    response = await client.send("127.0.0.1", port, request(port))
    assert await response.read() == b"all of it"
    assert client.connections()[f"127.0.0.1:{port}"]["idle"] == 0  # not reusable
    response = await client.send("127.0.0.1", port, request(port))
    assert response.status == 204 and await response.read() == b""
    assert script.connections == 2
    await client.close()
    await script.close()


@both_loops
async def test_closing_before_the_end_closes_the_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await script.read_request(reader)  # until the client closes

    script = Script(endless)
    port = await script.start()
    client = pool()
    response = await client.send("127.0.0.1", port, request(port))
    assert await response.readany() == b"first"
    response.close()
    await script.closed_by_client.wait()  # the worker sees the client go
    assert client.connections()[f"127.0.0.1:{port}"] == {"open": 0, "idle": 0}
    with pytest.raises(Disconnected):
        await response.readany()
    await client.close()
    await script.close()


@both_loops
async def test_a_pooled_connection_the_worker_closed_is_replaced() -> None:
    async def one_answer_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script
    ) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then closes
        await writer.drain()

    script = Script(one_answer_per_connection)
    port = await script.start()
    client = pool()
    for _ in range(3):
        response = await client.send("127.0.0.1", port, request(port))
        assert await response.read() == b"ok"
    assert script.connections == 3 and len(script.requests) == 3  # each request sent once
    await client.close()
    await script.close()


@both_loops
async def test_a_worker_failing_mid_body_raises_after_what_arrived() -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    script = Script(dies)
    port = await script.start()
    client = pool()
    response = await client.send("127.0.0.1", port, request(port))
    assert await response.readany() == b"partial"
    with pytest.raises(Disconnected, match="before its answer was complete"):
        await response.readany()
    await client.close()
    await script.close()


@both_loops
async def test_no_answer_a_bad_answer_and_no_worker() -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await script.read_request(reader)
        if script.connections == 1:
            writer.write(b"SPDY/3 200 OK\r\n\r\n")
        # the second connection: closed without an answer

    script = Script(bad)
    port = await script.start()
    client = pool()
    with pytest.raises(BadResponse, match=r"not an HTTP/1\.x answer"):
        await client.send("127.0.0.1", port, request(port))
    with pytest.raises(Disconnected):
        await client.send("127.0.0.1", port, request(port))
    await script.close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectFailed):
        await client.send("127.0.0.1", free, request(free))
    await client.close()


@both_loops
async def test_at_most_max_per_worker_connections_the_others_wait() -> None:
    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        while await script.read_request(reader) is not None:
            n = len(script.requests)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n%d" % n)
            await writer.drain()
            await script.event(f"finish {n}").wait()
            writer.write(b".")
            await writer.drain()

    script = Script(gated)
    port = await script.start()
    client = pool(max_per_worker=1)
    first = await client.send("127.0.0.1", port, request(port))
    second = asyncio.create_task(client.send("127.0.0.1", port, request(port)))
    third = asyncio.create_task(client.send("127.0.0.1", port, request(port)))
    assert await first.readany() == b"1"
    third.cancel()  # a waiter that leaves does not hold up the others
    script.event("finish 1").set()
    assert await first.readany() == b"."
    response = await second  # on the one connection, once the first answer was complete
    script.event("finish 2").set()
    assert await response.read() == b"2."
    assert third.cancelled() and script.connections == 1 and len(script.requests) == 2
    await client.close()
    await script.close()


@both_loops
async def test_connections_have_tcp_nodelay() -> None:
    script = Script(keep_alive_json)
    port = await script.start()
    client = pool()
    response = await client.send("127.0.0.1", port, request(port))
    await response.read()
    (worker,) = client._pools.values()
    (conn,) = worker.idle
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    await client.close()
    await script.close()


@both_loops
async def test_idle_connections_close_after_keepalive() -> None:
    script = Script(keep_alive_json)
    port = await script.start()
    client = pool(keepalive_s=30.0)
    response = await client.send("127.0.0.1", port, request(port))
    await response.read()
    (worker,) = client._pools.values()
    (conn,) = worker.idle
    worker.sweep(conn.idle_since + 1.0)
    assert worker.idle == [conn]  # still fresh
    worker.sweep(conn.idle_since + 30.0)
    assert worker.idle == [] and conn.closed and not worker.open
    await client.close()
    await script.close()
