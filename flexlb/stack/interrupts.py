"""SIGINT and SIGTERM for a command that must stop its children before it exits.

Both raise KeyboardInterrupt where the program is, as Ctrl-C does, and also set a flag: an exception raised inside
code that swallows it (a ``__del__``, a logging lock, a callback) is not lost, because every ``check()`` after it
raises again. Inside an event loop the loop's own handler only sets the flag and calls back (no exception crosses
the loop), and the process-wide handler is put back when the loop is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._raise)

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came (again, if its first one was swallowed)."""
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    def on_loop(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """While ``loop`` runs: a signal sets the flag and calls ``callback`` (e.g. sets a stop event)."""
        for sig in SIGNALS:

            def handle(sig: int = sig) -> None:
                self.signum = sig
                callback()

            loop.add_signal_handler(sig, handle)

    def off_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remove ``on_loop``'s handlers and put this object's process-wide handler back."""
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, self._raise)

    def ignore(self) -> None:
        """No signal interrupts what follows (the clean-up)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt where the program is, as Ctrl-C does, so the ``finally`` blocks of a
    command stop what it started (a benchmark's processes); the previous handler is back afterwards."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
