"""Dynamic capacity (queue mode): how many requests this router lets into scheduling at once follows the fleet's
water level, as the original's admission permits do (FLEXLB_REFERENCE.md, "Queue mode and capacity").

Water level per role, 0 (idle) to 100 (full): decode from the KV cache in use (0 at or below
``decodeFullSpeedThreshold`` %, 100 at or above ``decodeStopThreshold`` %, linear between); prefill from the waiting
tasks per worker (100 at ``maxPrefillQueueSize``). Permits move toward ``max - (max - min) x level / 100`` of the
fullest role by at most a tenth of the range per update, so one noisy status does not swing admission. Pure logic:
the queue feeds it the scheduler's latest snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flexlb.domain import Role, WorkerView

_DECODE_ROLES = (Role.DECODE, Role.PDFUSION)
_PREFILL_ROLES = (Role.PREFILL, Role.PDFUSION)


@dataclass(frozen=True, slots=True)
class AdmissionOptions:
    min_permits: int = 1  # at least this many requests always get in: the queue never stalls
    max_permits: int = 1024
    decode_full_speed_percent: float = 40.0
    decode_stop_percent: float = 80.0
    max_prefill_queue: float = 20.0

    @property
    def max_step(self) -> int:
        return max(1, (self.max_permits - self.min_permits) // 10)


def decode_level(views: Sequence[WorkerView], options: AdmissionOptions) -> float | None:
    """0-100 from the KV in use (reported + reserved) over the usable decode workers; None without KV numbers."""
    used = total = 0
    for v in views:
        if v.status.alive and v.status.kv_total > 0:
            used += v.status.kv_used + v.pending_tokens
            total += v.status.kv_total
    if not total:
        return None
    percent = 100 * used / total
    low, high = options.decode_full_speed_percent, options.decode_stop_percent
    return min(100.0, max(0.0, 100 * (percent - low) / (high - low)))


def prefill_level(views: Sequence[WorkerView], options: AdmissionOptions) -> float | None:
    """0-100 from the tasks waiting per alive prefill worker; None without alive workers."""
    alive = [v for v in views if v.status.alive]
    if not alive:
        return None
    waiting = sum(v.status.waiting + v.pending_count for v in alive) / len(alive)
    return min(100.0, 100 * waiting / options.max_prefill_queue)


def water_levels(views: Mapping[Role, Sequence[WorkerView]], options: AdmissionOptions) -> dict[str, float]:
    """The water level of each kind of capacity that has workers (``decode``, ``prefill``)."""
    levels: dict[str, float] = {}
    decode = [v for r in _DECODE_ROLES for v in views.get(r, ())]
    prefill = [v for r in _PREFILL_ROLES for v in views.get(r, ())]
    if (level := decode_level(decode, options)) is not None:
        levels["decode"] = level
    if (level := prefill_level(prefill, options)) is not None:
        levels["prefill"] = level
    return levels


def target_permits(levels: Iterable[float], options: AdmissionOptions) -> int:
    level = max(levels, default=0.0)
    span = options.max_permits - options.min_permits
    return options.max_permits - round(span * level / 100)


class AdmissionControl:
    """The current permits, moved one bounded step per update toward the target of the fleet's water level."""

    def __init__(self, options: AdmissionOptions) -> None:
        self.options = options
        self.permits = options.max_permits
        self.levels: dict[str, float] = {}

    def update(self, views: Mapping[Role, Sequence[WorkerView]]) -> int:
        self.levels = water_levels(views, self.options)
        target = target_permits(self.levels.values(), self.options)
        step = self.options.max_step
        self.permits += max(-step, min(step, target - self.permits))
        return self.permits

    def admits(self, in_flight: int) -> bool:
        return in_flight < self.permits
