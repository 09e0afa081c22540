"""One timer that sends the status polls of many workers, so an idle fleet costs one small callback per poll.

A :class:`~flexlb.master.poller.WorkerPoller` of an RTP-LLM worker waits in :meth:`StatusTicker.next_news` instead
of sleeping and calling the worker itself. The ticker sends the call when it is due (a heap of due times, looked at
every ``tick_s`` or so), ends it at its deadline and reads the reply in its done callback: a quiet reply (nothing
changed, no heartbeat or cache poll due: ``WorkerPoller.take_quiet``) is taken right there and the next poll
scheduled; only a reply that needs work (a change, a failure, a due write) wakes the poller's task. Per quiet poll
that saves a task wake-up, two timers and a chain of coroutines: most of a poll's CPU in one Python process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from flexlb.master.grpc_lite import ClientProtocol
from flexlb.master.worker_client import WorkerUnreachable
from flexlb.proto.flexlb_worker_pb2 import WorkerStatusPB

if TYPE_CHECKING:
    from flexlb.master.poller import WorkerPoller

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class News:
    """What wakes a poller: a reply to handle, or a failed poll (``error``). ``status`` None and ``error`` None:
    no light connection is open, the poller calls the worker itself this once (which connects)."""

    status: WorkerStatusPB | None = None
    error: WorkerUnreachable | None = None


NO_CONNECTION = News()


class StatusTicker:
    """Sends due status polls of the pollers waiting in :meth:`next_news`; runs until :meth:`run` is cancelled."""

    def __init__(self, tick_s: float = 0.002, max_sleep_s: float = 0.01, clock: Clock = time.monotonic) -> None:
        self.tick_s = tick_s  # the shortest sleep: due polls are sent in batches at most this late
        self.max_sleep_s = max_sleep_s
        self.clock = clock
        self._heap: list[tuple[float, int, WorkerPoller, asyncio.Future[News]]] = []
        self._seq = itertools.count()
        self._inflight: deque[tuple[float, ClientProtocol, int]] = deque()  # (deadline, connection, stream id)

    def next_news(self, poller: WorkerPoller, due_at: float) -> asyncio.Future[News]:
        """Poll ``poller``'s worker from ``due_at`` on until a reply needs the poller: the future of that news."""
        news: asyncio.Future[News] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (due_at, next(self._seq), poller, news))
        return news

    async def run(self) -> None:
        heap, inflight, clock, sleep = self._heap, self._inflight, self.clock, asyncio.sleep
        while True:
            now = clock()
            while heap and heap[0][0] <= now:
                _, _, poller, news = heapq.heappop(heap)
                if not news.done():  # done: its poller was stopped
                    self._send(poller, news, now)
            while inflight and inflight[0][0] <= now:  # one deadline for all: the oldest calls end first
                _, protocol, sid = inflight.popleft()
                protocol.expire(sid)  # a no-op when it was answered
            # a new poller's first poll (due now) waits at most max_sleep_s; the fleet's polls at most tick_s
            wait = heap[0][0] - now if heap else self.max_sleep_s
            await sleep(min(max(wait, self.tick_s), self.max_sleep_s))

    def _send(self, poller: WorkerPoller, news: asyncio.Future[News], now: float) -> None:
        sent = poller.client.start_status(poller.track.finished_version)
        if sent is None:
            news.set_result(NO_CONNECTION)
            return
        protocol, sid, call = sent
        self._inflight.append((now + poller.options.deadline_s, protocol, sid))
        call.add_done_callback(partial(self._on_reply, poller, news))

    def _on_reply(self, poller: WorkerPoller, news: asyncio.Future[News], call: asyncio.Future[bytes]) -> None:
        if news.done():  # the poller was stopped meanwhile: nothing to tell
            if not call.cancelled():
                call.exception()  # retrieved
            return
        try:
            status = poller.client.status_reply(call)
        except WorkerUnreachable as exc:
            news.set_result(News(error=exc))
            return
        if status is None:
            news.set_result(NO_CONNECTION)
            return
        now = self.clock()
        if poller.take_quiet(status, now):
            heapq.heappush(self._heap, (now + poller.interval_s, next(self._seq), poller, news))
        else:
            news.set_result(News(status=status))
