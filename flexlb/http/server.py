"""Serving an app with read timeouts: aiohttp's ``run_app``, plus a per-connection watchdog for the request headers.

aiohttp bounds an idle keep-alive connection (``keepalive_timeout``: from the connection's start or its last
response), but a client that sends a request's headers a byte at a time ("slowloris") keeps its connection as long
as that allows, and nothing bounds the body. So:

- idle: ``keepalive_timeout`` = ``ReadTimeouts.idle_s``;
- headers: each connection's protocol is wrapped (``_Watched``): the first byte of a request starts a deadline,
  ``ReadTimeouts.header_s``; the app's ``request_started`` middleware (flexlb/http/middleware.py), which runs once
  the headers are in, stops it; a connection whose headers are not in by then is closed;
- body: ``read_guard`` reads the whole body within ``ReadTimeouts.body_s`` (flexlb/http/body.py), answered 408.

Nothing here bounds writing a response: a proxied stream may last minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

WATCH = web.AppKey("connection_watch", "ConnectionWatch")
# what answers a connection before aiohttp does: an object with wrap(factory) -> factory (flexlb/http/fast_path.py)
FRONT = web.AppKey("connection_front", object)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
LINGER_S = 1.0  # after an early answer (408, 413): unread body bytes drained this long, so the answer is not reset


@dataclass(frozen=True, slots=True)
class ReadTimeouts:
    header_s: float  # from a request's first byte to the end of its headers
    body_s: float  # for the whole body, from the end of the headers
    idle_s: float  # a keep-alive connection with no request


class _Watched(asyncio.Protocol):
    """Delegates to aiohttp's protocol; closes the connection when a request's headers take too long."""

    __slots__ = ("_deadline", "_in_request", "_inner", "_transport", "_watch")

    def __init__(self, inner: asyncio.Protocol, watch: ConnectionWatch) -> None:
        self._inner = inner
        self._watch = watch
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport: not an asyncio.Transport
        self._watch.connections[transport] = self
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_request and self._deadline is None:  # the first byte of a request
            self._deadline = asyncio.get_running_loop().call_later(self._watch.header_s, self._headers_late)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._transport is not None:
            self._watch.connections.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self) -> None:
        self._in_request = True
        self._cancel()

    def request_finished(self) -> None:
        self._in_request = False  # bytes arriving from now on are the next request's

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        transport = self._transport
        if self._in_request or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # still writing the last answer: the next request is not late yet
            self._deadline = asyncio.get_running_loop().call_later(self._watch.header_s, self._headers_late)
            return
        self._watch.closed_late += 1
        transport.close()


class ConnectionWatch:
    """The watched connections of one server, by transport (what a request knows of its connection)."""

    def __init__(self, header_s: float) -> None:
        self.header_s = header_s
        self.connections: dict[asyncio.BaseTransport, _Watched] = {}
        self.closed_late = 0  # connections closed because their headers were late

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Watched(factory(), self)

    def of(self, request: web.BaseRequest) -> _Watched | None:
        transport = request.transport
        return self.connections.get(transport) if transport is not None else None


class _WatchedSite(web.TCPSite):
    """A TCPSite whose connections go through the app's ConnectionWatch."""

    def __init__(
        self,
        runner: web.AppRunner,
        watch: ConnectionWatch,
        host: str,
        port: int,
        sock: socket.socket | None,
        front: Any = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_port=True)
        self._watch = watch
        self._front = front
        self._sock = sock  # already bound and listening (a router alone: exclusive, flexlb/ports.py)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner (stopped by runner.cleanup)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        factory = self._watch.wrap(server)
        if self._front is not None:
            factory = self._front.wrap(factory)
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
            return
        self._server = await loop.create_server(factory, self._host, self._port, backlog=self._backlog, reuse_port=True)


def runner_options(timeouts: ReadTimeouts) -> dict[str, Any]:
    """aiohttp's own knobs for these timeouts (AppRunner / run_app keyword arguments)."""
    return {"keepalive_timeout": timeouts.idle_s, "lingering_time": LINGER_S}


def serve(
    app: web.Application, host: str, port: int, *, sock: socket.socket | None = None, **runner_kwargs: Any
) -> None:
    """``web.run_app(app, host=host, port=port, reuse_port=True, ...)`` with the app's ConnectionWatch on every
    connection (``app[WATCH]``, set by create_app), behind ``app[FRONT]`` when set: the same start-up and shutdown as
    run_app; SIGTERM / SIGINT stop it (after the start-up, when one comes during it), a second one cuts the shutdown
    short. ``sock``: listen on that socket instead (bound before anything started, so a port in use
    fails first)."""
    watch = app[WATCH]

    async def main() -> None:
        # Our own signal handlers, not aiohttp's: those raise GracefulExit, and a signal during start-up then
        # cancelled the start-up, where a cancellation lost in a Redis read (redis-py) left the process serving
        # for ever. A first signal sets ``stop`` (seen once the start-up is done: it is bounded by Redis'
        # timeouts); a second cancels what is left of the shutdown.
        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            stop.set()

        running = asyncio.get_running_loop()
        for sig in SIGNALS:
            running.add_signal_handler(sig, on_signal)
        runner = web.AppRunner(app, handle_signals=False, **runner_kwargs)
        await runner.setup()
        try:
            if not stop.is_set():
                await _WatchedSite(runner, watch, host, port, sock, app.get(FRONT)).start()
                await stop.wait()
        finally:
            await runner.cleanup()
            for sig in SIGNALS:
                running.remove_signal_handler(sig)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass  # a second signal cut the shutdown short
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in left:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
