"""The simulated worker's tokeniser: flexlb's whitespace tokeniser, or with ``--tokenizer PATH`` a Hugging Face
tokenizer and chat template (``flexlb.tokenize.hf``), so the simulator tokenises as a real engine serving that model
would: its ``/tokenize``, its cache's block keys and its KV events then carry that model's token ids.

A process-wide setting, not a parameter threaded through every parser: one simulator process serves one model (with
``--count N``, N workers of the same model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flexlb.blocks import render_chat, tokenize
from flexlb.tokenize.base import ChatPrompt, TextPrompt
from flexlb.tokenize.hf import HfTokenizer

_model: HfTokenizer | None = None


def use_tokenizer(path: str | None) -> None:
    """Tokenise with the tokenizer at ``path`` from now on (None: by whitespace); TokenizerError when missing."""
    global _model
    _model = HfTokenizer.load(path) if path else None


def text_tokens(text: str) -> list[int]:
    return tokenize(text) if _model is None else _model.encode(TextPrompt(text))


def chat_tokens(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The chat's tokens (the messages are checked by ``render_chat`` first: ValueError naming a bad one)."""
    rendered = render_chat(messages)
    return tokenize(rendered) if _model is None else _model.encode(ChatPrompt(tuple(messages)))


def token_strs_available() -> bool:
    """Whether ``token_strs`` can be the prompt's whitespace words (only with the whitespace tokeniser)."""
    return _model is None
