"""One status line redrawn in place (carriage return), and whole lines below it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class Terminal:
    """``overwrite`` redraws the current line; ``line`` ends it (or writes a line of its own)."""

    write: Callable[[str], None] = _stdout
    _open: bool = False

    def overwrite(self, text: str) -> None:
        self.write("\r" + text)
        self._open = True

    def line(self, text: str = "") -> None:
        if self._open or text:
            self.write(("\r" if self._open else "") + text + "\n")
        self._open = False
