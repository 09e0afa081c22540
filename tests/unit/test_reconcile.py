"""The master's reconciliation of worker replies (pure): versions, hand-over of requests, hysteresis, cache diffs."""

from __future__ import annotations

import pytest

from flexlb.domain import Role
from flexlb.master.reconcile import (
    Hysteresis,
    WorkerTrack,
    cache_diff,
    cache_poll_due,
    next_cache_interval,
    queued_prefill_tokens,
    reconcile_status,
    update_hold,
)
from flexlb.proto.flexlb_worker_pb2 import TaskInfoPB, WorkerStatusPB

H = Hysteresis(prefill_waiting=3, decode_kv_percent=90, bias_percent=15)


def status(
    version: int,
    running: list[int] = (),  # type: ignore[assignment]
    waiting: list[int] = (),  # type: ignore[assignment]
    finished: list[int] = (),  # type: ignore[assignment]
    *,
    kv_total: int = 1000,
    kv_available: int = 1000,
    alive: bool = True,
) -> WorkerStatusPB:
    tasks = [TaskInfoPB(request_id=r, input_length=100, prefix_length=40, iterate_count=3) for r in running]
    tasks += [TaskInfoPB(request_id=r, input_length=100, is_waiting=True) for r in waiting]
    return WorkerStatusPB(
        status_version=version,
        running_task_info=tasks,
        finished_task_list=[TaskInfoPB(request_id=r) for r in finished],
        running_query_len=len(running),
        waiting_query_len=len(waiting),
        total_kv_cache=kv_total,
        available_kv_cache=kv_available,
        latest_finished_version=version,
        alive=alive,
        step_latency_ms=12.5,
    )


def apply(track: WorkerTrack, reply: WorkerStatusPB, role: Role = Role.PREFILL, now: float = 0.0):
    return reconcile_status(track, reply, role, now, H, task_timeout_s=3.0)


def test_first_status_hands_over_every_reported_request_and_writes_the_counts() -> None:
    track = WorkerTrack()
    update = apply(track, status(10, running=[1, 2], waiting=[3], finished=[4], kv_available=700))
    assert update is not None
    assert update.handled_ids == [1, 2, 3, 4]
    assert update.fields["running"] == "2" and update.fields["waiting"] == "1"
    assert update.fields["kv_used"] == "300" and update.fields["kv_total"] == "1000"
    assert update.fields["queued_tokens"] == "100"  # the waiting one; running ones have started
    assert update.fields["alive"] == "1" and update.fields["available"] == "1"
    assert track.finished_version == 10


def test_a_request_is_handed_over_once_and_lost_when_it_vanishes_unfinished() -> None:
    track = WorkerTrack()
    apply(track, status(10, running=[1, 2]))
    update = apply(track, status(11, running=[2, 5], finished=[1]))
    assert update is not None
    assert update.handled_ids == [5]
    assert update.lost_ids == []
    update = apply(track, status(12, running=[5]))
    assert update is not None and update.lost_ids == [2]


def test_an_equal_status_version_is_ignored_and_a_smaller_one_is_a_restart() -> None:
    track = WorkerTrack()
    apply(track, status(10, running=[1]))
    assert apply(track, status(10, running=[1, 2])) is None
    update = apply(track, status(3, running=[1]))
    assert update is not None and update.restarted
    assert update.handled_ids == [1]  # a new process: request 1 is reported anew


def test_request_ids_are_forgotten_after_the_task_timeout() -> None:
    track = WorkerTrack()
    apply(track, status(1, finished=[7]), now=0.0)
    apply(track, status(2), now=2.0)
    assert 7 in track.seen
    apply(track, status(3), now=3.5)
    assert 7 not in track.seen


def test_an_id_still_reported_is_kept_while_older_ones_are_forgotten() -> None:
    track = WorkerTrack()
    apply(track, status(1, running=[5, 6]), now=0.0)  # 5 first: the least recently reported end
    apply(track, status(2, running=[5], finished=[8]), now=2.0)  # 5 reported again; 6 not since 0.0
    apply(track, status(3, running=[5]), now=4.0)
    assert list(track.seen) == [8, 5]  # 6 forgotten; 5 kept although it was seen first, 8 still within 3 s


@pytest.mark.parametrize(
    ("held", "level", "expected"),
    [
        (False, 2, False),
        (False, 3, True),  # at the threshold: held back
        (True, 3, True),
        (True, 2.6, True),  # above 85% of 3
        (True, 2, False),  # back below: available again
    ],
)
def test_update_hold_has_hysteresis(held: bool, level: float, expected: bool) -> None:
    assert update_hold(held, level, 3, H) is expected


def test_a_zero_threshold_disables_the_check() -> None:
    assert update_hold(True, 1000, 0, H) is False


def test_decode_kv_hysteresis_90_down_77_up() -> None:
    track = WorkerTrack()

    def kv_used(version: int, used: int) -> str:
        update = apply(track, status(version, kv_total=1000, kv_available=1000 - used), role=Role.DECODE)
        assert update is not None
        return update.fields["available"]

    assert kv_used(1, 899) == "1"
    assert kv_used(2, 900) == "0"
    assert kv_used(3, 800) == "0"  # not yet below 76.5%
    assert kv_used(4, 765) == "1"
    # prefill waiting threshold does not apply to decode
    update = apply(track, status(5, waiting=[1, 2, 3, 4]), role=Role.DECODE)
    assert update is not None and update.fields["available"] == "1"


def test_pdfusion_is_held_back_by_either_condition() -> None:
    track = WorkerTrack()
    update = apply(track, status(1, waiting=[1, 2, 3]), role=Role.PDFUSION)
    assert update is not None and update.fields["available"] == "0"
    update = apply(track, status(2, kv_available=50), role=Role.PDFUSION)
    assert update is not None and update.fields["available"] == "0"  # now the KV condition holds it
    update = apply(track, status(3), role=Role.PDFUSION)
    assert update is not None and update.fields["available"] == "1"


def test_a_worker_reporting_itself_not_alive_is_written_not_alive() -> None:
    update = apply(WorkerTrack(), status(1, alive=False))
    assert update is not None and update.fields["alive"] == "0"


def test_queued_tokens_count_uncached_prompt_of_tasks_not_started() -> None:
    reply = WorkerStatusPB(
        running_task_info=[
            TaskInfoPB(request_id=1, input_length=500, prefix_length=200, iterate_count=0),  # admitted, not run
            TaskInfoPB(request_id=2, input_length=500, prefix_length=200, iterate_count=1),  # prefilled
            TaskInfoPB(request_id=3, input_length=300, is_waiting=True),
        ]
    )
    assert queued_prefill_tokens(reply) == 300 + 300


def test_cache_diff() -> None:
    assert cache_diff({1, 2, 3}, [2, 3, 4, 5]) == ([4, 5], [1])
    assert cache_diff(set(), []) == ([], [])


def test_cache_interval_adapts_within_bounds() -> None:
    assert next_cache_interval(3.0, True, 0.05, 3.0) == 0.05  # a change: back to the shortest interval at once
    assert next_cache_interval(2.0, False, 0.05, 3.0) == 3.0
    assert next_cache_interval(0.05, False, 0.05, 3.0) == 0.1


def test_a_cache_poll_is_due_early_when_the_engine_ran_steps_after_an_idle_spell() -> None:
    track = WorkerTrack(cache_interval_s=3.0, next_cache_at=103.0, last_cache_at=100.0)
    track.iterations = track.iterations_at_cache_poll = 500
    assert not cache_poll_due(track, 101.0, 0.05)  # idle: wait for the long interval
    apply(track, WorkerStatusPB(status_version=7, iterate_count=501))
    assert track.iterations == 501
    assert cache_poll_due(track, 101.0, 0.05)  # a step ran: its blocks may be new
    track.last_cache_at = 101.0
    assert not cache_poll_due(track, 101.01, 0.05)  # but never more often than the shortest interval
    assert cache_poll_due(track, 103.0, 0.05)
