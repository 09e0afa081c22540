"""HTTP health checks of workers: the threshold logic (pure) and the one GET it takes (injected client).

As smg and vllm-router do: a worker is out after ``failure_threshold`` failed checks in a row and back after
``success_threshold`` passed ones in a row, so one lost packet neither drops a worker nor one lucky answer revives a
flapping one. A check passes on HTTP 200 from ``GET /health`` within the timeout (vLLM, SGLang, RTP-LLM and the
simulator all serve it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from flexlb.settings import FlexlbConfig

HEALTH_PATH = "/health"


@dataclass(frozen=True, slots=True)
class HealthOptions:
    interval_s: float = 0.5
    timeout_s: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 2

    @classmethod
    def from_config(cls, config: FlexlbConfig) -> HealthOptions:
        return cls(
            interval_s=config.health_check_interval_ms / 1000,
            timeout_s=config.health_check_timeout_ms / 1000,
            failure_threshold=config.health_failure_threshold,
            success_threshold=config.health_success_threshold,
        )

    @property
    def out_within_s(self) -> float:
        """The longest a worker nothing answers for stays in: every check of the threshold times out."""
        return self.failure_threshold * (self.interval_s + self.timeout_s)


@dataclass(slots=True)
class HealthTracker:
    """Consecutive results of one worker's checks -> whether it is up."""

    failure_threshold: int
    success_threshold: int
    up: bool = True
    failures: int = 0  # in a row
    successes: int = 0  # in a row

    def record(self, ok: bool) -> bool:
        """Count one check; returns True when this result moved ``up``."""
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            if not self.up and self.successes >= self.success_threshold:
                self.up = True
                return True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.up and self.failures >= self.failure_threshold:
                self.up = False
                return True
        return False

    @property
    def settled(self) -> bool:
        """The last results agree with ``up`` by a full threshold (not only by not having moved yet)."""
        return self.failures >= self.failure_threshold if not self.up else self.successes >= self.success_threshold


class HttpGetter:
    """GETs to workers over one pooled aiohttp session (the master polls, routers check health). Close it."""

    def __init__(self, timeout_s: float, session: aiohttp.ClientSession | None = None) -> None:
        self.timeout_s = timeout_s
        self._session = session

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env off: an http_proxy variable meant for other traffic must not reroute worker checks
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=4, ttl_dns_cache=None),
                trust_env=False,
            )
        return self._session

    async def get(self, host: str, port: int, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET http://host:port/path``; raises OSError, aiohttp.ClientError or TimeoutError."""
        netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
        async with asyncio.timeout(self.timeout_s):
            async with self._open().get(f"http://{netloc}:{port}{path}", allow_redirects=False) as resp:
                return resp.status, await resp.read()

    async def healthy(self, host: str, port: int) -> tuple[bool, str]:
        """(passed, why not) of one health check."""
        try:
            status, _ = await self.get(host, port, HEALTH_PATH)
        except TimeoutError:
            return False, f"no answer to GET {HEALTH_PATH} within {self.timeout_s}s"
        except (OSError, aiohttp.ClientError) as exc:
            return False, f"GET {HEALTH_PATH}: {type(exc).__name__}: {exc}"
        return (True, "") if status == 200 else (False, f"GET {HEALTH_PATH}: HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
