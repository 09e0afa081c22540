"""What a prompt is (chat messages, text or token ids), the tokeniser interface, and the simulator's tokeniser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flexlb.blocks import render_chat, tokenize


class TokenizerError(Exception):
    """A tokeniser that cannot be loaded (a start-up error), or a prompt it cannot tokenise (the request's error)."""


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """``/v1/chat/completions`` messages, checked by ``check_messages``; rendered by the tokeniser's chat template."""

    messages: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """A completion prompt or SGLang ``text``: tokenised as the engine does (with its special tokens)."""

    text: str


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    """Token ids the client gave: used as they are."""

    ids: tuple[int, ...]


Prompt = ChatPrompt | TextPrompt | TokenPrompt


class PromptTokenizer(Protocol):
    """Token ids of a prompt, as the engine serving it computes them."""

    @property
    def kind(self) -> str:
        """What it is, for logs and errors: ``whitespace``, ``hf:<path>``, ``engine``."""
        ...

    async def tokens(self, prompt: Prompt) -> list[int]:
        """Raises TokenizerError when the prompt cannot be tokenised (a 400 for its request)."""
        ...

    async def close(self) -> None: ...


def content_text(content: Any, sep: str) -> str:
    """OpenAI message content (a string, null or text parts) as one string, parts joined by ``sep``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return sep.join(part["text"] for part in content)


def check_messages(messages: Sequence[Any]) -> tuple[Mapping[str, Any], ...]:
    """Check chat messages as every tokeniser needs them (objects with a role and text content); ValueError naming
    the message and field otherwise. ``render_chat`` holds the checks, so all tokenisers refuse the same requests."""
    render_chat(messages)
    return tuple(messages)


class WhitespaceTokenizer:
    """The simulator's tokeniser (``flexlb.blocks``): one stable id per whitespace-separated word, flexlb's own chat
    template. Right only for ``flexlb sim-worker`` (and RTP-LLM fleets that send token ids)."""

    kind = "whitespace"

    async def tokens(self, prompt: Prompt) -> list[int]:
        return whitespace_tokens(prompt)

    async def close(self) -> None:
        return None


def whitespace_tokens(prompt: Prompt) -> list[int]:
    if isinstance(prompt, TokenPrompt):
        return list(prompt.ids)
    if isinstance(prompt, TextPrompt):
        return tokenize(prompt.text)
    return tokenize(render_chat(prompt.messages))
