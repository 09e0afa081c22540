"""What a workload yields: one request to send (prompt or chat messages, output length, arrival offset)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexlb.blocks import render_chat, tokenize


class WorkloadError(ValueError):
    """A workload cannot be built from its parameters (the message names the option)."""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request: exactly one of ``prompt`` (``/v1/completions``) or ``messages`` (``/v1/chat/completions``).

    ``arrival_s`` is the send time relative to the run's start (open-loop arrivals); ``depends_on`` is the index of
    an earlier request that must have finished first (the previous turn of a chat); ``tag`` names its group.
    """

    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    max_tokens: int = 16
    arrival_s: float = 0.0
    depends_on: int | None = None
    tag: str = ""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a RequestSpec has exactly one of prompt and messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def api(self) -> str:
        return "completions" if self.prompt is not None else "chat"

    def rendered(self) -> str:
        """The text a flexlb worker tokenises: the prompt, or the chat messages through ``render_chat``."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return render_chat(self.messages)

    def prompt_tokens(self) -> list[int]:
        """Token ids as flexlb's simulator and router see them (one per whitespace word)."""
        return tokenize(self.rendered())
