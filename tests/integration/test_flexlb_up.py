"""`flexlb up`: one command to a working fleet. The printed examples work as pasted (the curl and the openai-client
line), and SIGINT stops every process it started (none of their ports answers afterwards)."""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flexlb.embedded_redis import free_port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_flexlb_up_serves_the_printed_examples_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    out_path = tmp_path / "up.out"
    with open(out_path, "w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "flexlb.cli", "up", "--port", str(port), "--workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops everything" not in out_path.read_text():
            assert up.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, f"no banner within 90 s:\n{out_path.read_text()}"
            time.sleep(0.1)
        banner = out_path.read_text()
        examples = [line.strip() for line in banner.splitlines() if line.startswith("  ")]
        chat = next(line for line in examples if line.startswith("curl") and "/v1/chat/completions" in line)
        answer = subprocess.run(shlex.split(chat), capture_output=True, text=True, timeout=30, check=True).stdout
        assert '"finish_reason"' in answer and '"chat.completion"' in answer, answer
        client = next(line for line in examples if line.startswith("python -c"))
        argv = [sys.executable, *shlex.split(client)[1:]]
        assert subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        serving = next(line for line in banner.splitlines() if "serving on" in line)
        ports = [port, *(int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", serving.split("workers:")[1]))]
        assert len(ports) == 3 and all(_listening(p) for p in ports)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, out_path.read_text()
    assert "stopping every process" in out_path.read_text()
    assert not any(_listening(p) for p in ports), "a process of the fleet still listens"
