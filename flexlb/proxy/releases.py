"""Releases the proxy starts without waiting for them: a request's answer goes out while its reservation is being
given back in Redis.

``Scheduler.release`` runs the release as a task of its own (shielded: a cancelled caller does not cut it short) and
``Scheduler.finish_releases`` waits for those at shutdown. What is left here is not to await it: ``start`` wraps it
in a task and keeps a reference until it ends (the event loop holds only weak references to tasks), and the task's
outcome is always retrieved, so a failed release is logged instead of "Task exception was never retrieved".

Shutdown needs no step of its own: the release's own task is registered with the scheduler on the wrapper's first
step, which the event loop runs before it resumes anything that waited for the handler that started it (callbacks run
in the order they were scheduled), so ``finish_releases`` sees it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any, Protocol

log = logging.getLogger("flexlb.proxy")


class Releasing(Protocol):
    """What a release needs of the scheduler."""

    def release(self, request_id: int) -> Coroutine[Any, Any, int]: ...


class Releases:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[int]] = set()

    def __len__(self) -> int:
        """Releases started here and not finished yet."""
        return len(self._tasks)

    def start(self, scheduler: Releasing, request_id: int) -> None:
        """Give back the reservations of ``request_id`` in the background."""
        task = asyncio.ensure_future(scheduler.release(request_id))
        self._tasks.add(task)
        task.add_done_callback(partial(self._done, request_id))

    def _done(self, request_id: int, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if task.cancelled():  # the release itself goes on (shielded); only this wrapper was cancelled
            return
        exc = task.exception()
        if exc is not None:
            log.error("release of request %s failed; its reservation expires by its TTL", request_id, exc_info=exc)

    async def wait(self) -> None:
        """Until every release started here has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
