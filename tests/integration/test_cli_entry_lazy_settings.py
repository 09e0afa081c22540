"""The installed commands (``flexlb``, ``python -m flexlb.cli``) with a bad FLEXLB_CONFIG: those that never read the
settings run, one that does exits 2 with the configuration's error (in process: tests/unit/test_cli_lazy_settings)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from flexlb.blocks import block_cache_keys, tokenize

PROMPT = "a b c d e f g h"
ENTRY_POINTS = {
    "python -m flexlb.cli": [sys.executable, "-m", "flexlb.cli"],
    "flexlb": [shutil.which("flexlb") or "flexlb"],  # the console script of pyproject.toml
}


@pytest.fixture(params=list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def cli(request: pytest.FixtureRequest) -> list[str]:
    command = ENTRY_POINTS[request.param]
    if request.param == "flexlb" and shutil.which("flexlb") is None:
        pytest.skip("the flexlb console script is not installed (pip install -e .)")
    return command


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEXLB_CONFIG": "{bad"}
    env.pop("REDIS_URL", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_blocks_version_and_help_run_with_a_bad_config(cli: list[str]) -> None:
    blocks = _run([*cli, "blocks", PROMPT, "--block-size", "2"])
    assert blocks.returncode == 0, blocks.stderr
    assert json.loads(blocks.stdout) == block_cache_keys(tokenize(PROMPT), 2)
    for flag in ("--version", "--help"):
        result = _run([*cli, flag])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("flexlb " if flag == "--version" else "usage: flexlb")


def test_a_command_that_reads_the_settings_refuses_a_bad_config(cli: list[str]) -> None:
    result = _run([*cli, "master", "--port", "0"])
    assert result.returncode == 2
    assert result.stderr.startswith("flexlb: error: FLEXLB_CONFIG: invalid JSON"), result.stderr
