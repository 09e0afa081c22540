"""Shared fixtures: a real redis-server per test session on a free port, FleetStores on it or on fakeredis, and child
processes of the real commands (routers, `flexlb master`, simulated workers)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import redis.asyncio as aioredis

from flexlb.embedded_cluster import EmbeddedCluster
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.stack.processes import Child, spawn, stop_process, wait_http_ready
from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.store import FleetStore


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s}s (last: {last!r})")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server for the session; tests isolate by service name, never by FLUSHDB."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A 3-master Redis Cluster for the session (tests that move slots move their own service's slot back or not
    at all: each test has a service of its own, most likely in a slot of its own)."""
    cluster = EmbeddedCluster().start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def service() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def real_redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(params=["real", "fake"])
async def any_redis(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    """The same test on a real redis-server (the reference) and on fakeredis with Lua."""
    if request.param == "real":
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis(decode_responses=True, version=(7, 0))
    yield client
    await client.aclose()


@pytest.fixture
async def store(any_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str) -> AsyncIterator[FleetStore]:
    """On the real server the scripts go through the pipelined client, as in a router; on fakeredis through
    redis-py (as in the master)."""
    async with _scripts_client(any_redis, redis_server) as pipelined:
        yield FleetStore(any_redis, service, pipelined)


@pytest.fixture
async def real_store(
    real_redis: aioredis.Redis, redis_server: EmbeddedRedis, service: str
) -> AsyncIterator[FleetStore]:
    async with _scripts_client(real_redis, redis_server) as pipelined:
        yield FleetStore(real_redis, service, pipelined)


@contextlib.asynccontextmanager
async def _scripts_client(client: aioredis.Redis, server: EmbeddedRedis) -> AsyncIterator[PipelinedRedis | None]:
    if "Fake" in type(client).__name__:
        yield None
        return
    pipelined = PipelinedRedis(server.url, timeout_s=10)
    try:
        yield pipelined
    finally:
        await pipelined.aclose()


class ChildProcess:
    """A flexlb command run as a child process through the project's launcher (flexlb.stack.processes: a process
    group of its own, the parent-death signal), its output in ``log_path``, ready when its ``/health`` answers 200."""

    what = "process"
    url: str
    child: Child

    def _spawn(self, command: list[str], env: dict[str, str], log_path: str) -> None:
        path = Path(log_path)
        self.child = spawn(self.what, command, path.parent, env, log_path=path, truncate=True)
        self.process = self.child.process
        self.log_path = log_path

    def wait_ready(self, timeout_s: float = 20.0) -> Self:
        wait_http_ready(self.url, self.process, self.log, self.what, timeout_s)
        return self

    def log(self) -> str:
        return self.child.log_tail(4000)

    def stop(self, sig: int | None = None) -> int:
        """Send ``sig`` (default SIGTERM) and return the exit status (killed, and -9, if it does not stop in 10 s).

        To the process alone, not its group: a test can then check that it stopped its own children itself."""
        import signal

        return stop_process(self.process, sig or signal.SIGTERM)


class RouterProcess(ChildProcess):
    """A ``flexlb serve`` child process on a free port; ``processes`` > 1: a supervisor of that many routers."""

    what = "router"

    def __init__(
        self,
        redis_url: str,
        service: str,
        config: dict | None = None,
        env: dict | None = None,
        processes: int = 1,
    ) -> None:
        import os
        import sys

        import orjson

        from flexlb.embedded_redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "FLEXLB_SERVICE_ID": service,
            # Routers here schedule on statuses the tests write; a test that wants polling says contendForMaster.
            # Without a master they would check the workers' health (flexlb/master/router_health.py) and mark the
            # addresses tests register without a listener not alive: once an hour, unless a test says otherwise.
            "FLEXLB_CONFIG": orjson.dumps(
                {"contendForMaster": False, "healthCheckIntervalMs": 3_600_000, **(config or {})}
            ).decode(),
            **(env or {}),
        }
        command = [sys.executable, "-m", "flexlb.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if processes != 1:
            command += ["--processes", str(processes)]
        self._spawn(command, full_env, f"/tmp/flexlb-router-{self.port}.log")


@pytest.fixture
def start_router(redis_server: EmbeddedRedis, service: str) -> Iterator:
    """Factory: start_router(config=..., redis_url=..., processes=...) -> a ready RouterProcess; all are stopped at
    the end."""
    started: list[RouterProcess] = []

    def start(
        config: dict | None = None,
        *,
        redis_url: str | None = None,
        env: dict | None = None,
        wait: bool = True,
        processes: int = 1,
    ) -> RouterProcess:
        router = RouterProcess(redis_url or redis_server.url, service, config, env, processes)
        started.append(router)
        return router.wait_ready() if wait else router

    yield start
    for router in started:
        router.stop()


class SimWorkerProcess(ChildProcess):
    """A simulated worker child process (``flexlb sim-worker``) on a free HTTP port, gRPC on the next one.

    ``port`` reuses a port (a restarted worker); ``args`` are extra sim-worker options."""

    what = "worker"

    def __init__(
        self,
        log_path: str,
        *,
        role: str = "pdfusion",
        args: tuple[str, ...] = (),
        port: int | None = None,
        entry: tuple[str, ...] | None = None,
        time_scale: float = 0.05,
    ) -> None:
        import os
        import sys

        self.role = role
        from flexlb.embedded_redis import free_port_pair

        self.port = port or free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.port + 1}"
        self.worker_id = f"127.0.0.1:{self.port}"
        entry = entry or ("-m", "flexlb.cli", "sim-worker", "--role", role)
        command = [sys.executable, *entry, "--port", str(self.port), "--time-scale", str(time_scale), *args]
        self._spawn(command, {**os.environ, "PYTHONUNBUFFERED": "1"}, log_path)


@pytest.fixture
def start_sim_worker(tmp_path) -> Iterator:  # type: ignore[no-untyped-def]
    """Factory: start_sim_worker(role=..., args=..., port=...) -> a ready SimWorkerProcess; all stopped at the end."""
    started: list[SimWorkerProcess] = []

    def start(wait: bool = True, **kwargs) -> SimWorkerProcess:  # type: ignore[no-untyped-def]
        worker = SimWorkerProcess(str(tmp_path / f"sim-{len(started)}.log"), **kwargs)
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop()


class MasterProcess(ChildProcess):
    """A ``flexlb master`` child process; its /health on a free port."""

    what = "master"

    def __init__(self, redis_url: str, service: str, config: dict | None = None, env: dict | None = None) -> None:
        import os
        import sys

        import orjson

        from flexlb.embedded_redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.holder = f"test-master-{self.port}"
        command = [sys.executable, "-m", "flexlb.cli", "master", "--port", str(self.port), "--holder", self.holder]
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "FLEXLB_SERVICE_ID": service,
            "FLEXLB_CONFIG": orjson.dumps(config or {}).decode(),
            **(env or {}),
        }
        self._spawn(command, env, f"/tmp/flexlb-master-{self.port}.log")


@pytest.fixture
def start_master(redis_server: EmbeddedRedis, service: str) -> Iterator:
    """Factory: start_master(config=...) -> a ready MasterProcess (master or standby); all stopped at the end."""
    started: list[MasterProcess] = []

    def start(config: dict | None = None, *, env: dict | None = None, wait: bool = True) -> MasterProcess:
        master = MasterProcess(redis_server.url, service, config, env)
        started.append(master)
        return master.wait_ready() if wait else master

    yield start
    for master in started:
        master.stop()
