"""Polling split over processes: with ``pollShards`` N > 1 the workers fall into N shards (crc32 of the worker id mod
N), each polled by whichever process holds the shard's lease.

Shard 0's lease is the master lock itself, so ``/master/info``, the routers' "is there a master" and the reservation
sweep work as with one master. Shard i > 0 has the lease ``shard:<i>`` and its own fencing epoch ``shard_epoch:<i>``,
taken, renewed, released and taken over with the master lock's scripts (a :class:`MasterElection` on those keys),
so the same guarantees hold per shard: every write of a holder is fenced by its shard's epoch (a deposed holder's
write is refused), and a SIGKILLed holder's lease is taken over at once through its presence connection by a
process that wants the shard.

Balance: once per renew interval each process says it is alive in the ``pollers`` zset (lua/shard_pollers.lua) and
aims at its share, ceil(N / live pollers): above it, it hands its highest shards back (released, so a newcomer
takes them on its next round); below it, it takes free shards, starting at an offset of its own so processes do not
all reach for the same one. A process that died stops counting after one lock TTL; its shards are free at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flexlb.master.election import Clock, MasterElection
from flexlb.master.poller import ClientFactory, MasterDuties, PollOptions
from flexlb.metrics import MasterMetrics
from flexlb.settings import Settings
from flexlb.state.keys import ServiceKeys
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.master.shards")

_REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def shard_of(worker_id: str, shards: int) -> int:
    """The polling shard of a worker: stable across processes and restarts."""
    return zlib.crc32(worker_id.encode()) % shards


def in_shard(shard: int, shards: int, worker_id: str) -> bool:
    return shard_of(worker_id, shards) == shard


def fair_share(shards: int, live_pollers: int) -> int:
    """How many shards one of ``live_pollers`` processes aims to hold."""
    return math.ceil(shards / max(1, live_pollers))


@dataclass(slots=True)
class Shard:
    index: int
    lease: MasterElection
    duties: MasterDuties


class PollShards:
    """This process's part of the sharded polling: contends for about its share of the N shards' leases and runs the
    duties of each shard it holds."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        metrics: MasterMetrics,
        *,
        holder: str,
        client_factory: ClientFactory,
        clock: Clock = time.monotonic,
    ) -> None:
        config = settings.flexlb
        service = settings.service.service_id
        self.count = config.poll_shards
        self.keys = ServiceKeys(service)
        self.poller_id = uuid.uuid4().hex[:16]
        self.ttl_ms = config.master_lock_ttl_ms
        self.renew_s = config.master_renew_interval_ms / 1000
        options = PollOptions.from_settings(settings)
        kv_events = {w.worker_id: w.kv_events for w in settings.service.endpoints if w.kv_events is not None}
        self.shards: list[Shard] = []
        for i in range(self.count):
            lock = self.keys.master_lock if i == 0 else self.keys.shard_lock(i)
            fence = self.keys.master_epoch if i == 0 else self.keys.shard_epoch(i)
            store = FleetStore(redis, service, fence_key=fence)
            lease = MasterElection(
                redis, self.keys, holder=f"{holder} shard {i}/{self.count}", scripts=store.scripts,
                ttl_ms=config.master_lock_ttl_ms, renew_interval_ms=config.master_renew_interval_ms, clock=clock,
                lock_key=lock, epoch_key=fence,
            )  # fmt: skip
            duties = MasterDuties(
                store, options, metrics, client_factory, clock, kv_events=kv_events,
                polls=partial(in_shard, i, self.count),
            )  # fmt: skip
            self.shards.append(Shard(i, lease, duties))
        self._scripts = self.shards[0].duties.store.scripts
        self._stopping = asyncio.Event()
        self._live: int | None = None

    @property
    def held(self) -> list[int]:
        return [s.index for s in self.shards if s.lease.is_master]

    async def run(self) -> None:
        """Hold about this process's share of the shards until :meth:`stop`; on the way out hand them all back."""
        try:
            while not self._stopping.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.renew_s)
        finally:
            for shard in self.shards:
                if shard.lease.holding:
                    await shard.lease.resign(self._deposed(shard))
                await shard.lease.close_presence()
            with contextlib.suppress(*_REDIS_FAILURES):
                await self._scripts.call("shard_pollers", [self.keys.pollers], [self.poller_id, 0])

    async def stop(self) -> None:
        self._stopping.set()

    async def step(self) -> None:
        """One round: say we are alive, renew what we hold, hand back what is above our share, take free shards up
        to it."""
        try:
            live = int(await self._scripts.call("shard_pollers", [self.keys.pollers], [self.poller_id, self.ttl_ms]))
        except _REDIS_FAILURES as exc:
            log.warning("poller %s: cannot reach Redis to share the shards: %r", self.poller_id, exc)
            live = None
        if live != self._live and live is not None:
            log.info("%d poller processes share %d shards: this one aims at %d", live, self.count,
                     fair_share(self.count, live))  # fmt: skip
            self._live = live
        held = [s for s in self.shards if s.lease.holding]
        for shard in held:
            await shard.lease.step(self._elected(shard), self._deposed(shard))  # renews, or steps down
        held = [s for s in held if s.lease.holding]
        if live is None:
            return
        share = fair_share(self.count, live)
        for shard in held[share:]:  # the highest first: shard 0 (the master lock) stays where it is
            log.info("handing shard %d/%d back: %d pollers share them now", shard.index, self.count, live)
            await shard.lease.resign(self._deposed(shard))
        held = held[:share]
        start = zlib.crc32(self.poller_id.encode()) % self.count
        for k in range(self.count):
            if len(held) >= share:
                break
            shard = self.shards[(start + k) % self.count]
            if shard in held:
                continue
            await shard.lease.step(self._elected(shard), self._deposed(shard))  # takes it if free or its holder died
            if shard.lease.holding:
                held.append(shard)

    def _elected(self, shard: Shard) -> Callable[[int], Awaitable[None]]:
        async def duties(epoch: int) -> None:
            log.info("polling shard %d/%d (epoch %d)", shard.index, self.count, epoch)
            while True:  # a crash restarts them; they return on their own only when a newer holder writes
                try:
                    await shard.duties.run(epoch)
                    return
                except Exception:
                    log.exception("duties of shard %d/%d failed (epoch %d); restarting them", shard.index,
                                  self.count, epoch)  # fmt: skip
                    await asyncio.sleep(1.0)

        return duties

    def _deposed(self, shard: Shard) -> Callable[[], Awaitable[None]]:
        async def deposed() -> None:
            log.info("no longer polling shard %d/%d", shard.index, self.count)

        return deposed

    def info(self) -> dict[str, Any]:
        return {
            "poll_shards": self.count,
            "shards_held": self.held,
            "workers_polled": sum(len(s.duties.pollers) for s in self.shards if s.lease.is_master),
        }
