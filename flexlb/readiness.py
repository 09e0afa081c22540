"""Waiting for a child process's HTTP server to be ready (benchmarks, tests, local stacks)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable


class NotReady(RuntimeError):
    pass


def wait_http_ready(
    url: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    what: str,
    timeout_s: float = 20.0,
) -> None:
    """Poll ``url``/health until it answers 200; raise NotReady with the child's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NotReady(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise NotReady(f"{what} on {url} not ready within {timeout_s:g}s:\n{log()}")
