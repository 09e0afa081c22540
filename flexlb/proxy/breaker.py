"""Per-worker circuit breakers of one router's proxy (pure: the handler reports outcomes, the clock is injected).

A worker whose proxied requests fail ``failure_threshold`` times in a row (connect error, reset, timeout, HTTP 5xx:
every ``UpstreamFailure``) is *open*: left out of this router's choices for ``cooldown_s``. Then it is *half open*:
the next request may go to it as a probe (while that probe is out, others still leave it out); an answer closes the
breaker, a failure opens it for another cool-down. Each router keeps its own breakers: they act on what this router
sees, at once, without waiting for the health checks (which take the worker out for every router).

An observer (the proxy's metrics: ``flexlb_proxy_breaker_state``, ``flexlb_proxy_breaker_trips_total``) is told of
every change of state as it happens: *open* when it trips (also after a failed probe), *half open* when its probe
request is sent, *closed* when an answer comes. A breaker whose cool-down is over stays *open* until a request probes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger("flexlb.proxy.breaker")

State = Literal["closed", "half_open", "open"]


class BreakerObserver(Protocol):
    def breaker_changed(self, worker_id: str, state: State, *, tripped: bool) -> None:
        """``worker_id``'s breaker is now ``state``; ``tripped``: it has just opened."""


@dataclass(slots=True)
class _Breaker:
    failures: int = 0  # in a row
    open_until: float | None = None  # monotonic s; None: closed
    # half open with a probe request out, until then (a probe whose request never ends, e.g. a client gone, does not
    # keep the worker out past one more cool-down)
    probe_until: float | None = None


class Breakers:
    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        observer: BreakerObserver | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.observer = observer
        self._by_worker: dict[str, _Breaker] = {}

    def excluded(self) -> frozenset[str]:
        """Workers no request may be sent to now: open ones, and half-open ones with their probe out."""
        if not self._by_worker:
            return frozenset()
        now = self.clock()
        return frozenset(
            wid
            for wid, b in self._by_worker.items()
            if b.open_until is not None and (now < b.open_until or (b.probe_until is not None and now < b.probe_until))
        )

    def sending(self, worker_ids: Iterable[str]) -> None:
        """A request goes to these workers: one whose cool-down is over becomes the half-open probe."""
        now = self.clock()
        for wid in worker_ids:
            b = self._by_worker.get(wid)
            if b is not None and b.open_until is not None and now >= b.open_until:
                probing = b.probe_until is not None
                b.probe_until = now + self.cooldown_s
                if self.observer is not None and not probing:
                    self.observer.breaker_changed(wid, "half_open", tripped=False)

    def failed(self, worker_id: str, what: str) -> None:
        """A request to ``worker_id`` (``what``: its role and address, for the log) failed before its first byte."""
        b = self._by_worker.setdefault(worker_id, _Breaker())
        b.failures += 1
        if b.probe_until is not None or (b.open_until is None and b.failures >= self.failure_threshold):
            again = b.probe_until is not None
            b.open_until, b.probe_until = self.clock() + self.cooldown_s, None
            log.warning(
                "%s: circuit breaker open for %.1fs after %s", what, self.cooldown_s,
                "its probe request failed" if again else f"{b.failures} failed requests in a row",
            )  # fmt: skip
            if self.observer is not None:
                self.observer.breaker_changed(worker_id, "open", tripped=True)

    def answered(self, worker_id: str, what: str) -> None:
        """A request to ``worker_id`` got its answer's headers: the breaker closes."""
        b = self._by_worker.pop(worker_id, None)
        if b is not None and b.open_until is not None:
            log.info("%s: circuit breaker closed (its probe request was answered)", what)
            if self.observer is not None:
                self.observer.breaker_changed(worker_id, "closed", tripped=False)

    def state(self, worker_id: str) -> State:
        """As the observer was last told."""
        b = self._by_worker.get(worker_id)
        if b is None or b.open_until is None:
            return "closed"
        return "half_open" if b.probe_until is not None else "open"

    def is_open(self, worker_id: str) -> bool:
        b = self._by_worker.get(worker_id)
        return b is not None and b.open_until is not None
