"""Where `flexlb launch` registers its engines: the fleet's Redis (as `flexlb worker add` does: REDIS_URL,
``--redis-url``, or the Redis of ``--serve``), or a router's admin API (``--router URL``, as ``POST /rtp_llm/workers``
with FLEXLB_ADMIN_TOKEN). Either way the worker carries its engine kind, so the master polls it the right way, and
where it publishes KV events when it does (``--kv-events-port``), so the master subscribes to them."""

from __future__ import annotations

import logging
from typing import Protocol
from urllib.parse import quote

import aiohttp
import orjson

from flexlb.domain import WorkerSpec

log = logging.getLogger("flexlb.launch")


class RegistrationFailed(RuntimeError):
    """The fleet did not take the registration (Redis away, the router refusing); worth trying again."""


class Registrar(Protocol):
    where: str  # for messages: the Redis URL or the router

    async def register(self, spec: WorkerSpec) -> None: ...

    async def deregister(self, worker_id: str) -> None: ...

    async def close(self) -> None: ...


class RedisRegistrar:
    """Writes the worker's keys in the fleet's Redis (flexlb.state.store, as `flexlb worker add` / `remove`)."""

    def __init__(self, url: str, service: str, timeout_ms: int) -> None:
        from flexlb.app import make_redis
        from flexlb.state.store import FleetStore

        self.redis = make_redis(url, timeout_ms)
        self.store = FleetStore(self.redis, service)
        self.where = f"service {service!r} in Redis {url}"

    async def register(self, spec: WorkerSpec) -> None:
        from flexlb.state.errors import REDIS_UNAVAILABLE

        try:
            await self.store.register_worker(spec)
        except REDIS_UNAVAILABLE as exc:
            raise RegistrationFailed(f"Redis: {exc}") from None

    async def deregister(self, worker_id: str) -> None:
        from flexlb.state.errors import REDIS_UNAVAILABLE

        try:
            await self.store.remove_worker(worker_id)
        except REDIS_UNAVAILABLE as exc:
            raise RegistrationFailed(f"Redis: {exc}") from None

    async def close(self) -> None:
        await self.redis.aclose()


class RouterRegistrar:
    """Registers through a router's admin API (``POST /rtp_llm/workers``, ``DELETE /rtp_llm/workers/{id}``), in
    the router's own service, with the first of FLEXLB_ADMIN_TOKEN's tokens when it is set."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.where = f"the router {self.url}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def _call(self, method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, str]:
        try:
            data = orjson.dumps(body) if body is not None else None
            async with self._http().request(method, url, data=data) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistrationFailed(f"{method} {url}: {exc!r}") from None

    async def register(self, spec: WorkerSpec) -> None:
        body: dict[str, object] = {"ip": spec.ip, "http_port": spec.http_port, "role": spec.role.value,
                                   "grpc_port": spec.grpc_port, "engine": spec.engine.value}  # fmt: skip
        if spec.kv_events is not None:
            body |= {"kv_events": spec.kv_events.publisher, "kv_events_replay": spec.kv_events.replay or False}
        status, text = await self._call("POST", f"{self.url}/rtp_llm/workers", body)
        if status != 201:
            raise RegistrationFailed(f"POST {self.url}/rtp_llm/workers answered {status}: {text[:500]}")

    async def deregister(self, worker_id: str) -> None:
        url = f"{self.url}/rtp_llm/workers/{quote(worker_id, safe=':[]')}"
        status, text = await self._call("DELETE", url)
        if status not in (200, 404):  # 404: not registered (any more): what was asked
            raise RegistrationFailed(f"DELETE {url} answered {status}: {text[:500]}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
