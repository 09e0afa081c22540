"""What a scheduled request becomes: the worker(s) it goes to and the body they get (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexlb.domain import Choice, Role
from flexlb.proxy.errors import ProxyError
from flexlb.proxy.parse import ProxiedRequest, Route
from flexlb.proxy.upstream import Target


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
