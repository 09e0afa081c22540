"""TTFT estimate (milliseconds) and reservation sizes."""

from __future__ import annotations

import pytest

from flexlb.domain import Role, WorkerSpec, WorkerStatus, WorkerView
from flexlb.routing import TtftModel, estimate_ttft_ms, reserve_tokens

MODEL = TtftModel(default_prefill_tokens_per_ms=10.0, overhead_ms=5.0)


def view(
    *,
    hit_blocks: int = 0,
    queued_tokens: int = 0,
    waiting: int = 0,
    pending_count: int = 0,
    pending_tokens: int = 0,
    rate: float = 0.0,
    role: Role = Role.PREFILL,
) -> WorkerView:
    status = WorkerStatus(queued_tokens=queued_tokens, waiting=waiting, block_size=64, prefill_tokens_per_ms=rate)
    return WorkerView(
        spec=WorkerSpec(ip="10.0.0.1", http_port=8000, role=role),
        status=status,
        pending_count=pending_count,
        pending_tokens=pending_tokens,
        hit_blocks=hit_blocks,
    )


def test_worked_example() -> None:
    # r = 10 tokens/ms (unmeasured -> default), overhead 5 ms, seq_len 2000, hit 16 blocks x 64 = 1024 tokens.
    # queue = (queued 500 + pending 300) / 10 + (waiting 1 + pending_count 1) * 5 = 80 + 10 = 90 ms
    # own   = 5 + (2000 - 1024) / 10 = 5 + 97.6                                  = 102.6 ms
    # total = 90 + 102.6                                                          = 192.6 ms
    v = view(hit_blocks=16, queued_tokens=500, waiting=1, pending_count=1, pending_tokens=300)
    assert v.hit_tokens == 1024
    assert estimate_ttft_ms(v, 2000, MODEL) == pytest.approx(192.6)


def test_measured_rate_overrides_default() -> None:
    # Same worker measured at 20 tokens/ms: queue = 800 / 20 + 2 * 5 = 50; own = 5 + 976 / 20 = 53.8; total 103.8.
    v = view(hit_blocks=16, queued_tokens=500, waiting=1, pending_count=1, pending_tokens=300, rate=20.0)
    assert estimate_ttft_ms(v, 2000, MODEL) == pytest.approx(103.8)


def test_idle_cold_worker() -> None:
    # Only the request itself: 5 + 2000 / 10.
    assert estimate_ttft_ms(view(), 2000, MODEL) == pytest.approx(205.0)


def test_cache_hit_lowers_estimate() -> None:
    cold = estimate_ttft_ms(view(), 2000, MODEL)
    warm = estimate_ttft_ms(view(hit_blocks=16), 2000, MODEL)
    assert cold - warm == pytest.approx(1024 / 10)


def test_hit_is_clamped_to_seq_len_and_one_token_is_always_computed() -> None:
    # 40 blocks = 2560 tokens cached for a 2000-token prompt: own = 5 + max(2000 - 2000, 1) / 10 = 5.1.
    assert estimate_ttft_ms(view(hit_blocks=40), 2000, MODEL) == pytest.approx(5.1)


def test_pending_reservations_count_as_queue() -> None:
    base = estimate_ttft_ms(view(), 1000, MODEL)
    # 2 pending requests of 1000 tokens in total: + 1000 / 10 + 2 * 5 = 110 ms.
    assert estimate_ttft_ms(view(pending_count=2, pending_tokens=1000), 1000, MODEL) - base == pytest.approx(110.0)


def test_model_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="default_prefill_tokens_per_ms"):
        TtftModel(default_prefill_tokens_per_ms=0.0)


@pytest.mark.parametrize(
    ("role", "hit_blocks", "expected"),
    [
        (Role.PREFILL, 16, 2000 - 1024),
        (Role.PDFUSION, 16, 2000 - 1024),
        (Role.PREFILL, 40, 0),  # hit beyond the prompt: nothing new to hold
        (Role.DECODE, 16, 2000),
        (Role.VIT, 16, 2000),
    ],
)
def test_reserve_tokens(role: Role, hit_blocks: int, expected: int) -> None:
    assert reserve_tokens(role, view(hit_blocks=hit_blocks, role=role), 2000) == expected
