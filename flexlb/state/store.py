"""FleetStore: the fleet's shared state in Redis (workers, reservations, cache index, change stream).

Round trips per decision: a prefix lookup in the inverted index (prefill-type roles with block keys only; one more per
LOOKUP_CHUNK blocks still matched), a reservation of every role one script call, a release one call (two when the
caller does not know the request's workers). No call on the decision path reads every worker: :meth:`read_fleet` does
(a router's view resync: at start, after a gap in the change stream, after Redis came back), and :meth:`list_workers`
(operators, and the master's duties: membership changes, its periodic maintenance).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from flexlb.domain import WorkerSpec, WorkerStatus, WorkerView
from flexlb.state.codec import SCRIPT_OWNED, WorkerDecoder, parse_status_value, spec_fields, status_fields
from flexlb.state.keys import ServiceKeys
from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.script_batch import DEFER_S
from flexlb.state.scripts import Scripts

LOOKUP_CHUNK = 128  # blocks per lookup call: 8k tokens of 64-token blocks, so long prompts build few keys at once
LOOKUP_FOLLOW = 4  # workers a lookup samples (lua/lookup.lua): bounded work with popular prefixes; the least loaded
# of a few random holders is nearly as good as of all of them (power of d choices), and each one followed costs an
# SMISMEMBER of the chunk
MAX_INFLIGHT_BLOCKS = 1024  # in-flight blocks a reservation records at most (64k tokens of 64-token blocks)
_CHECKED = (
    "alive", "max_concurrency", "running", "waiting", "pending_count", "kv_total", "kv_used", "pending_tokens", "role",
)  # fmt: skip


class PrefixHits(dict[str, int]):
    """Worker id -> blocks of the request's prefix it holds; ``held_by_any``: when the lookup sampled the holders
    of a popular prefix, how many leading blocks some worker holds (perhaps one not in the sample), else 0."""

    held_by_any: int = 0


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    ok: bool
    refused_index: int = -1  # index into the picks of the worker that refused
    reason: str = ""  # gone | not_alive | concurrency_full | kv_full
    detail: str = ""
    # what the script saw: (pending_count, pending_tokens) per pick after a reservation; the refused worker's
    # checked status fields after a refusal (lua/reserve.lua CHECKED), for the caller's view
    pending: tuple[tuple[int, int], ...] = ()
    seen: dict[str, str] | None = None
    redis_ms: int = 0  # Redis' clock at a reservation (its in-flight blocks expire from then)
    inflight_blocks: tuple[int, ...] = ()  # the blocks a reservation put in flight (at most MAX_INFLIGHT_BLOCKS)


@dataclass(frozen=True, slots=True)
class ReservationAudit:
    """A worker's pending load and what its reservations hold, read together (lua/audit_reservations.lua)."""

    worker_id: str
    pending_count: int
    pending_tokens: int
    reserved: dict[int, int | None]  # request id -> tokens its index holds for the worker (None: the index lost them)

    @property
    def mismatch(self) -> str:
        """What does not add up ('' when the counters are exactly their reservations')."""
        tokens = sum(t or 0 for t in self.reserved.values())
        counted = (self.pending_count, self.pending_tokens) == (len(self.reserved), tokens)
        if counted and None not in self.reserved.values():
            return ""
        return (
            f"{self.worker_id}: pending {self.pending_count} / {self.pending_tokens} tokens, "
            f"reservations {len(self.reserved)} / {tokens} tokens {sorted(self.reserved.items())[:8]}"
        )


@dataclass(frozen=True, slots=True)
class FleetRead:
    """Every worker's status hash at one moment, and the change stream's position just before it was read: a view
    built from it and then following the stream from ``stream_id`` misses nothing."""

    hashes: dict[str, dict[str, str]]
    stream_id: str
    seq: int
    redis_ms: int = 0  # Redis' clock at the read (the workers' updated_ms are on it)


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
    def __init__(
        self, redis: Redis, service: str, pipelined: PipelinedRedis | None = None, *, fence_key: str | None = None
    ) -> None:
        """``pipelined``: the client the scripts go through (the decision path's); redis-py's ``redis`` otherwise.
        ``fence_key``: the epoch the master writes check (default the master epoch; a polling shard's own)."""
        self.redis = redis
        self.keys = ServiceKeys(service)
        self.fence_key = fence_key or self.keys.master_epoch
        self.scripts = Scripts(redis, pipelined)
        self._pipelined = pipelined
        self._blocking = pipelined.sibling() if pipelined is not None else None  # the view's XREAD BLOCK

    # ---- the decision path ----

    async def lookup_prefix(self, block_keys: Sequence[int], follow: int = LOOKUP_FOLLOW) -> PrefixHits:
        """Prefill-type workers holding a prefix of ``block_keys`` (in prompt order) -> blocks of that prefix: one
        call per LOOKUP_CHUNK blocks, and only while some worker still matches. With more than ``follow`` holders
        of the first block, a sample of them and the deepest holders (lua/lookup.lua)."""
        hits = PrefixHits()
        alive: list[str] = []
        block = self.keys.block
        for offset in range(0, len(block_keys), LOOKUP_CHUNK):
            chunk = block_keys[offset : offset + LOOKUP_CHUNK]
            args = [self.keys.cache_prefix, self.keys.inflight_prefix, follow, len(chunk), *chunk, *alive]
            alive, dropped, deepest = await self.scripts.call("lookup", [block(k) for k in chunk], args)
            if offset == 0:
                hits.held_by_any = int(deepest)
            for i in range(0, len(dropped), 2):
                hits[dropped[i]] = offset + int(dropped[i + 1])
            if not alive:
                return hits
            if offset + LOOKUP_CHUNK >= len(block_keys):
                break
        for wid in alive:
            hits[wid] = len(block_keys)
        return hits

    async def reserve(
        self,
        request_id: int,
        picks: Sequence[tuple[str, int]],
        ttl_ms: int,
        *,
        inflight_blocks: Sequence[int] = (),
        inflight_ttl_ms: int = 0,
        inflight_max_blocks: int = 0,
        probe_block: int | None = None,
        limits: bool = True,
    ) -> ReserveOutcome:
        """Reserve ``tokens`` on each ``(worker_id, tokens)`` for ``request_id``: all of them or none. On success the
        ``inflight_blocks`` (the request's blocks the first prefill-type pick does not hold) are in flight there for
        ``inflight_ttl_ms``: lookups find them held by it until its cache report confirms them; ``inflight_max_blocks``
        (0: no bound) bounds that worker's in-flight blocks, the oldest dropped first. ``probe_block``: the
        first block no worker held at the caller's lookup; refused as ``prefix_moved`` when some worker holds it by
        now (lua/reserve.lua). ``limits`` False: the workers' concurrency and KV limits are not checked (admission by
        wait: a worker at its limits queues the request)."""
        keys = [self.keys.request(request_id), *self.keys.change_keys()]
        blocks = inflight_blocks[:MAX_INFLIGHT_BLOCKS] if inflight_ttl_ms > 0 else ()
        probe = "" if probe_block is None else probe_block
        args: list[str | int] = [request_id, ttl_ms, inflight_ttl_ms, self.keys.block_prefix, probe]
        args += ["1" if not limits else "0", inflight_max_blocks, len(blocks)]
        args += blocks
        for wid, tokens in picks:
            keys += self.keys.reservation_pair(wid)
            args += [wid, tokens]
        reply = await self.scripts.call("reserve", keys, args)
        if reply[0] == 1:
            pending = tuple(parse_pending(p) for p in reply[2:])
            return ReserveOutcome(ok=True, pending=pending, redis_ms=int(reply[1]), inflight_blocks=tuple(blocks))
        seen = {name: value for name, value in zip(_CHECKED, reply[4], strict=False) if value is not None}
        return ReserveOutcome(ok=False, refused_index=int(reply[1]) - 1, reason=reply[2], detail=reply[3], seen=seen)

    async def request_workers(self, request_id: int) -> list[str]:
        """Workers that hold (or held until expiry) a reservation of the request."""
        return sorted(await self.redis.hkeys(self.keys.request(request_id)))

    async def _release(self, request_id: int, worker_ids: Sequence[str], *, defer_s: float = 0.0) -> tuple[int, int]:
        keys = [self.keys.request(request_id), *self.keys.change_keys()]
        for wid in worker_ids:
            keys += self.keys.reservation_pair(wid)
        released, remaining = await self.scripts.call("release", keys, [request_id, *worker_ids], defer_s=defer_s)
        return int(released), int(remaining)

    async def release(self, request_id: int, worker_ids: Sequence[str] | None = None) -> int:
        """Remove the request's reservations on ``worker_ids`` (a rollback of some roles) or, when None, all of them;
        exactly once each. Returns how many were removed."""
        if worker_ids is None:
            worker_ids = await self.request_workers(request_id)
        if not worker_ids:
            return 0
        return (await self._release(request_id, worker_ids))[0]

    async def release_request(self, request_id: int, likely_workers: Sequence[str], *, defer_s: float = DEFER_S) -> int:
        """Remove every reservation of the request, trying ``likely_workers`` first: one round trip when they are
        all of them (the router that reserved knows), two when another router reserved some too. The request is over:
        its release may wait up to ``defer_s`` to share a batch with other calls (Scripts.call)."""
        if likely_workers:
            released, remaining = await self._release(request_id, likely_workers, defer_s=defer_s)
        else:
            released, remaining = 0, 1
        if remaining:
            released += await self.release(request_id)
        return released

    async def sweep(self, worker_ids: Sequence[str]) -> int:
        """Expire overdue reservations of these workers; returns how many were expired."""
        if not worker_ids:
            return 0
        keys = [*self.keys.change_keys(), *(k for wid in worker_ids for k in self.keys.reservation_pair(wid))]
        return int(await self.scripts.call("sweep", keys, list(worker_ids)))

    async def audit_reservations(self, worker_id: str) -> ReservationAudit:
        """A worker's pending load and its reservations' tokens, read in one atomic step: for checks that the two
        agree (``ReservationAudit.mismatch``)."""
        count, tokens, flat = await self.scripts.call(
            "audit_reservations", self.keys.reservation_pair(worker_id), [worker_id]
        )
        held = {int(rid): int(t) if t != "" else None for rid, t in zip(flat[::2], flat[1::2], strict=True)}
        return ReservationAudit(worker_id, int(count), int(tokens), held)

    # ---- membership and status (admin API / CLI now, the master's poller later) ----

    async def _upsert(self, worker_id: str, role: str, create: bool, fields: Mapping[str, str]) -> bool:
        keys = [
            self.keys.members_version,
            *self.keys.role_sets(),
            self.keys.worker(worker_id),
            *self.keys.change_keys(),
            self.keys.cache_blocks(worker_id),
        ]
        args = [worker_id, role, "1" if create else "0", self.keys.block_prefix]
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

    async def restore_worker(self, worker_id: str, fields: Mapping[str, str]) -> bool:
        """Register a worker again from its status hash as a router last saw it (Redis lost it): identity and
        status, not what the scripts own (pending load, versions), which starts again from nothing. Creates only;
        returns True if it was missing."""
        role = fields.get("role", "")
        kept = {name: value for name, value in fields.items() if name not in SCRIPT_OWNED and name != "role"}
        return await self._upsert(worker_id, role, True, kept)

    async def update_status(self, worker_id: str, changes: Mapping[str, object]) -> None:
        """Set some status fields of a registered worker; values are validated. Raises WorkerNotFound."""
        fields = {name: parse_status_value(name, str(value)) for name, value in changes.items()}
        await self._upsert(worker_id, "", False, fields)

    async def remove_worker(self, worker_id: str) -> bool:
        keys = [
            self.keys.members_version,
            *self.keys.role_sets(),
            *self.keys.reservation_pair(worker_id),
            self.keys.cache_blocks(worker_id),
            *self.keys.change_keys(),
        ]
        return bool(await self.scripts.call("remove_worker", keys, [worker_id, self.keys.block_prefix]))

    async def set_cache_blocks(self, worker_id: str, block_keys: Sequence[int]) -> None:
        """Replace the set of block hashes a worker holds, in its set and the inverted index (operators and tests;
        the poller applies diffs)."""
        args = [worker_id, self.keys.block_prefix, *block_keys]
        keys = [self.keys.worker(worker_id), self.keys.cache_blocks(worker_id), *self.keys.change_keys()]
        await self.scripts.call("cache_set", keys, args)

    async def block_holders(self, block_key: int) -> set[str]:
        """The workers the inverted index lists as holding one block."""
        return set(await self.redis.smembers(self.keys.block(block_key)))

    # ---- the routers' fleet view: one full read, then the change stream ----

    async def read_fleet(self) -> FleetRead:
        """Every registered worker's status hash, with the stream position to follow changes from (two round
        trips: membership and position in one transaction, then the hashes)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            # Raw commands, TIME through a script on a key of the service: a cluster transaction takes keyed commands
            # only, and redis-py's (8.1) passes the routing arguments of its command methods to reply callbacks that
            # do not take them.
            pipe.execute_command("EVAL", "return redis.call('TIME')", 1, self.keys.changes_seq)
            pipe.execute_command("GET", self.keys.changes_seq)
            pipe.execute_command("XREVRANGE", self.keys.changes, "+", "-", "COUNT", 1)
            for key in self.keys.role_sets():
                pipe.execute_command("SMEMBERS", key)
            (seconds, micros), seq, last, *members = await pipe.execute()
        ids = sorted({wid for m in members for wid in m})
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self.keys.worker(wid))
            hashes = await pipe.execute()
        return FleetRead(
            hashes={wid: h for wid, h in zip(ids, hashes, strict=True) if h},
            stream_id=last[0][0] if last else "0-0",
            seq=int(seq or 0),
            redis_ms=int(seconds) * 1000 + int(micros) // 1000,
        )

    async def read_changes(
        self, after_id: str, *, block_ms: int | None = None, count: int = 2000
    ) -> list[tuple[str, dict[str, str]]]:
        """Stream entries after ``after_id`` (oldest first), waiting up to ``block_ms`` for one when given."""
        if self._pipelined is not None and self._blocking is not None:
            client, block = (self._pipelined, ()) if block_ms is None else (self._blocking, ("BLOCK", block_ms))
            raw = await client.execute("XREAD", "COUNT", count, *block, "STREAMS", self.keys.changes, after_id)
            if not raw:
                return []
            return [(entry_id, _pairs(values)) for entry_id, values in raw[0][1]]
        reply = await self.redis.xread({self.keys.changes: after_id}, count=count, block=block_ms)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 clients answer a map
            return next(iter(reply.values()))[0]
        return reply[0][1]

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
        decoder = WorkerDecoder()
        views = (decoder.view_from_hash(wid, h) for wid, h in zip(ids, hashes, strict=True) if h)
        return [v for v in views if v is not None]

    async def members_version(self) -> str:
        """The current membership version ("0" when never set): a change means a worker joined, left or moved."""
        return await self.redis.get(self.keys.members_version) or "0"

    async def inflight_blocks(self, worker_id: str) -> dict[int, int]:
        """A worker's in-flight blocks -> their expiry (Redis ms)."""
        pairs = await self.redis.zrange(self.keys.inflight_blocks(worker_id), 0, -1, withscores=True)
        return {int(block): int(expiry) for block, expiry in pairs}

    async def read_worker_blocks(self, worker_ids: Sequence[str]) -> dict[str, tuple[set[int], dict[int, int]]]:
        """Each worker's cached blocks and in-flight blocks (-> expiry ms): what a router's block mirror starts from
        (one pipelined round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in worker_ids:
                pipe.smembers(self.keys.cache_blocks(wid))
                pipe.zrange(self.keys.inflight_blocks(wid), 0, -1, withscores=True)
            replies = await pipe.execute() if worker_ids else []
        return {
            wid: ({int(b) for b in cached}, {int(b): int(until) for b, until in inflight})
            for wid, cached, inflight in zip(worker_ids, replies[::2], replies[1::2], strict=True)
        }

    async def cache_blocks(self, worker_id: str) -> set[int]:
        """The block cache keys a worker holds."""
        return {int(k) for k in await self.redis.smembers(self.keys.cache_blocks(worker_id))}

    # ---- master writes (fenced by epoch) ----
    # Each raises StaleEpoch when ``epoch`` is no longer the master epoch (nothing is written then) and returns None
    # when the worker was removed meanwhile (it is not re-created).

    async def _fenced(self, name: str, keys: list[str], args: list[str | int]) -> list | None:
        reply = await self.scripts.call(name, [self.fence_key, *keys], args)
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
        keys = [
            *self.keys.reservation_pair(worker_id),
            *self.keys.change_keys(),
            *map(self.keys.request, handled_request_ids),
        ]
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
        keys = [self.keys.worker(worker_id), self.keys.cache_blocks(worker_id), *self.keys.change_keys()]
        args = [epoch, worker_id, self.keys.block_prefix, len(add), *add, *remove]
        reply = await self._fenced("master_cache", keys, args)
        return None if reply is None else int(reply[1])

    async def forget_worker(self, epoch: int, worker_id: str) -> int | None:
        """A worker silent past the worker timeout: mark it not alive with no load, drop all its reservations and its
        cache blocks (it stays registered). Returns the number of reservations dropped."""
        keys = [*self.keys.reservation_pair(worker_id), self.keys.cache_blocks(worker_id), *self.keys.change_keys()]
        args = [epoch, worker_id, self.keys.events, self.keys.block_prefix]
        reply = await self._fenced("master_forget", keys, args)
        return None if reply is None else int(reply[1])


def _pairs(values: list[str]) -> dict[str, str]:
    """A stream entry's flat [field, value, ...] as a dict."""
    it = iter(values)
    return dict(zip(it, it, strict=True))


def parse_pending(value: str) -> tuple[int, int]:
    """A 'p' stream entry's value "pending_count pending_tokens"."""
    count, _, tokens = value.partition(" ")
    return int(count), int(tokens or 0)
