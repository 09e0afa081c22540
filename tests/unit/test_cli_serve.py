"""`flexlb serve --processes N` refuses bad input once, before it starts anything."""

from __future__ import annotations

import signal
import socket

import pytest

from flexlb.cli import main
from flexlb.ports import claim_shared
from flexlb.supervisor import describe_exit


def test_processes_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--processes", "0"]) == 2
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err


def test_a_port_in_use_fails_at_once_not_in_every_child(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:  # listening without SO_REUSEPORT: no router can join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--processes", "2", "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_port_zero_becomes_one_free_port_for_all_children() -> None:
    with claim_shared("127.0.0.1", 0) as held:
        assert 0 < held.getsockname()[1] < 65536


def test_exit_statuses_are_named() -> None:
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"
