"""The one definition of "Redis is not there", as opposed to a bug in a script (ResponseError), which must surface."""

from __future__ import annotations

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BusyLoadingError, OSError)
