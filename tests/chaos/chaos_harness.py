"""The chaos suite's harness: one fleet of real processes per test module, and a fault runner that asserts every
invariant the fault checked. The fleet, the load generator, the invariants and the faults live in
``flexlb.bench.chaos`` (`flexlb bench chaos` runs the same faults); this module puts them under pytest.

``FLEXLB_CHAOS=heavy``: 4 routers, twice the clients, 5 s of load around each fault, each fault three times.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from typing import Any

import pytest

from flexlb.bench.chaos import ChaosFleet, ChaosParams, FaultResult, run_fault

HEAVY = os.environ.get("FLEXLB_CHAOS", "").lower() == "heavy"
COMMON = ("answered", "counters", "drained", "counters after")  # every fault's invariants, read from Redis
# a round that takes longer fails here, below pytest-timeout's 120 s, with the stack of every task of the loop: a
# round has hung ~1 run in 10 of this module on the 2-core machine, and pytest-timeout shows only the threads
ROUND_DEADLINE_S = 100.0 if not HEAVY else 600.0


def fleet_fixture() -> Any:
    """The module-scoped ``chaos_fleet`` fixture for a test module to assign (``fleet = fleet_fixture()``): Redis,
    4 workers, 2 masters, 3 routers (heavy: 4), shared by the module's faults; each fault heals the fleet first
    (restarts what is dead, waits until every router serves from shared state)."""

    @pytest.fixture(scope="module", name="chaos_fleet")
    def chaos_fleet() -> Iterator[ChaosFleet]:
        fleet = ChaosFleet(ChaosParams.heavy() if HEAVY else ChaosParams())
        try:
            asyncio.run(fleet.start())
            yield fleet
        finally:
            asyncio.run(fleet.close())

    return chaos_fleet


async def assert_fault(fleet: ChaosFleet, fault: str, *invariants: str) -> FaultResult:
    """Run ``fault`` (``repeat`` times) and assert that it ran, that ``invariants`` (besides the common ones) were
    checked, and that every check held; returns the last result."""
    result = FaultResult(fault)
    try:
        for round_ in range(fleet.params.repeat):
            result = await _bounded(run_fault(fleet, fault, seed=round_), f"{fault} round {round_ + 1}")
            checked = {c.invariant for c in result.checks}
            report = f"{result.report()}\nbounds {result.bounds}\ncalls {result.calls}"
            assert not result.error, f"{report}\n{fleet.log_tails()}"
            assert checked >= {*COMMON, *invariants}, f"invariants not checked: {report}"
            assert result.ok, f"{report}\n{fleet.log_tails()}"
    finally:
        await fleet.drop_client()
    return result


async def _bounded(round_: Any, what: str) -> FaultResult:
    task = asyncio.ensure_future(round_)
    done, _ = await asyncio.wait({task}, timeout=ROUND_DEADLINE_S)
    if task in done:
        return task.result()
    stacks = io.StringIO()
    for other in asyncio.all_tasks():
        print(f"--- {other!r}", file=stacks)
        other.print_stack(limit=12, file=stacks)
    task.cancel()
    raise AssertionError(f"{what}: no result within {ROUND_DEADLINE_S:.0f} s; the loop's tasks:\n{stacks.getvalue()}")
