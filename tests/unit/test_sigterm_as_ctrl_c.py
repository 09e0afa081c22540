"""flexlb.stack.interrupts.sigterm_as_ctrl_c: a benchmark's SIGTERM takes the Ctrl-C path, only while inside."""

from __future__ import annotations

import os
import signal

import pytest

from flexlb.stack.interrupts import sigterm_as_ctrl_c


def test_sigterm_raises_keyboard_interrupt_inside_and_the_handler_is_back_after() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt, match="signal 15"), sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # outside: the handler that was there before
    finally:
        signal.signal(signal.SIGTERM, previous)
