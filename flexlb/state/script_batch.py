"""Reserve and release calls of one loop round, sent as one ``lua/batch.lua`` call per service.

Most of a decision's Redis time is the scripts' own cost rather than their commands: each call pays for its
invocation, a clock read and a change-stream entry (docs/performance.md). Calls made in the same event-loop round (a
router under load makes several) share those; a lone call goes as its own script, unchanged. Order is kept: the calls
run in the order they were made, each as its own script would, and each caller gets its own reply or error.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from flexlb.state.pipelined import PipelinedRedis

BATCHED = ("reserve", "release")  # the scripts lua/batch.lua can run
# How long a deferred call may wait to share a batch: a release no decision waits for (the schedule API's /release,
# whose client waits for its answer), and one nobody waits for at all (the proxy's, once the answer is out: waiting
# 4 ms instead of 1 ms shares most of them with other calls, ~7% of a proxying router's CPU; the worker reports
# the request done by then, and the master's hand-over drops most reservations before their release anyway)
DEFER_S = 0.001
AFTER_ANSWER_DEFER_S = 0.004
# calls per batch: 16 share the fixed cost nearly as well as more, and bound the script's run (Redis and its other
# clients wait for it; each caller for its whole batch): 64 lowered a closed loop's throughput
MAX_CALLS = 16
_ERROR = "__error__"
_MOVED = "__moved__"  # lua/batch.lua: this call met its slot in transit

Call = Callable[[str, list[str], list[Any]], Awaitable[Any]]  # Scripts._call
Submit = Callable[[str, list[str], list[Any]], "asyncio.Future[Any] | None"]  # Scripts.submit


@dataclass(slots=True)
class _Pending:
    name: str
    keys: list[str]
    args: list[Any]
    future: asyncio.Future[Any]


class ScriptBatch:
    """Queues batchable script calls and sends them, per service (their change-stream key), at the end of the loop
    round, or when every queued call is deferred (``defer_s`` > 0: a release nothing waits for), as late as the
    earliest of their waits allows.

    ``submit(name, keys, args)`` sends a call at once and returns its reply's future (None: no connection up), so a
    batch costs no task; ``call`` (a coroutine) is the way round when it cannot: connecting, loading the script
    after NOSCRIPT, following a cluster redirection."""

    def __init__(self, submit: Submit, call: Call) -> None:
        self._submit = submit
        self._call = call
        self._queued: list[_Pending] = []
        self._soon: asyncio.Handle | None = None
        self._late: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0  # batch.lua calls made (tests)

    async def call(self, name: str, keys: list[str], args: list[Any], *, defer_s: float = 0.0) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(_Pending(name, keys, args, future))
        if self._soon is not None:
            pass  # sent at the end of this round anyway
        elif defer_s <= 0:
            self._soon = loop.call_soon(self._flush)
        elif self._late is None or loop.time() + defer_s < self._late.when():
            if self._late is not None:
                self._late.cancel()
            self._late = loop.call_later(defer_s, self._flush)
        # a caller cancelled meanwhile cancels only its wait: the call is sent, as one already written would be (its
        # own clean-up, a release, is queued after it)
        return await future

    def _flush(self) -> None:
        for handle in (self._soon, self._late):
            if handle is not None:
                handle.cancel()
        self._soon = self._late = None
        queued, self._queued = self._queued, []
        groups: dict[str, list[_Pending]] = {}
        for p in queued:
            groups.setdefault(p.keys[1], []).append(p)  # KEYS[2]: the service's change stream (its hash slot)
        for group in groups.values():
            for start in range(0, len(group), MAX_CALLS):
                self._start(group[start : start + MAX_CALLS])

    def _start(self, calls: list[_Pending]) -> None:
        if len(calls) > 1:
            self.batches += 1
        try:
            future = self._submit(*_script_call(calls))
        except Exception as exc:  # e.g. an argument the protocol cannot encode: its callers fail, none waits forever
            _fail(calls, exc)
            return
        if future is None:
            self._the_long_way(calls)
        else:
            future.add_done_callback(functools.partial(self._answered, calls))

    def _answered(self, calls: list[_Pending], future: asyncio.Future[Any]) -> None:
        exc = ConnectionError("Redis call cancelled") if future.cancelled() else future.exception()
        if exc is None:
            self._deliver(calls, future.result())
        elif isinstance(exc, NoScriptError) or PipelinedRedis.redirected(exc):  # not run: run it the long way
            self._the_long_way(calls)
        else:
            _fail(calls, exc)

    def _the_long_way(self, calls: list[_Pending]) -> None:
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Pending]) -> None:
        try:
            reply = await self._call(*_script_call(calls))
        except BaseException as exc:  # each caller gets the failure of the call it made
            _fail(calls, exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        self._deliver(calls, reply)

    def _deliver(self, calls: list[_Pending], reply: Any) -> None:
        replies = [reply] if len(calls) == 1 else reply
        if not isinstance(replies, list) or not 0 < len(replies) <= len(calls):
            _fail(calls, ResponseError(f"batch of {len(calls)} calls: unexpected reply {str(reply)[:200]}"))
            return
        for i, (p, one) in enumerate(zip(calls, replies, strict=False)):
            marker = one[0] if len(calls) > 1 and isinstance(one, list) and len(one) == 2 else None
            if marker == _MOVED:  # its slot is in transit: it and the rest go again, following the redirection
                self._the_long_way(calls[i:])
                return
            if p.future.done():
                continue
            if marker == _ERROR:
                p.future.set_exception(ResponseError(f"{p.name}: {one[1]}"))
            else:
                p.future.set_result(one)
        if len(replies) < len(calls):
            _fail(calls[len(replies) :], ResponseError(f"batch of {len(calls)} calls: {len(replies)} replies"))


def _fail(calls: list[_Pending], exc: BaseException) -> None:
    for p in calls:
        if not p.future.done():
            p.future.set_exception(exc)


def _script_call(calls: list[_Pending]) -> tuple[str, list[str], list[Any]]:
    """The one script call that runs ``calls``: the call itself, or lua/batch.lua's."""
    if len(calls) == 1:
        (only,) = calls
        return only.name, only.keys, only.args
    return ("batch", *batch_call(calls))


def batch_call(calls: list[_Pending]) -> tuple[list[str], list[Any]]:
    """lua/batch.lua's KEYS and ARGV for these calls."""
    keys: list[str] = []
    head: list[Any] = [len(calls)]
    tail: list[Any] = []
    for p in calls:
        keys += p.keys
        head += [p.name, len(p.keys), len(p.args)]
        tail += p.args
    return keys, head + tail
