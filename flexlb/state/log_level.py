"""The log level of every router process of a service at once (``POST /rtp_llm/update_log_level``), over Redis
pub/sub on ``keys.log_level``: each router follows the channel, applies a level it is sent and answers on the reply
channel the message names, so the router that was asked can say how many processes applied it.

Pub/sub reaches only routers subscribed at that moment (a process still starting keeps its configured level).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from flexlb.state.keys import ServiceKeys
from flexlb.tasks import cancel_until_done

log = logging.getLogger("flexlb.log_level")

REPLY_TIMEOUT_S = 2.0  # how long the asked router waits for the others' answers
RECONNECT_DELAY_S = 0.5


@dataclass(frozen=True, slots=True)
class Broadcast:
    """What a log-level broadcast reached: ``reached`` subscribers, ``applied`` the answers (one per process)."""

    reached: int
    applied: list[dict[str, Any]] = field(default_factory=list)


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


async def broadcast_log_level(
    redis: Redis, keys: ServiceKeys, level: str, timeout_s: float = REPLY_TIMEOUT_S
) -> Broadcast:
    """Ask every router of the service to set ``level``; wait up to ``timeout_s`` for all that got it to answer.
    Raises redis errors (the caller still applied it to its own process)."""
    reply = f"{keys.log_level}:reply:{secrets.token_hex(8)}"
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    applied: list[dict[str, Any]] = []
    try:
        await pubsub.subscribe(reply)  # before publishing: no answer can come before it listens
        reached = int(await redis.publish(keys.log_level, orjson.dumps({"level": level, "reply": reply})))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(applied) < reached and (left := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=min(left, 1.0))
            if message is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    applied.append(orjson.loads(message["data"]))
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
    if len(applied) < reached:
        log.warning("log level %s: %d of %d router processes answered within %g s", level, len(applied), reached,
                    timeout_s)  # fmt: skip
    return Broadcast(reached, applied)


class LogLevelFollower:
    """One router process's subscription: applies each level it is sent with ``apply`` (which returns the level's
    name, or raises ValueError) and answers on the message's reply channel."""

    def __init__(self, redis: Redis, keys: ServiceKeys, apply: Callable[[str], str]) -> None:
        self._redis = redis
        self._keys = keys
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log level follower")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_until_done(self._task)
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.log_level)
                self.subscribed.set()
                if failing:
                    log.info("log level: subscribed again to %s", self._keys.log_level)
                    failing = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: this process keeps its level until it is back
                self.subscribed.clear()
                if not failing:
                    log.warning("log level: subscription to %s lost (%r); retrying", self._keys.log_level, exc)
                    failing = True
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _on_message(self, data: bytes | str) -> None:
        try:
            message = orjson.loads(data)
            level, reply = message["level"], message["reply"]
            applied = self._apply(level)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("log level: ignoring a malformed message on %s (%r): %r", self._keys.log_level, data, exc)
            return
        # At DEBUG on purpose: it shows in the log only if the level really is DEBUG now.
        log.debug("log level %s applied in router process %d", applied, os.getpid())
        await self._redis.publish(reply, orjson.dumps({**_me(), "level": applied}))
