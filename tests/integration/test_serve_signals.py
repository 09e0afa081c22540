"""flexlb.http.server.serve and SIGTERM: a signal during the start-up stops the process once it is up; a second
signal cuts a long shutdown short. Each case runs serve() in a process of its own (signals need the main thread)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# An app whose start-up swallows one cancellation (as a redis-py read did: the process then served for ever) and
# whose shutdown takes a minute. It prints what it reaches so the test signals at the right moment.
APP = """
import asyncio, sys
from aiohttp import web
from flexlb.http.server import WATCH, ConnectionWatch, serve

async def start(app):
    print("starting", flush=True)
    try:
        await asyncio.sleep(float(sys.argv[1]))
    except asyncio.CancelledError:
        pass
    print("started", flush=True)

async def slow_shutdown(app):
    print("draining", flush=True)
    await asyncio.sleep(60)

app = web.Application()
app[WATCH] = ConnectionWatch(5.0)
app.on_startup.append(start)
app.on_shutdown.append(slow_shutdown)
serve(app, "127.0.0.1", 0)
print("stopped", flush=True)
"""


class _App:
    """The app's process and the lines it printed (read by a thread, so a wait for a line has a deadline)."""

    def __init__(self, tmp_path: Path, startup_s: float) -> None:
        script = tmp_path / "app.py"
        script.write_text(APP)
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(startup_s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, marker: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.seen:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no {marker!r} within {timeout_s}s; printed: {self.seen}")
            if line is None:
                pytest.fail(f"the process ended before printing {marker!r}: {self.seen}")
            self.seen.append(line)

    def exit_status(self, timeout_s: float = 20) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"still running {timeout_s}s after the signal; printed: {self.seen}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@pytest.mark.parametrize(
    ("startup_s", "first_seen", "signum"),
    [
        # during the start-up: it ends (not cancelled: nothing to swallow), then the shutdown runs; the point is
        # that the first signal was not lost
        pytest.param(1.0, "starting", signal.SIGTERM, id="sigterm-during-start-up"),
        pytest.param(0.0, "started", signal.SIGINT, id="sigint-after-start-up"),
    ],
)
def test_a_first_signal_stops_the_process_and_a_second_cuts_a_long_shutdown_short(
    tmp_path: Path, startup_s: float, first_seen: str, signum: int
) -> None:
    app = _App(tmp_path, startup_s)
    app.wait_for(first_seen)
    app.signal(signum)
    app.wait_for("draining")  # the shutdown takes a minute here: a second signal ends it
    app.signal(signum)
    assert app.exit_status() == 0
    app.wait_for("stopped")
