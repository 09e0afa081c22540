"""Loads the Lua scripts in lua/ once and calls them by SHA, loading a script again when Redis answers NOSCRIPT
(restarted, or SCRIPT FLUSH): through redis-py's AsyncScript, or through the decision path's pipelined client."""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.script_batch import BATCHED, ScriptBatch

SCRIPT_NAMES = (
    "lookup",
    "reserve",
    "release",
    "batch",
    "sweep",
    "audit_reservations",
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
_BODY = "-- @body "


def script_source(name: str) -> str:
    """The text of lua/<name>.lua with its ``-- @body script`` lines replaced by that script as a local function of
    (KEYS, ARGV) (lua/batch.lua), then its ``-- @include file`` lines by what the whole text uses of that file."""
    folder = resources.files("flexlb.lua")
    body: list[str] = []
    for line in folder.joinpath(f"{name}.lua").read_text().splitlines():
        if line.startswith(_BODY):
            inner = line.removeprefix(_BODY).strip()
            own = folder.joinpath(f"{inner}.lua").read_text().splitlines()
            body += [f"local function {inner}(KEYS, ARGV)", *(x for x in own if not x.startswith(_INCLUDE)), "end"]
        else:
            body.append(line)
    own = "\n".join(line for line in body if not line.startswith(_INCLUDE))
    lines = []
    for line in body:
        if line.startswith(_INCLUDE):
            lines.append(_used_part(folder.joinpath(line.removeprefix(_INCLUDE).strip()).read_text(), own))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)")


def _used_part(library: str, script: str) -> str:
    """The top-level definitions of ``library`` (each a ``local`` at column 0 with the comment lines above it) that
    ``script`` refers to, directly or through another one, in their order: Redis runs a script's whole text on
    every call, and defining the unused helpers cost about 5 us per call (measured)."""
    chunks: list[tuple[str | None, list[str]]] = []
    pending: list[str] = []
    for line in library.splitlines():
        match = _DEFINITION.match(line)
        if match:
            chunks.append((match[1], [*pending, line]))
            pending = []
        elif chunks and chunks[-1][0] is not None and not line.startswith("--") and line.strip():
            chunks[-1][1].append(line)  # the definition's body
        else:
            pending.append(line)  # a comment (or blank line) before the next definition
    used: set[str] = set()
    text = script
    while True:
        more = {n for n, _ in chunks if n is not None and n not in used and re.search(rf"\b{n}\b", text)}
        if not more:
            break
        used |= more
        text = "\n".join("\n".join(body) for n, body in chunks if n in more)
    return "\n".join("\n".join(body) for n, body in chunks if n in used)


class Scripts:
    """One registered script per Lua file, bound to a client; calls go through ``pipelined`` when given."""

    def __init__(self, redis: Redis, pipelined: PipelinedRedis | None = None) -> None:
        self._redis = redis
        self._pipelined = pipelined
        self._scripts: dict[str, AsyncScript] = {n: redis.register_script(script_source(n)) for n in SCRIPT_NAMES}
        # the decision path's reserves and releases of a loop round: one script call (flexlb/state/script_batch.py)
        self.batch = ScriptBatch(self.submit, self._call) if pipelined is not None else None

    async def preload(self) -> None:
        """SCRIPT LOAD every script so the first calls need no fallback round trip."""
        for script in self._scripts.values():
            await self._redis.script_load(script.script)

    async def call(self, name: str, keys: list[str], args: list[Any], *, defer_s: float = 0.0) -> Any:
        """``defer_s``: nothing waits for the answer to go on: it may wait up to that long to share a batch
        (ScriptBatch)."""
        if self.batch is not None and name in BATCHED:
            return await self.batch.call(name, keys, args, defer_s=defer_s)
        return await self._call(name, keys, args)

    def submit(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any] | None:
        """The pipelined client's call of a loaded script, sent now (PipelinedRedis.submit); None without one."""
        if self._pipelined is None:
            return None
        return self._pipelined.submit("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        if self._pipelined is None:
            return await script(keys=keys, args=args)
        try:
            return await self._pipelined.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._pipelined.execute("SCRIPT", "LOAD", script.script)
            return await self._pipelined.execute("EVALSHA", script.sha, len(keys), *keys, *args)
