"""A local flexlb stack of real processes: a redis-server, and per model service a `flexlb master`, routers in proxy
mode and simulated workers, all on free loopback ports. Used by `flexlb up`, `flexlb demo`, `flexlb launch` and
`flexlb bench proxy` / `peers` / `chaos`.

Every process is started through ``flexlb.stack.processes`` (own process group, parent-death signal) and recorded, so
``Stack.close()`` stops everything ever started and the JSON can list every pid.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync

from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.embedded_redis import RedisNotInstalled, free_port, free_port_pair
from flexlb.settings import ENV_VARS, FlexlbConfig
from flexlb.stack.processes import Child, NotReady, spawn, stop_all, wait_http_ready
from flexlb.stack.worker_options import WorkerOptions
from flexlb.state.keys import ServiceKeys

FLEXLB = (sys.executable, "-m", "flexlb.cli", "--log-level", "WARNING")
BOOTSTRAP = (sys.executable, "-m", "flexlb.sim.bootstrap", "--log-level", "WARNING")
# A disaggregated service's decode workers wait this long for their prefill's KV before failing the request.
KV_WAIT_TIMEOUT_S = 30.0
_ENDPOINT_KEY = {Role.PREFILL: "prefill_endpoint", Role.DECODE: "decode_endpoint", Role.PDFUSION: "pd_fusion_endpoint"}
# What the caller's environment could change in a child's configuration: the demo sets what it means instead.
_CONFIG_VARIABLES = frozenset({v.name for v in ENV_VARS} | {f.name.upper() for f in dataclasses.fields(FlexlbConfig)})


class StackError(RuntimeError):
    """A process of the stack did not start or died (the message names it and shows its log's end)."""


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without flexlb configuration variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass(frozen=True, slots=True)
class Worker:
    child: Child
    role: Role
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_id(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True, slots=True)
class Router:
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(slots=True)
class Service:
    """One model service's processes on the shared Redis."""

    service_id: str
    workers: list[Worker]
    routers: list[Router]
    master: Child | None
    bootstrap: Child | None = None  # a disaggregated service's PD bootstrap server (flexlb.sim.bootstrap)

    @property
    def children(self) -> list[Child]:
        return [
            *(r.child for r in self.routers),
            *([self.master] if self.master else []),
            *(w.child for w in self.workers),
            *([self.bootstrap] if self.bootstrap else []),
        ]

    @property
    def bootstrap_url(self) -> str | None:
        return None if self.bootstrap is None else f"http://127.0.0.1:{_port_of(self.bootstrap.command)}"

    def model_service_config(self) -> str:
        by_role: dict[Role, list[str]] = {}
        for w in self.workers:
            by_role.setdefault(w.role, []).append(w.worker_id)
        doc = {_ENDPOINT_KEY[role]: {"address": ids} for role, ids in by_role.items()}
        return orjson.dumps({"service_id": self.service_id, **doc}).decode()


@dataclass
class Stack:
    """A redis-server and the services started on it; ``close()`` stops every process ever started."""

    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flexlb-demo-")))
    started: list[Child] = field(default_factory=list)  # every child, in start order, never removed
    redis: Child | None = None
    redis_url: str = ""
    startup_timeout_s: float = 60.0
    checkpoint: Callable[[], None] = lambda: None  # called while waiting; raises to abandon the start (a signal)

    def _spawn(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        child = spawn(name, command, self.log_dir, env)
        self.started.append(child)
        return child

    # ---- redis ----

    def start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled(
                "redis-server is not on PATH: install it (Debian/Ubuntu: apt-get install -y redis-server)"
            )
        port = free_port()
        data = self.log_dir / "redis-data"
        data.mkdir(exist_ok=True)
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        self.redis = self._spawn("redis", args)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis_sync.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if not self.redis.alive():
                    raise StackError(
                        f"redis-server exited with {self.redis.process.returncode}:\n{self.redis.log_tail()}"
                    )
                try:
                    if client.ping():
                        return self.redis_url
                except redis_sync.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"redis-server did not answer PING within {self.startup_timeout_s:g} s")
                self.checkpoint()
                time.sleep(0.02)
        finally:
            client.close()

    # ---- one service ----

    def start_service(
        self,
        service_id: str,
        roles: Sequence[Role],
        options: Mapping[Role, WorkerOptions],
        routers: int,
        router_config: Mapping[str, Any],
        *,
        master: bool = True,
        router_port: int | None = None,
        router_processes: int = 1,
    ) -> Service:
        """Start workers, a master (unless ``master`` is false) and routers; return once all answer /health and
        the fleet's status in Redis shows every worker polled (alive, with its configured KV). ``router_port``: the
        first router's port (else a free one); ``router_processes``: each router's ``--processes``.

        With PREFILL and DECODE workers, also a PD bootstrap server whose port is the routers' ``bootstrapPort``: a
        decode worker waits there for its prefill's KV, so the client's TTFT includes the prefill."""
        bootstrap: Child | None = None
        pd_args: list[str] = []
        if Role.PREFILL in roles and Role.DECODE in roles:
            bootstrap_port = free_port()
            command = [*BOOTSTRAP, "--port", str(bootstrap_port)]
            bootstrap = self._spawn(f"{service_id}-bootstrap", command)
            router_config = {**router_config, "bootstrapPort": bootstrap_port}
            pd_args = ["--kv-wait-timeout", f"{KV_WAIT_TIMEOUT_S:g}"]
        workers = []
        for i, role in enumerate(roles):
            try:
                port = free_port_pair()
            except OSError as exc:
                raise StackError(str(exc)) from None
            command = [*FLEXLB, "sim-worker", "--role", role.value.lower(), "--port", str(port), *options[role].argv()]
            command += pd_args if role is not Role.PDFUSION else []
            workers.append(Worker(self._spawn(f"{service_id}-{role.value.lower()}{i}", command), role, port))
        service = Service(service_id, workers, [], None, bootstrap)
        env = clean_environment(
            {
                "REDIS_URL": self.redis_url,
                "FLEXLB_SERVICE_ID": service_id,
                "MODEL_SERVICE_CONFIG": service.model_service_config(),
            }
        )
        if master:
            command = [*FLEXLB, "master", "--port", str(free_port()), "--holder", f"{service_id}-master"]
            service.master = self._spawn(f"{service_id}-master", command, env)
        config = orjson.dumps(dict(router_config)).decode()
        for i in range(routers):
            port = router_port if router_port and i == 0 else free_port()
            command = [*FLEXLB, "serve", "--host", "127.0.0.1", "--port", str(port), "--advertise", f"127.0.0.1:{port}"]
            if router_processes > 1:
                command += ["--processes", str(router_processes)]
            child = self._spawn(f"{service_id}-router{i}", command, {**env, "FLEXLB_CONFIG": config})
            service.routers.append(Router(child, port))
        waits = [(w.url, w.child) for w in workers]
        if bootstrap is not None:
            waits.append((str(service.bootstrap_url), bootstrap))
        if service.master is not None:
            waits.append((f"http://127.0.0.1:{_port_of(service.master.command)}", service.master))
        waits += [(r.url, r.child) for r in service.routers]
        for url, child in waits:
            self.checkpoint()
            try:
                wait_http_ready(url, child.process, child.log_tail, child.name, self.startup_timeout_s)
            except NotReady as exc:
                raise StackError(str(exc)) from None
        self.wait_polled(service, options)
        return service

    def wait_polled(self, service: Service, options: Mapping[Role, WorkerOptions]) -> None:
        """Until Redis shows every worker alive with its configured KV size: a status some master polled."""
        keys = ServiceKeys(service.service_id)
        client = redis_sync.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                missing = []
                for w in service.workers:
                    status = client.hgetall(keys.worker(w.worker_id))
                    kv_total = str(options[w.role].kv_blocks * DEFAULT_BLOCK_SIZE)
                    if status.get("alive") != "1" or status.get("kv_total") != kv_total:
                        missing.append(w.worker_id)
                if not missing:
                    return
                self.check_alive(service)
                self.checkpoint()
                if time.monotonic() > deadline:
                    raise StackError(f"workers {', '.join(missing)} not polled within {self.startup_timeout_s:g} s")
                time.sleep(0.05)
        finally:
            client.close()

    def check_alive(self, service: Service) -> None:
        for child in service.children:
            if not child.alive():
                raise StackError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")

    def stop_service(self, service: Service) -> None:
        stop_all(service.children)

    def close(self, *, keep_logs: bool = False) -> None:
        """Stop every process ever started (services first, redis-server last); drop the logs unless asked."""
        stop_all([c for c in self.started if c is not self.redis])
        if self.redis is not None:
            stop_all([self.redis])
        if not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _port_of(command: Sequence[str]) -> str:
    return command[list(command).index("--port") + 1]
