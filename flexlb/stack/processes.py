"""The process launcher of every command and test that starts flexlb's own processes (`flexlb up`, `demo`, `launch`,
the benchmarks, the tests' fixtures): start a child with its log file, wait for its HTTP server, stop it.

Each child runs in its own session (process group) and is stopped as a group. A Ctrl-C in the terminal reaches only
the parent (the children are not in the terminal's foreground group), which then stops every child itself: SIGTERM
to the child's process group, SIGKILL to the group after a grace period. On Linux each child also gets the
parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so even a parent killed with SIGKILL leaves no child
running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


_PREEXEC = _parent_death_signal()


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used so far (Linux /proc; None elsewhere or once it is gone).

    The sum of its threads' scheduler runtimes (``se.sum_exec_runtime`` in /proc/<pid>/task/<tid>/sched, in ms to
    the ns) where the kernel has them, else user + system time from /proc/<pid>/stat, counted in clock ticks (10
    ms): too coarse for a short run, where a quiet process showed 0. Threads that exit between two reads are not
    in the later one; flexlb's processes and redis-server keep theirs."""
    try:
        total = 0.0
        for task in Path(f"/proc/{pid}/task").iterdir():
            line = next(x for x in (task / "sched").read_text().splitlines() if x.startswith("se.sum_exec_runtime"))
            total += float(line.rpartition(":")[2])
        return total / 1000
    except (OSError, StopIteration, ValueError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    """One started process: what it is, its pid (= its process group id) and its log file."""

    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    group_stopped: bool = field(default=False, repr=False)  # its group was killed after it exited: hands off

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        """CPU time it has used so far (``process_cpu_seconds``)."""
        return process_cpu_seconds(self.pid)

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group. Only until the group was cleaned up after the child exited: from then
        on its id may belong to someone else (Linux reuses a pid only once no group or session has it as id)."""
        if self.group_stopped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "command": self.command, "returncode": self.process.returncode}


def spawn(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    log_path: Path | None = None,
    truncate: bool = False,
) -> Child:
    """Start ``command`` in a new session, its output appended to ``log_path`` (default ``log_dir/<name>.log``;
    ``truncate``: emptied first, for a restart whose log must not show the previous run's)."""
    log_path = log_path or log_dir / f"{name}.log"
    with open(log_path, "wb" if truncate else "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_PREEXEC,  # one prctl call: takes no lock another thread could hold across the fork
        )
    return Child(name, list(command), log_path, process)


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


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = STOP_GRACE_S) -> int:
    """Send ``sig`` to the process alone (not its group) unless it has exited, wait ``timeout_s``, then kill it;
    returns the exit status (-9 if killed). For a process not started by ``spawn`` (no group of its own), and for a
    test that checks what a process does with its own children (``stop_all`` would kill them itself)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def stop_all(children: Sequence[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child's process group at once, wait up to ``grace_s`` for all, then SIGKILL what is left of
    each group. A child that had already exited before is only marked: its pid may be someone else's by now."""
    live = [c for c in children if not c.group_stopped and c.alive()]
    for child in children:
        child.group_stopped = child.group_stopped or child not in live
    for child in live:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in live:
        # Also after a clean exit of the leader: anything it started in its group goes too (while anything is left in
        # the group, its id cannot be reused, so this reaches only the child's own processes).
        child.signal_group(signal.SIGKILL)
        if child.process.poll() is None:
            child.process.wait()
        child.group_stopped = True
