"""process_cpu_seconds: a process's CPU time finer than the kernel's 10 ms clock ticks where Linux has it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from flexlb.stack.processes import process_cpu_seconds


def test_a_few_milliseconds_of_cpu_are_measured_below_one_clock_tick() -> None:
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/sched").exists():
        pytest.skip("no per-thread scheduler runtimes here: only clock ticks")
    before = process_cpu_seconds(os.getpid())
    spent = time.thread_time()
    while time.thread_time() - spent < 0.003:  # 3 ms of this thread's CPU, not of the wall clock
        pass
    after = process_cpu_seconds(os.getpid())
    assert before is not None and after is not None
    assert 0.003 <= after - before < 0.01  # clock ticks would say 0 or 0.01


def test_a_process_that_is_gone_has_no_figure() -> None:
    assert process_cpu_seconds(2**22 + 12_345) is None  # above Linux's pid_max
