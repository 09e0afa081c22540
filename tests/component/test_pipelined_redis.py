"""The decision path's pipelined Redis client against real redis-servers: replies matched to callers under
concurrency, errors as redis-py's, timeouts and restarts reported as "Redis unavailable" and recovered from, AUTH,
SELECT and unix sockets, under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.scripts import Scripts


async def test_concurrent_calls_get_their_own_replies(redis_server: EmbeddedRedis, service: str) -> None:
    client = PipelinedRedis(redis_server.url, timeout_s=5)
    try:
        await asyncio.gather(*(client.execute("SET", f"{service}:{i}", f"v{i}") for i in range(300)))
        replies = await asyncio.gather(*(client.execute("GET", f"{service}:{i}") for i in range(300)))
        assert replies == [f"v{i}" for i in range(300)]
        # integers, nil, nested arrays as redis-py decodes them
        assert await client.execute("EVAL", "return {1, 'a', {2, false}}", 0) == [1, "a", [2, None]]
    finally:
        await client.aclose()


async def test_an_error_reply_fails_only_its_caller(redis_server: EmbeddedRedis, service: str) -> None:
    client = PipelinedRedis(redis_server.url, timeout_s=5)
    key = f"{service}:s"
    try:
        results = await asyncio.gather(
            client.execute("SET", key, "1"),
            client.execute("HGET", key, "field"),  # WRONGTYPE, in the same write as its neighbours
            client.execute("GET", key),
            return_exceptions=True,
        )
        assert results[0] == "OK" and results[2] == "1"
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
        with pytest.raises(NoScriptError):
            await client.execute("EVALSHA", "0" * 40, 0)
    finally:
        await client.aclose()


async def test_scripts_are_loaded_again_after_a_script_flush(redis_server: EmbeddedRedis, real_redis) -> None:
    client = PipelinedRedis(redis_server.url, timeout_s=5)
    scripts = Scripts(real_redis, client)
    try:
        await real_redis.script_flush()
        reply = await scripts.call("lookup", ["flexlb:{x}:blk:1"], ["flexlb:{x}:cache:", 8, 1, 1])
        assert reply == [[], []]
    finally:
        await client.aclose()


async def test_no_reply_times_out_and_the_next_call_reconnects() -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    client = PipelinedRedis(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.2)
    try:
        results = await asyncio.gather(client.execute("PING"), client.execute("PING"), return_exceptions=True)
        assert all(isinstance(r, REDIS_UNAVAILABLE) for r in results), results
        with pytest.raises(REDIS_UNAVAILABLE):
            await client.execute("PING")
    finally:
        await client.aclose()
        silent.close()


async def test_redis_restart_is_unavailable_then_recovered(tmp_path: Path) -> None:
    server = EmbeddedRedis(directory=str(tmp_path)).start()
    client = PipelinedRedis(server.url, timeout_s=2)
    try:
        assert await client.execute("PING") == "PONG"
        server.stop()
        with pytest.raises(REDIS_UNAVAILABLE):
            await client.execute("PING")
        with pytest.raises(REDIS_UNAVAILABLE):  # refused while it is down, not hung
            await client.execute("PING")
        server.start()
        assert await client.execute("PING") == "PONG"
    finally:
        await client.aclose()
        server.close()


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server with a password, on a free TCP port and a unix socket."""
    port, sock = free_port(), tmp_path / "redis.sock"
    binary = shutil.which("redis-server")
    assert binary is not None
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    args += ["--unixsocket", str(sock), "--requirepass", "s3cret"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, sock
    finally:
        process.terminate()
        process.wait(10)


async def _eventually_ping(client: PipelinedRedis) -> str:
    for _ in range(200):
        try:
            return await client.execute("PING")
        except REDIS_UNAVAILABLE:
            await asyncio.sleep(0.02)  # the server is still starting
    raise AssertionError("redis-server did not start")


async def test_auth_select_and_unix_socket(protected_redis: tuple[int, Path]) -> None:
    port, sock = protected_redis
    tcp = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{port}/3", timeout_s=2)
    unix = PipelinedRedis(f"unix://:s3cret@{sock}?db=3", timeout_s=2)
    wrong = PipelinedRedis(f"redis://:nope@127.0.0.1:{port}/0", timeout_s=2)
    try:
        assert await _eventually_ping(tcp) == "PONG"
        await tcp.execute("SET", "k", "in-db-3")
        assert await unix.execute("GET", "k") == "in-db-3"
        with pytest.raises(AuthenticationError, match="invalid"):  # as redis-py: a ConnectionError
            await wrong.execute("PING")
    finally:
        for client in (tcp, unix, wrong):
            await client.aclose()


def test_works_under_uvloop(redis_server: EmbeddedRedis) -> None:
    async def main() -> list[int]:
        client = PipelinedRedis(redis_server.url, timeout_s=2)
        try:
            return await asyncio.gather(*(client.execute("EVAL", "return tonumber(ARGV[1])", 0, i) for i in range(50)))
        finally:
            await client.aclose()

    assert uvloop.run(main()) == list(range(50))


def test_only_plain_and_unix_urls() -> None:
    assert PipelinedRedis.supports("redis://h:1/0") and PipelinedRedis.supports("unix:///tmp/r.sock")
    assert not PipelinedRedis.supports("rediss://h:1/0")
    with pytest.raises(ValueError, match="rediss"):
        PipelinedRedis("rediss://h:1/0", timeout_s=1)
