"""ViewSync: keeps a router's FleetView current by tailing the service's change stream (XREAD BLOCK).

A full read of the fleet (``FleetStore.read_fleet``) happens at start, after the connection to Redis was lost, and
when the entries' sequence numbers show a gap (the stream was trimmed past this reader, or Redis restarted empty);
otherwise each change costs one entry. ``fresh_at`` is when Redis last answered the tail: the decision path treats
a view older than its staleness bound as unusable, exactly as it treated an old snapshot.

With a :class:`~flexlb.state.block_mirror.BlockMirror`, the same tail keeps the router's copy of the inverted
cache-block index: ``k`` entries (a prefill-type worker's blocks changed) and the in-flight blocks of ``p`` entries;
a ``k`` entry too large for the stream says "read this worker again", done after the batch it came in.

Without the background task running (:meth:`start`), :meth:`catch_up` does the same work inline: the scheduler calls
it before a decision then, so a scheduler built without the tail (tests, tools) still decides on current state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from flexlb.state.block_mirror import INDEXED_ROLES, BlockMirror, parse_blocks
from flexlb.state.store import FleetStore, PrefixHits
from flexlb.state.view import FleetView, NeedsResync, pending_loads
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.view")

RECONNECT_DELAY_S = 0.2


class ViewSync:
    def __init__(
        self,
        store: FleetStore,
        view: FleetView,
        *,
        block_ms: int = 500,
        clock: Callable[[], float] = time.monotonic,
        mirror: BlockMirror | None = None,
    ) -> None:
        self.store = store
        self.view = view
        self.mirror = mirror
        self._touched: dict[str, int] = {}  # worker -> 'k' entries applied to the mirror (reloads check it)
        self._reload_later: set[str] = set()  # workers whose reads kept being overtaken: read with the next batch
        self.block_ms = block_ms
        self._clock = clock
        self._last_id = "0-0"
        self._last_seq = 0
        self.fresh_at: float | None = None  # when Redis last answered a read of the view
        self.resyncs = 0  # full reads since start (tests, /schedule_snapshot)
        self.entries = 0  # stream entries applied since start
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = asyncio.Event()  # the tail is following the stream (set after its first read)
        # called after a batch that may have freed capacity (flexlb.state.events: queue-mode waiters wake up)
        self.on_freed: Callable[[], None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.connected.is_set()

    def age_s(self) -> float | None:
        return None if self.fresh_at is None else self._clock() - self.fresh_at

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="fleet view")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True  # the loop checks it too: a lost cancellation still ends it
            await cancel_until_done(task)
        self.connected.clear()

    async def resync(self) -> None:
        """Read the whole fleet again and follow the stream from where that read stands.

        When the stream's counter went back (Redis restarted empty, or failed over to a replica that had not
        seen the last writes), the workers this view held and Redis lost are registered again from the view:
        registrations made through the API exist nowhere else. Removals came through the stream, so a removed
        worker is not in the view and stays removed."""
        read = await self.store.read_fleet()
        if read.seq < self._last_seq and await self._restore_lost(read.hashes):
            read = await self.store.read_fleet()
        self.view.replace_all(read.hashes)
        if self.mirror is not None:
            self.mirror.clear()
            await self._reload_blocks(sorted(read.hashes))
            self.mirror.synced = self.mirror.loaded = True
        self._last_id, self._last_seq = read.stream_id, read.seq
        self.fresh_at = self._clock()
        self.view.observe_redis_clock(read.redis_ms, self.fresh_at)
        self.resyncs += 1
        if self.on_freed is not None:
            self.on_freed()  # anything may have changed

    async def catch_up(self, block_ms: int | None = None) -> int:
        """Apply the entries after the last one applied (waiting up to ``block_ms`` for one); a full read first if
        the view never had one. Returns how many entries were applied. Raises what Redis raises.

        The tail and an inline catch-up may read at once: an entry is applied only if it is the next one, one
        already applied is skipped, one after a gap means a full read."""
        try:
            if not self.view.synced:
                await self.resync()
            entries = await self.store.read_changes(self._last_id, block_ms=block_ms)
        except BaseException:
            self.view.synced = False  # Redis may come back empty: read everything then
            if self.mirror is not None:
                self.mirror.synced = False
            raise
        applied = 0
        reload: set[str] = set()
        freed = False
        for entry_id, fields in entries:
            seq = int(fields.get("n", 0))
            if _stream_id(entry_id) <= _stream_id(self._last_id):
                continue  # applied by the other reader meanwhile
            if seq != self._last_seq + 1:
                log.warning(
                    "change stream of %s: entry %d follows %d (missed entries: trimmed, or Redis restarted); "
                    "reading the fleet again",
                    self.store.keys.service,
                    seq,
                    self._last_seq,
                )
                await self.resync()
                return applied
            try:
                freed = freed or (self.on_freed is not None and _frees(fields, self.view))
                self.view.apply(fields)
                if self.mirror is not None:
                    self._apply_blocks(fields, reload)
            except NeedsResync as exc:
                log.warning("fleet view of %s: %s; reading the fleet again", self.store.keys.service, exc)
                await self.resync()
                return applied
            self._last_id, self._last_seq = entry_id, seq
            applied += 1
        if reload or self._reload_later:
            await self._reload_blocks(sorted(reload | self._reload_later))
        self.fresh_at = self._clock()  # a blocking read that came back empty: nothing changed until now
        if applied:  # an entry's id is Redis' clock when it was written, a moment ago
            self.view.observe_redis_clock(_stream_id(self._last_id)[0], self.fresh_at)
        self.entries += applied
        if freed and self.on_freed is not None:
            self.on_freed()
        return applied

    def lookup_prefix(self, block_keys: list[int], *, stale_ok: bool = False) -> PrefixHits | None:
        """The request's prefix hits from the block mirror; None when there is none or it is not synced (the
        caller asks Redis then). ``stale_ok``: as the mirror stood when the stream was lost (Redis away: the
        degraded mode decides on the view as it stood too)."""
        mirror = self.mirror
        if mirror is None or not (mirror.loaded if stale_ok else mirror.synced and self.view.synced):
            return None
        return mirror.lookup_prefix(block_keys, self.view.redis_now_ms(self._clock()))

    def note_inflight(self, worker_id: str, blocks: Sequence[int], until_ms: int, cap: int) -> None:
        """This router's own reservation put ``blocks`` in flight: in the mirror now, before the stream says so."""
        if self.mirror is not None and blocks:  # not a touch (see _reload_blocks): its stream entry comes too
            self.mirror.add_inflight(worker_id, blocks, until_ms, cap)

    def _apply_blocks(self, fields: dict[str, str], reload: set[str]) -> None:
        """One stream entry's block changes, into the mirror; workers to read again go to ``reload``."""
        mirror = self.mirror
        assert mirror is not None
        kind = fields.get("t")
        if kind == "p":  # a batch's entry (lua/batch.lua) has a note per reservation: '+i', '+i2', ...
            for name, note in fields.items():
                if name.startswith("+i") and note:
                    wid, until, cap, *blocks = note.split()
                    self.note_inflight(wid, [int(b) for b in blocks], int(until), int(cap))
        elif kind == "k":
            wid = fields["w"]
            self._touched[wid] = self._touched.get(wid, 0) + 1
            if fields.get("op") == "d":
                mirror.apply_diff(wid, parse_blocks(fields.get("add", "")), parse_blocks(fields.get("del", "")))
            else:
                reload.add(wid)
        elif kind == "r":
            self._touched.pop(wid := fields["w"], None)
            mirror.forget(wid)

    async def _reload_blocks(self, worker_ids: list[str]) -> None:
        """Read these workers' blocks into the mirror (a worker no longer of a prefill-type role holds none there).

        A read is newer than every entry already applied, and the entries after it are applied on top: for each
        block the last write wins. Only another reader applying entries meanwhile (an inline catch-up beside the
        tail) could make a read older than the mirror: a worker with a 'k' entry applied while its read was on the
        way is read again, and after three overtaken reads, with the next batch. In-flight blocks noted straight
        from a reservation do not count: their own stream entry follows."""
        mirror = self.mirror
        assert mirror is not None
        self._reload_later.clear()
        todo = worker_ids
        for _ in range(3):
            indexed = [w for w in todo if (v := self.view.get(w)) is not None and v.spec.role in INDEXED_ROLES]
            for wid in set(todo) - set(indexed):
                mirror.forget(wid)
            before = {w: self._touched.get(w, 0) for w in indexed}
            read = await self.store.read_worker_blocks(indexed)
            todo = []
            for wid, (cached, inflight) in read.items():
                if self._touched.get(wid, 0) != before[wid]:
                    todo.append(wid)
                else:
                    mirror.replace_worker(wid, cached, inflight)
            if not todo:
                return
        self._reload_later.update(todo)

    async def _restore_lost(self, found: dict[str, dict[str, str]]) -> int:
        lost = {wid: raw for wid, raw in self.view.raw_hashes().items() if wid not in found}
        restored = 0
        for wid, raw in lost.items():
            if raw.get("role"):  # a hash the view could not decode is not restored
                restored += await self.store.restore_worker(wid, raw)
        log.warning(
            "change stream of %s went back from entry %d (Redis lost its data): registered again %d of the %d "
            "workers it lost, from this router's view",
            self.store.keys.service,
            self._last_seq,
            restored,
            len(lost),
        )
        return restored

    async def _run(self) -> None:
        failing = False
        while not self._stopping:
            try:
                await self.resync_if_needed(failing)
                if failing:
                    log.warning("fleet view of %s: following the change stream again", self.store.keys.service)
                    failing = False
                self.connected.set()
                while not self._stopping:
                    await self.catch_up(self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away or restarted: read everything again once it answers
                self.connected.clear()
                if not failing:
                    log.warning(
                        "fleet view of %s: change stream lost (%s: %s); view frozen at %.1fs old, retrying",
                        self.store.keys.service,
                        type(exc).__name__,
                        exc,
                        self.age_s() or 0.0,
                    )
                    failing = True
                await asyncio.sleep(RECONNECT_DELAY_S)

    async def resync_if_needed(self, force: bool) -> None:
        if force or not self.view.synced:
            await self.resync()


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _frees(fields: dict[str, str], view: FleetView) -> bool:
    """Whether a stream entry, not yet applied to ``view``, may free capacity: a status write, a registration, or a
    pending load (a release, an expiry) below what the view holds. A reservation's entry raises it: no wake-up."""
    kind = fields.get("t")
    if kind in ("s", "a"):
        return True
    if kind != "p":
        return False
    for wid, count, tokens in pending_loads(fields):
        worker = view.get(wid)
        if worker is not None and (count < worker.pending_count or tokens < worker.pending_tokens):
            return True
    return False
