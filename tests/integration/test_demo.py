"""`flexlb demo` as a user runs it: a subprocess that starts its own stack, compares the strategies on the workers'
own counters, and leaves no process behind, whether it finishes or is interrupted.

Every process the demo starts inherits its environment, so a marker variable given to the demo finds them all in
/proc (children, and anything they started), whatever their process group."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

from flexlb.stack.processes import spawn, stop_all

MARK = "FLEXLB_TEST_DEMO_MARK"
DEMO_TIMEOUT_S = 110  # --quick takes ~45 s on a busy 2-core machine


def marked(mark: str) -> list[int]:
    """Pids of the processes whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def demo(tmp_path: Path, mark: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flexlb.cli", "demo", "--out", str(tmp_path / "demo.json"), *args],
        env={**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout_s: float = 60) -> bytes:
    """The demo's output up to and including ``marker`` (its progress line is redrawn with carriage returns)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{marker!r} not printed within {timeout_s} s: {seen[-2000:]!r}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the demo exited ({proc.wait()}) before printing {marker!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen


def test_quick_demo_cache_aware_beats_random_and_nothing_is_left_running(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = demo(tmp_path, mark, "--quick")
    out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    assert proc.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    assert marked(mark) == [], "processes of the demo outlived it"

    result = orjson.loads((tmp_path / "demo.json").read_bytes())
    by = {s["strategy"]: s for s in result["strategies"]}
    assert list(by) == ["RANDOM", "ROUND_ROBIN", "LOWEST_CONCURRENCY", "SHORTEST_TTFT"]
    oracle = result["oracle"]
    report = {name: (s["fleet"]["hit_ratio"], s["summary"]["ttft_ms"]["mean"]) for name, s in by.items()}
    print(f"\nhit ratio, mean TTFT ms: {report}; oracle {oracle['hit_ratio']}, {oracle['ttft_ms']['mean']}")
    for name, s in by.items():
        summary, fleet = s["summary"], s["fleet"]
        assert (summary["requests"], summary["ok"], summary["errors"]) == (96, 96, 0), (name, summary)
        assert fleet["requests"] == 96 and fleet["unreadable"] == 0, (name, fleet)  # each admitted once, on a worker
        # the oracle's bounds: no placement caches more than a perfect fleet-wide cache, nor answers sooner on mean
        assert fleet["hit_ratio"] <= oracle["hit_ratio"] + 1e-9, (name, fleet, oracle["hit_ratio"])
        assert summary["ttft_ms"]["mean"] > oracle["ttft_ms"]["mean"], (name, summary["ttft_ms"], oracle["ttft_ms"])
    random_, ttft = by["RANDOM"], by["SHORTEST_TTFT"]
    assert ttft["fleet"]["hit_ratio"] > random_["fleet"]["hit_ratio"], report
    assert ttft["summary"]["ttft_ms"]["mean"] < random_["summary"]["ttft_ms"]["mean"], report

    # every process it started (redis-server, then per strategy 4 workers, a master and 2 routers) is gone
    processes = result["processes"]
    assert len(processes) == 1 + 4 * (4 + 1 + 2)
    for p in processes:
        assert p["returncode"] is not None, p
        assert not Path(f"/proc/{p['pid']}").exists() or mark.encode() not in _environ(p["pid"]), p


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_ctrl_c_during_a_run_stops_everything_and_exits_130(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = demo(tmp_path, mark, "--quick", "--strategies", "RANDOM,SHORTEST_TTFT")
    try:
        read_until(proc, b" done ")  # the first strategy's stack is up and its requests are being sent
        running = marked(mark)
        assert len(running) >= 1 + 4 + 1 + 2, running  # the marker finds the demo's processes while they run
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out.decode()[-2000:], err.decode()[-2000:])
    assert b"interrupted; every process it started is stopped" in err
    assert marked(mark) == []
    result = orjson.loads((tmp_path / "demo.json").read_bytes())
    assert result["interrupted"] and result["strategies"][0]["strategy"] == "RANDOM"
    assert result["strategies"][0]["interrupted"]


def test_sigterm_while_the_stack_starts_stops_everything_and_exits_130(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = demo(tmp_path, mark, "--quick", "--strategies", "RANDOM")
    try:
        read_until(proc, b"starting 4 pdfusion workers")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out.decode()[-2000:], err.decode()[-2000:])
    assert marked(mark) == []
    assert orjson.loads((tmp_path / "demo.json").read_bytes())["interrupted"]


def test_stop_all_stops_a_childs_whole_process_group(tmp_path: Path) -> None:
    """A child's own children (same process group) go with it, even when the child ignores SIGTERM."""
    mark = uuid.uuid4().hex
    script = "trap '' TERM; sleep 300 & echo started; wait"
    child = spawn("shell", ["bash", "-c", script], tmp_path, {**os.environ, MARK: mark})
    deadline = time.monotonic() + 20
    while "started" not in child.log_tail() or len(marked(mark)) < 2:
        assert time.monotonic() < deadline, child.log_tail()
        time.sleep(0.01)  # polling the log for the shell's "started", with a deadline
    assert os.getpgid(child.pid) == child.pid  # its own group
    stop_all([child], grace_s=0.5)
    assert child.process.returncode == -signal.SIGKILL  # it ignored SIGTERM
    assert marked(mark) == []
