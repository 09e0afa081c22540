"""MasterService: the master election plus the duties it runs while elected, as one unit a process starts and stops.

A router process runs one when ``contendForMaster`` is true; ``flexlb master`` runs one alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from redis.asyncio import Redis

from flexlb.master.election import Clock, MasterElection
from flexlb.master.poller import ClientFactory, MasterDuties, PollOptions
from flexlb.master.shards import PollShards
from flexlb.master.worker_client import WorkerStatusClient
from flexlb.metrics import MasterMetrics
from flexlb.settings import Settings
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.master")


def default_holder(role: str) -> str:
    """How this process names itself in the lock: host, pid and what it is (``router`` or ``master``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


class MasterService:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        metrics: MasterMetrics,
        *,
        holder: str,
        client_factory: ClientFactory = WorkerStatusClient.for_worker,
        clock: Clock = time.monotonic,
    ) -> None:
        config = settings.flexlb
        self.store = FleetStore(redis, settings.service.service_id)
        self.election = MasterElection(
            redis,
            self.store.keys,
            holder=holder,
            scripts=self.store.scripts,
            ttl_ms=config.master_lock_ttl_ms,
            renew_interval_ms=config.master_renew_interval_ms,
            clock=clock,
        )
        kv_events = {w.worker_id: w.kv_events for w in settings.service.endpoints if w.kv_events is not None}
        self.duties = MasterDuties(
            self.store, PollOptions.from_settings(settings), metrics, client_factory, clock, kv_events=kv_events
        )
        # pollShards > 1: the polling is split into shards (flexlb.master.shards); shard 0's lease is the master lock
        self.shards: PollShards | None = None
        if config.poll_shards > 1:
            self.shards = PollShards(
                redis, settings, metrics, holder=holder, client_factory=client_factory, clock=clock
            )
            self.election, self.duties = self.shards.shards[0].lease, self.shards.shards[0].duties
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.shards is not None:
            self._task = asyncio.create_task(self.shards.run(), name="polling shards")
            return
        self._task = asyncio.create_task(self.election.run(self._duties, self._on_deposed), name="master election")

    async def _duties(self, epoch: int) -> None:
        """The term's duties; a crash restarts them (a master that holds the lock but polls nothing starves the
        fleet of status). They return on their own only when a newer master exists."""
        while True:
            try:
                await self.duties.run(epoch)
                return
            except Exception:
                log.exception("master duties failed (epoch %d); restarting them", epoch)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Stop polling and hand the lock over at once (another process takes over without waiting for the TTL)."""
        if self._task is None:
            return
        if self.shards is not None:
            await self.shards.stop()
        else:
            await self.election.stop()
        await self._task
        self._task = None

    async def _on_deposed(self) -> None:
        log.info("no longer master (holder %s, epoch %d)", self.election.holder, self.election.epoch)

    def info(self) -> dict[str, Any]:
        if self.shards is not None:
            return {"holder": self.election.holder, "is_master": self.election.is_master,
                    "epoch": self.election.epoch, **self.shards.info()}  # fmt: skip
        return {
            "holder": self.election.holder,
            "is_master": self.election.is_master,
            "epoch": self.election.epoch,
            "workers_polled": len(self.duties.pollers) if self.election.is_master else 0,
        }
