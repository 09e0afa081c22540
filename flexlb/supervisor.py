"""``flexlb serve --processes N``: N router processes on one port, supervised by the parent.

Each child is a plain ``flexlb serve`` (started with exec, not fork, so no event loop or Redis connection is shared),
listening with SO_REUSEPORT: the kernel spreads new connections over them. The port is theirs alone: the supervisor
checks it is free and holds it for them (flexlb/ports.py), so another router on it fails at start. The parent runs no
router: it restarts a child that dies (with a backoff, so a crash loop does not spin), forwards SIGTERM / SIGINT to
every child and waits for them, and owns the directory of prometheus_client's multiprocess mode, where each child
writes its metrics and from which any child's /metrics answers for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence

from prometheus_client.multiprocess import mark_process_dead

from flexlb.metrics import MULTIPROC_DIR_ENV

log = logging.getLogger("flexlb.supervisor")

BACKOFF_FIRST_S = 0.5  # delay before restarting a child that crashed; doubles per quick crash in a row
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a child that ran this long before dying starts the backoff over
KILL_AFTER_S = 30.0  # beyond shutdownTimeoutMs, a child that has not exited is killed (it is stuck)


def follow_supervisor(pid: int) -> None:
    """In a child: get SIGTERM when the supervisor dies, even by SIGKILL, rather than serve on unsupervised (Linux;
    elsewhere a child outlives a killed parent)."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class RouterSupervisor:
    """Runs ``processes`` copies of ``command`` until SIGTERM / SIGINT; ``run()`` returns the exit status."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        processes: int,
        *,
        shutdown_timeout_s: float,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.processes = processes
        self.stop_timeout_s = shutdown_timeout_s + KILL_AFTER_S
        self._children: dict[int, asyncio.subprocess.Process] = {}  # slot -> its running child
        self._stopping = asyncio.Event()  # binds to the loop of run() on first use

    def run(self) -> int:
        # A fresh directory: files a previous run left would add its counters to this one's.
        metrics_dir = tempfile.mkdtemp(prefix="flexlb-metrics-")
        self.env[MULTIPROC_DIR_ENV] = metrics_dir
        try:
            return asyncio.run(self._run(metrics_dir))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    async def _run(self, metrics_dir: str) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("starting %d router processes (metrics in %s)", self.processes, metrics_dir)
        slots = [asyncio.create_task(self._keep_running(slot, metrics_dir)) for slot in range(self.processes)]
        await self._stopping.wait()
        done, pending = await asyncio.wait(slots, timeout=self.stop_timeout_s)
        if pending:
            for slot, child in self._children.items():
                log.error("router process %d (pid %d) still running %.0fs after SIGTERM: killing it",
                          slot, child.pid, self.stop_timeout_s)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            await asyncio.wait(pending)
        clean = not pending and all(task.result() for task in done)
        log.info("all router processes stopped%s", "" if clean else " (not all cleanly)")
        return 0 if clean else 1

    def _on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM or SIGINT: SIGTERM to every child (a SIGINT would make a child still importing print a
        KeyboardInterrupt traceback). A second signal is passed on as well: aiohttp then stops without waiting."""
        if not self._stopping.is_set():
            log.info("%s: stopping %d router processes", sig.name, len(self._children))
            self._stopping.set()
        else:
            log.warning("%s again: passing it on; requests in flight are cut short", sig.name)
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    async def _keep_running(self, slot: int, metrics_dir: str) -> bool:
        """Run the slot's child and restart it when it dies, until the stop; True when its last exit was clean."""
        loop = asyncio.get_running_loop()
        crashes = 0
        while True:
            started = loop.time()
            try:
                # process_group=0: a terminal's Ctrl-C reaches the parent only, which passes it on once
                child = await asyncio.create_subprocess_exec(*self.command, env=self.env, process_group=0)
            except OSError as exc:
                log.error("router process %d could not start: %s", slot, exc)
                returncode = None
            else:
                self._children[slot] = child
                if self._stopping.is_set():  # the signal came while it was starting
                    child.send_signal(signal.SIGTERM)
                log.info("router process %d: pid %d", slot, child.pid)
                returncode = await child.wait()
                del self._children[slot]
                # its gauges of the live* modes go; its counters stay in the sums
                mark_process_dead(child.pid, metrics_dir)
                if self._stopping.is_set():
                    # killed by our SIGTERM: it was still starting (no handler yet), so it had nothing in flight
                    clean = returncode in (0, -signal.SIGTERM)
                    if not clean:
                        log.error("router process %d (pid %d) %s while stopping", slot, child.pid,
                                  describe_exit(returncode))  # fmt: skip
                    return clean
            crashes = crashes + 1 if loop.time() - started < STABLE_S else 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (crashes - 1))
            what = "failed to start" if returncode is None else f"(pid {child.pid}) {describe_exit(returncode)}"
            log.error("router process %d %s; restarting it in %.1fs", slot, what, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return True  # the crash was logged; the stop itself has nothing left to do here
