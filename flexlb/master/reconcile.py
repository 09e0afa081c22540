"""What the master makes of one worker's status and cache replies: pure logic, no I/O (the poller does the calls and
the writes). Rules follow the original FlexLB (FLEXLB_REFERENCE.md, "Reconciliation with fresh status"), adapted to
reservations in Redis: a reservation is dropped as soon as the worker itself reports the request (running, waiting or
finished), because from then the worker's own counts carry it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.proto.flexlb_worker_pb2 import WorkerStatusPB

_PREFILL_GATED = (Role.PREFILL, Role.PDFUSION)  # held back by waiting tasks
_DECODE_GATED = (Role.DECODE, Role.PDFUSION)  # held back by KV use


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """Availability thresholds (FLEXLB_CONFIG prefillQueueSizeThreshold, decodeAvailableMemoryThreshold,
    hysteresisBiasPercent). A threshold of 0 disables its check."""

    prefill_waiting: int = 3
    decode_kv_percent: int = 90
    bias_percent: int = 15

    def release_level(self, threshold: float) -> float:
        """Where a held-back worker becomes available again: ``bias_percent`` below the threshold."""
        return threshold * (100 - self.bias_percent) / 100


@dataclass(slots=True)
class WorkerTrack:
    """The master's memory of one worker during its term (a new master starts from scratch)."""

    status_version: int = -1  # last status applied; an equal one is ignored, a smaller one means a restart
    finished_version: int = 0  # asked for: the worker lists tasks finished after it
    # request id -> last time reported (monotonic s), least recently reported first
    seen: OrderedDict[int, float] = field(default_factory=OrderedDict)
    live: frozenset[int] = frozenset()  # request ids running or waiting in the last status
    prefill_hold: bool = False
    decode_hold: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE  # from cache replies
    # liveness
    failures: int = 0  # failed polls in a row
    last_ok: float | None = None  # monotonic s of the last successful status poll
    first_failure: float | None = None
    marked_down: bool = False
    forgotten: bool = False
    # what was last written, to skip writes that change nothing
    written: dict[str, str] | None = None
    written_at: float = 0.0
    # cache index
    cache_version: int | None = None  # None: never asked in this term
    cache_keys: frozenset[int] | None = None  # what Redis holds for the worker, as far as this term knows
    cache_interval_s: float = 0.0  # current adaptive interval; 0 until the first cache poll
    next_cache_at: float = 0.0  # monotonic s
    last_cache_at: float = 0.0  # monotonic s of the last cache poll
    # the engine's cache changes only when it runs a step: a moved iterate_count makes a cache poll due at once
    iterations: int = -1  # iterate_count of the last status
    iterations_at_cache_poll: int = -1
    quiet_key: tuple[object, ...] | None = None  # what the last reply of an idle worker said (see quiet_reply)

    @property
    def available(self) -> bool:
        return not (self.prefill_hold or self.decode_hold)

    def restart(self) -> None:
        """The worker restarted (or was forgotten): nothing it reported before applies."""
        self.quiet_key = None
        self.status_version = -1
        self.finished_version = 0
        self.seen.clear()
        self.live = frozenset()
        self.cache_version = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    fields: dict[str, str]  # status hash fields to write
    handled_ids: list[int]  # request ids reported for the first time: drop their reservations
    lost_ids: list[int]  # running or waiting before, gone now without finishing
    restarted: bool = False


def update_hold(held: bool, level: float, threshold: float, hysteresis: Hysteresis) -> bool:
    """Hold back at ``level >= threshold``; once held, release only at ``level <= release_level(threshold)``."""
    if threshold <= 0:
        return False
    if held:
        return level > hysteresis.release_level(threshold)
    return level >= threshold


def queued_prefill_tokens(status: WorkerStatusPB) -> int:
    """Prompt tokens the worker still has to prefill: waiting tasks and running ones before their first step."""
    return sum(
        max(t.input_length - t.prefix_length, 0)
        for t in status.running_task_info
        if t.is_waiting or t.iterate_count == 0
    )


def _quiet_key(status: WorkerStatusPB) -> tuple[object, ...] | None:
    """Everything of an idle reply (no task running, waiting or newly finished) that ``reconcile_status`` reads,
    or None for a reply with tasks."""
    if status.running_task_info or status.finished_task_list:
        return None
    return (
        status.alive, status.running_query_len, status.waiting_query_len, status.available_kv_cache,
        status.total_kv_cache, status.step_latency_ms, status.iterate_count, status.latest_finished_version,
    )  # fmt: skip


def quiet_reply(track: WorkerTrack, status: WorkerStatusPB) -> bool:
    """True for a newer reply of an idle worker that says exactly what its previous one said: nothing to reconcile
    or write (its version is taken). The cheap path of polling an idle fleet; anything else goes through
    ``reconcile_status``, which arms it again."""
    key = track.quiet_key
    if key is None or status.status_version <= track.status_version or _quiet_key(status) != key:
        return False
    track.status_version = status.status_version
    return True


def reconcile_status(
    track: WorkerTrack,
    status: WorkerStatusPB,
    role: Role,
    now: float,
    hysteresis: Hysteresis,
    task_timeout_s: float,
) -> StatusUpdate | None:
    """Apply a status reply to ``track``; returns what to write, or None for a reply that is not newer."""
    restarted = status.status_version < track.status_version
    if restarted:
        track.restart()
    elif status.status_version == track.status_version:
        return None
    track.status_version = status.status_version
    track.finished_version = status.latest_finished_version
    track.iterations = status.iterate_count
    track.quiet_key = _quiet_key(status)

    live = frozenset(t.request_id for t in status.running_task_info)
    finished = {t.request_id for t in status.finished_task_list}
    reported = live | finished
    handled = [rid for rid in reported if rid not in track.seen]
    lost = sorted(track.live - live - finished)
    seen = track.seen
    for rid in reported:
        seen[rid] = now
        seen.move_to_end(rid)
    # forget ids not reported for a while, so the memory stays bounded by the worker's recent traffic: from the
    # least recently reported end, so a poll costs what it reports, not what the worker served in the last seconds
    while seen:
        rid, at = next(iter(seen.items()))
        if now - at <= task_timeout_s:
            break
        del seen[rid]
    track.live = live

    kv_total = max(status.total_kv_cache, 0)
    kv_used = max(kv_total - status.available_kv_cache, 0) if kv_total else 0
    waiting = status.waiting_query_len
    if role in _PREFILL_GATED:
        track.prefill_hold = update_hold(track.prefill_hold, waiting, hysteresis.prefill_waiting, hysteresis)
    if role in _DECODE_GATED and kv_total:
        kv_percent = 100 * kv_used / kv_total
        track.decode_hold = update_hold(track.decode_hold, kv_percent, hysteresis.decode_kv_percent, hysteresis)
    fields = {
        "alive": "1" if status.alive else "0",
        "available": "1" if track.available else "0",
        "running": str(status.running_query_len),
        "waiting": str(waiting),
        "queued_tokens": str(queued_prefill_tokens(status)),
        "kv_used": str(kv_used),
        "kv_total": str(kv_total),
        "block_size": str(track.block_size),
        "step_latency_ms": str(float(status.step_latency_ms)),
    }
    return StatusUpdate(fields=fields, handled_ids=sorted(handled), lost_ids=lost, restarted=restarted)


def cache_diff(known: Iterable[int], current: Iterable[int]) -> tuple[list[int], list[int]]:
    """(keys to add, keys to remove) that turn the set ``known`` into ``current``."""
    known_set = known if isinstance(known, (set, frozenset)) else set(known)  # a poll's sets: no copies
    current_set = current if isinstance(current, (set, frozenset)) else set(current)
    return sorted(current_set - known_set), sorted(known_set - current_set)


def next_cache_interval(interval_s: float, changed: bool, low_s: float, high_s: float) -> float:
    """Adaptive cache polling: back to the shortest interval when the key set changed, half as often each time it
    did not (a quiet worker costs little; a busy one is followed closely)."""
    return low_s if changed else min(high_s, interval_s * 2)


def cache_poll_due(track: WorkerTrack, now: float, low_s: float) -> bool:
    """Due by the adaptive interval, or early (at most every ``low_s``) when the engine ran steps since the last
    cache poll: after an idle spell the first new request's blocks must not wait for the long interval."""
    if now >= track.next_cache_at:
        return True
    return track.iterations != track.iterations_at_cache_poll and now - track.last_cache_at >= low_s
