"""Loads the Lua scripts in lua/ once and calls them by SHA, loading a script again when Redis answers NOSCRIPT
(restarted, or SCRIPT FLUSH): through redis-py's AsyncScript, or through the decision path's pipelined client."""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from flexlb.state.pipelined import PipelinedRedis

SCRIPT_NAMES = (
    "lookup",
    "reserve",
    "release",
    "sweep",
    "upsert_worker",
    "remove_worker",
    "cache_set",
    "lock_acquire",
    "lock_renew",
    "lock_release",
    "lock_take_over",
    "shard_pollers",
    "fenced_set",
    "master_status",
    "master_cache",
    "master_forget",
)
_INCLUDE = "-- @include "


def script_source(name: str) -> str:
    """The text of lua/<name>.lua with its ``-- @include file`` lines replaced by that file."""
    folder = resources.files("flexlb.lua")
    lines = []
    for line in folder.joinpath(f"{name}.lua").read_text().splitlines():
        if line.startswith(_INCLUDE):
            lines.append(folder.joinpath(line.removeprefix(_INCLUDE).strip()).read_text())
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class Scripts:
    """One registered script per Lua file, bound to a client; calls go through ``pipelined`` when given."""

    def __init__(self, redis: Redis, pipelined: PipelinedRedis | None = None) -> None:
        self._redis = redis
        self._pipelined = pipelined
        self._scripts: dict[str, AsyncScript] = {n: redis.register_script(script_source(n)) for n in SCRIPT_NAMES}

    async def preload(self) -> None:
        """SCRIPT LOAD every script so the first calls need no fallback round trip."""
        for script in self._scripts.values():
            await self._redis.script_load(script.script)

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        if self._pipelined is None:
            return await script(keys=keys, args=args)
        try:
            return await self._pipelined.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._pipelined.execute("SCRIPT", "LOAD", script.script)
            return await self._pipelined.execute("EVALSHA", script.sha, len(keys), *keys, *args)
