"""Disaggregated prefill / decode, as SGLang's PD router does it: the same body, with the KV-transfer bootstrap
fields, goes to the prefill and the decode worker at once; the client gets the decode worker's answer.

``bootstrap_host`` is the prefill worker's address, ``bootstrap_port`` its bootstrap server's port and
``bootstrap_room`` a random 63-bit id both sides use to find each other.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from flexlb.proxy.http1 import Response
from flexlb.proxy.upstream import UPSTREAM_ERRORS, Target, UpstreamFailure

log = logging.getLogger("flexlb.proxy")

Opener = Callable[[Target], Awaitable[Response]]


class PrefillRefused(Exception):
    """The prefill worker answered below 500 but not 2xx (the request is wrong for the engine): the client gets
    that answer; the decode worker, which would wait for KV that never comes, is abandoned."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"prefill answered HTTP {response.status}")
        self.response = response


class UpstreamFailures(Exception):
    """One or both workers of a request failed before their first byte."""

    def __init__(self, failures: list[UpstreamFailure]) -> None:
        super().__init__("; ".join(str(f) for f in failures))
        self.failures = failures


def bootstrap_fields(prefill: Target, port: int, rng: random.Random) -> dict[str, Any]:
    return {"bootstrap_host": prefill.spec.ip, "bootstrap_port": port, "bootstrap_room": rng.getrandbits(63)}


async def open_pair(open_one: Opener, prefill: Target, decode: Target) -> tuple[Response, Response]:
    """Send to both workers at once and return (prefill, decode) responses once both sent their headers.

    Raises UpstreamFailures naming the worker(s) that failed, or PrefillRefused; whatever else was opened is closed.
    """

    async def open_prefill() -> Response:
        response = await open_one(prefill)
        if not 200 <= response.status < 300:
            raise PrefillRefused(response)
        return response

    tasks = (asyncio.create_task(open_prefill()), asyncio.create_task(open_one(decode)))
    try:
        # A failure on one side ends the wait: the other side would wait for a partner that is not coming.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in tasks if t.done() and t.exception() is not None]
        failures = [e for e in errors if isinstance(e, UpstreamFailure)]
        if failures:
            raise UpstreamFailures(failures)
        if errors:
            raise errors[0]  # PrefillRefused, or a bug
        return tasks[0].result(), tasks[1].result()
    except BaseException as exc:
        keep = exc.response if isinstance(exc, PrefillRefused) else None
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            _close_opened(task, keep)
        raise


def _close_opened(task: asyncio.Task[Response], keep: Response | None) -> None:
    """Close the response ``task`` opened, unless it is ``keep``: the worker sees the disconnect and cancels."""
    if task.cancelled():
        return
    exc = task.exception()
    response = exc.response if isinstance(exc, PrefillRefused) else task.result() if exc is None else None
    if response is not None and response is not keep:
        response.close()


async def drain(response: Response, target: Target, request_id: int, on_failure: Callable[[Target], None]) -> None:
    """Read and discard the prefill worker's answer (its connection stays open until the prefill is done)."""
    try:
        while await response.readany():
            pass
    except UPSTREAM_ERRORS as exc:
        # Too late to fail the request: the decode side has its KV or fails by itself, and its answer is the client's.
        on_failure(target)
        log.warning("request %s: %s failed after its first byte: %r", request_id, target, exc)
    finally:
        response.close()
