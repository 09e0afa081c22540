"""Shared fixtures: a real redis-server per test session on a free port, and FleetStores on it or on fakeredis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from flexlb.embedded_redis import EmbeddedRedis
from flexlb.readiness import wait_http_ready
from flexlb.state.store import FleetStore


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server for the session; tests isolate by service name, never by FLUSHDB."""
    with EmbeddedRedis() as server:
        yield server


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
async def store(any_redis: aioredis.Redis, service: str) -> FleetStore:
    return FleetStore(any_redis, service)


@pytest.fixture
async def real_store(real_redis: aioredis.Redis, service: str) -> FleetStore:
    return FleetStore(real_redis, service)


class RouterProcess:
    """A ``flexlb serve`` child process on a free port."""

    def __init__(self, redis_url: str, service: str, config: dict | None = None, env: dict | None = None) -> None:
        import os
        import subprocess
        import sys

        import orjson

        from flexlb.embedded_redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "FLEXLB_SERVICE_ID": service,
            "FLEXLB_CONFIG": orjson.dumps(config or {}).decode(),
            **(env or {}),
        }
        self.log_path = f"/tmp/flexlb-router-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flexlb.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 20.0) -> RouterProcess:
        wait_http_ready(self.url, self.process, self.log, "router", timeout_s)
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def start_router(redis_server: EmbeddedRedis, service: str) -> Iterator:
    """Factory: start_router(config=..., redis_url=...) -> a ready RouterProcess; all are stopped at the end."""
    started: list[RouterProcess] = []

    def start(
        config: dict | None = None, *, redis_url: str | None = None, env: dict | None = None, wait: bool = True
    ) -> RouterProcess:
        router = RouterProcess(redis_url or redis_server.url, service, config, env)
        started.append(router)
        return router.wait_ready() if wait else router

    yield start
    for router in started:
        router.stop()
