"""Which workers may take a request for a role: a filter applied before a strategy chooses."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from flexlb.domain import Role, WorkerView
from flexlb.routing.ttft import reserve_tokens


def is_eligible(view: WorkerView, role: Role, seq_len: int) -> bool:
    """Alive and available, of the role, under its concurrency limit and with room for the reservation's KV."""
    if not (view.status.alive and view.status.available) or view.spec.role != role:
        return False
    limit = view.spec.max_concurrency
    if limit and view.load >= limit:
        return False
    # kv_total 0 means unknown / unlimited: nothing to check against.
    return view.status.kv_total <= 0 or view.kv_free >= reserve_tokens(role, view, seq_len)


def eligible(
    views: Sequence[WorkerView], role: Role, seq_len: int, exclude: Collection[str] = frozenset()
) -> list[WorkerView]:
    """The views that may take a ``seq_len``-token request for ``role``, in input order, less the ``exclude``d
    worker ids."""
    return [view for view in views if view.worker_id not in exclude and is_eligible(view, role, seq_len)]
