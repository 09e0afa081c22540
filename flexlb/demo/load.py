"""Moved to flexlb.bench.closed_loop (this name goes in the next commit)."""

from flexlb.bench.closed_loop import LoadOutcome, LoadProgress, closed_loop  # noqa: F401
