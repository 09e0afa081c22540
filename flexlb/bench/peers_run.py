"""`flexlb bench peers`, the I/O part: for every (repeat, router) of the plan, fresh simulated workers behind that
router (flexlb: a redis-server, a master and its routers; a peer: its own replicas), the same workload sent
open-loop through it, the workers' counters and the routers' CPU time read around it, then everything stopped.

Every process is started and stopped through ``flexlb.stack.local`` / ``flexlb.stack.processes``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flexlb.bench import peers as pp
from flexlb.bench.run import RunOptions, run_requests
from flexlb.bench.tables import pct
from flexlb.bench.workloads import Arrivals, RequestSpec
from flexlb.domain import Role
from flexlb.embedded_redis import free_port, free_port_pair
from flexlb.stack.interrupts import Interrupts
from flexlb.stack.local import FLEXLB, Stack, StackError
from flexlb.stack.processes import Child, NotReady, spawn, wait_http_ready
from flexlb.stack.terminal import Terminal
from flexlb.stack.worker_options import WorkerOptions

START_ATTEMPTS = 3
MODEL = "flexlb-sim"  # the simulated workers' served model name and flexlb's service id, sent in every request


@dataclass(frozen=True, slots=True)
class PeersParams:
    workers: int = 4
    kv_blocks: int = 192
    max_concurrency: int = 8
    time_scale: float = 1.0
    strategy: str = "SHORTEST_TTFT"
    flexlb_config: dict[str, Any] = field(default_factory=dict)  # more FLEXLB_CONFIG options for its routers
    policy: str = "cache_aware"
    repeats: int = 3
    request_timeout_s: float = 120.0
    startup_timeout_s: float = 60.0

    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(self.kv_blocks, self.max_concurrency, self.time_scale)


@dataclass(slots=True)
class Deployment:
    """What one run sends to and reads: router URLs, worker URLs, and which processes' CPU time counts."""

    urls: list[str]
    worker_urls: list[str]
    routers: list[Child]
    control: list[Child]  # flexlb's master and redis-server; none for a peer


def _cpu(children: Sequence[Child]) -> float | None:
    values = [c.cpu_seconds() for c in children]
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def _healthy_workers(url: str) -> int:
    """How many workers a peer lists as healthy on its GET /workers (smg and vllm-router both answer it)."""
    with urllib.request.urlopen(f"{url}/workers", timeout=2) as resp:
        data = json.loads(resp.read())
    return sum(1 for w in data.get("workers") or [] if w.get("is_healthy"))


def _router_hits(urls: Sequence[str]) -> dict[str, float] | None:
    """flexlb's routers' own account of their cache routing (peers.router_hits); None when a page cannot be read.
    Routers sharing a port answer for all of them (multiprocess metrics): each URL once."""
    pages = []
    try:
        for url in dict.fromkeys(urls):
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
                pages.append(resp.read().decode())
    except OSError:
        return None
    return pp.router_hits(pages)


def wait_peer_ready(url: str, child: Child, workers: int, timeout_s: float, checkpoint: Callable[[], None]) -> None:
    """Until the peer at ``url`` lists all ``workers`` as healthy: both answer /health before their workers are in."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        if not child.alive():
            raise StackError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            seen = _healthy_workers(url)
        except (OSError, ValueError):
            seen = 0
        if seen >= workers:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{child.name} on {url} listed {seen} of {workers} workers healthy after {timeout_s:g} s:\n"
                f"{child.log_tail()}"
            )
        checkpoint()
        time.sleep(0.1)


def start_flexlb(stack: Stack, params: PeersParams, replicas: int, name: str) -> Deployment:
    stack.start_redis()
    options = {Role.PDFUSION: params.worker_options()}
    config = {"contendForMaster": False, "loadBalanceStrategy": params.strategy, **params.flexlb_config}
    service = stack.start_service(name, [Role.PDFUSION] * params.workers, options, replicas, config)
    assert stack.redis is not None and service.master is not None
    return Deployment(
        [r.url for r in service.routers],
        [w.url for w in service.workers],
        [r.child for r in service.routers],
        [service.master, stack.redis],
    )


def _spawn(stack: Stack, name: str, command: Sequence[str], env: dict[str, str] | None = None) -> Child:
    child = spawn(name, command, stack.log_dir, env)
    stack.started.append(child)  # so stack.close() stops it with the rest
    return child


def start_peer(stack: Stack, params: PeersParams, peer: pp.Peer, binary: str, replicas: int, name: str) -> Deployment:
    """Fresh workers (in the GET /get_load shape the peer reads), then ``replicas`` independent peer processes."""
    workers: list[tuple[str, Child]] = []
    for i in range(params.workers):
        port = free_port_pair()  # the worker also takes the next port, for its gRPC status
        command = [*FLEXLB, "sim-worker", "--role", "pdfusion", "--port", str(port)]
        command += [*params.worker_options().argv(), "--load-format", peer.load_format]
        workers.append((f"http://127.0.0.1:{port}", _spawn(stack, f"{name}-worker{i}", command)))
    for url, child in workers:
        try:
            wait_http_ready(url, child.process, child.log_tail, child.name, params.startup_timeout_s)
        except NotReady as exc:
            raise StackError(str(exc)) from None
    worker_urls = [url for url, _ in workers]
    env = pp.peer_environment(os.environ)
    routers: list[tuple[str, Child]] = []
    for i in range(replicas):
        port, metrics_port = free_port(), free_port()
        command = peer.command(binary, port, metrics_port, worker_urls, params.policy)
        routers.append((f"http://127.0.0.1:{port}", _spawn(stack, f"{name}-{peer.name}{i}", command, env)))
    for url, child in routers:
        wait_peer_ready(url, child, params.workers, params.startup_timeout_s, stack.checkpoint)
    return Deployment([u for u, _ in routers], worker_urls, [c for _, c in routers], [])


def _send(
    specs: Sequence[RequestSpec],
    arrivals: Arrivals,
    deployment: Deployment,
    params: PeersParams,
    interrupts: Interrupts,
    term: Terminal,
    title: str,
) -> Any:
    options = RunOptions(
        target=deployment.urls[0],
        more_targets=tuple(deployment.urls[1:]),
        arrivals=arrivals,
        model=MODEL,
        request_timeout_s=params.request_timeout_s,
        worker_metrics=tuple(deployment.worker_urls),
    )

    def progress(line: str) -> None:
        if sys.stdout.isatty():  # a progress line per second only where it is redrawn in place
            term.overwrite(f"{title} {line.strip()}")

    async def main() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        interrupts.on_loop(loop, stop.set)
        try:
            return await run_requests(specs, options, out=progress, stop=stop)
        finally:
            interrupts.off_loop(loop)

    return asyncio.run(main())


def _start(
    target: pp.RouterTarget,
    binaries: dict[str, str],
    params: PeersParams,
    interrupts: Interrupts,
    keep_logs: Callable[[Stack], None],
) -> tuple[Stack, Deployment]:
    """A fresh deployment of ``target``; started again (new ports) when a start fails, e.g. when another program
    took a port between its choice and its bind, which happens on a machine shared with other work."""
    for attempt in range(1, START_ATTEMPTS + 1):
        stack = Stack(startup_timeout_s=params.startup_timeout_s, checkpoint=interrupts.check)
        name = f"peers-{target.router}-x{target.replicas}-{os.urandom(3).hex()}"
        try:
            if target.router == pp.FLEXLB:
                return stack, start_flexlb(stack, params, target.replicas, MODEL)  # its service id is its model name
            peer = pp.PEERS[target.router]
            return stack, start_peer(stack, params, peer, binaries[peer.name], target.replicas, name)
        except StackError:
            last = attempt == START_ATTEMPTS
            if last:
                keep_logs(stack)
            stack.close(keep_logs=last)
            if last:
                raise
        except BaseException:
            stack.close()
            raise
    raise AssertionError("unreachable")


def run_one(
    target: pp.RouterTarget,
    binaries: dict[str, str],
    specs: Sequence[RequestSpec],
    arrivals: Arrivals,
    params: PeersParams,
    interrupts: Interrupts,
    term: Terminal,
    title: str,
    keep_logs: Callable[[Stack], None],
) -> dict[str, Any]:
    """One run on fresh processes; they are all stopped before it returns."""
    term.overwrite(f"{title} starting ...")
    try:
        stack, deployment = _start(target, binaries, params, interrupts, keep_logs)
    except StackError:
        term.line()
        raise
    failed = True
    try:
        interrupts.check()
        cpu_before, control_before = _cpu(deployment.routers), _cpu(deployment.control)
        outcome = _send(specs, arrivals, deployment, params, interrupts, term, title)
        cpu_after, control_after = _cpu(deployment.routers), _cpu(deployment.control)
        for child in stack.started:
            if not child.alive():
                raise StackError(
                    f"{child.name} exited with {child.process.returncode} during the run:\n{child.log_tail()}"
                )
        row = pp.run_row(
            outcome.records,
            outcome.elapsed_s,
            outcome.workers,
            None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
            None if control_before is None or control_after is None else control_after - control_before,
        )
        row["interrupted"] = outcome.interrupted
        if target.router == pp.FLEXLB:
            row["router_hits"] = _router_hits(deployment.urls)
        row["router_urls"] = deployment.urls
        failed = False
    finally:
        term.line()
        if failed:
            keep_logs(stack)
        stack.close(keep_logs=failed)
    row["processes"] = [c.describe() for c in stack.started]  # once stopped: with their exit status
    return row


def run_peers_bench(
    params: PeersParams,
    targets: Sequence[pp.RouterTarget],
    binaries: dict[str, str],
    specs: Sequence[RequestSpec],
    arrivals: Arrivals,
    interrupts: Interrupts,
    term: Terminal,
    keep_logs: Callable[[Stack], None],
) -> dict[str, Any]:
    """Every run of the interleaved plan; the result has each run's row and each target's combined row."""
    runs: list[dict[str, Any]] = []
    plan = pp.run_order(targets, params.repeats)
    interrupted = False
    for step, (repeat, target) in enumerate(plan, 1):
        interrupts.check()
        title = f"[{step}/{len(plan)}] {target.label} repeat {repeat}:"
        row = run_one(target, binaries, specs, arrivals, params, interrupts, term, title, keep_logs)
        c = row["ttft_ms"]
        term.line(
            f"{title} {row['ok']}/{row['requests']} ok, refused {row['refused']}, errors {row['errors']}, "
            f"TTFT mean {c['mean']:.1f} ms, worker hit {pct(row['hit_ratio'])}"
        )
        runs.append(
            {"repeat": repeat, "router": target.router, "replicas": target.replicas, "label": target.label, **row}
        )
        if row["interrupted"] or interrupts.requested:
            interrupted = True
            break
    combined = {t.label: pp.combine([r for r in runs if r["label"] == t.label]) for t in targets}
    combined = {label: c for label, c in combined.items() if c["runs"]}
    peer_names = [p for p in dict.fromkeys(t.router for t in targets) if p != pp.FLEXLB]
    return {
        "benchmark": "peers",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(params) | {"worker_options": params.worker_options().argv()},
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
        },
        "interrupted": interrupted,
        "plan": [{"repeat": r, "label": t.label} for r, t in plan],
        "runs": runs,
        "combined": combined,
        "targets": [t.to_json() for t in pp.check_targets(combined, peer_names)],
    }
