"""The one definition of "Redis is not there", as opposed to a bug in a script (ResponseError), which must surface.

With a Redis Cluster or Sentinel "not there" also covers the slot or the primary being elsewhere or in transit:
a redirection the client could not follow in time, a cluster that is down, a demoted primary (READONLY).
"""

from __future__ import annotations

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    ReadOnlyError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

# What a cluster node answers a script that meets a key of its slot on the other node of a migration (the key was
# moved already), or runs while the cluster is down: nothing after that call ran, the slot is in transit.
_SLOT_MOVING = (
    "Script attempted to access a non local key in a cluster node",
    "Script attempted to execute a command while the cluster is down",
    "Script attempted to execute a write command while the cluster is down",
)


class SlotMoving(ClusterDownError):
    """A script stopped because its slot is being migrated (or the cluster is down): retry shortly, elsewhere."""


def slot_moving(text: str) -> bool:
    return any(marker in text for marker in _SLOT_MOVING)


REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    BusyLoadingError,
    OSError,
    ClusterError,  # ClusterDownError, MasterDownError, SlotMoving
    SlotNotCoveredError,
    AskError,  # MovedError too: still redirected after the client's retries
    TryAgainError,
    ReadOnlyError,
)
