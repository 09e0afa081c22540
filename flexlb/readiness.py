"""Child processes of benchmarks, tests and local stacks: waiting for their HTTP server to be ready, stopping them."""

from __future__ import annotations

import signal
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


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
    """Send ``sig`` unless it has exited, wait ``timeout_s``, then kill it; returns the exit status (-9 if killed)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
