"""FleetView: one router process's live copy of the fleet (every worker's status and pending load), in memory.

It is built from one full read (:meth:`FleetView.replace_all`) and then kept current by applying the change stream's
entries in order (:meth:`FleetView.apply`; see lua/_lib.lua ``stream_add`` for their kinds). No I/O here: the
:class:`~flexlb.state.view_sync.ViewSync` reads Redis and feeds it, and the decision reads it.

Besides the workers by role, the view keeps each role's workers sorted by a few keys (the ``orders`` given at
construction, e.g. estimated queue time or load), updated as entries arrive, so a decision can look at the best few
workers of a large fleet instead of scoring every one.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE, Role, WorkerView
from flexlb.state.codec import WorkerDecoder
from flexlb.state.keys import ROLE_SET_ORDER

log = logging.getLogger("flexlb.view")

OrderKey = Callable[[WorkerView], float]


class NeedsResync(Exception):
    """An entry the view cannot apply on what it holds (a status change of a worker it does not know)."""


class SortedWorkers:
    """Worker ids of one role sorted by one key, kept sorted as keys change (bisect: O(log n) search)."""

    __slots__ = ("_entries", "_key_of")

    def __init__(self) -> None:
        self._entries: list[tuple[float, str]] = []
        self._key_of: dict[str, float] = {}

    def put(self, worker_id: str, key: float) -> None:
        old = self._key_of.get(worker_id)
        if old is not None:
            if old == key:
                return
            del self._entries[bisect.bisect_left(self._entries, (old, worker_id))]
        bisect.insort(self._entries, (key, worker_id))
        self._key_of[worker_id] = key

    def drop(self, worker_id: str) -> None:
        old = self._key_of.pop(worker_id, None)
        if old is not None:
            del self._entries[bisect.bisect_left(self._entries, (old, worker_id))]

    def __iter__(self) -> Iterator[tuple[float, str]]:
        return iter(self._entries)

    def count_up_to(self, key: float) -> int:
        return bisect.bisect_right(self._entries, (key, "\U0010ffff"))

    def id_at(self, index: int) -> str:
        return self._entries[index][1]

    def __len__(self) -> int:
        return len(self._entries)


def pending_loads(entry: Mapping[str, str]) -> Iterator[tuple[str, int, int]]:
    """(worker id, pending count, pending tokens) of each worker a 'p' change-stream entry names."""
    for wid, value in entry.items():
        if wid not in ("t", "n") and wid[0] != "+":  # '+i', '+i2', ...: in-flight blocks (ViewSync's)
            count, _, tokens = value.partition(" ")
            yield wid, int(count), int(tokens or 0)


class FleetView:
    def __init__(
        self, orders: Mapping[str, OrderKey] | None = None, per_role: Mapping[Role, Iterable[str]] | None = None
    ) -> None:
        """``orders``: the keys to keep workers sorted by; ``per_role``: which of them each role needs (default: all
        of them for every role). Each kept ordering costs every update of a worker of that role a re-sort step."""
        orders = dict(orders or {})
        wanted = {r: set(orders) if per_role is None else set(per_role.get(r, ())) for r in ROLE_SET_ORDER}
        self._orders: dict[Role, list[tuple[str, OrderKey]]] = {
            r: [(name, orders[name]) for name in orders if name in wanted[r]] for r in ROLE_SET_ORDER
        }
        self._raw: dict[str, dict[str, str]] = {}
        self._views: dict[str, WorkerView] = {}
        self._by_role: dict[Role, dict[str, WorkerView]] = {r: {} for r in ROLE_SET_ORDER}
        self._sorted: dict[tuple[Role, str], SortedWorkers] = {
            (r, name): SortedWorkers() for r in ROLE_SET_ORDER for name, _ in self._orders[r]
        }
        self._ids: dict[Role, list[str]] = {r: [] for r in ROLE_SET_ORDER}  # sorted; changes with membership only
        self._decoder = WorkerDecoder()
        self._block_size: int | None = None
        self.synced = False  # holds a full read (replace_all) and what followed it
        self._redis_clock_offset_ms: float | None = None  # Redis' clock (workers' updated_ms) minus ours

    def observe_redis_clock(self, redis_ms: float, local_s: float) -> None:
        """Redis' clock read ``redis_ms`` at our monotonic ``local_s`` (a stream entry's id, a TIME)."""
        self._redis_clock_offset_ms = redis_ms - local_s * 1000

    def redis_now_ms(self, local_s: float) -> int | None:
        """Redis' clock now, from the last observation; None before any."""
        offset = self._redis_clock_offset_ms
        return None if offset is None else int(local_s * 1000 + offset)

    # ---- reading ----

    def get(self, worker_id: str) -> WorkerView | None:
        return self._views.get(worker_id)

    def workers(self, role: Role) -> list[WorkerView]:
        """The role's workers in worker_id order."""
        views = self._views
        return [views[wid] for wid in self._ids[role]]

    def ids(self, role: Role) -> list[str]:
        """The role's worker ids in order (shared: do not modify); it changes only when membership does, so an
        index into it is a cheap random or round-robin pick."""
        return self._ids[role]

    def all(self) -> Iterator[WorkerView]:
        return iter(self._views.values())

    def by_role(self) -> dict[Role, list[WorkerView]]:
        return {role: self.workers(role) for role in ROLE_SET_ORDER}

    def count(self, role: Role) -> int:
        return len(self._by_role[role])

    def ordered(self, role: Role, order: str) -> Iterator[tuple[float, WorkerView]]:
        """The role's workers by ascending ``order`` key, with the key."""
        views = self._views
        return ((key, views[wid]) for key, wid in self._sorted[(role, order)])

    def count_up_to(self, role: Role, order: str, key: float) -> int:
        """How many of the role's workers have an ``order`` key of at most ``key``."""
        return self._sorted[(role, order)].count_up_to(key)

    def nth(self, role: Role, order: str, index: int) -> WorkerView:
        """The role's worker at ``index`` in ``order`` (0 = smallest key)."""
        return self._views[self._sorted[(role, order)].id_at(index)]

    def __len__(self) -> int:
        return len(self._views)

    def block_size(self) -> int:
        """Tokens per KV block most workers report, else the default: request keys must be cut as workers cut."""
        if self._block_size is None:
            sizes = Counter(v.status.block_size for v in self._views.values())
            self._block_size = sizes.most_common(1)[0][0] if sizes else DEFAULT_BLOCK_SIZE
        return self._block_size

    # ---- writing ----

    def raw_hashes(self) -> dict[str, dict[str, str]]:
        """Every worker's status hash as last seen (copies)."""
        return {wid: dict(raw) for wid, raw in self._raw.items() if wid in self._views}

    def replace_all(self, hashes: Mapping[str, Mapping[str, str]]) -> None:
        """Forget everything and hold exactly these workers' status hashes (a full read)."""
        for wid in list(self._views):
            self._remove(wid)
        for wid, fields in hashes.items():
            self._raw[wid] = dict(fields)
            self._refresh(wid)
        self.synced = True

    def apply(self, entry: Mapping[str, str]) -> None:
        """Apply one change stream entry (its fields). Raises NeedsResync when it cannot be applied."""
        kind = entry.get("t")
        if kind == "p":
            for wid, count, tokens in pending_loads(entry):
                self.set_pending(wid, count, tokens)
        elif kind in ("s", "a"):
            wid = entry["w"]
            raw = self._raw.get(wid)
            if raw is None:
                if kind == "s":  # a status change of a worker registered before a change this view missed
                    raise NeedsResync(f"status of unknown worker {wid}")
                raw = self._raw[wid] = {}
            raw.update((k, v) for k, v in entry.items() if k not in ("t", "n", "w"))
            self._refresh(wid)
        elif kind == "r":
            self._remove(entry["w"])
        elif kind == "k":
            pass  # a worker's blocks changed: the block mirror's (ViewSync), not a status
        else:
            log.warning("change stream entry of unknown kind %r ignored: %s", kind, dict(entry))

    def set_pending(self, worker_id: str, count: int, tokens: int) -> None:
        """The worker's pending load (every router's live reservations) as a script saw it."""
        raw = self._raw.get(worker_id)
        if raw is None:
            return  # a worker removed meanwhile, or not registered through the stream yet
        raw["pending_count"], raw["pending_tokens"] = str(count), str(tokens)
        old = self._views.get(worker_id)
        if old is None:
            self._refresh(worker_id)
        elif old.pending_count != count or old.pending_tokens != tokens:
            self._put(WorkerView(old.spec, old.status, count, tokens))

    def merge_fields(self, worker_id: str, fields: Mapping[str, Any]) -> None:
        """Some status fields of a known worker, as a script saw them (a refused reservation)."""
        raw = self._raw.get(worker_id)
        if raw is not None and fields:
            raw.update((k, str(v)) for k, v in fields.items())
            self._refresh(worker_id)

    def forget(self, worker_id: str) -> None:
        """Drop a worker a script found gone (its removal's entry is on its way)."""
        self._remove(worker_id)

    def _refresh(self, worker_id: str) -> None:
        view = self._decoder.view_from_hash(worker_id, self._raw[worker_id])
        if view is None:  # undecodable (logged by the decoder): not schedulable
            self._remove(worker_id, keep_raw=True)
        else:
            self._put(view)

    def _put(self, view: WorkerView) -> None:
        wid, role = view.worker_id, view.spec.role
        old = self._views.get(wid)
        if old is not None and old.spec.role is not role:
            self._unlist(old)
        self._views[wid] = view
        if wid not in self._by_role[role]:
            bisect.insort(self._ids[role], wid)
        self._by_role[role][wid] = view
        if old is None or old.status.block_size != view.status.block_size:
            self._block_size = None
        for name, key in self._orders[role]:
            self._sorted[(role, name)].put(wid, key(view))

    def _remove(self, worker_id: str, *, keep_raw: bool = False) -> None:
        if not keep_raw:
            self._raw.pop(worker_id, None)
        old = self._views.pop(worker_id, None)
        if old is not None:
            self._unlist(old)
            self._block_size = None

    def _unlist(self, view: WorkerView) -> None:
        role = view.spec.role
        if self._by_role[role].pop(view.worker_id, None) is not None:
            ids = self._ids[role]
            del ids[bisect.bisect_left(ids, view.worker_id)]
        for name, _ in self._orders[role]:
            self._sorted[(role, name)].drop(view.worker_id)
