"""Talking to one worker: the shared client (``flexlb.proxy.http1``), sending a request, and telling a failure before
the worker's first byte (retried elsewhere) from an answer (passed to the client, whatever its status below 500)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from flexlb.domain import Role, WorkerSpec
from flexlb.proxy.http1 import ConnectFailed, ConnectTimeout, Response, UpstreamError, UpstreamPool

# Engines serve hundreds of concurrent streams each; the pool must not be what limits a fleet, but a runaway client
# must not open sockets without end either. A request waiting for a pooled connection counts against its
# time-to-headers timeout.
MAX_CONNECTIONS_PER_WORKER = 1024
KEEPALIVE_S = 30.0  # below common engines' idle timeouts, so a pooled connection is rarely closed under us
ERROR_PREVIEW_BYTES = 512  # of a 5xx body, quoted in the log and the client's error
# What a worker's connection can fail with, once connected: the pool's errors and the socket's.
UPSTREAM_ERRORS = (UpstreamError, OSError)


@dataclass(frozen=True, slots=True)
class Target:
    """A worker the scheduler chose for one role of a request."""

    role: Role
    spec: WorkerSpec

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    def __str__(self) -> str:
        return f"{self.role.value} worker {self.worker_id}"


class UpstreamFailure(Exception):
    """A worker failed before its first byte: the request can be retried on another worker."""

    def __init__(self, target: Target, reason: str, detail: str) -> None:
        super().__init__(f"{target} failed: {detail}")
        self.target = target
        self.reason = reason  # a metric label: connect, connect_timeout, headers_timeout, reset, http_5xx
        self.detail = detail


def make_client(connect_timeout_s: float) -> UpstreamPool:
    """The router's one client to its workers: no total timeout (streams last as long as they last); bodies pass
    through byte for byte, with the worker's Content-Encoding (none is asked for)."""
    return UpstreamPool(
        connect_timeout_s=connect_timeout_s, max_per_worker=MAX_CONNECTIONS_PER_WORKER, keepalive_s=KEEPALIVE_S
    )


@functools.lru_cache(maxsize=4096)
def request_head(ip: str, port: int, path: str) -> bytes:
    """The part of a request's head that is the same for every request to this worker and path."""
    return f"POST {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nContent-Type: application/json\r\n".encode("latin-1")


async def open_response(
    client: UpstreamPool,
    target: Target,
    path: str,
    payload: bytes,
    request_id: int,
    headers_timeout_s: float | None,
    authorization: bytes = b"",
) -> Response:
    """POST ``payload`` to the worker and return its response once the headers arrived (status below 500).
    ``authorization``: an ``Authorization`` header line with its CRLF, or b"" (flexlb/proxy/auth.py).

    Raises UpstreamFailure on a refused or reset connection, no headers within ``headers_timeout_s``, or a 5xx.
    """
    spec = target.spec
    data = b"%b%bContent-Length: %d\r\nX-Request-Id: %d\r\n\r\n%b" % (
        request_head(spec.ip, spec.http_port, path),
        authorization,
        len(payload),
        request_id,
        payload,
    )
    try:
        async with asyncio.timeout(headers_timeout_s):
            response = await client.send(spec.ip, spec.http_port, data)
    except ConnectFailed as exc:
        raise UpstreamFailure(target, "connect", f"cannot connect: {exc}") from None
    except ConnectTimeout:
        raise UpstreamFailure(target, "connect_timeout", "connect timed out") from None
    except TimeoutError:
        raise UpstreamFailure(target, "headers_timeout", f"no response headers within {headers_timeout_s}s") from None
    except UPSTREAM_ERRORS as exc:
        raise UpstreamFailure(target, "reset", f"{type(exc).__name__}: {exc}") from None
    if response.status >= 500:
        preview = await _preview(response)
        raise UpstreamFailure(target, "http_5xx", f"HTTP {response.status}: {preview}")
    return response


async def _preview(response: Response) -> str:
    """The start of an error body, for the log; the response is closed."""
    data = b""
    try:
        async with asyncio.timeout(1.0):
            while len(data) < ERROR_PREVIEW_BYTES and (chunk := await response.readany()):
                data += chunk
    except (TimeoutError, *UPSTREAM_ERRORS):
        pass
    finally:
        response.close()
    return data[:ERROR_PREVIEW_BYTES].decode("utf-8", "replace").strip() or "(no body)"
