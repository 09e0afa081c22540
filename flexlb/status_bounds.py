"""Worker status given by hand (``POST /rtp_llm/workers[/<id>/status]``, ``flexlb worker add|update``): each field
checked against its type and a sane bound before anything is stored, so one request cannot park absurd numbers in
the fleet's state (``running = 2**70``, ``kv_used = 1e30``, ``prefill_tokens_per_ms = inf`` pulled every request to
one worker). The one place both the admin API and the CLI validate status; the stored form is
``flexlb.state.codec.parse_status_value``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from flexlb.state.codec import STATUS_FIELDS, parse_status_value

MAX_TASKS: Final = (1 << 31) - 1  # int32 on RTP-LLM's wire (waiting_query_len, running_query_len)
MAX_TOKENS: Final = 1 << 40  # a trillion tokens of KV: far beyond any engine's cache
MAX_BLOCK_SIZE: Final = 1 << 16
MAX_RATE_TOKENS_PER_MS: Final = 1e5  # 100 M prompt tokens a second on one engine: more is a bad measurement
MAX_LATENCY_MS: Final = 3_600_000.0  # an hour per engine step


@dataclass(frozen=True, slots=True)
class Bound:
    kind: type  # bool, int or float
    low: float = 0
    high: float = 0
    zero_ok: bool = True  # floats: 0 accepted below ``low`` ("not measured yet")

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is int:
            return f"an integer from {int(self.low)} to {int(self.high)}"
        zero = "0 (not measured) or " if self.zero_ok and self.low > 0 else ""
        return f"{zero}a finite number from {self.low:g} to {self.high:g}"


BOUNDS: Final[Mapping[str, Bound]] = {
    "alive": Bound(bool),
    "available": Bound(bool),
    "running": Bound(int, 0, MAX_TASKS),
    "waiting": Bound(int, 0, MAX_TASKS),
    "queued_tokens": Bound(int, 0, MAX_TOKENS),
    "kv_used": Bound(int, 0, MAX_TOKENS),
    "kv_total": Bound(int, 0, MAX_TOKENS),
    "block_size": Bound(int, 1, MAX_BLOCK_SIZE),
    "step_latency_ms": Bound(float, 0, MAX_LATENCY_MS),
    "prefill_tokens_per_ms": Bound(float, 1e-3, MAX_RATE_TOKENS_PER_MS),
}

_TEXT_TRUE, _TEXT_FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


def _from_text(name: str, bound: Bound, text: str) -> bool | int | float:
    """A value typed on the command line, as the JSON value it stands for."""
    low = text.strip().lower()
    if bound.kind is bool:
        if low in _TEXT_TRUE | _TEXT_FALSE:
            return low in _TEXT_TRUE
        raise ValueError(f"{name}: expected {bound.describe()}, got {text!r}")
    try:
        return int(low) if bound.kind is int else float(low)
    except ValueError:
        raise ValueError(f"{name}: expected {bound.describe()}, got {text!r}") from None


def check_status_value(name: str, value: object) -> str:
    """``value`` (a JSON value) checked against ``name``'s type and bound; its stored form, or ValueError naming
    the field and the bound."""
    bound = BOUNDS.get(name)
    if bound is None:
        raise ValueError(f"unknown status field {name!r}; known: {', '.join(STATUS_FIELDS)}")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if bound.kind is bool:
        if not isinstance(value, bool):  # strict: 1, "yes" and "true" are not JSON booleans
            raise ValueError(f"{name}: expected {bound.describe()}, got {shown}")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected {bound.describe()}, got {shown}")
    elif bound.kind is int and not isinstance(value, int):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name}: expected {bound.describe()}, got {shown}")
        value = int(value)
    if bound.kind is not bool:
        assert isinstance(value, int | float)
        zero = bound.kind is float and bound.zero_ok and value == 0
        if not zero and not (math.isfinite(value) and bound.low <= value <= bound.high):
            raise ValueError(f"{name}: {shown} is out of bounds: expected {bound.describe()}")
    return parse_status_value(name, str(int(value) if isinstance(value, bool) else value))


def check_status(changes: Mapping[str, object]) -> dict[str, str]:
    """Every field of ``changes`` checked (the first bad one raises); their stored forms."""
    return {name: check_status_value(name, value) for name, value in changes.items()}


def check_status_text(name: str, text: str) -> str:
    """A ``field=value`` of the CLI, checked as the admin API checks JSON."""
    bound = BOUNDS.get(name)
    if bound is None:
        return check_status_value(name, text)  # raises: unknown field
    return check_status_value(name, _from_text(name, bound, text))
