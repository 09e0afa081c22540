"""Shared fixtures: a real redis-server per test session on a free port, and FleetStores on it or on fakeredis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from flexlb.embedded_redis import EmbeddedRedis
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
