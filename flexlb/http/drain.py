"""Graceful shutdown of a router's HTTP server: the requests in flight get until a deadline, then are cancelled.

aiohttp's own ``shutdown_timeout`` waits for the handlers twice over (once for them to finish, once more after it
stops their body reads) before it cancels them, and 0 means no limit; ``shutdownTimeoutMs`` is meant as the deadline.
So the router tracks its handlers here and, at shutdown, waits for them and cancels what is left itself; their
``finally`` blocks then release the reservations, and aiohttp finds nothing left to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("flexlb.http")

CANCEL_GRACE_S = 10.0  # for cancelled handlers to run their finally blocks (Redis calls, bounded by their timeout)
AIOHTTP_SHUTDOWN_TIMEOUT_S = 5.0  # aiohttp's own wait, a backstop: drain() has left nothing in flight


class InFlightRequests:
    """The tasks of the requests being handled; ``middleware`` must be the outermost middleware (the fast path,
    flexlb/http/fast_path.py, adds its own)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._changed.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.add(task)
        try:
            return await handler(request)
        finally:
            self.discard(task)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the requests in flight to finish, then cancel the others and wait (a bounded
        time) for them to unwind; returns how many were cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._tasks and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        left = list(self._tasks)
        if left:
            log.warning("shutdown: cancelling %d requests still in flight after %.1fs", len(left), timeout_s)
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CANCEL_GRACE_S)
        return len(left)
