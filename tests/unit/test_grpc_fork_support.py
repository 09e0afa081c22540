"""Importing flexlb turns gRPC's fork handlers off before grpc loads (flexlb/__init__.py): with them, a child that
subprocess.Popen forks from a process using gRPC could abort before its exec."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = "import os, flexlb.grpc_api.server, grpc; print(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))"


def _run(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


def test_importing_flexlb_disables_grpc_fork_support_unless_the_environment_says_otherwise() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    assert _run(env).strip() == "false"
    assert _run({**env, "GRPC_ENABLE_FORK_SUPPORT": "true"}).strip() == "true"
