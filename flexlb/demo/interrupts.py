"""Moved to flexlb.stack.interrupts (this name goes in the next commit)."""

from flexlb.stack.interrupts import Interrupts  # noqa: F401
