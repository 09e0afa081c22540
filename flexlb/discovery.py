"""Service discovery: which workers the fleet has. Workers come from MODEL_SERVICE_CONFIG (static) and from
registrations (``POST /rtp_llm/workers``, ``flexlb worker add``); both live in Redis, so every router and every new
master see the same membership."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from flexlb.settings import StaticWorker
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.discovery")


async def register_static_workers(
    store: FleetStore, endpoints: Sequence[StaticWorker], registered_ids: Iterable[str]
) -> int:
    """Register the configured workers Redis does not hold (first start, or Redis lost its data); returns how many.

    A worker is registered as alive: with a master polling, its first failed polls mark it down within
    ``workerDownAfterFailedPolls`` status intervals."""
    registered = set(registered_ids)
    added = 0
    for worker in endpoints:
        if worker.worker_id not in registered:
            await store.register_worker(worker.to_spec())
            log.info("registered %s worker %s from MODEL_SERVICE_CONFIG", worker.role.value, worker.worker_id)
            added += 1
    return added
