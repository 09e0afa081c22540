"""Prompt tokenisation as the engine does it, for the proxy's ``seq_len`` and block cache keys.

Three tokenisers behind one interface (``PromptTokenizer``): a Hugging Face ``tokenizer.json`` with the model's chat
template (``hf``), the engine's own ``POST /tokenize`` with an LRU cache (``engine``), and the simulator's whitespace
tokeniser (``base``); ``select.tokenizer_for`` picks one from the settings.
"""

from flexlb.tokenize.base import (
    ChatPrompt,
    Prompt,
    PromptTokenizer,
    TextPrompt,
    TokenizerError,
    TokenPrompt,
    WhitespaceTokenizer,
    check_messages,
)

__all__ = [
    "ChatPrompt",
    "Prompt",
    "PromptTokenizer",
    "TextPrompt",
    "TokenPrompt",
    "TokenizerError",
    "WhitespaceTokenizer",
    "check_messages",
]
