"""Which client holds which reservation made through this router's schedule API, so that a client can release only
its own reservations and hold at most ``maxReservationsPerToken`` at once.

The bookkeeping is this router's, in memory (the fleet's reservations themselves stay in Redis): a release must
reach the router the schedule went to (RTP-LLM's frontend does: it sends both to ``real_master_host``), and the cap
is per router process (a client spreading its calls over N routers holds at most N x the cap). An entry lives no
longer than its reservation's TTL (``min(reservationTtlMs, generate_timeout)``): an expired reservation frees its
slot by itself, and a restarted router forgets its entries (their reservations expire by the same TTL).

A slot is taken before the schedule starts (concurrent calls cannot overshoot the cap) and given back when the
schedule is refused or the reservation released; a schedule cancelled midway keeps its slot until the TTL, as its
reservation may have been made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


class OwnerRefused(Exception):
    """The client may not do this; ``status`` is the HTTP status (403: not its reservation, 429: over the cap)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Client:
    held: dict[int, float] = field(default_factory=dict)  # request id -> monotonic deadline


class ReservationOwners:
    """``cap`` 0: no cap. ``check_release``: releases are checked (clients have tokens); else only counted."""

    def __init__(self, cap: int, *, check_release: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.check_release = check_release
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._owner: dict[int, str] = {}  # request id -> client

    def _prune(self, client: str, now: float) -> _Client:
        entry = self._clients.setdefault(client, _Client())
        for request_id in [rid for rid, deadline in entry.held.items() if deadline <= now]:
            del entry.held[request_id]
            if self._owner.get(request_id) == client:
                del self._owner[request_id]
        return entry

    def _live_owner(self, request_id: int, now: float) -> str | None:
        owner = self._owner.get(request_id)
        if owner is not None and self._prune(owner, now).held.get(request_id) is None:
            return None
        return owner

    def held(self, client: str) -> int:
        return len(self._prune(client, self._clock()).held)

    def take(self, client: str, request_id: int, ttl_ms: int) -> bool:
        """A slot for ``request_id`` before it is scheduled; OwnerRefused when another client holds that id or the
        client holds ``cap`` reservations already. Scheduling an id it holds again takes no new slot (False)."""
        now = self._clock()
        owner = self._live_owner(request_id, now)
        if owner is not None and owner != client:
            raise OwnerRefused(
                409,
                f"request_id {request_id} has a reservation of another client on this router: choose another id",
            )
        entry = self._prune(client, now)
        if request_id not in entry.held and self.cap and len(entry.held) >= self.cap:
            raise OwnerRefused(
                429,
                f"TOO_MANY_RESERVATIONS: this client holds {len(entry.held)} reservations on this router, the cap"
                f" (maxReservationsPerToken) is {self.cap}: release one (POST /rtp_llm/release) or wait for one to"
                " expire",
            )
        new = request_id not in entry.held
        entry.held[request_id] = now + ttl_ms / 1000
        self._owner[request_id] = client
        return new

    def give_back(self, client: str, request_id: int) -> None:
        """The schedule was refused (it holds nothing) or its reservation is released."""
        entry = self._clients.get(client)
        if entry is not None:
            entry.held.pop(request_id, None)
            if not entry.held:
                del self._clients[client]
        if self._owner.get(request_id) == client:
            del self._owner[request_id]

    def check_may_release(self, client: str, request_id: int) -> None:
        """OwnerRefused (403) unless ``client`` holds ``request_id`` here (only when releases are checked)."""
        if not self.check_release:
            return
        if self._live_owner(request_id, self._clock()) != client:
            raise OwnerRefused(
                403,
                f"PERMISSION_DENIED: request_id {request_id} has no reservation of this client on this router (a"
                " client releases only what it scheduled, through the router it scheduled on)",
            )
