"""Block cache keys and tokenisation: the reference's chained hash, exactly, and stable across processes."""

from __future__ import annotations

import random

import pytest

from flexlb.blocks import block_cache_keys, render_chat, splitmix64, to_int64, token_hash, tokenize, word_id

M = (1 << 64) - 1


def test_splitmix64_matches_the_published_sequence() -> None:
    # splitmix64 seeded with 0 first returns 0xe220a8397b1dcdaf (Vigna's reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert token_hash(0) == splitmix64(0)


def test_chained_hash_worked_example() -> None:
    """Block size 2, tokens 1..5: two keys, the fifth token (a partial block) gets none."""
    golden = 0x9E3779B97F4A7C15

    def step(h: int, t: int) -> int:
        return h ^ ((token_hash(t) + golden + ((h << 12) & M) + (h >> 32)) & M)

    h1 = step(step(0, 1), 2)  # after block [1, 2]
    h2 = step(step(h1, 3), 4)  # after block [3, 4]: depends on h1
    expected = [h - (1 << 64) if h >= 1 << 63 else h for h in (h1, h2)]
    assert block_cache_keys([1, 2, 3, 4, 5], block_size=2) == expected
    # Pinned values: the router and the simulator (and any other process) must compute exactly these.
    assert expected == [9172627077994381919, 7879361821844440848]


def test_matches_a_plain_reading_of_the_formula() -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(1 << 31) for _ in range(100)]

    def reference(tokens: list[int], block_size: int) -> list[int]:
        h, keys = 0, []
        for i in range(len(tokens) - len(tokens) % block_size):
            h = h ^ ((token_hash(tokens[i]) + 0x9E3779B97F4A7C15 + (h << 12) + (h >> 32)) % (1 << 64))
            if (i + 1) % block_size == 0:
                keys.append(to_int64(h))
        return keys

    for block_size in (1, 3, 16, 64):
        assert block_cache_keys(tokens, block_size) == reference(tokens, block_size)


def test_remembered_blocks_and_tokens_give_the_formula_s_keys() -> None:
    """The memo of hashed blocks is keyed by the chain state too: the same block after another prefix, or under
    another parent, gets its own key; ids beyond int64 or negative ones go the plain way; bounds hold."""
    import flexlb.blocks as blocks

    rng = random.Random(11)

    def reference(tokens: list[int], block_size: int, parent: int | None) -> list[int]:
        h, keys = (0 if parent is None else parent & M), []
        for i in range(len(tokens) - len(tokens) % block_size):
            h = h ^ ((token_hash(tokens[i]) + 0x9E3779B97F4A7C15 + (h << 12) + (h >> 32)) % (1 << 64))
            if (i + 1) % block_size == 0:
                keys.append(to_int64(h))
        return keys

    shared = [rng.randrange(1 << 31) for _ in range(64)]
    for _ in range(300):
        size = rng.choice((1, 4, 16))
        pool = [rng.randrange(1 << 31), -rng.randrange(1 << 40), rng.randrange(1 << 70), 0]
        tokens = [rng.choice(pool) for _ in range(rng.randrange(40))] + shared[: rng.randrange(64)]
        parent = rng.choice((None, rng.randrange(-(1 << 63), 1 << 63)))
        for seq in (tokens, tuple(tokens)):
            assert block_cache_keys(seq, size, parent) == reference(tokens, size, parent)
            assert block_cache_keys(seq, size, parent) == reference(tokens, size, parent)  # remembered now
    assert len(blocks._BLOCK_MEMO) <= blocks._BLOCK_MEMO_MAX and len(blocks._TOKEN_MIX) <= blocks._TOKEN_MIX_MAX


def test_prefix_property() -> None:
    base = list(range(100, 164))  # 8 blocks of 8
    other = [*base[:40], 7, *base[41:]]  # differs inside block 5 (tokens 40..47)
    a, b = block_cache_keys(base, 8), block_cache_keys(other, 8)
    assert a[:5] == b[:5]
    assert all(x != y for x, y in zip(a[5:], b[5:], strict=True))  # chained: every later key differs too


def test_partial_block_gets_no_key() -> None:
    tokens = list(range(10))
    assert len(block_cache_keys(tokens, 4)) == 2
    assert block_cache_keys(tokens, 4) == block_cache_keys(tokens[:8], 4)
    assert block_cache_keys(tokens[:3], 4) == []
    assert block_cache_keys([], 4) == []


def test_keys_are_signed_int64() -> None:
    keys = block_cache_keys(list(range(2000)), 1)
    assert all(-(1 << 63) <= k < 1 << 63 for k in keys)
    assert any(k < 0 for k in keys) and any(k > 0 for k in keys)
    assert to_int64(M) == -1 and to_int64(1 << 63) == -(1 << 63) and to_int64(5) == 5


def test_default_block_size_is_64() -> None:
    tokens = list(range(130))
    assert block_cache_keys(tokens) == block_cache_keys(tokens, 64)
    assert len(block_cache_keys(tokens)) == 2


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_cache_keys([1, 2], 0)


def test_tokenize_is_stable_and_whitespace_based() -> None:
    # blake2b, not Python's salted hash(): the same ids in every process.
    assert word_id("hello") == 686667431
    assert tokenize("hello  world\n") == [686667431, 2143498584]
    assert tokenize("") == []
    assert all(0 <= t < 1 << 31 for t in tokenize("a b c d e f g"))


def test_render_chat_template() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ]
    assert render_chat(messages) == "<|system|> be brief\n<|user|> hi there\n<|assistant|> \n<|assistant|>"


@pytest.mark.parametrize(
    "messages",
    [
        [{"content": "no role"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        ["not an object"],
    ],
)
def test_render_chat_refuses_bad_messages(messages: list) -> None:
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        render_chat(messages)
