"""The decision path's pipelined Redis client against real redis-servers: replies matched to callers under
concurrency, errors as redis-py's, timeouts and restarts reported as "Redis unavailable" and recovered from, AUTH,
SELECT and unix sockets, under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from conftest import eventually
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from flexlb.embedded_cluster import EmbeddedCluster, EmbeddedSentinel
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
        args = ["flexlb:{x}:cache:", "flexlb:{x}:inflight:", 8, 1, 1]
        reply = await scripts.call("lookup", ["flexlb:{x}:blk:1"], args)
        assert reply == [[], [], 0]
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


# ---- Redis Cluster and Sentinel: a real 3-master cluster (the session's), MOVED / ASK / TRYAGAIN / failover ----

COUNT_BOTH = "redis.call('INCR', KEYS[1]); return redis.call('INCR', KEYS[2])"  # two keys of one slot, one step


def _slot_and_other(cluster: EmbeddedCluster, service: str) -> tuple[int, int, int]:
    slot = key_slot(f"flexlb:{{{service}}}:x".encode())
    owner = cluster.owner(slot)
    return slot, owner, next(p for p in cluster.ports if p != owner)


@pytest.mark.realredis
async def test_cluster_a_seed_that_does_not_own_the_slot_redirects_the_whole_batch(
    redis_cluster: EmbeddedCluster, service: str
) -> None:
    _, owner, other = _slot_and_other(redis_cluster, service)
    client = PipelinedRedis(f"redis+cluster://127.0.0.1:{other}", timeout_s=5)
    try:
        keys = [f"flexlb:{{{service}}}:{i}" for i in range(50)]
        assert await asyncio.gather(*(client.execute("SET", k, k) for k in keys)) == ["OK"] * 50
        assert await asyncio.gather(*(client.execute("GET", k) for k in keys)) == keys
        assert client.address == ("127.0.0.1", owner)
        assert redis_cluster.client(owner).get(keys[0]) == keys[0]
    finally:
        await client.aclose()


@pytest.mark.realredis
async def test_cluster_reshard_under_load_loses_and_repeats_no_call(
    redis_cluster: EmbeddedCluster, service: str
) -> None:
    """Scripts on two keys of the slot run without pause while the slot moves to another node (MIGRATE in batches of
    10 keys, as redis-cli does): every call answers, and each ran exactly once."""
    slot, owner, other = _slot_and_other(redis_cluster, service)
    client = PipelinedRedis(redis_cluster.url, timeout_s=5)
    a, b = f"flexlb:{{{service}}}:a", f"flexlb:{{{service}}}:b"
    for i in range(60):  # keys to migrate, so the move takes several MIGRATE calls
        redis_cluster.client(owner).set(f"flexlb:{{{service}}}:filler{i}", i)
    done = asyncio.Event()

    async def load() -> int:
        calls = 0
        while not done.is_set():
            await asyncio.gather(*(client.execute("EVAL", COUNT_BOTH, 2, a, b) for _ in range(20)))
            calls += 20
        return calls

    try:
        await client.execute("EVAL", COUNT_BOTH, 2, a, b)
        loader = asyncio.ensure_future(load())
        moved = await asyncio.to_thread(redis_cluster.move_slot, slot, other, between=lambda: time.sleep(0.005))
        await eventually(lambda: asyncio.sleep(0, client.address == ("127.0.0.1", other)), "the client follows")
        done.set()
        calls = 1 + await loader
        assert moved >= 60
        assert redis_cluster.owner(slot) == other
        assert [int(redis_cluster.client(other).get(k)) for k in (a, b)] == [calls, calls]
    finally:
        done.set()
        await client.aclose()


@pytest.mark.realredis
async def test_cluster_ask_goes_to_the_importing_node_once(redis_cluster: EmbeddedCluster, service: str) -> None:
    slot, owner, other = _slot_and_other(redis_cluster, service)
    key = f"flexlb:{{{service}}}:asked"
    src, dst = redis_cluster.client(owner), redis_cluster.client(other)
    client = PipelinedRedis(f"redis+cluster://127.0.0.1:{owner}", timeout_s=5)
    try:
        assert await client.execute("SET", key, "v") == "OK"
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", redis_cluster.node_id(owner))
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", redis_cluster.node_id(other))
        src.execute_command("MIGRATE", "127.0.0.1", other, key, 0, 5000)
        assert await client.execute("GET", key) == "v"  # ASK -> ASKING + GET on the importing node
        assert client.address == ("127.0.0.1", owner)  # the slot is still the source's
    finally:
        for port in redis_cluster.ports:  # back to stable: the slot is the importing node's now
            redis_cluster.client(port).execute_command("CLUSTER SETSLOT", slot, "NODE", redis_cluster.node_id(other))
        await client.aclose()


@pytest.mark.realredis
async def test_cluster_owner_lost_finds_the_new_owner_from_the_other_nodes(tmp_path: Path, service: str) -> None:
    """The owner dies after its slot was handed to another node (a failover, as far as the client can tell): the
    call in flight fails as unavailable, the next one asks the surviving nodes (CLUSTER SLOTS) and goes there."""
    cluster = EmbeddedCluster(directory=str(tmp_path), full_coverage=False).start()
    try:
        slot, owner, other = _slot_and_other(cluster, service)
        client = PipelinedRedis(f"redis+cluster://127.0.0.1:{owner}", timeout_s=2)
        key = f"flexlb:{{{service}}}:k"
        try:
            assert await client.execute("SET", key, "1") == "OK"
            cluster.move_slot(slot, other)
            cluster.kill(owner)
            with pytest.raises(REDIS_UNAVAILABLE):
                await client.execute("GET", key)  # the connection to the dead owner is lost
            assert await client.execute("GET", key) == "1"
            assert client.address == ("127.0.0.1", other)
        finally:
            await client.aclose()
    finally:
        cluster.close()


@pytest.mark.realredis
async def test_sentinel_primary_is_asked_of_the_sentinels_and_followed_after_a_failover(
    tmp_path: Path, service: str
) -> None:
    deployment = EmbeddedSentinel(directory=str(tmp_path)).start()
    client = PipelinedRedis(deployment.url, timeout_s=2)
    key = f"{service}:k"
    try:
        assert await client.execute("SET", key, "before") == "OK"
        assert client.address == ("127.0.0.1", deployment.primary)
        new = await asyncio.to_thread(deployment.failover, stop_primary=True)

        async def written() -> bool:
            try:
                return await client.execute("SET", key, "after") == "OK"
            except REDIS_UNAVAILABLE:
                return False  # the old primary is gone: unavailable until the sentinel names the new one

        await eventually(written, "a write through the promoted primary")
        assert client.address == ("127.0.0.1", new)
        assert deployment.client(new).get(key) == "after"
    finally:
        await client.aclose()
        deployment.close()


def test_cluster_and_sentinel_urls() -> None:
    assert PipelinedRedis.supports("redis+cluster://h:1,h:2") and PipelinedRedis.supports("redis+sentinel://h:1/m")
    assert not PipelinedRedis.supports("rediss+cluster://h:1")  # TLS: the scripts go through redis-py
