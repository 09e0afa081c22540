"""Tokens and block cache keys, shared by the router and the simulated worker (pure, no I/O).

The router and the simulator must compute the same keys for the same prompt, so everything here is deterministic
across processes and machines: no salted ``hash()``, no randomness.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # the constant of the reference's chained hash (and of splitmix64)
TOKEN_ID_BITS = 31  # token ids are non-negative and fit a Java int


@functools.lru_cache(maxsize=1 << 16)
def word_id(word: str) -> int:
    """Stable 31-bit id of one word (blake2b; cached because prompts repeat words a lot)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << TOKEN_ID_BITS) - 1)


def tokenize(text: str) -> list[int]:
    """Whitespace-split words mapped to stable ids: one token per word."""
    return [word_id(word) for word in text.split()]


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, null, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("content parts must be objects {'type': 'text', 'text': str}")
            texts.append(part["text"])
        return " ".join(texts)
    raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """Render chat messages with a fixed template, ending with the assistant's turn (the generation prompt).

    ``<|role|> content`` per message; raises ValueError on a message without a string role or with bad content.
    """
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role: expected a non-empty string")
        try:
            text = _content_text(message.get("content"))
        except ValueError as exc:
            raise ValueError(f"messages[{i}].content: {exc}") from None
        parts.append(f"<|{role}|> {text}")
    parts.append("<|assistant|>")
    return "\n".join(parts)


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser of ``x`` (mod 2**64): a cheap, well-mixed, reproducible uint64 hash."""
    z = (x + GOLDEN64) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def token_hash(token: int) -> int:
    """uint64 hash of one token id: splitmix64 of the id.

    RTP-LLM's own per-token hash may differ; what matters is that flexlb's router and simulator agree.
    """
    return splitmix64(token & MASK64)


def to_int64(value: int) -> int:
    """A uint64 read as a signed two's-complement int64 (Java ``long`` semantics)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def block_cache_keys(
    tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, parent: int | None = None
) -> list[int]:
    """Chained hash of every full block of ``tokens``: key i depends on blocks 0..i.

    As the reference: h = 0; for each token t of a full block, ``h ^= hash(t) + 0x9e3779b97f4a7c15 + (h << 12) +
    (h >> 32)`` in uint64 arithmetic (logical shifts, wrap-around sums); after each block h is appended as a signed
    int64 (Java ``long``). A partial last block gets no key.

    ``parent``: the key of the block before ``tokens[0]`` (the chain continues from it, as a KV event's
    ``parent_block_hash`` says); None: ``tokens`` starts the prompt.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    keys: list[int] = []
    h = 0 if parent is None else parent & MASK64  # a key is h itself, read as signed: its state is recoverable
    m, g = MASK64, GOLDEN64
    full = len(tokens) - len(tokens) % block_size
    for start in range(0, full, block_size):
        for t in tokens[start : start + block_size]:
            # token_hash(t), inlined: this loop runs once per prompt token on the request path.
            z = ((t & m) + g) & m
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
            z ^= z >> 31
            h ^= (z + g + ((h << 12) & m) + (h >> 32)) & m
        keys.append(to_int64(h))
    return keys
