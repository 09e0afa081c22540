"""Moved to flexlb.stack.terminal (this name goes in the next commit)."""

from flexlb.stack.terminal import Terminal  # noqa: F401
