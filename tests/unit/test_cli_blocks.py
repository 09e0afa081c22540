"""`flexlb blocks` prints the block cache keys the router and the simulated workers compute for a prompt."""

from __future__ import annotations

import io
import json

import pytest

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.cli import main

PROMPT = " ".join(f"w{i}" for i in range(300))


def test_prints_the_keys_of_every_full_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", PROMPT]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert keys == block_cache_keys(tokenize(PROMPT), 64)
    assert len(keys) == 4  # 300 tokens: 4 full blocks of 64, the partial last one has no key


def test_reads_standard_input_and_honours_the_block_size(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert main(["blocks", "-", "--block-size", "100"]) == 0
    assert json.loads(capsys.readouterr().out) == block_cache_keys(tokenize(PROMPT), 100)


def test_a_bad_block_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", PROMPT, "--block-size", "0"]) == 2
    assert "--block-size must be positive" in capsys.readouterr().err
