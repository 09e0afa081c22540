"""The simulated PD bootstrap server: where a prefill worker says a bootstrap room's KV is ready and its decode peer
waits for that (SGLang's decode side waits on the KV transfer from the room its router named).

SGLang's prefill server hosts the bootstrap server on its ``--disaggregation-bootstrap-port``. flexlb writes one
``bootstrap_port`` into every disaggregated request, so simulated prefill workers sharing a host share one bootstrap
server: run ``python -m flexlb.sim.bootstrap --port 8998`` on it (``flexlb demo`` and ``flexlb up --pd`` do).

Routes (JSON): ``POST /kv/rooms/{room}`` records the room's state (``{"state": "ready" | "failed", ...}``, from
the prefill worker); ``GET /kv/rooms/{room}?wait_ms=N`` answers it, waiting up to N ms (at most ``MAX_WAIT_MS``) for
a room not yet recorded, then 202 ``{"state": "pending"}``; ``GET /health``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from flexlb.cli_options import port

log = logging.getLogger("flexlb.sim.bootstrap")

MAX_WAIT_MS = 10_000  # one long poll; a decode worker polls again until its own deadline
ROOM_TTL_S = 300.0  # a room nobody asked for is forgotten after this (the decode side failed or never came)
MAX_ROOMS = 100_000
ROOM_STATES = ("ready", "failed")


class RoomBoard:
    """The rooms' states, and the waiters of rooms not recorded yet; old rooms expire (a dead peer leaves none)."""

    def __init__(self, ttl_s: float = ROOM_TTL_S, max_rooms: int = MAX_ROOMS) -> None:
        self._ttl_s = ttl_s
        self._max = max_rooms
        self._rooms: OrderedDict[int, tuple[float, dict[str, Any]]] = OrderedDict()  # by time recorded
        self._waiters: dict[int, tuple[asyncio.Event, int]] = {}  # room -> (recorded, how many wait)

    def record(self, room: int, state: dict[str, Any]) -> None:
        now = time.monotonic()
        self._rooms.pop(room, None)
        self._rooms[room] = (now, state)
        while self._rooms:
            first, (at, _) = next(iter(self._rooms.items()))
            if now - at < self._ttl_s and len(self._rooms) <= self._max:
                break
            del self._rooms[first]
        waiter = self._waiters.pop(room, None)
        if waiter is not None:
            waiter[0].set()

    def get(self, room: int) -> dict[str, Any] | None:
        entry = self._rooms.get(room)
        return None if entry is None else entry[1]

    async def wait(self, room: int, timeout_s: float) -> dict[str, Any] | None:
        """The room's state, waiting up to ``timeout_s`` for it to be recorded; None if it was not."""
        state = self.get(room)
        if state is not None or timeout_s <= 0:
            return state
        event, count = self._waiters.get(room, (asyncio.Event(), 0))
        self._waiters[room] = (event, count + 1)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        finally:
            current = self._waiters.get(room)
            if current is not None and current[0] is event:  # not recorded yet: the last waiter leaves no entry
                self._waiters[room] = (event, current[1] - 1)
                if current[1] == 1:
                    del self._waiters[room]
        return self.get(room)


BOARD = web.AppKey("board", RoomBoard)


def _room(request: web.Request) -> int:
    text = request.match_info["room"]
    try:
        room = int(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"bootstrap room: expected an integer, got {text!r}") from None
    if not 0 <= room < 1 << 64:
        raise web.HTTPBadRequest(text=f"bootstrap room {room}: out of range [0, 2**64)")
    return room


async def record_room(request: web.Request) -> web.Response:
    room = _room(request)
    try:
        state = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"bootstrap room {room}: malformed JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("state") not in ROOM_STATES:
        raise web.HTTPBadRequest(text=f"bootstrap room {room}: expected an object with state in {ROOM_STATES}")
    request.app[BOARD].record(room, state)
    return web.json_response({"room": room, "recorded": True})


async def get_room(request: web.Request) -> web.Response:
    room = _room(request)
    try:
        wait_ms = min(max(int(request.query.get("wait_ms", "0")), 0), MAX_WAIT_MS)
    except ValueError:
        raise web.HTTPBadRequest(text=f"wait_ms: expected an integer, got {request.query['wait_ms']!r}") from None
    state = await request.app[BOARD].wait(room, wait_ms / 1000)
    if state is None:
        return web.json_response({"room": room, "state": "pending"}, status=202)
    return web.json_response({"room": room, **state})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_bootstrap_app(board: RoomBoard | None = None) -> web.Application:
    app = web.Application()
    app[BOARD] = board or RoomBoard()
    app.router.add_post("/kv/rooms/{room}", record_room)
    app.router.add_get("/kv/rooms/{room}", get_room)
    app.router.add_get("/health", health)
    return app


async def run_bootstrap_server(host: str, port_: int, stop: asyncio.Event) -> None:
    runner = web.AppRunner(create_bootstrap_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port_).start()
        log.info("simulated PD bootstrap server on http://%s:%d", host, port_)
        await stop.wait()
    finally:
        await runner.cleanup()


async def _serve(host: str, port_: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_bootstrap_server(host, port_, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexlb.sim.bootstrap", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8998, help="the fleet's bootstrapPort (default 8998)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        asyncio.run(_serve(args.host, args.port))
    except OSError as exc:  # the port is in use
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
