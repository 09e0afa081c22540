"""Moved to flexlb.stack.processes (this name goes in the next commit)."""

from flexlb.stack.processes import STOP_GRACE_S, Child, spawn, stop_all  # noqa: F401
