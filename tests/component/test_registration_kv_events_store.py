"""A worker's KV events endpoints in Redis (upsert_worker.lua): stored with its registration, read back by every
listing, and a registration that changes them moves the members version, so the master (which re-reads membership
only when that version moves) follows the new endpoints; a registration that changes nothing does not move it."""

from __future__ import annotations

from flexlb.domain import EngineKind, Role, WorkerSpec, WorkerStatus
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.state.store import FleetStore

EVENTS = KvEventsEndpoint("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")


def spec(events: KvEventsEndpoint | None) -> WorkerSpec:
    return WorkerSpec("127.0.0.1", 8000, Role.PDFUSION, engine=EngineKind.VLLM, kv_events=events)


async def test_a_change_of_kv_events_moves_the_members_version(store: FleetStore) -> None:
    await store.register_worker(spec(None), WorkerStatus())
    first = await store.members_version()
    await store.register_worker(spec(None), WorkerStatus())
    assert await store.members_version() == first  # the same registration again: nothing for the master to redo

    await store.register_worker(spec(EVENTS), WorkerStatus())
    with_events = await store.members_version()
    assert with_events != first
    (view,) = await store.list_workers()
    assert view.spec.kv_events == EVENTS

    await store.update_status("127.0.0.1:8000", {"running": 3})  # status only: its endpoints stay
    assert await store.members_version() == with_events
    (view,) = await store.list_workers()
    assert view.spec.kv_events == EVENTS and view.status.running == 3

    await store.register_worker(spec(KvEventsEndpoint(EVENTS.publisher, None)), WorkerStatus())  # replay only
    no_replay = await store.members_version()
    assert no_replay != with_events

    await store.register_worker(spec(None), WorkerStatus())  # without: cleared
    assert await store.members_version() != no_replay
    (view,) = await store.list_workers()
    assert view.spec.kv_events is None


async def test_a_change_of_engine_or_status_port_moves_the_members_version(store: FleetStore) -> None:
    await store.register_worker(spec(None), WorkerStatus())
    before = await store.members_version()
    as_sglang = WorkerSpec("127.0.0.1", 8000, Role.PDFUSION, engine=EngineKind.SGLANG)
    await store.register_worker(as_sglang, WorkerStatus())  # the master must poll it the other way now
    moved = await store.members_version()
    assert moved != before
    other_port = WorkerSpec("127.0.0.1", 8000, Role.PDFUSION, grpc_port=9100, engine=EngineKind.SGLANG)
    await store.register_worker(other_port, WorkerStatus())
    assert await store.members_version() != moved
    (view,) = await store.list_workers()
    assert view.spec.engine is EngineKind.SGLANG and view.spec.grpc_port == 9100
