"""Dynamic capacity: water levels from worker views, target permits, bounded steps."""

from __future__ import annotations

import pytest

from flexlb.admission import (
    AdmissionControl,
    AdmissionOptions,
    decode_level,
    prefill_level,
    target_permits,
    water_levels,
)
from flexlb.domain import Role, WorkerSpec, WorkerStatus, WorkerView

OPTIONS = AdmissionOptions(min_permits=4, max_permits=104, max_prefill_queue=20)


def view(role: Role, *, kv_used: int = 0, kv_total: int = 1000, waiting: int = 0, pending_tokens: int = 0,
         pending_count: int = 0, alive: bool = True) -> WorkerView:  # fmt: skip
    return WorkerView(
        spec=WorkerSpec("10.0.0.1", 8000, role),
        status=WorkerStatus(alive=alive, kv_used=kv_used, kv_total=kv_total, waiting=waiting),
        pending_tokens=pending_tokens,
        pending_count=pending_count,
    )


@pytest.mark.parametrize(
    ("used", "level"), [(0, 0.0), (400, 0.0), (600, 50.0), (800, 100.0), (1000, 100.0)]
)  # 40 % full speed, 80 % stop
def test_decode_level_is_linear_between_the_thresholds(used: int, level: float) -> None:
    assert decode_level([view(Role.DECODE, kv_used=used)], OPTIONS) == pytest.approx(level)


def test_decode_level_counts_reservations_and_skips_dead_or_unknown_workers() -> None:
    views = [
        view(Role.DECODE, kv_used=300, pending_tokens=300),  # 60 %
        view(Role.DECODE, kv_used=1000, alive=False),
        view(Role.DECODE, kv_total=0),
    ]
    assert decode_level(views, OPTIONS) == pytest.approx(50.0)
    assert decode_level([view(Role.DECODE, kv_total=0)], OPTIONS) is None


def test_prefill_level_is_waiting_per_worker_over_the_queue_size() -> None:
    views = [view(Role.PREFILL, waiting=4, pending_count=1), view(Role.PREFILL, waiting=5)]
    assert prefill_level(views, OPTIONS) == pytest.approx(100 * 5 / 20)
    assert prefill_level([view(Role.PREFILL, waiting=100)], OPTIONS) == 100.0


def test_pdfusion_counts_as_both_kinds_and_the_fullest_sets_the_target() -> None:
    levels = water_levels({Role.PDFUSION: [view(Role.PDFUSION, kv_used=600, waiting=2)]}, OPTIONS)
    assert levels == pytest.approx({"decode": 50.0, "prefill": 10.0})
    assert target_permits(levels.values(), OPTIONS) == 104 - 50
    assert target_permits([], OPTIONS) == 104


def test_permits_move_toward_the_target_one_bounded_step_at_a_time() -> None:
    control = AdmissionControl(OPTIONS)
    full = {Role.DECODE: [view(Role.DECODE, kv_used=900)]}
    seen = [control.update(full) for _ in range(12)]
    assert seen[0] == 104 - 10  # a tenth of the range per update
    assert seen[-1] == 4 and min(seen) == 4
    assert control.admits(3) and not control.admits(4)
    idle = {Role.DECODE: [view(Role.DECODE, kv_used=0)]}
    assert control.update(idle) == 14
