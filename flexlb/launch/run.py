"""Start and keep running the engines of a ``LaunchPlan`` (and with ``--serve`` a Redis and a router).

Every process is started through ``flexlb.stack.processes`` (own process group, parent-death signal, log file), the
launcher `flexlb up` and `flexlb demo` use, and stopped as a group, so what an engine starts itself (vLLM's engine
core, tensor-parallel workers) goes with it. One event loop supervises every engine at once:

- start-up: poll ``GET <health path>`` until it answers 200 (or the engine exits, or ``--startup-timeout``); an
  engine that fails its first start ends the launch with its log's last lines (a bad model or flag fails at once);
- healthy: register it as a worker of its role (``flexlb.launch.register``), with its engine kind (and with
  ``--kv-events-port`` where it publishes KV events);
- dead: deregister it at once, kill what is left of its process group, start it again after a backoff (1 s,
  doubling to 30 s; back to 1 s once it ran healthy for 30 s), and register it again when it is healthy;
- SIGINT / SIGTERM, at any moment (also while waiting for health): deregister every engine, SIGTERM every process
  group started, SIGKILL after ``--stop-grace`` seconds, wait for all; exit status 0, as `flexlb up`.

Signals only set a flag here (the loop's handler): nothing is interrupted half-way, so no child is ever started
without being recorded for the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flexlb.domain import WorkerSpec
from flexlb.embedded_redis import RedisNotInstalled
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.launch.plan import Engine, LaunchPlan
from flexlb.launch.register import RedisRegistrar, Registrar, RegistrationFailed, RouterRegistrar
from flexlb.stack.local import Stack, StackError
from flexlb.stack.processes import STOP_GRACE_S, Child, spawn, stop_all
from flexlb.supervisor import BACKOFF_MAX_S, STABLE_S, describe_exit

log = logging.getLogger("flexlb.launch")

BACKOFF_FIRST_S = 1.0  # before the first restart of an engine that died; doubles per failure up to BACKOFF_MAX_S
HEALTH_POLL_S = 0.25  # between two health checks of a starting engine
EXIT_POLL_S = 0.1  # how often a running engine is checked for having exited
HEALTH_TIMEOUT_S = 2.0  # one health check
REGISTER_RETRY_S = 2.0  # between two registration attempts while the fleet does not take it
DEREGISTER_TIMEOUT_S = 5.0  # at the stop, for all deregistrations together
LOG_LINES = 20  # of an engine's log, in an error about it


class LaunchFailed(RuntimeError):
    """An engine (or the router) did not come up the first time; the message names it and shows its log's end."""


_STOPPING = object()  # what a wait returns when the launch is being stopped


@dataclass(frozen=True, slots=True)
class Target:
    """Where the engines are registered: a Redis (``redis_url``), a router's admin API (``router_url``), or nowhere
    (both None: ``--no-register``). With ``serve`` and no Redis, the launcher starts its own redis-server."""

    redis_url: str | None
    router_url: str | None
    service: str
    redis_timeout_ms: int = 1000
    admin_token: str | None = None


@dataclass(frozen=True, slots=True)
class Serve:
    """``--serve``: a router (`flexlb serve`) on ``host``:``port`` with ``env`` besides the Redis URL."""

    host: str
    port: int
    env: Mapping[str, str]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def _tail(child: Child, lines: int = LOG_LINES) -> str:
    text = child.log_tail(20_000).rstrip("\n").splitlines()[-lines:]
    return "\n".join(text) or "(empty)"


@dataclass
class Launcher:
    plan: LaunchPlan
    target: Target
    log_dir: Path
    startup_timeout_s: float = 600.0
    stop_grace_s: float = STOP_GRACE_S
    serve: Serve | None = None
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    out: Callable[[str], None] = field(default=lambda text: print(text, flush=True))
    err: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True))

    children: list[Child] = field(default_factory=list, init=False)  # every process started, never removed
    registered: set[str] = field(default_factory=set, init=False)  # worker ids possibly in the fleet
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _registrar: Registrar | None = field(default=None, init=False)
    _http: aiohttp.ClientSession | None = field(default=None, init=False)
    _stack: Stack | None = field(default=None, init=False)
    _router: Child | None = field(default=None, init=False)
    _current: dict[int, Child] = field(default_factory=dict, init=False)  # engine index -> its running process
    _router_ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _failure: str | None = field(default=None, init=False)  # why the launch ends with status 1

    def run(self) -> int:
        """Until SIGINT / SIGTERM (0), or until the first start of an engine or the router fails (1)."""
        try:
            return asyncio.run(self._main())
        except KeyboardInterrupt:  # a Ctrl-C before the loop's handler was installed: nothing was started yet
            return 0

    # ---- the whole launch ----

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S))
        tasks: list[asyncio.Task[None]] = []
        try:
            redis_url = self.target.redis_url
            if self.serve is not None and redis_url is None:
                # Blocks the loop while redis-server starts (well under a second): a signal meanwhile waits.
                self._stack = Stack(log_dir=self.log_dir)
                redis_url = self._stack.start_redis()
                self.out(f"flexlb launch: REDIS_URL not set; started redis-server at {redis_url}")
            self._registrar = self._make_registrar(redis_url)
            if self.serve is not None:
                assert redis_url is not None
                tasks.append(self._task(self._run_router(self.serve, redis_url), "router"))
            healthy = {e.index: asyncio.Event() for e in self.plan.engines}
            for e in self.plan.engines:
                tasks.append(self._task(self._keep_running(e, healthy[e.index]), f"engine {e.index}"))
            tasks.append(self._task(self._announce(healthy), "announce"))
            await self._stopping.wait()  # a signal, or a failure (_task)
            if self._failure is not None:
                self.err(f"flexlb launch: {self._failure}\nlogs in {self.log_dir}")
                return 1
            return 0
        except (StackError, RedisNotInstalled) as exc:
            self.err(f"flexlb launch: {exc}")
            return 1
        finally:
            await self._shutdown(tasks)

    def _task(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of the launch: a LaunchFailed (or a bug) in it stops the whole launch, with its message."""

        async def guarded() -> None:
            try:
                await work
            except LaunchFailed as exc:
                self._fail(str(exc))
            except Exception as exc:
                log.exception("%s failed", name)
                self._fail(f"{name} failed: {exc!r}")

        return asyncio.create_task(guarded(), name=name)

    def _fail(self, message: str) -> None:
        if not self._stopping.is_set():
            self._failure = message
            self._stopping.set()

    def _make_registrar(self, redis_url: str | None) -> Registrar | None:
        if redis_url is not None:
            return RedisRegistrar(redis_url, self.target.service, self.target.redis_timeout_ms)
        if self.target.router_url is not None:
            return RouterRegistrar(self.target.router_url, self.target.admin_token)
        return None

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping.is_set():
            log.warning("%s again: already stopping", sig.name)
            return
        self.out(f"flexlb launch: {sig.name}: stopping every process ...")
        self._stopping.set()

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """Deregister every engine, stop every process started (engines, router, redis-server last), wait."""
        self._stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._registrar is not None and self.registered:
            try:
                async with asyncio.timeout(DEREGISTER_TIMEOUT_S):
                    for worker_id in sorted(self.registered):
                        await self._deregister_quietly(worker_id)
            except TimeoutError:
                log.error("deregistering took over %.0f s: some workers stay registered", DEREGISTER_TIMEOUT_S)
        live = [c for c in self.children if not c.group_stopped and c.alive()]
        # Blocking, on purpose: nothing else is left to do, and a signal now only waits for the loop.
        stop_all(self.children, grace_s=self.stop_grace_s)
        if self._stack is not None:
            self._stack.close(keep_logs=True)
        if self._registrar is not None:
            await self._registrar.close()
        if self._http is not None:
            await self._http.close()
        if live:
            self.out(f"flexlb launch: stopped {len(live)} processes (logs in {self.log_dir})")

    async def _deregister_quietly(self, worker_id: str) -> None:
        assert self._registrar is not None
        try:
            await self._registrar.deregister(worker_id)
            self.registered.discard(worker_id)
            log.info("deregistered %s", worker_id)
        except RegistrationFailed as exc:
            log.error("could not deregister %s from %s: %s", worker_id, self._registrar.where, exc)

    async def _announce(self, healthy: Mapping[int, asyncio.Event]) -> None:
        for event in healthy.values():
            await event.wait()
        if self.serve is not None:
            await self._router_ready.wait()
        self.out(self.banner())

    # ---- one engine ----

    def _spawn(self, engine: Engine) -> Child:
        name = f"engine{engine.index}-port{engine.port}"
        with open(self.log_dir / f"{name}.log", "a") as header:
            header.write(f"=== flexlb launch {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(engine.command)}\n")
        child = spawn(name, engine.command, self.log_dir, engine.env(self.base_env))
        self.children.append(child)
        self._current[engine.index] = child
        return child

    def describe(self, engine: Engine, child: Child) -> str:
        gpus = f"GPUs {engine.gpu_text}" if engine.gpus else "no GPU"
        return f"engine {engine.index} (port {engine.port}, pid {child.pid}, {gpus})"

    def worker_spec(self, engine: Engine) -> WorkerSpec:
        """The worker registered for ``engine``: its address, role, engine kind and, with ``--kv-events-port``, where
        it publishes KV events (the master subscribes to them)."""
        host, events = self.plan.advertise_host, None
        if engine.kv_events_port is not None:
            events = KvEventsEndpoint(
                f"tcp://{host}:{engine.kv_events_port}", f"tcp://{host}:{engine.kv_events_port + 1}"
            )
        return WorkerSpec(host, engine.port, self.plan.role, engine=self.plan.worker_engine, kv_events=events)

    async def _keep_running(self, engine: Engine, healthy: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            child = self._spawn(engine)
            what = self.describe(engine, child)
            log.info("%s: started: %s (log %s)", what, shlex.join(engine.command), child.log_path)
            started = loop.time()
            problem = await self._wait_healthy(self.health_url(engine.port), child, self.startup_timeout_s)
            if problem is _STOPPING:
                return
            if problem is not None:
                self._kill_group(child)
                if not healthy.is_set():
                    raise LaunchFailed(f"{what} {problem}\nlast lines of {child.log_path}:\n{_tail(child)}")
                failures += 1
                delay = self._backoff(failures)
                log.error("%s %s; restarting it in %.1f s; last lines of its log:\n%s", what, problem, delay,
                          _tail(child))  # fmt: skip
                if await self._sleep(delay) is _STOPPING:
                    return
                continue
            spec = self.worker_spec(engine)
            await self._register(spec, child, what)
            log.info("%s: healthy after %.1f s; registered as %s worker %s (engine %s)%s", what,
                     loop.time() - started, spec.role.value, spec.worker_id, spec.engine.value,
                     f" in {self._registrar.where}" if self._registrar else "")  # fmt: skip
            healthy.set()
            healthy_at = loop.time()
            returncode = await self._wait_exit(child)
            if returncode is _STOPPING:
                return
            ran = loop.time() - healthy_at
            if self._registrar is not None:
                await self._deregister_quietly(spec.worker_id)
            self._kill_group(child)
            failures = 1 if ran >= STABLE_S else failures + 1
            delay = self._backoff(failures)
            log.error("%s %s after %.1f s healthy; deregistered %s; restarting it in %.1f s; last lines of its log:"
                      "\n%s", what, describe_exit(returncode), ran, spec.worker_id, delay, _tail(child))  # fmt: skip
            if await self._sleep(delay) is _STOPPING:
                return

    @staticmethod
    def _backoff(failures: int) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))

    def health_url(self, port: int) -> str:
        return f"http://{self.plan.advertise_host}:{port}{self.plan.health_path}"

    async def _sleep(self, seconds: float) -> object:
        """Sleep, or return _STOPPING as soon as the launch is stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return _STOPPING if self._stopping.is_set() else None

    async def _wait_healthy(self, url: str, child: Child, timeout_s: float) -> object:
        """None once ``url`` answers 200; else why not (the child exited, or the time is up), or _STOPPING."""
        assert self._http is not None
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            if self._stopping.is_set():
                return _STOPPING
            if not child.alive():
                return f"{describe_exit(child.process.returncode)} before it was healthy"
            try:
                async with self._http.get(url) as resp:
                    if resp.status == 200:
                        return None
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                return f"was not healthy within {timeout_s:g} s (GET {url}: {last}); stopped it"
            if await self._sleep(HEALTH_POLL_S) is _STOPPING:
                return _STOPPING

    async def _wait_exit(self, child: Child) -> object:
        """The child's exit status once it exits, or _STOPPING."""
        while child.process.poll() is None:
            if await self._sleep(EXIT_POLL_S) is _STOPPING:
                return _STOPPING
        return child.process.returncode

    async def _register(self, spec: WorkerSpec, child: Child, what: str) -> None:
        """Until the fleet takes it (or the engine exits, or the stop: then cancelled or left to the exit wait)."""
        if self._registrar is None:
            return
        while True:
            self.registered.add(spec.worker_id)  # before the call: a stop during it still deregisters
            try:
                await self._registrar.register(spec)
                return
            except RegistrationFailed as exc:
                log.warning("%s: could not register %s in %s: %s; trying again in %.0f s", what, spec.worker_id,
                            self._registrar.where, exc, REGISTER_RETRY_S)  # fmt: skip
            if await self._sleep(REGISTER_RETRY_S) is _STOPPING or not child.alive():
                return

    def _kill_group(self, child: Child) -> None:
        """A child that is dead, or must go now: SIGKILL its process group (what it started, too) and reap it."""
        child.signal_group(signal.SIGKILL)
        if child.process.poll() is None:
            child.process.wait()
        child.group_stopped = True

    # ---- --serve: the router ----

    async def _run_router(self, serve: Serve, redis_url: str) -> None:
        command = [sys.executable, "-m", "flexlb.cli", "serve", "--host", serve.host, "--port", str(serve.port)]
        env = {**self.base_env, **serve.env, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        child = spawn("router", command, self.log_dir, env)
        self.children.append(child)
        self._router = child
        what = f"the router on port {serve.port} (pid {child.pid})"
        log.info("%s: started: %s", what, shlex.join(command))
        problem = await self._wait_healthy(f"{serve.url}/health", child, 60.0)
        if problem is _STOPPING:
            return
        if problem is not None:
            raise LaunchFailed(f"{what} {problem}\nlast lines of {child.log_path}:\n{_tail(child)}")
        self._router_ready.set()
        returncode = await self._wait_exit(child)
        if returncode is not _STOPPING:
            raise LaunchFailed(f"{what} {describe_exit(returncode)}\nlast lines of its log:\n{_tail(child)}")

    # ---- what the operator sees ----

    def banner(self) -> str:
        plan = self.plan
        where = f" of {self._registrar.where}" if self._registrar else " (not registered: --no-register)"
        lines = [
            f"flexlb launch: {len(plan.engines)} {plan.engine} engines healthy, {plan.role.value} workers (engine"
            f" {plan.worker_engine.value}){where}",
        ]
        for e in plan.engines:
            child = self._current.get(e.index)
            pid = child.pid if child is not None else 0
            gpus = f"GPUs {e.gpu_text}" if e.gpus else "no GPU"
            events = f"  KV events tcp://{plan.advertise_host}:{e.kv_events_port}" if e.kv_events_port else ""
            lines.append(f"  engine {e.index}  http://{plan.advertise_host}:{e.port}  pid {pid}  {gpus}{events}")
        if self.serve is not None:
            url = self.serve.url
            chat = orjson.dumps(
                {"model": plan.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
            ).decode()
            lines += [
                f"flexlb launch: serving on {url}  (model {plan.model!r}; router pid"
                f" {self._router.pid if self._router else 0})",
                f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'",
            ]
        lines.append(f"Ctrl-C stops everything (logs in {self.log_dir}).")
        return "\n".join(lines)
