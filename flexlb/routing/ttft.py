"""Time-to-first-token estimate in milliseconds, and the tokens a reservation holds.

For a request of ``seq_len`` tokens on one worker, with ``r`` the worker's measured prefill rate in tokens/ms (or the
model's default while it is unmeasured)::

    queue_ms = (queued_tokens + pending_tokens) / r + (waiting + pending_count) * overhead_ms
    own_ms   = overhead_ms + max(seq_len - hit_tokens, 1) / r
    estimate = queue_ms + own_ms

Why each term:

- ``queued_tokens / r``: prompt tokens the worker still has to prefill, including the remaining prefill of running
  tasks, so running work needs no term of its own.
- ``pending_tokens / r``: reservations this fleet has sent since the worker's last status sample; the worker has not
  reported them yet but will have to prefill them before (or alongside) this request.
- ``(waiting + pending_count) * overhead_ms``: every request ahead of this one pays a fixed scheduling / launch cost
  that the token rate does not capture.
- ``own_ms``: this request's own overhead plus the tokens it must compute; cached prefix tokens are not recomputed,
  and at least one token always is (the last one produces the first output token).

The original FlexLB estimated in token units (``seq_len - 0.7 * hit``); milliseconds let workers of different speeds
be compared and the estimate be reported as ``prefill_time``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlb.domain import Role, WorkerView


@dataclass(frozen=True, slots=True)
class TtftModel:
    """Parameters of the TTFT estimate."""

    default_prefill_tokens_per_ms: float = 10.0  # used while a worker's rate is unmeasured
    overhead_ms: float = 5.0  # per-request overhead

    def __post_init__(self) -> None:
        if not self.default_prefill_tokens_per_ms > 0:
            raise ValueError(f"default_prefill_tokens_per_ms must be > 0, got {self.default_prefill_tokens_per_ms}")
        if not self.overhead_ms >= 0:
            raise ValueError(f"overhead_ms must be >= 0, got {self.overhead_ms}")


def prefill_rate(view: WorkerView, model: TtftModel) -> float:
    """The worker's measured prefill rate in tokens/ms, or the model's default while unmeasured."""
    measured = view.status.prefill_tokens_per_ms
    return measured if measured > 0 else model.default_prefill_tokens_per_ms


def estimate_ttft_ms(view: WorkerView, seq_len: int, model: TtftModel) -> float:
    """Estimated time to first token of a ``seq_len``-token request on this worker (see the module docstring)."""
    rate = prefill_rate(view, model)
    status = view.status
    queue_ms = (status.queued_tokens + view.pending_tokens) / rate + (
        status.waiting + view.pending_count
    ) * model.overhead_ms
    # max() also clamps a cached prefix longer than the prompt: at least the last token is computed.
    own_ms = model.overhead_ms + max(seq_len - view.hit_tokens, 1) / rate
    return queue_ms + own_ms


def reserve_tokens(role: Role, view: WorkerView, seq_len: int) -> int:
    """KV tokens a reservation of this request holds on the worker.

    Prefill-type workers reuse the cached prefix, so only the uncached part needs new KV (and compute); decode and
    vision workers receive or build the whole sequence.
    """
    if role in (Role.PREFILL, Role.PDFUSION):
        return max(seq_len - view.hit_tokens, 0)
    return seq_len
