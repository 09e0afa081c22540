"""Moved to flexlb.stack.processes (this name goes in the next commit)."""

from flexlb.stack.processes import NotReady, stop_process, wait_http_ready  # noqa: F401
