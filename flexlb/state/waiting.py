"""WaitingBoard: the fleet-wide order of the requests waiting in every router's queue (a Redis sorted set by priority,
then arrival).

Every router's queue wakes on the same 'released' event, so without a shared order the routers race for the freed
capacity and one router's later arrivals are served before another's earlier ones. A request entering a router's
queue is put on the board with its rank: its priority band (``PRIORITY_MAX`` minus its level; 0 for the most urgent)
times ``RANK_SCALE``, plus its arrival by the Redis server's clock (one clock for all routers) in milliseconds. So the
score orders the board as each router orders its queue, priority first, then arrival; read in decimal, its leading
digits are the band and its last 13 the arrival. Before trying a waiter, a router asks for the live waiters of other
routers that rank before it, and leaves the capacity to them (flexlb.queueing). Each router marks itself alive on
the board while it has waiters; the waiters of a router not seen for ``LEASE_MS`` (crashed, partitioned) are dropped
from the board, so they hold nobody back.

A waiter aged in its router's queue (overtaken ``max_overtakes`` times, flexlb.queueing) is promoted: its score
becomes its arrival alone (band 0), so every router lets it go before their later waiters, whatever their priority.

Members written by a version before priorities have their arrival alone as score (band 0): during a rolling upgrade
they rank as the most urgent, and such a router, reading by arrival, sees the newer routers' waiters of band 0 only.

The board only orders; it never refuses: any Redis error reads as "nobody waits elsewhere" (the queue carries on as
if alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.keys import ServiceKeys
from flexlb.state.scripts import script_source
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.waiting")

LEASE_MS = 5_000  # a router not seen this long has its waiters dropped from the board
HEARTBEAT_S = 1.0  # how often a router with waiters marks itself alive (well within the lease)
EARLIER_LIMIT = 64  # waiters read per check that rank before: the first ones, which are the ones that matter

# Priority levels, as the original FlexLB's (its PriorityNormalizer): 1 to 100, higher = more urgent; 50 by default.
PRIORITY_MIN = 1
PRIORITY_MAX = 100
PRIORITY_DEFAULT = 50
RANK_SCALE = 10**13  # one priority band in a waiter's score: milliseconds of arrival up to the year 2286
# a score stays an exact integer in a double (Redis scores, Lua numbers): below 2 ** 53
assert (PRIORITY_MAX - PRIORITY_MIN + 1) * RANK_SCALE < 2**53

# The board's scripts: lua/waiting_enter.lua, lua/waiting_earlier.lua (their KEYS/ARGV contracts head them).


def rank(priority: int, arrival_ms: int) -> int:
    """A waiter's score on the board: smaller goes first (higher ``priority``, then earlier ``arrival_ms``)."""
    return (PRIORITY_MAX - priority) * RANK_SCALE + arrival_ms


@dataclass(frozen=True, slots=True)
class Waiter:
    """A request waiting in some router's queue, as the board has it."""

    member: str
    arrival_ms: int
    size: int  # prompt plus output tokens: a larger waiter elsewhere that cannot fit holds back no smaller one
    priority: int = PRIORITY_DEFAULT  # its queue priority (1-100, higher first)

    @property
    def rank(self) -> int:
        return rank(self.priority, self.arrival_ms)

    @classmethod
    def from_score(cls, member: str, score: int) -> Waiter:
        band, arrival = divmod(score, RANK_SCALE)
        return cls(member, arrival, int(member.rsplit("|", 1)[1]), PRIORITY_MAX - band)


class WaitingBoard:
    def __init__(self, redis: Redis, keys: ServiceKeys, router_id: str | None = None) -> None:
        self._redis = redis
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self._keys = [keys.waiting, keys.waiting_routers]
        self._enter = redis.register_script(script_source("waiting_enter"))
        self._earlier = redis.register_script(script_source("waiting_earlier"))
        self._mine = 0  # waiters of this router on the board: the heartbeat runs while there are any
        self._heartbeat: asyncio.Task[None] | None = None

    async def enter(self, request_id: int, size: int, priority: int = PRIORITY_DEFAULT) -> Waiter | None:
        """Put a request of queue ``priority`` (PRIORITY_MIN to PRIORITY_MAX) on the board; None when Redis did not
        answer (it then waits unordered)."""
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ValueError(f"priority {priority} outside {PRIORITY_MIN}-{PRIORITY_MAX}")
        member = f"{self.router_id}|{request_id}|{size}"
        try:
            arrival = int(await self._enter(self._keys, [self.router_id, member, rank(priority, 0)]))
        except REDIS_UNAVAILABLE as exc:
            log.debug("waiting board: request %s not entered (%r)", request_id, exc)
            return None
        self._mine += 1
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="waiting board heartbeat")
        return Waiter(member, arrival, size, priority)

    async def leave(self, waiter: Waiter) -> None:
        self._mine = max(0, self._mine - 1)
        try:
            await self._redis.zrem(self._keys[0], waiter.member)
        except REDIS_UNAVAILABLE as exc:  # left behind: dropped with this router's lease, or by its next leave
            log.debug("waiting board: %s not removed (%r)", waiter.member, exc)

    async def promote(self, waiter: Waiter) -> None:
        """Rank ``waiter`` (aged in its queue: it is overtaken no more) by its arrival alone, as the most urgent
        level's; nothing when it has left the board meanwhile."""
        try:
            await self._redis.zadd(self._keys[0], {waiter.member: rank(PRIORITY_MAX, waiter.arrival_ms)}, xx=True)
        except REDIS_UNAVAILABLE as exc:  # it keeps its rank: the other routers go on ordering it by its priority
            log.debug("waiting board: %s not promoted (%r)", waiter.member, exc)

    async def earlier_elsewhere(self, before_rank: int) -> list[Waiter] | None:
        """Other routers' live waiters that rank before ``before_rank`` (a Waiter.rank), in board order (at most
        EARLIER_LIMIT); None when Redis did not answer (nobody counts as waiting elsewhere then)."""
        try:
            rows = await self._earlier(self._keys, [self.router_id, LEASE_MS, before_rank, EARLIER_LIMIT])
        except REDIS_UNAVAILABLE as exc:
            log.debug("waiting board: not read (%r); ordering by this router alone", exc)
            return None
        waiters = []
        for member, score in zip(rows[::2], rows[1::2], strict=True):
            member = member.decode() if isinstance(member, bytes) else member
            waiters.append(Waiter.from_score(member, int(float(score))))  # exact: scores are below 2 ** 53
        return waiters

    async def _beat(self) -> None:
        """Mark this router alive while it has waiters on the board (its dispatcher may sleep longer than the
        lease between two checks)."""
        while self._mine > 0:
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await self._redis.zadd(self._keys[1], {self.router_id: await _redis_ms(self._redis)})
            await asyncio.sleep(HEARTBEAT_S)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            await cancel_until_done(self._heartbeat)
            self._heartbeat = None


async def _redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
