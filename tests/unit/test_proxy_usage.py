"""Reading the cached prompt tokens an engine reports from its answer's bytes (flexlb.proxy.usage)."""

from __future__ import annotations

import orjson
import pytest

from flexlb.proxy.usage import cached_tokens

USAGE = {"prompt_tokens": 300, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 256}}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (orjson.dumps({"id": "x", "usage": USAGE}), 256),
        (b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\ndata: [DONE]\n\n", 256),
        (b'data: {"choices": [{"delta": {"content": "usage"}}]}\n\n', None),  # the word, not the field
        (orjson.dumps({"usage": {"prompt_tokens": 3}}), None),  # no details: nothing reported
        (orjson.dumps({"usage": {"prompt_tokens_details": {"cached_tokens": -1}}}), None),
        (orjson.dumps({"usage": {"prompt_tokens_details": {"cached_tokens": True}}}), None),
        (b'{"usage": ', None),  # truncated
    ],
)
def test_cached_tokens(data: bytes, expected: int | None) -> None:
    assert cached_tokens(data) == expected
