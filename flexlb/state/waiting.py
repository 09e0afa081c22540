"""WaitingBoard: the fleet-wide order of the requests waiting in every router's queue (a Redis sorted set by arrival).

Every router's queue wakes on the same 'released' event, so without a shared order the routers race for the freed
capacity and one router's later arrivals are served before another's earlier ones. A request entering a router's
queue is put on the board with the Redis server's time (one clock for all routers); before trying a waiter, a router
asks for the live waiters of other routers that arrived earlier, and leaves the capacity to them
(flexlb.queueing). Each router marks itself alive on the board while it has waiters; the waiters of a router not
seen for ``LEASE_MS`` (crashed, partitioned) are dropped from the board, so they hold nobody back.

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
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.waiting")

LEASE_MS = 5_000  # a router not seen this long has its waiters dropped from the board
HEARTBEAT_S = 1.0  # how often a router with waiters marks itself alive (well within the lease)
EARLIER_LIMIT = 64  # earlier waiters read per check: the oldest ones, which are the ones that matter

# KEYS: waiting zset (member "router|request|size", score arrival ms), alive zset (router -> last seen ms)
# ARGV: this router, member to add
_ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[2])
return now
"""

# ARGV: this router, lease ms, arrival bound (only waiters that arrived before it), limit
# Returns {member, arrival, ...} of other routers' live waiters, oldest first; drops the waiters of dead routers.
_EARLIER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local out = {}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'WITHSCORES', 'LIMIT', 0, ARGV[4])
for i = 1, #rows, 2 do
  local router = string.match(rows[i], '^([^|]*)|')
  if router ~= ARGV[1] then
    local seen = tonumber(redis.call('ZSCORE', KEYS[2], router))
    if seen and seen >= now - tonumber(ARGV[2]) then
      out[#out + 1] = rows[i]
      out[#out + 1] = rows[i + 1]
    else
      redis.call('ZREM', KEYS[1], rows[i])
    end
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Waiter:
    """A request waiting in some router's queue, as the board has it."""

    member: str
    arrival_ms: int
    size: int  # prompt plus output tokens: a larger waiter elsewhere that cannot fit holds back no smaller one


class WaitingBoard:
    def __init__(self, redis: Redis, keys: ServiceKeys, router_id: str | None = None) -> None:
        self._redis = redis
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self._keys = [f"{keys.prefix}:waiting", f"{keys.prefix}:waiting_routers"]
        self._enter = redis.register_script(_ENTER)
        self._earlier = redis.register_script(_EARLIER)
        self._mine = 0  # waiters of this router on the board: the heartbeat runs while there are any
        self._heartbeat: asyncio.Task[None] | None = None

    async def enter(self, request_id: int, size: int) -> Waiter | None:
        """Put a request on the board; None when Redis did not answer (it then waits unordered)."""
        member = f"{self.router_id}|{request_id}|{size}"
        try:
            arrival = int(await self._enter(self._keys, [self.router_id, member]))
        except REDIS_UNAVAILABLE as exc:
            log.debug("waiting board: request %s not entered (%r)", request_id, exc)
            return None
        self._mine += 1
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="waiting board heartbeat")
        return Waiter(member, arrival, size)

    async def leave(self, waiter: Waiter) -> None:
        self._mine = max(0, self._mine - 1)
        try:
            await self._redis.zrem(self._keys[0], waiter.member)
        except REDIS_UNAVAILABLE as exc:  # left behind: dropped with this router's lease, or by its next leave
            log.debug("waiting board: %s not removed (%r)", waiter.member, exc)

    async def earlier_elsewhere(self, before_ms: int) -> list[Waiter]:
        """Other routers' live waiters that arrived before ``before_ms``, oldest first (at most EARLIER_LIMIT)."""
        try:
            rows = await self._earlier(self._keys, [self.router_id, LEASE_MS, before_ms, EARLIER_LIMIT])
        except REDIS_UNAVAILABLE as exc:
            log.debug("waiting board: not read (%r); ordering by this router alone", exc)
            return []
        waiters = []
        for member, arrival in zip(rows[::2], rows[1::2], strict=True):
            member = member.decode() if isinstance(member, bytes) else member
            waiters.append(Waiter(member, int(float(arrival)), int(member.rsplit("|", 1)[1])))
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
