"""Talking to one worker: the shared client session, sending a request, and telling a failure before the worker's
first byte (retried elsewhere) from an answer (passed to the client, whatever its status below 500)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from flexlb.domain import Role, WorkerSpec

# Engines serve hundreds of concurrent streams each; the pool must not be what limits a fleet, but a runaway client
# must not open sockets without end either. A request waiting for a pooled connection counts against its
# time-to-headers timeout.
MAX_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_WORKER = 1024
KEEPALIVE_S = 30.0  # below common engines' idle timeouts, so a pooled connection is rarely closed under us
ERROR_PREVIEW_BYTES = 512  # of a 5xx body, quoted in the log and the client's error


@dataclass(frozen=True, slots=True)
class Target:
    """A worker the scheduler chose for one role of a request."""

    role: Role
    spec: WorkerSpec

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    def url(self, path: str) -> str:
        return f"http://{self.spec.ip}:{self.spec.http_port}{path}"

    def __str__(self) -> str:
        return f"{self.role.value} worker {self.worker_id}"


class UpstreamFailure(Exception):
    """A worker failed before its first byte: the request can be retried on another worker."""

    def __init__(self, target: Target, reason: str, detail: str) -> None:
        super().__init__(f"{target} failed: {detail}")
        self.target = target
        self.reason = reason  # a metric label: connect, connect_timeout, headers_timeout, reset, http_5xx
        self.detail = detail


def make_session(connect_timeout_s: float) -> aiohttp.ClientSession:
    """The router's one client session to its workers: no total timeout (streams last as long as they last)."""
    connector = aiohttp.TCPConnector(
        limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS_PER_WORKER, keepalive_timeout=KEEPALIVE_S
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
    # auto_decompress off: bodies pass through byte for byte, with the worker's Content-Encoding.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False, raise_for_status=False)


async def open_response(
    session: aiohttp.ClientSession,
    target: Target,
    path: str,
    payload: bytes,
    request_id: int,
    headers_timeout_s: float | None,
) -> aiohttp.ClientResponse:
    """POST ``payload`` to the worker and return its response once the headers arrived (status below 500).

    Raises UpstreamFailure on a refused or reset connection, no headers within ``headers_timeout_s``, or a 5xx.
    """
    headers = {"Content-Type": "application/json", "X-Request-Id": str(request_id)}
    try:
        async with asyncio.timeout(headers_timeout_s):
            response = await session.post(target.url(path), data=payload, headers=headers)
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure(target, "connect", f"cannot connect: {exc.os_error or exc}") from None
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamFailure(target, "connect_timeout", "connect timed out") from None
    except TimeoutError:
        raise UpstreamFailure(target, "headers_timeout", f"no response headers within {headers_timeout_s}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamFailure(target, "reset", f"{type(exc).__name__}: {exc}") from None
    if response.status >= 500:
        preview = await _preview(response)
        raise UpstreamFailure(target, "http_5xx", f"HTTP {response.status}: {preview}")
    return response


async def _preview(response: aiohttp.ClientResponse) -> str:
    """The start of an error body, for the log; the response is closed."""
    try:
        async with asyncio.timeout(1.0):
            data = await response.content.read(ERROR_PREVIEW_BYTES)
    except (TimeoutError, aiohttp.ClientError, OSError):
        data = b""
    finally:
        response.close()
    return data.decode("utf-8", "replace").strip() or "(no body)"
