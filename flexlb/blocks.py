"""Tokens and block cache keys, shared by the router and the simulated worker (pure, no I/O).

The router and the simulator must compute the same keys for the same prompt, so everything here is deterministic
across processes and machines: no salted ``hash()``, no randomness.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # the constant of the reference's chained hash (and of splitmix64)
TOKEN_ID_BITS = 31  # token ids are non-negative and fit a Java int


_WORD_IDS: dict[str, int] = {}  # word -> word_id(word): prompts repeat words a lot
_WORD_IDS_MAX = 1 << 18  # entries, then it starts again


def word_id(word: str) -> int:
    """Stable 31-bit id of one word (blake2b)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << TOKEN_ID_BITS) - 1)


def tokenize(text: str) -> list[int]:
    """Whitespace-split words mapped to stable ids: one token per word."""
    return _remembered(_WORD_IDS, text.split(), word_id, _WORD_IDS_MAX)


def _remembered(memo: dict[Any, int], keys: Sequence[Any], compute: Callable[[Any], int], limit: int) -> list[int]:
    """``compute(k)`` of each of ``keys``, from ``memo`` where it holds them (plain dict lookups, all at once: ~3x
    faster than a call per key); the missing ones are computed and kept, and past ``limit`` entries it starts again."""
    try:
        return list(map(memo.__getitem__, keys))
    except KeyError:
        if len(memo) >= limit:
            memo.clear()
        return [memo[k] if k in memo else memo.setdefault(k, compute(k)) for k in keys]


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


def _token_mix(token: int) -> int:
    """What the chain adds for one token before its shifts: its hash plus the golden constant, mod 2**64."""
    return (token_hash(token) + GOLDEN64) & MASK64


def to_int64(value: int) -> int:
    """A uint64 read as a signed two's-complement int64 (Java ``long`` semantics)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# What the request path's hashing remembers (one process, no threads): prompts repeat tokens, and long prefixes
# (system prompts, conversations, documents) whole blocks of them.
_TOKEN_MIX: dict[int, int] = {}  # token id -> splitmix64(id) + GOLDEN64, mod 2**64
_TOKEN_MIX_MAX = 1 << 18  # entries, then it starts again (a real vocabulary fits; whitespace "ids" need not)
_BLOCK_MEMO: dict[tuple[int, bytes], int] = {}  # (chain state, the block's ids as int64 bytes) -> the state after
_BLOCK_MEMO_MAX = 1 << 14  # blocks (~5 MB of 64-token blocks), the oldest forgotten first


def block_cache_keys(
    tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, parent: int | None = None
) -> list[int]:
    """Chained hash of every full block of ``tokens``: key i depends on blocks 0..i.

    As the reference: h = 0; for each token t of a full block, ``h ^= hash(t) + 0x9e3779b97f4a7c15 + (h << 12) +
    (h >> 32)`` in uint64 arithmetic (logical shifts, wrap-around sums); after each block h is appended as a signed
    int64 (Java ``long``). A partial last block gets no key.

    ``parent``: the key of the block before ``tokens[0]`` (the chain continues from it, as a KV event's
    ``parent_block_hash`` says); None: ``tokens`` starts the prompt.

    A block already hashed after the same chain state is not hashed again (``_BLOCK_MEMO``: a 2,048-token prefix
    seen before costs ~50 us instead of ~1.7 ms here), nor a token id (``_TOKEN_MIX``).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    keys: list[int] = []
    h = 0 if parent is None else parent & MASK64  # a key is h itself, read as signed: its state is recoverable
    full = len(tokens) - len(tokens) % block_size
    try:
        packed: bytes | None = array("q", tokens[:full]).tobytes()
    except (OverflowError, TypeError):  # ids beyond int64 (or not ints): hashed, not remembered
        packed = None
    memo, width = _BLOCK_MEMO, 8 * block_size
    for start in range(0, full, block_size):
        seen = None
        if packed is not None:
            seen = (h, packed[start * 8 : start * 8 + width])
            after = memo.get(seen)
            if after is not None:
                h = after
                keys.append(to_int64(h))
                continue
        h = _chain(h, tokens[start : start + block_size])
        if seen is not None:
            if len(memo) >= _BLOCK_MEMO_MAX:
                del memo[next(iter(memo))]
            memo[seen] = h
        keys.append(to_int64(h))
    return keys


def _chain(h: int, block: Sequence[int]) -> int:
    """The chain state ``h`` after the tokens of one block."""
    m = MASK64
    for z in _remembered(_TOKEN_MIX, block, _token_mix, _TOKEN_MIX_MAX):  # looked up apart from the chain: ~1.7x
        # one mask for the sum: (h << 12) wraps mod 2**64 in the reference, and so does the sum it is part of
        h = h ^ ((z + (h << 12) + (h >> 32)) & m)
    return h
