"""`flexlb up --pd`: a prefill and a decode worker behind the PD proxy, the decode waiting for the prefill's KV at
the bootstrap server the banner names; the printed chat example works, and Ctrl-C stops the bootstrap server too."""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from flexlb.embedded_redis import free_port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _counters(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/get_server_info", timeout=10) as resp:
        return orjson.loads(resp.read())["internal_states"][0]["counters"]


def test_flexlb_up_pd_answers_through_a_decode_that_waited_for_its_prefill(tmp_path: Path) -> None:
    port = free_port()
    out_path = tmp_path / "up.out"
    with open(out_path, "w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "flexlb.cli", "up", "--pd", "--port", str(port), "--workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    bootstrap_port = 0
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops everything" not in out_path.read_text():
            assert up.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, f"no banner within 90 s:\n{out_path.read_text()}"
            time.sleep(0.1)
        banner = out_path.read_text()
        bootstrap_port = int(re.search(r"bootstrap server http://127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        assert _listening(bootstrap_port)
        chat = next(line.strip() for line in banner.splitlines() if "curl" in line and "/v1/chat/completions" in line)
        answer = subprocess.run(shlex.split(chat), capture_output=True, text=True, timeout=30, check=True).stdout
        assert '"finish_reason"' in answer and '"chat.completion"' in answer, answer
        decode = re.search(r"DECODE (http://127\.0\.0\.1:\d+)", banner).group(1)  # type: ignore[union-attr]
        counted = _counters(decode)
        assert counted["kv_wait_ms"] > 0 and counted["kv_failures"] == 0, counted  # it waited for the prefill's KV
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, out_path.read_text()
    assert not _listening(bootstrap_port), "the bootstrap server still listens"
