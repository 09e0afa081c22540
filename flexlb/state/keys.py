"""Every Redis key flexlb uses, built in one place (documented in docs/redis-keys.md).

All keys of one model service share the Redis Cluster hash tag ``{<service>}``, so every script touches one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlb.domain import Role

ROLE_SET_ORDER: tuple[Role, ...] = (Role.PREFILL, Role.DECODE, Role.PDFUSION, Role.VIT)  # as upsert_worker.lua


@dataclass(frozen=True, slots=True)
class ServiceKeys:
    service: str

    @property
    def prefix(self) -> str:
        return f"flexlb:{{{self.service}}}"

    @property
    def members_version(self) -> str:
        return f"{self.prefix}:members_version"

    @property
    def master_lock(self) -> str:
        """String ``token|epoch|holder`` with a TTL: who is master now (see lua/lock_acquire.lua)."""
        return f"{self.prefix}:master"

    @property
    def master_epoch(self) -> str:
        """Integer, never reset: the fencing token every master write checks. Each new master sets it to
        max(Redis server time in ms, previous + 1) (lua/lock_acquire.lua): not reused even if Redis lost its data."""
        return f"{self.prefix}:master_epoch"

    def shard_lock(self, shard: int) -> str:
        """String ``token|epoch|holder`` with a TTL: the lease of polling shard ``shard`` (> 0; shard 0's lease is
        the master lock), taken and renewed by the master lock's scripts."""
        return f"{self.prefix}:shard:{shard}"

    def shard_epoch(self, shard: int) -> str:
        """Integer, never reset: the fencing token of polling shard ``shard`` (> 0), as :attr:`master_epoch`."""
        return f"{self.prefix}:shard_epoch:{shard}"

    @property
    def pollers(self) -> str:
        """Zset poller process id -> expiry (Redis ms): the processes that share the polling shards
        (lua/shard_pollers.lua); each takes about its share of the shards."""
        return f"{self.prefix}:pollers"

    @property
    def events(self) -> str:
        """Pub/sub channel (not a key) of fleet events: the master publishes ``status <worker id> <status_version>``
        after every status write (lua/master_status.lua, lua/master_forget.lua). Hash-tagged like the keys, so it
        names the same slot."""
        return f"{self.prefix}:events"

    @property
    def log_level(self) -> str:
        """Pub/sub channel (not a key): ``POST /rtp_llm/update_log_level`` asks every router of the service to change
        its log level; each answers on the reply channel the message names (flexlb.state.log_level)."""
        return f"{self.prefix}:log_level"

    @property
    def changes(self) -> str:
        """Stream of every change a router's fleet view follows (status, membership, pending load; see
        lua/_lib.lua stream_add), trimmed to about STREAM_MAXLEN entries."""
        return f"{self.prefix}:changes"

    @property
    def changes_seq(self) -> str:
        """Integer: the number of the last entry appended to :attr:`changes`, so a reader can tell it missed some."""
        return f"{self.prefix}:changes_seq"

    def change_keys(self) -> list[str]:
        """The stream and its counter: the two keys every script that appends to the stream takes."""
        return [self.changes, self.changes_seq]

    @property
    def block_prefix(self) -> str:
        """Prefix of the inverted index's keys: ``<block_prefix><block hash>`` is the set of workers holding it."""
        return f"{self.prefix}:blk:"

    def block(self, block_hash: int) -> str:
        return f"{self.block_prefix}{block_hash}"

    def role_set(self, role: Role) -> str:
        return f"{self.prefix}:role:{role.value}"

    def role_sets(self) -> list[str]:
        return [self.role_set(r) for r in ROLE_SET_ORDER]

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def reservations(self, worker_id: str) -> str:
        return f"{self.prefix}:resv:{worker_id}"

    @property
    def cache_prefix(self) -> str:
        """Prefix of the workers' own block sets: ``<cache_prefix><worker id>``."""
        return f"{self.prefix}:cache:"

    def cache_blocks(self, worker_id: str) -> str:
        return f"{self.cache_prefix}{worker_id}"

    @property
    def inflight_prefix(self) -> str:
        """Prefix of the workers' in-flight block zsets (block -> expiry ms): ``<inflight_prefix><worker id>``."""
        return f"{self.prefix}:inflight:"

    def inflight_blocks(self, worker_id: str) -> str:
        return f"{self.inflight_prefix}{worker_id}"

    @property
    def waiting(self) -> str:
        """The fleet's waiting board: requests waiting in every router's queue, by rank (flexlb/state/waiting.py)."""
        return f"{self.prefix}:waiting"

    @property
    def waiting_routers(self) -> str:
        """Routers with requests on the waiting board -> last seen ms."""
        return f"{self.prefix}:waiting_routers"

    def inflight_heads(self, worker_id: str) -> str:
        """The zset of a worker's in-flight heads (the first new block of each request, the only ones the inverted
        index names it for while in flight) -> expiry ms; named as lua/_lib.lua's inflight_heads_key names it."""
        return f"{self.prefix}:inflight_heads:{worker_id}"

    def request(self, request_id: int) -> str:
        return f"{self.prefix}:req:{request_id}"

    def reservation_pair(self, worker_id: str) -> list[str]:
        """Status hash and reservations zset: the keys reserve/release/sweep take per worker (a reservation's tokens
        are in its request's index, ``request``)."""
        return [self.worker(worker_id), self.reservations(worker_id)]
