"""What a scheduled request becomes: the worker(s) it goes to, the body they get, the block size its keys are cut
at (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE, Choice, Role
from flexlb.proxy.errors import ProxyError
from flexlb.proxy.parse import ProxiedRequest, Route
from flexlb.proxy.upstream import Target
from flexlb.state.store import FleetSnapshot


def plan(choices: Mapping[Role, Choice]) -> tuple[Target, Target | None]:
    """The worker whose answer the client gets, and the prefill worker it depends on (disaggregated)."""
    if Role.PREFILL in choices and Role.DECODE in choices:
        decode, prefill = choices[Role.DECODE].worker.spec, choices[Role.PREFILL].worker.spec
        return Target(Role.DECODE, decode), Target(Role.PREFILL, prefill)
    for role in (Role.PDFUSION, Role.DECODE, Role.PREFILL):
        if role in choices:
            return Target(role, choices[role].worker.spec), None
    raise ProxyError(503, "no text-generating worker (PDFUSION, DECODE or PREFILL) was chosen", code="no_worker")


def forward_body(parsed: ProxiedRequest, request_id: int, served_model_name: str) -> dict[str, Any]:
    """The client's body with this request's id (reported in the worker's status) and the workers' model name."""
    body = {**parsed.body, "request_id": request_id}
    if served_model_name and parsed.route is not Route.GENERATE:  # SGLang's /generate has no model field
        body["model"] = served_model_name
    return body


def fleet_block_size(snapshot: FleetSnapshot | None) -> int:
    """Tokens per KV block the workers reported (the most common size), else the default: the keys must be cut
    as the workers cut their cache."""
    if snapshot is None:
        return DEFAULT_BLOCK_SIZE
    sizes = Counter(v.status.block_size for views in snapshot.views.values() for v in views)
    return sizes.most_common(1)[0][0] if sizes else DEFAULT_BLOCK_SIZE
