"""A command loads the settings only when it needs them: a bad configuration stops those, with its one clear error and
exit 2, and no other (`flexlb blocks`, `--version`, `--help`, the benchmarks that start their own configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.cli import main

PROMPT = " ".join(f"w{i}" for i in range(100))
BAD_JSON = "flexlb: error: FLEXLB_CONFIG: invalid JSON"

# One bad value of each part of the settings (FLEXLB_CONFIG, MODEL_SERVICE_CONFIG, the other variables, auth).
BAD_ENVIRONMENTS = {
    "flexlb-config": {"FLEXLB_CONFIG": "{bad"},
    "flexlb-config-field": {"FLEXLB_CONFIG": '{"httpPort": -1}'},
    "model-service-config": {"MODEL_SERVICE_CONFIG": '{"prefil_endpoint": {"address": "127.0.0.1:8000"}}'},
    "redis-url": {"REDIS_URL": "http://127.0.0.1:6379"},
    "sync-variable": {"SYNC_STATUS_INTERVAL": "soon"},
    "api-keys": {"FLEXLB_API_KEYS": "a,,b"},
}


@pytest.fixture(params=list(BAD_ENVIRONMENTS), ids=list(BAD_ENVIRONMENTS))
def bad_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    environ = BAD_ENVIRONMENTS[request.param]
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return environ


def test_the_bad_environments_are_bad(bad_environment: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    # The premise of the tests below: a command that reads the settings refuses each of these environments.
    assert main(["master", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("flexlb: error: ")


def test_blocks_runs_whatever_the_settings(bad_environment: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", PROMPT, "--block-size", "16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == block_cache_keys(tokenize(PROMPT), 16)
    assert captured.err == ""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["blocks", "--help"], ["serve", "--help"]])
def test_version_and_help_ignore_the_settings(
    argv: list[str], bad_environment: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("flexlb " if argv == ["--version"] else "usage: flexlb")
    assert captured.err == ""


def test_bench_compare_does_not_read_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEXLB_CONFIG", "{bad")
    missing = str(tmp_path / "missing.json")
    assert main(["bench", "compare", missing, missing]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err  # its own error, not the configuration's
    assert "FLEXLB_CONFIG" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "0"],
        ["serve", "--port", "0", "--worker-urls", "http://127.0.0.1:8000"],  # the flags' variables join the rest
        ["master", "--port", "0"],
        ["worker", "--redis-url", "redis://127.0.0.1:1", "list"],
        ["launch", "--engine", "sim", "--count", "1"],
        ["bench", "schedule"],
        ["bench", "control"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_a_command_that_needs_the_settings_fails_with_the_clear_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEXLB_CONFIG", "{bad")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(BAD_JSON)
    assert captured.err.count("\n") == 1  # one line, before the command started anything
