"""Moved to flexlb.stack.local (this name goes in the next commit)."""

from flexlb.stack.local import FLEXLB, Service, Stack, StackError, clean_environment  # noqa: F401
