"""Stopping a background task for sure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_until_done(task: asyncio.Future[Any], retry_s: float = 0.2) -> None:
    """Cancel ``task`` and wait until it is done. A cancellation can be lost in a read that completes at the same
    moment (asyncio.timeout on Python 3.11; seen in redis-py's blocking reads), so it is sent again until the task
    ends; its own exception, if any, is not raised here."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
