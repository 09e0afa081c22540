"""Issue 13: MODEL_SERVICE_CONFIG workers named by DNS name are registered at the address the name resolves to and
re-resolved periodically: a name whose address changes moves its worker (the new address registered, the old one
deregistered, logged with the name and both addresses); a name that stops resolving keeps its last address and logs
a warning. The resolver is injected (no real DNS); the store is a real redis-server and fakeredis."""

from __future__ import annotations

import logging
import socket

import pytest

from flexlb.discovery import RESOLVE_INTERVAL_S, StaticWorkers, system_resolver
from flexlb.domain import Role
from flexlb.settings import StaticWorker
from flexlb.state.store import FleetStore

PREFILL = StaticWorker("prefill-0.svc", 8000, Role.PREFILL, group="g1", grpc_port=8200)
LITERAL = StaticWorker("10.1.0.9", 8000, Role.DECODE)


class FakeDns:
    """Answers from a table a test edits; a name missing from it does not resolve."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def ids(store: FleetStore) -> set[str]:
    return {v.worker_id for v in await store.list_workers()}


async def register(static: StaticWorkers, store: FleetStore) -> int:
    return await static.register(store, await ids(store))


def make(dns: FakeDns, clock: Clock, *workers: StaticWorker) -> StaticWorkers:
    return StaticWorkers(workers or (PREFILL,), resolver=dns, clock=clock)


async def test_a_name_is_registered_at_its_address(store: FleetStore) -> None:
    dns, clock = FakeDns({"prefill-0.svc": ["10.0.0.5"]}), Clock()
    static = make(dns, clock, PREFILL, LITERAL)
    assert await register(static, store) == 2
    assert await ids(store) == {"10.0.0.5:8000", "10.1.0.9:8000"}
    (view,) = [v for v in await store.list_workers() if v.spec.role is Role.PREFILL]
    assert (view.spec.ip, view.spec.group, view.spec.grpc_port) == ("10.0.0.5", "g1", 8200)  # the rest as listed
    assert dns.asked == ["prefill-0.svc"]  # an IP literal is not resolved
    assert await register(static, store) == 0 and dns.asked == ["prefill-0.svc"]  # not again before the interval


async def test_a_name_whose_address_changes_moves_its_worker(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    dns, clock = FakeDns({"prefill-0.svc": ["10.0.0.5"]}), Clock()
    static = make(dns, clock)
    await register(static, store)
    dns.table["prefill-0.svc"] = ["10.0.0.6"]
    clock.now += RESOLVE_INTERVAL_S - 1
    await register(static, store)
    assert await ids(store) == {"10.0.0.5:8000"}  # not due yet
    clock.now += 1
    with caplog.at_level(logging.INFO, logger="flexlb.discovery"):
        assert await register(static, store) == 1
    assert await ids(store) == {"10.0.0.6:8000"}
    moved = [r.getMessage() for r in caplog.records if "now resolves to" in r.getMessage()]
    assert len(moved) == 1 and all(s in moved[0] for s in ("prefill-0.svc", "10.0.0.6", "was 10.0.0.5")), moved
    assert any("deregistered worker 10.0.0.5:8000" in r.getMessage() for r in caplog.records)


async def test_a_name_that_stops_resolving_keeps_its_last_address(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    dns, clock = FakeDns({"prefill-0.svc": ["10.0.0.5"]}), Clock()
    static = make(dns, clock)
    await register(static, store)
    del dns.table["prefill-0.svc"]
    with caplog.at_level(logging.INFO, logger="flexlb.discovery"):
        for _ in range(3):
            clock.now += RESOLVE_INTERVAL_S
            await register(static, store)
    assert await ids(store) == {"10.0.0.5:8000"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once, not every interval
    assert "prefill-0.svc does not resolve" in warnings[0].getMessage()
    assert "keeping its last address 10.0.0.5" in warnings[0].getMessage()

    dns.table["prefill-0.svc"] = ["10.0.0.5"]
    clock.now += RESOLVE_INTERVAL_S
    with caplog.at_level(logging.INFO, logger="flexlb.discovery"):
        await register(static, store)
    assert any("resolves again" in r.getMessage() for r in caplog.records)
    assert await ids(store) == {"10.0.0.5:8000"}


async def test_a_name_that_never_resolved_is_registered_by_name_until_it_does(store: FleetStore) -> None:
    dns, clock = FakeDns({}), Clock()
    static = make(dns, clock)
    await register(static, store)
    assert await ids(store) == {"prefill-0.svc:8000"}  # connections resolve it meanwhile, as before
    dns.table["prefill-0.svc"] = ["10.0.0.7"]
    clock.now += RESOLVE_INTERVAL_S
    await register(static, store)
    assert await ids(store) == {"10.0.0.7:8000"}


async def test_a_worker_another_process_moved_is_resolved_again_at_once(store: FleetStore) -> None:
    """Two processes keep the same static workers: after one moved the worker, the other, seeing its address gone
    from Redis, resolves the name again instead of registering the old address back."""
    dns, clock = FakeDns({"prefill-0.svc": ["10.0.0.5"]}), Clock()
    first, second = make(dns, clock), make(dns, clock)
    await register(first, store)
    await register(second, store)
    dns.table["prefill-0.svc"] = ["10.0.0.6"]
    clock.now += RESOLVE_INTERVAL_S
    await register(first, store)
    assert await ids(store) == {"10.0.0.6:8000"}
    clock.now += 1  # the second one is not due (it resolved at the same time as the first) but misses its worker
    await register(second, store)
    assert await ids(store) == {"10.0.0.6:8000"}
    assert [w.worker_id for w in second.workers()] == ["10.0.0.6:8000"]


async def test_of_several_addresses_the_current_one_is_kept(store: FleetStore) -> None:
    dns, clock = FakeDns({"prefill-0.svc": ["10.0.0.9", "10.0.0.3", "fd00::1"]}), Clock()
    static = make(dns, clock)
    await register(static, store)
    assert await ids(store) == {"10.0.0.3:8000"}  # the first IPv4 address in order
    dns.table["prefill-0.svc"] = ["10.0.0.1", "10.0.0.3"]  # round robin: another order, the current one still in it
    clock.now += RESOLVE_INTERVAL_S
    await register(static, store)
    assert await ids(store) == {"10.0.0.3:8000"}


async def test_the_system_resolver_answers_for_localhost() -> None:
    assert "127.0.0.1" in await system_resolver("localhost")
