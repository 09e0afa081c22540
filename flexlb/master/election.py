"""Master election: one router process at a time holds the master lock and does the master-only duties.

The lock is a Redis string ``token|epoch|holder`` with a TTL (lua/lock_acquire.lua). Every new holder gets a higher
master epoch (never one used before, even after Redis lost its data), a fencing token: master writes go through
scripts that check it (lua/fenced_set.lua), so a master paused past its TTL and replaced meanwhile cannot write when
it wakes up. The master also keeps a lease by its
own monotonic clock, from the moment it *sent* its last successful renew: when that lease runs out it stops
considering itself master (``is_master`` turns false at once) even if Redis cannot be reached to tell it so.

Presence: a contender keeps one connection to Redis named ``flexlb-master:<id>`` (an id per process) and marks the
lock it holds ``[presence <id>]``. A process that dies (SIGKILL, a crash) loses that connection at once; a standby
that finds the lock's holder marked and its connection gone takes the lock over at once (lua/lock_take_over.lua, a
new epoch) instead of waiting for the TTL. A paused process keeps its connection, so its lock expires by the TTL as
before. Plain Redis and unix sockets only: on a cluster or through Sentinel the TTL alone decides.

Run ``python -m flexlb.master.election --help`` for a probe process used by the integration tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError

from flexlb.state.keys import ServiceKeys
from flexlb.state.scripts import Scripts
from flexlb.state.store import StaleEpoch
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.master.election")

Clock = Callable[[], float]  # monotonic seconds
OnElected = Callable[[int], Awaitable[None]]
OnDeposed = Callable[[], Awaitable[None]]

# What a failed round trip to Redis can raise: the caller keeps its lease until its local clock says otherwise.
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)
PRESENCE_NAME = "flexlb-master:"  # + the process's presence id: the presence connection's client name
_PRESENCE_MARK = re.compile(r" \[presence ([0-9a-f]+)\]$")  # at the end of the lock's holder
DUTIES_CANCEL_RETRY_S = 2.0


def holder_name(holder: str) -> str:
    """The lock's holder description without its presence mark."""
    return _PRESENCE_MARK.sub("", holder)


def parse_lock_value(value: str) -> tuple[str, int, str]:
    """``token|epoch|holder`` -> (token, epoch, holder); the holder may contain ``|``."""
    token, epoch, holder = value.split("|", 2)
    return token, int(epoch), holder


async def current_master(redis: Redis, keys: ServiceKeys) -> tuple[str | None, int]:
    """(holder, epoch) of the current master, or (None, last epoch) when no one holds the lock (for /master/info)."""
    value, epoch = await redis.mget([keys.master_lock, keys.master_epoch])
    if value is None:
        return None, int(epoch or 0)
    _, lock_epoch, holder = parse_lock_value(_text(value))
    return holder_name(holder), lock_epoch


async def fenced_set(scripts: Scripts, keys: ServiceKeys, epoch: int, target: str, fields: Mapping[str, Any]) -> None:
    """HSET ``fields`` into ``target`` only if ``epoch`` is still the master epoch; else raise :class:`StaleEpoch`."""
    args: list[Any] = [epoch]
    for name, value in fields.items():
        args += [name, value]
    reply = await scripts.call("fenced_set", [keys.master_epoch, target], args)
    if reply != 1:
        raise StaleEpoch(_text(reply[1]))


def _plain_connection(pool: ConnectionPool) -> bool:
    """TCP or a unix socket to one server: a connection of its own can stand for this process (not a cluster's or
    Sentinel's routing pool)."""
    return pool.connection_class.__name__ in ("Connection", "HiredisPackingConnection", "UnixDomainSocketConnection")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MasterElection:
    """Contends for the master lock of one service; runs ``on_elected`` as the master duties while it holds it."""

    def __init__(
        self,
        redis: Redis,
        keys: ServiceKeys,
        *,
        holder: str,
        scripts: Scripts | None = None,
        ttl_ms: int = 3000,
        renew_interval_ms: int = 1000,
        clock: Clock = time.monotonic,
        lock_key: str | None = None,
        epoch_key: str | None = None,
    ) -> None:
        """``lock_key`` / ``epoch_key``: another lease than the master lock (a polling shard's,
        flexlb.master.shards), with the same scripts and the same guarantees."""
        if not 0 < renew_interval_ms < ttl_ms / 2:
            # at least two renew attempts per TTL, so one lost round trip does not cost the lock
            raise ValueError(f"renew_interval_ms ({renew_interval_ms}) must be > 0 and < ttl_ms / 2 ({ttl_ms / 2})")
        self._redis = redis
        self._keys = keys
        self._lock_key = lock_key or keys.master_lock
        self._epoch_key = epoch_key or keys.master_epoch
        self._scripts = scripts or Scripts(redis)
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.renew_interval_ms = renew_interval_ms
        self._clock = clock
        self._token = uuid.uuid4().hex
        self._master = False
        self._epoch = 0
        self._lease_end = 0.0  # local monotonic time at which our lock expires at the latest
        self._duties: asyncio.Future[None] | None = None
        self._observed: tuple[str | None, int] | None = None  # last other master seen, to log changes once
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()  # set while run() is not running
        self._idle.set()
        self._presence: Redis | None = None  # the connection named after our presence id (module docstring)
        self._presence_id = uuid.uuid4().hex[:16]

    @property
    def is_master(self) -> bool:
        """True while this process holds the lock by its own clock: false at once after a pause longer than the TTL."""
        return self._master and self._clock() < self._lease_end

    @property
    def holding(self) -> bool:
        """True from election until stepping down (:attr:`is_master` also checks the lease by the local clock)."""
        return self._master

    @property
    def epoch(self) -> int:
        """Epoch of the current term, or of the last one after stepping down (0 before the first)."""
        return self._epoch

    async def run(self, on_elected: OnElected, on_deposed: OnDeposed) -> None:
        """Contend until :meth:`stop` (or cancellation); on the way out step down and release the lock."""
        self._idle.clear()
        try:
            while not self._stopping.is_set():
                delay = await self.step(on_elected, on_deposed)
                with contextlib.suppress(TimeoutError):  # the usual case: no stop() during the wait
                    await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            await self._leave(on_deposed)
            await self.close_presence()
            self._idle.set()

    async def close_presence(self) -> None:
        """Close the presence connection (:meth:`run` does on its way out; a caller driving :meth:`step` itself
        does once it is done), so no connection outlives its event loop."""
        if self._presence is not None:
            with contextlib.suppress(*_REDIS_FAILURES):
                # its own pool: a client given a pool only hands its connection back to it on a plain aclose()
                await self._presence.aclose(close_connection_pool=True)
            self._presence = None

    async def stop(self) -> None:
        """Graceful handover: stop the master duties and release the lock so another process takes over now."""
        self._stopping.set()
        if self._idle.is_set():
            await self._release()
        else:
            await self._idle.wait()  # run() steps down and releases on its way out

    async def step(self, on_elected: OnElected, on_deposed: OnDeposed) -> float:
        """One round of what :meth:`run` repeats; returns the seconds to wait before the next round."""
        if self._master:
            await self._renew(on_deposed)
        if not self._master:
            await self._ensure_presence()  # named before the lock is ours: a standby never sees us without it
            await self._try_acquire(on_elected)
        interval = self.renew_interval_ms / 1000
        if self._master:
            # wake up no later than the lease's end, to step down then even if Redis never answers
            return max(0.0, min(interval, self._lease_end - self._clock()))
        return interval

    async def _renew(self, on_deposed: OnDeposed) -> None:
        if not self.is_master:
            await self._step_down(on_deposed, "lease ran out by the local clock (paused, or Redis unreachable)")
            return
        sent = self._clock()
        try:
            # a hung Redis must not keep us waiting past the lease
            async with asyncio.timeout(self._lease_end - sent):
                renewed = await self._scripts.call(
                    "lock_renew", [self._lock_key], [self._token, self._epoch, self.ttl_ms]
                )
        except _REDIS_FAILURES as exc:
            log.warning("renew failed (holder=%s epoch=%d): %r; lease left %.3fs", self.holder, self._epoch, exc,
                        self._lease_end - self._clock())  # fmt: skip
            if not self.is_master:
                await self._step_down(on_deposed, "lease ran out while Redis was failing")
            return
        if renewed == 1:
            self._lease_end = sent + self.ttl_ms / 1000
        else:
            await self._step_down(on_deposed, "renew refused: the lock expired or has another holder")

    async def _try_acquire(self, on_elected: OnElected) -> None:
        sent = self._clock()
        try:
            reply = await self._scripts.call(
                "lock_acquire",
                [self._lock_key, self._epoch_key],
                [self._token, self.ttl_ms, self._lock_holder],
            )
        except _REDIS_FAILURES as exc:
            log.warning("acquire failed (holder=%s): %r", self.holder, exc)
            return
        if reply[0] != 1:
            self._note_other_master(holder_name(_text(reply[2])), int(reply[1]))
            reply = await self._take_over_if_gone()
            if reply is None or reply[0] != 1:
                return
        self._master, self._epoch = True, int(reply[1])
        self._lease_end = sent + self.ttl_ms / 1000
        self._observed = None
        log.info("elected master: holder=%s epoch=%d", self.holder, self._epoch)
        if self._stopping.is_set():
            return  # stop() came during the acquire: run() releases the lock next, no duties to start
        self._duties = asyncio.ensure_future(on_elected(self._epoch))
        self._duties.add_done_callback(self._log_duties_end)

    @property
    def _lock_holder(self) -> str:
        return self.holder + (f" [presence {self._presence_id}]" if self._presence is not None else "")

    async def _ensure_presence(self) -> None:
        """Keep the connection named after this process's presence id open (a PING per round: redis-py names it
        again when it reconnects), when the client allows one."""
        pool = getattr(self._redis, "connection_pool", None)
        if type(self._redis) is not Redis or pool is None or not _plain_connection(pool):
            return
        try:
            if self._presence is None:
                kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "client_name"}
                named = ConnectionPool(
                    connection_class=pool.connection_class, client_name=PRESENCE_NAME + self._presence_id, **kwargs
                )
                self._presence = Redis(connection_pool=named, single_connection_client=True)
            await self._presence.ping()
        except _REDIS_FAILURES as exc:
            log.warning("presence connection failed (holder=%s): %r; a takeover waits for the TTL", self.holder, exc)

    async def _take_over_if_gone(self) -> list[Any] | None:
        """The lock's reply when its holder, marked with a presence connection, has none any more (it died): the
        lock is taken over now, with a new epoch; None when the holder is there (or cannot be told)."""
        if self._presence is None:
            return None
        try:
            value = await self._redis.get(self._lock_key)
            if value is None:
                return None
            _, _, holder = parse_lock_value(_text(value))
            mark = _PRESENCE_MARK.search(holder)
            if mark is None:
                return None  # a holder without presence (an older version): its TTL decides
            names = {_text(c.get("name") or "") for c in await self._redis.client_list()}
            if PRESENCE_NAME + mark[1] in names:
                return None
            reply = await self._scripts.call(
                "lock_take_over",
                [self._lock_key, self._epoch_key],
                [_text(value), self._token, self.ttl_ms, self._lock_holder],
            )
        except _REDIS_FAILURES as exc:
            log.warning("takeover check failed (holder=%s): %r", self.holder, exc)
            return None
        if reply[0] == 1:
            log.warning(
                "took the master lock over from %s: its connection to Redis closed (the process is gone)", holder
            )
        return reply

    def _note_other_master(self, holder: str, epoch: int) -> None:
        if self._observed != (holder, epoch):
            self._observed = (holder, epoch)
            log.info("master is %s (epoch %d); %s waits", holder, epoch, self.holder)

    async def _step_down(self, on_deposed: OnDeposed, reason: str) -> None:
        """Stop the duties first (no master write after this), then tell the caller."""
        self._master = False
        # a fresh token per term: a later acquire always makes a new epoch, never resumes this one
        self._token = uuid.uuid4().hex
        if self._duties is not None:
            # sent again every 2 s: a cancellation lost in a Redis read (redis-py) left a shutting-down process
            # waiting here for ever; 2 s leaves the duties' own clean-up (awaits in finally blocks) time to run
            await cancel_until_done(self._duties, retry_s=DUTIES_CANCEL_RETRY_S)
            self._duties = None
        log.warning("deposed: holder=%s epoch=%d: %s", self.holder, self._epoch, reason)
        await on_deposed()

    async def resign(self, on_deposed: OnDeposed) -> None:
        """Stop the duties and release the lock now, for another process to take (a shard handed over when the
        pollers rebalance); the next :meth:`step` may contend again."""
        await self._leave(on_deposed)

    async def _leave(self, on_deposed: OnDeposed) -> None:
        if not self._master:
            return
        token = self._token
        await self._step_down(on_deposed, "stopping")
        await self._release(token)

    async def _release(self, token: str | None = None) -> None:
        try:
            async with asyncio.timeout(self.ttl_ms / 1000):
                released = await self._scripts.call("lock_release", [self._lock_key], [token or self._token])
        except _REDIS_FAILURES as exc:
            log.warning("release failed (holder=%s): %r; the lock expires by its TTL", self.holder, exc)
            return
        if released == 1:
            log.info("released the master lock: holder=%s epoch=%d", self.holder, self._epoch)

    def _log_duties_end(self, duties: asyncio.Future[None]) -> None:
        if not duties.cancelled() and duties.exception() is not None:
            log.error("master duties failed (holder=%s epoch=%d)", self.holder, self._epoch,
                      exc_info=duties.exception())  # fmt: skip


# --- probe process: the election plus one fenced write loop, for tests and manual checks -------------------------


def _emit(line: str) -> None:
    print(line, flush=True)


async def _probe(args: argparse.Namespace) -> int:
    redis = Redis.from_url(args.redis_url, decode_responses=True, socket_timeout=args.ttl_ms / 1000)
    keys = ServiceKeys(args.service)
    scripts = Scripts(redis)
    election = MasterElection(
        redis, keys, holder=args.holder, scripts=scripts, ttl_ms=args.ttl_ms, renew_interval_ms=args.renew_ms
    )
    probe_key = f"{keys.prefix}:election_probe"  # test-only key, deliberately not in keys.py

    async def on_elected(epoch: int) -> None:
        _emit(f"ELECTED epoch={epoch}")
        n = 0
        while True:
            await asyncio.sleep(args.write_every_ms / 1000)
            if not args.unsafe_skip_lease_check and not election.is_master:
                continue  # our lease ran out: the election loop is about to depose us
            n += 1
            try:
                await fenced_set(scripts, keys, epoch, probe_key, {"holder": args.holder, "n": n})
            except StaleEpoch:
                _emit(f"WRITE_REJECTED epoch={epoch}")
            except _REDIS_FAILURES as exc:
                log.warning("probe write failed: %r", exc)

    async def on_deposed() -> None:
        _emit(f"DEPOSED epoch={election.epoch}")

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(election.stop()))
    try:
        await election.run(on_elected, on_deposed)
    finally:
        await redis.aclose()
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flexlb.master.election", description=main.__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--ttl-ms", type=int, default=3000)
    p.add_argument("--renew-ms", type=int, default=1000)
    p.add_argument("--holder", required=True)
    p.add_argument("--write-every-ms", type=int, default=100)
    p.add_argument(
        "--unsafe-skip-lease-check",
        action="store_true",
        help="test only: write even after the local lease ran out, so that only Redis-side fencing stops the write",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the election; while master, fenced-write {holder, n} to flexlb:{S}:election_probe every W ms."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(_probe(args))


if __name__ == "__main__":
    raise SystemExit(main())
