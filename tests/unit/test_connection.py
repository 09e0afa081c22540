"""The hiredis packer sends exactly the bytes redis-py's own asyncio packer sends."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from flexlb.state.connection import HiredisPackingConnection


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("EVALSHA", "a" * 40, 3, "flexlb:{svc}:worker:10.0.0.1:8000", "k2", "k3", "-1", 4, -9223372036854775808, 17),
        ("SET", "clé", "välue"),
        ("CONFIG GET", "maxmemory"),
        ("HSET", b"raw\x00bytes", "f", 1.5),
    ],
)
def test_same_bytes_as_redis_py(args: tuple) -> None:
    ours = b"".join(HiredisPackingConnection().pack_command(*args))
    theirs = b"".join(Connection().pack_command(*args))
    assert ours == theirs
