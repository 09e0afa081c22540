"""Issue 10's fault run as tests: each fault under load through 3 routers, 2 masters and 4 simulated workers (real
processes, real signals), checked in Redis: no reservation left after the TTL, pending counters = reservation keys,
no answer naming a dead worker past the bound, one master writing, every request answered.
docs/failure-behaviour.md lists each fault's bound and names these tests."""

from __future__ import annotations

from chaos_harness import assert_fault, fleet_fixture

from flexlb.bench.chaos import ChaosFleet

fleet = fleet_fixture()  # one fleet for the module's faults: chaos_fleet


async def test_router_sigkill_mid_load(chaos_fleet: ChaosFleet) -> None:
    result = await assert_fault(chaos_fleet, "router_sigkill", "dead router's reservations expire")
    assert result.calls.get("schedule 200", 0) > 0


async def test_master_sigkill_standby_takes_over(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "master_sigkill", "takeover", "one master writing")


async def test_master_sigstop_past_ttl_writes_nothing_when_woken(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "master_sigstop", "takeover", "one master writing")


async def test_worker_killed_and_restarted(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "worker_kill_restart", "dead worker not named", "worker back")


async def test_redis_short_outage_served_from_the_view(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "redis_short_outage", "served from the view", "recovered")


async def test_redis_outage_past_the_staleness_bound(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "redis_long_outage", "503 past the bound", "recovered")


async def test_redis_restarts_empty_registrations_come_back(chaos_fleet: ChaosFleet) -> None:
    await assert_fault(chaos_fleet, "redis_restart_empty", "registrations back", "recovered")


async def test_zero_token_reservation_released(chaos_fleet: ChaosFleet) -> None:
    """Regression, issue 10 bug 1: a 0-token reservation's release answered 500 ('-0' refused by HINCRBY)."""
    await assert_fault(chaos_fleet, "zero_token_release", "0-token release")
