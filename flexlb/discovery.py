"""Service discovery: which workers the fleet has. Workers come from MODEL_SERVICE_CONFIG (static) and from
registrations (``POST /rtp_llm/workers``, ``flexlb worker add``); both live in Redis, so every router and every new
master see the same membership.

A static worker may name its host by DNS name (``worker-0.svc:8000``, a compose service name). It is registered at
the address the name resolves to (its worker id is ``address:port``, the address the schedule API answers), and the
name is resolved again every ``RESOLVE_INTERVAL_S``, and whenever its worker is missing from Redis (another process
may have moved it): a name whose address changed moves its worker, the new address registered, then the old one
deregistered, logged with the name and both addresses. A name that stops resolving keeps its last address (a
warning, once; an info when it resolves again); one that has never resolved is registered by its name meanwhile
(connections resolve it then), and moves to its address once it resolves. Of several addresses, the current one is
kept while it is among them, else the first IPv4 one in sorted order (else the first IPv6 one). The resolver is a
parameter (tests inject one); the default asks the system's (getaddrinfo, in a thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from flexlb.settings import StaticWorker
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.discovery")

RESOLVE_INTERVAL_S = 10.0  # how often each DNS name of MODEL_SERVICE_CONFIG is resolved again
RESOLVE_TIMEOUT_S = 2.0  # a resolution that takes longer counts as failed (the last address is kept)
MISSING_RESOLVE_GAP_S = 1.0  # a worker missing from Redis has its name resolved again at most this often

Resolver = Callable[[str], Awaitable[Sequence[str]]]  # host name -> its addresses; raises OSError when it fails
Clock = Callable[[], float]


async def system_resolver(host: str) -> list[str]:
    """The addresses the system's resolver gives ``host`` (TCP), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_address(host: str) -> bool:
    """An IP literal (not a name to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _choose(addresses: Sequence[str], current: str | None) -> str:
    """The address a name's worker is registered at, of those it resolves to now."""
    if current is not None and current in addresses:
        return current  # several addresses (round robin): stay where the worker is

    def order(address: str) -> tuple[int, int, str]:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 address may carry its zone
        except ValueError:
            return (99, 0, address)
        return (ip.version, int(ip), address)

    return min(addresses, key=order)


@dataclasses.dataclass(slots=True)
class _Named:
    """A static worker whose host is a DNS name, and where it is registered now."""

    worker: StaticWorker
    address: str | None = None  # the name's last address; None: never resolved (registered by its name)
    failing: bool = False  # its last resolution failed (warned once)
    resolved_at: float = float("-inf")

    @property
    def name(self) -> str:
        return self.worker.ip

    @property
    def current(self) -> StaticWorker:
        return self.worker if self.address is None else dataclasses.replace(self.worker, ip=self.address)


class StaticWorkers:
    """MODEL_SERVICE_CONFIG's workers, kept registered in Redis (:meth:`register`, once per maintenance round of
    every process), their DNS names resolved as the module says."""

    def __init__(
        self,
        endpoints: Sequence[StaticWorker],
        *,
        resolver: Resolver = system_resolver,
        clock: Clock = time.monotonic,
        interval_s: float = RESOLVE_INTERVAL_S,
        timeout_s: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self._fixed = [w for w in endpoints if is_address(w.ip)]
        self._named = [_Named(w) for w in endpoints if not is_address(w.ip)]
        self._resolver = resolver
        self._clock = clock
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._next_resolve = float("-inf")
        self._stale: set[str] = set()  # ids of addresses names moved away from: deregistered once

    def workers(self) -> list[StaticWorker]:
        """The static workers as registered now (names at their last address)."""
        return [*self._fixed, *(n.current for n in self._named)]

    async def register(self, store: FleetStore, registered_ids: Iterable[str]) -> int:
        """Register the configured workers Redis does not hold (first start, Redis lost its data, a name moved) and
        deregister the addresses names moved away from; returns how many were registered.

        A worker is registered as alive: with a master polling, its first failed polls mark it down within
        ``workerDownAfterFailedPolls`` status intervals."""
        registered = set(registered_ids)
        await self._resolve(registered)
        wanted = self.workers()
        added = 0
        for worker in wanted:
            if worker.worker_id not in registered:
                await store.register_worker(worker.to_spec())
                registered.add(worker.worker_id)
                log.info("registered %s worker %s from MODEL_SERVICE_CONFIG", worker.role.value, worker.worker_id)
                added += 1
        keep = {w.worker_id for w in wanted}
        for worker_id in sorted(self._stale):
            if worker_id in registered and worker_id not in keep:
                await store.remove_worker(worker_id)
                log.info("deregistered worker %s: its name resolves elsewhere now", worker_id)
            self._stale.discard(worker_id)
        return added

    async def _resolve(self, registered: set[str]) -> None:
        """Resolve the names due: all of them every ``interval_s``, and those whose worker Redis does not hold."""
        if not self._named:
            return
        now = self._clock()
        due = now >= self._next_resolve
        if due:
            self._next_resolve = now + self._interval_s
        names = [
            n
            for n in self._named
            if due or (n.current.worker_id not in registered and now - n.resolved_at >= MISSING_RESOLVE_GAP_S)
        ]
        if names:
            await asyncio.gather(*(self._resolve_one(n, now) for n in names))

    async def _resolve_one(self, named: _Named, now: float) -> None:
        named.resolved_at = now
        where = f"MODEL_SERVICE_CONFIG worker {named.name}:{named.worker.http_port}"
        try:
            addresses = list(await asyncio.wait_for(self._resolver(named.name), self._timeout_s))
            if not addresses:
                raise OSError("no address")
        except (OSError, TimeoutError) as exc:
            if not named.failing:
                named.failing = True
                if named.address is None:
                    log.warning(
                        "%s: %s does not resolve (%s); registered by its name until it does",
                        where,
                        named.name,
                        exc or "timed out",
                    )
                else:
                    log.warning(
                        "%s: %s does not resolve (%s); keeping its last address %s",
                        where,
                        named.name,
                        exc or "timed out",
                        named.address,
                    )
            return
        if named.failing:
            named.failing = False
            log.info("%s: %s resolves again (%s)", where, named.name, ", ".join(addresses))
        address = _choose(addresses, named.address)
        if address == named.address:
            return
        before = named.current.worker_id
        if named.address is None:
            log.info(
                "%s: %s resolves to %s: its worker is %s:%s",
                where,
                named.name,
                address,
                address,
                named.worker.http_port,
            )
        else:
            log.info(
                "%s: %s now resolves to %s (was %s): worker %s moves to %s:%s",
                where,
                named.name,
                address,
                named.address,
                before,
                address,
                named.worker.http_port,
            )
        named.address = address
        self._stale.add(before)
