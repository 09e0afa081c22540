"""FleetStore: the fleet's shared state in Redis (workers, reservations, cache index). The only Redis user.

Round trips: a snapshot is one script call (two when membership changed since the last one), a reservation of
every role one script call, a release one call (two when the caller does not know the request's workers).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from flexlb.domain import Role, WorkerSpec, WorkerStatus, WorkerView
from flexlb.state.codec import SCRIPT_OWNED, WorkerDecoder, parse_status_value, spec_fields, status_fields
from flexlb.state.keys import ROLE_SET_ORDER, ServiceKeys
from flexlb.state.scripts import Scripts


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Workers of the roles asked for, with pending load and the request's cache hit, at Redis time ``now_ms``."""

    views: dict[Role, list[WorkerView]]
    now_ms: int


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    ok: bool
    refused_index: int = -1  # index into the picks of the worker that refused
    reason: str = ""  # gone | not_alive | concurrency_full | kv_full
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """What a master status write did: reservations dropped (the worker reported their requests) and the new
    ``status_version`` of the worker."""

    dropped: int
    status_version: int


class WorkerNotFound(LookupError):
    pass


class StaleEpoch(Exception):
    """A master write was refused: a newer master has been elected since the writer's term began."""


class FleetStore:
    def __init__(self, redis: Redis, service: str) -> None:
        self.redis = redis
        self.keys = ServiceKeys(service)
        self.scripts = Scripts(redis)
        self._members: dict[Role, list[str]] = {r: [] for r in ROLE_SET_ORDER}
        self._members_version = "-1"  # never a real version: the first snapshot fetches membership
        self._snapshot_keys: dict[tuple[Role, ...], list[str]] = {}  # per roles asked, for _members_version
        self._decoder = WorkerDecoder()

    async def snapshot(self, roles: Sequence[Role], block_keys: Sequence[int] = ()) -> FleetSnapshot:
        """One consistent read of the roles' workers and each one's cached prefix of ``block_keys``."""
        roles = tuple(roles)
        for _ in range(3):  # membership rarely changes twice between two calls; three tries is plenty
            args = [self._members_version, len(ROLE_SET_ORDER), *block_keys]
            reply = await self.scripts.call("snapshot", self._keys_of_snapshot(roles), args)
            if reply[0] == 1:
                return self._decode_snapshot(roles, reply)
            self._members_version = reply[1]
            self._members = {r: sorted(m) for r, m in zip(ROLE_SET_ORDER, reply[2:], strict=True)}
            self._snapshot_keys.clear()
        raise RuntimeError("worker membership kept changing during the snapshot read")

    def _keys_of_snapshot(self, roles: tuple[Role, ...]) -> list[str]:
        keys = self._snapshot_keys.get(roles)
        if keys is None:
            keys = [self.keys.members_version, *self.keys.role_sets()]
            for role in roles:
                for wid in self._members[role]:
                    keys += [*self.keys.reservation_triple(wid), self.keys.cache_blocks(wid)]
            self._snapshot_keys[roles] = keys
        return keys

    def _decode_snapshot(self, roles: Sequence[Role], reply: list) -> FleetSnapshot:
        entries = iter(reply[2:])
        view = self._decoder.try_view
        views: dict[Role, list[WorkerView]] = {}
        for role in roles:
            decoded = (view(wid, values, hit) for wid, (values, hit) in zip(self._members[role], entries, strict=False))
            views[role] = [v for v in decoded if v is not None]
        return FleetSnapshot(views=views, now_ms=reply[1])

    async def reserve(self, request_id: int, picks: Sequence[tuple[str, int]], ttl_ms: int) -> ReserveOutcome:
        """Reserve ``tokens`` on each ``(worker_id, tokens)`` for ``request_id``: all of them or none."""
        keys = [self.keys.request(request_id)]
        args: list[str | int] = [request_id, ttl_ms]
        for wid, tokens in picks:
            keys += self.keys.reservation_triple(wid)
            args += [wid, tokens]
        reply = await self.scripts.call("reserve", keys, args)
        if reply[0] == 1:
            return ReserveOutcome(ok=True)
        return ReserveOutcome(ok=False, refused_index=int(reply[1]) - 1, reason=reply[2], detail=reply[3])

    async def request_workers(self, request_id: int) -> list[str]:
        """Workers that hold (or held until expiry) a reservation of the request."""
        return sorted(await self.redis.hkeys(self.keys.request(request_id)))

    async def _release(self, request_id: int, worker_ids: Sequence[str]) -> tuple[int, int]:
        keys = [self.keys.request(request_id)]
        for wid in worker_ids:
            keys += self.keys.reservation_triple(wid)
        released, remaining = await self.scripts.call("release", keys, [request_id, self.keys.events, *worker_ids])
        return int(released), int(remaining)

    async def release(self, request_id: int, worker_ids: Sequence[str] | None = None) -> int:
        """Remove the request's reservations on ``worker_ids`` (a rollback of some roles) or, when None, all of them;
        exactly once each. Returns how many were removed."""
        if worker_ids is None:
            worker_ids = await self.request_workers(request_id)
        if not worker_ids:
            return 0
        return (await self._release(request_id, worker_ids))[0]

    async def release_request(self, request_id: int, likely_workers: Sequence[str]) -> int:
        """Remove every reservation of the request, trying ``likely_workers`` first: one round trip when they are
        all of them (the router that reserved knows), two when another router reserved some too."""
        released, remaining = await self._release(request_id, likely_workers) if likely_workers else (0, 1)
        if remaining:
            released += await self.release(request_id)
        return released

    async def sweep(self, worker_ids: Sequence[str]) -> int:
        """Expire overdue reservations of these workers; returns how many were expired."""
        if not worker_ids:
            return 0
        keys = [k for wid in worker_ids for k in self.keys.reservation_triple(wid)]
        return int(await self.scripts.call("sweep", keys, []))

    # ---- membership and status (admin API / CLI now, the master's poller later) ----

    async def _upsert(self, worker_id: str, role: str, create: bool, fields: Mapping[str, str]) -> bool:
        keys = [self.keys.members_version, *self.keys.role_sets(), self.keys.worker(worker_id)]
        args = [worker_id, role, "1" if create else "0"]
        for name, value in fields.items():
            args += [name, value]
        reply = await self.scripts.call("upsert_worker", keys, args)
        if reply[0] != 1:
            raise WorkerNotFound(reply[1])
        return bool(reply[1])

    async def register_worker(
        self, spec: WorkerSpec, status: WorkerStatus | Mapping[str, object] | None = None
    ) -> bool:
        """Add or replace a worker: its identity and every status field (``WorkerStatus()`` defaults, overridden by
        ``status``: a full status or some validated fields). Returns True if membership changed."""
        if isinstance(status, WorkerStatus):
            fields = spec_fields(spec) | status_fields(status)
        else:
            fields = spec_fields(spec) | status_fields(WorkerStatus())
            fields |= {name: parse_status_value(name, str(value)) for name, value in (status or {}).items()}
        return await self._upsert(spec.worker_id, spec.role.value, True, fields)

    async def update_status(self, worker_id: str, changes: Mapping[str, object]) -> None:
        """Set some status fields of a registered worker; values are validated. Raises WorkerNotFound."""
        fields = {name: parse_status_value(name, str(value)) for name, value in changes.items()}
        await self._upsert(worker_id, "", False, fields)

    async def remove_worker(self, worker_id: str) -> bool:
        keys = [
            self.keys.members_version,
            *self.keys.role_sets(),
            *self.keys.reservation_triple(worker_id),
            self.keys.cache_blocks(worker_id),
        ]
        return bool(await self.scripts.call("remove_worker", keys, [worker_id]))

    async def set_cache_blocks(self, worker_id: str, block_keys: Sequence[int]) -> None:
        """Replace the set of block hashes a worker holds (operators and tests; the poller applies diffs)."""
        key = self.keys.cache_blocks(worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if block_keys:
                pipe.sadd(key, *block_keys)
            await pipe.execute()

    async def list_workers(self) -> list[WorkerView]:
        """Every registered worker with its status and pending load (no cache hit)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.keys.role_sets():
                pipe.smembers(key)
            members = await pipe.execute()
        ids = sorted({wid for m in members for wid in m})
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self.keys.worker(wid))
            hashes = await pipe.execute()
        views = (self._decoder.view_from_hash(wid, h) for wid, h in zip(ids, hashes, strict=True) if h)
        return [v for v in views if v is not None]

    async def members_version(self) -> str:
        """The current membership version ("0" when never set): a change means a worker joined, left or moved."""
        return await self.redis.get(self.keys.members_version) or "0"

    async def cache_blocks(self, worker_id: str) -> set[int]:
        """The block cache keys a worker holds."""
        return {int(k) for k in await self.redis.smembers(self.keys.cache_blocks(worker_id))}

    # ---- master writes (fenced by epoch) ----
    # Each raises StaleEpoch when ``epoch`` is no longer the master epoch (nothing is written then) and returns None
    # when the worker was removed meanwhile (it is not re-created).

    async def _fenced(self, name: str, keys: list[str], args: list[str | int]) -> list | None:
        reply = await self.scripts.call(name, [self.keys.master_epoch, *keys], args)
        if reply[0] == 1:
            return reply
        if reply[1] == "gone":
            return None
        raise StaleEpoch(reply[1])

    async def write_worker_status(
        self, epoch: int, worker_id: str, fields: Mapping[str, str], handled_request_ids: Sequence[int] = ()
    ) -> StatusWrite | None:
        """Write a worker's polled status fields (encoded, as ``status_fields`` makes them) and drop its reservations
        of ``handled_request_ids``: requests the worker reported running, waiting or finished, whose load its own
        counts now carry. Pass each id once (a repeat is a no-op); unknown or expired ids are ignored."""
        owned = SCRIPT_OWNED.intersection(fields)
        if owned:
            raise ValueError(f"fields owned by the scripts cannot be written: {', '.join(sorted(owned))}")
        keys = [*self.keys.reservation_triple(worker_id), *map(self.keys.request, handled_request_ids)]
        args: list[str | int] = [epoch, worker_id, self.keys.events, len(fields)]
        for name, value in fields.items():
            args += [name, value]
        args += handled_request_ids
        reply = await self._fenced("master_status", keys, args)
        return None if reply is None else StatusWrite(dropped=int(reply[1]), status_version=int(reply[2]))

    async def apply_cache_diff(
        self, epoch: int, worker_id: str, add: Collection[int], remove: Collection[int]
    ) -> int | None:
        """Add and remove block cache keys of a worker in one step; returns the number of keys it holds after."""
        keys = [self.keys.worker(worker_id), self.keys.cache_blocks(worker_id)]
        reply = await self._fenced("master_cache", keys, [epoch, len(add), *add, *remove])
        return None if reply is None else int(reply[1])

    async def forget_worker(self, epoch: int, worker_id: str) -> int | None:
        """A worker silent past the worker timeout: mark it not alive with no load, drop all its reservations and its
        cache blocks (it stays registered). Returns the number of reservations dropped."""
        keys = [*self.keys.reservation_triple(worker_id), self.keys.cache_blocks(worker_id)]
        reply = await self._fenced("master_forget", keys, [epoch, worker_id, self.keys.events])
        return None if reply is None else int(reply[1])
