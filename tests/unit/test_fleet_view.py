"""FleetView: applying change stream entries, and the orderings it keeps as workers change."""

from __future__ import annotations

import random

import pytest

from flexlb.domain import Role, WorkerView
from flexlb.routing import StrategyParams, order_keys
from flexlb.state.view import FleetView, NeedsResync


def hash_of(ip: str, role: str = "PREFILL", **fields: object) -> dict[str, str]:
    base = {"ip": ip, "http_port": "8000", "role": role, "alive": "1", "kv_total": "10000", "status_version": "1"}
    return base | {k: str(v) for k, v in fields.items()}


def test_entries_register_update_load_and_remove_workers() -> None:
    view = FleetView()
    view.replace_all({"10.0.0.1:8000": hash_of("10.0.0.1")})
    view.apply({"t": "a", "n": "2", "w": "10.0.0.2:8000", **hash_of("10.0.0.2", "DECODE")})
    view.apply({"t": "s", "n": "3", "w": "10.0.0.1:8000", "running": "3", "status_version": "2"})
    view.apply({"t": "p", "n": "4", "10.0.0.1:8000": "2 300", "10.0.0.2:8000": "1 50"})
    p1, d1 = view.get("10.0.0.1:8000"), view.get("10.0.0.2:8000")
    assert p1 is not None and d1 is not None
    assert (p1.status.running, p1.status.status_version, p1.pending_count, p1.pending_tokens) == (3, 2, 2, 300)
    assert (d1.spec.role, d1.pending_count, d1.pending_tokens) == (Role.DECODE, 1, 50)
    assert [v.worker_id for v in view.workers(Role.PREFILL)] == ["10.0.0.1:8000"]
    # a worker moving role moves in every list
    view.apply({"t": "a", "n": "5", "w": "10.0.0.2:8000", "role": "PREFILL"})
    assert view.ids(Role.PREFILL) == ["10.0.0.1:8000", "10.0.0.2:8000"] and view.ids(Role.DECODE) == []
    view.apply({"t": "r", "n": "6", "w": "10.0.0.1:8000"})
    assert view.get("10.0.0.1:8000") is None and view.ids(Role.PREFILL) == ["10.0.0.2:8000"]
    # pending load of a worker the view does not hold is ignored (removed meanwhile)
    view.apply({"t": "p", "n": "7", "10.0.0.1:8000": "1 1"})
    assert view.get("10.0.0.1:8000") is None


def test_a_status_entry_of_an_unknown_worker_asks_for_a_full_read() -> None:
    view = FleetView()
    view.replace_all({})
    with pytest.raises(NeedsResync, match=r"10\.0\.0\.9:8000"):
        view.apply({"t": "s", "n": "1", "w": "10.0.0.9:8000", "running": "1"})


def test_block_size_is_the_fleets_most_common_else_the_default() -> None:
    view = FleetView()
    assert view.block_size() == 64
    view.replace_all(
        {
            "a:1": hash_of("a", block_size=16),
            "b:1": hash_of("b", block_size=16),
            "c:1": hash_of("c", "DECODE"),
        }
    )
    assert view.block_size() == 16
    view.apply({"t": "a", "n": "2", "w": "a:1", "block_size": "64"})
    assert view.block_size() == 64


def test_orderings_stay_sorted_under_random_changes() -> None:
    keys = order_keys(StrategyParams())
    view = FleetView(keys)
    rng = random.Random(3)
    ids = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(60)]
    view.replace_all({wid: hash_of(wid.split(":")[0]) for wid in ids[:40]})
    for n in range(2, 2000):
        wid = rng.choice(ids)
        kind = rng.choice("spar") if view.get(wid) else "a"
        if kind == "s":
            view.apply({"t": "s", "n": str(n), "w": wid, "waiting": str(rng.randrange(9)), "queued_tokens": "5"})
        elif kind == "p":
            view.apply({"t": "p", "n": str(n), wid: f"{rng.randrange(5)} {rng.randrange(900)}"})
        elif kind == "a":
            role = rng.choice(["PREFILL", "DECODE"])
            view.apply({"t": "a", "n": str(n), "w": wid, **hash_of(wid.split(":")[0], role, kv_used=rng.randrange(99))})
        else:
            view.apply({"t": "r", "n": str(n), "w": wid})
    for role in (Role.PREFILL, Role.DECODE):
        members: list[WorkerView] = view.workers(role)
        assert [v.worker_id for v in members] == sorted(v.worker_id for v in members)
        for name, key in keys.items():
            got = [(k, v.worker_id) for k, v in view.ordered(role, name)]
            assert got == sorted((key(v), v.worker_id) for v in members), (role, name)
