"""Multi-turn chat: sessions whose every turn resends the whole conversation so far plus one new question.

The assistant's earlier answers are synthetic words (the workload is generated before anything is sent), so turn
k + 1's rendered prompt starts with turn k's rendered prompt. Requests are ordered turn by turn over all sessions,
and each turn depends on the session's previous one: the runner sends it only once that one finished.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from flexlb.bench.workloads.spec import RequestSpec, WorkloadError
from flexlb.bench.workloads.text import random_words

OPTION_PREFIX = "mt-"


@dataclass(frozen=True, slots=True)
class MultiTurnParams:
    sessions: int = field(default=16, metadata={"help": "conversations"})
    turns: int = field(default=4, metadata={"help": "user turns per conversation"})
    system_prompt_len: int = field(
        default=0, metadata={"help": "tokens of one system prompt shared by every session (0: none)"}
    )
    first_len: int = field(default=256, metadata={"help": "tokens of a session's first user message"})
    question_len: int = field(default=64, metadata={"help": "tokens of each later user message"})
    output_len: int = field(default=64, metadata={"help": "max_tokens, and the length of the synthetic answers"})


def generate(params: MultiTurnParams, rng: random.Random) -> list[RequestSpec]:
    """``sessions * turns`` chat requests, turn 0 of every session first; tag ``s<session>t<turn>``."""
    for name in ("sessions", "turns", "first_len", "question_len", "output_len"):
        if getattr(params, name) < 1:
            raise WorkloadError(f"--{OPTION_PREFIX}{name.replace('_', '-')} must be at least 1")
    if params.system_prompt_len < 0:
        raise WorkloadError(f"--{OPTION_PREFIX}system-prompt-len must not be negative")
    system = random_words(rng, params.system_prompt_len)
    histories: list[list[dict[str, Any]]] = [
        [{"role": "system", "content": system}] if system else [] for _ in range(params.sessions)
    ]
    specs: list[RequestSpec] = []
    last: list[int | None] = [None] * params.sessions
    for turn in range(params.turns):
        for s, history in enumerate(histories):
            length = params.first_len if turn == 0 else params.question_len
            history.append({"role": "user", "content": random_words(rng, length)})
            spec = RequestSpec(
                messages=tuple(dict(m) for m in history),
                max_tokens=params.output_len,
                depends_on=last[s],
                tag=f"s{s}t{turn}",
            )
            last[s] = len(specs)
            specs.append(spec)
            history.append({"role": "assistant", "content": random_words(rng, params.output_len)})
    return specs
