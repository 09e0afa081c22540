"""The master lock and fencing scripts, and MasterElection on a fake clock, on real Redis and on fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from flexlb.master.election import MasterElection, StaleEpoch, current_master, fenced_set, parse_lock_value
from flexlb.state.keys import ServiceKeys
from flexlb.state.scripts import Scripts

TTL = 60_000


@pytest.fixture
def keys(service: str) -> ServiceKeys:
    return ServiceKeys(service)


@pytest.fixture
def scripts(any_redis: aioredis.Redis) -> Scripts:
    return Scripts(any_redis)


async def acquire(scripts: Scripts, keys: ServiceKeys, token: str, ttl: int = TTL, holder: str = "h:1 42") -> list:
    return await scripts.call("lock_acquire", [keys.master_lock, keys.master_epoch], [token, ttl, holder])


async def renew(scripts: Scripts, keys: ServiceKeys, token: str, epoch: int, ttl: int = TTL) -> int:
    return await scripts.call("lock_renew", [keys.master_lock], [token, epoch, ttl])


async def release(scripts: Scripts, keys: ServiceKeys, token: str) -> int:
    return await scripts.call("lock_release", [keys.master_lock], [token])


async def server_ms(redis: aioredis.Redis) -> int:
    """Redis server time in ms: the least epoch a new holder can get (lua/_lib.lua next_epoch)."""
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


async def test_acquire_free_lock_then_others_are_refused_with_the_holder(scripts: Scripts, keys: ServiceKeys) -> None:
    r = scripts._redis
    start = await server_ms(r)
    ok, epoch = await acquire(scripts, keys, "a", holder="10.0.0.1:80 7|x")
    assert ok == 1 and epoch >= start  # the first epoch is the server time in ms, not 1
    assert parse_lock_value(await r.get(keys.master_lock)) == ("a", epoch, "10.0.0.1:80 7|x")
    assert await r.get(keys.master_epoch) == str(epoch)
    assert await acquire(scripts, keys, "b", holder="other") == [0, epoch, "10.0.0.1:80 7|x"]
    assert await acquire(scripts, keys, "a") == [1, epoch]  # the holder again (a retry): same term, same epoch
    assert await current_master(r, keys) == ("10.0.0.1:80 7|x", epoch)


async def test_epoch_grows_strictly_with_every_new_holder(scripts: Scripts, keys: ServiceKeys) -> None:
    r = scripts._redis
    assert await current_master(r, keys) == (None, 0)
    previous = await server_ms(r) - 1
    for token in ["a", "b", "c", "a2"]:  # back to back, often within one ms: then it is previous + 1
        ok, epoch = await acquire(scripts, keys, token)
        assert ok == 1 and epoch > previous
        assert await renew(scripts, keys, token, epoch) == 1  # renewals do not move the epoch
        assert await acquire(scripts, keys, token) == [1, epoch]
        assert await release(scripts, keys, token) == 1
        assert await current_master(r, keys) == (None, epoch)
        assert await r.get(keys.master_epoch) == str(epoch)
        previous = epoch


async def test_an_epoch_ahead_of_the_clock_grows_by_exactly_one(scripts: Scripts, keys: ServiceKeys) -> None:
    r = scripts._redis
    ahead = await server_ms(r) + 10_000_000  # e.g. set while the server clock was ahead, which has since been fixed
    await r.set(keys.master_epoch, ahead)
    assert await acquire(scripts, keys, "a") == [1, ahead + 1]
    assert await r.get(keys.master_epoch) == str(ahead + 1)
    await release(scripts, keys, "a")
    assert await acquire(scripts, keys, "b") == [1, ahead + 2]


async def test_after_redis_lost_its_data_a_new_master_never_gets_an_old_epoch(
    scripts: Scripts, keys: ServiceKeys
) -> None:
    r = scripts._redis
    target = f"{keys.prefix}:probe"
    _, e1 = await acquire(scripts, keys, "a")
    await fenced_set(scripts, keys, e1, target, {"holder": "a", "n": 1})
    # a restart without persistence, or a failover to an empty replica, while "a" is paused believing it is master;
    # a real takeover comes at least a lock TTL later: let the server clock pass e1 as it would have by then
    await r.delete(keys.master_lock, keys.master_epoch)
    async with asyncio.timeout(5):
        while await server_ms(r) <= e1:
            await asyncio.sleep(0.001)
    ok, e2 = await acquire(scripts, keys, "b")
    assert ok == 1 and e2 != e1 and e2 > e1  # a counter would have restarted at 1: "a"'s epoch, had e1 been 1
    with pytest.raises(StaleEpoch, match=f"stale epoch {e1}, current {e2}"):
        await fenced_set(scripts, keys, e1, target, {"holder": "a", "n": 2})
    assert await r.hgetall(target) == {"holder": "a", "n": "1"}
    await fenced_set(scripts, keys, e2, target, {"holder": "b", "n": 1})
    assert await r.hgetall(target) == {"holder": "b", "n": "1"}


async def test_renew_needs_the_token_and_the_epoch(scripts: Scripts, keys: ServiceKeys) -> None:
    _, old = await acquire(scripts, keys, "a")
    await release(scripts, keys, "a")
    _, epoch = await acquire(scripts, keys, "b")
    assert epoch > old
    assert await renew(scripts, keys, "a", epoch) == 0  # wrong token
    assert await renew(scripts, keys, "b", old) == 0  # right token, old epoch
    assert await renew(scripts, keys, "b", epoch) == 1
    await release(scripts, keys, "b")
    assert await renew(scripts, keys, "b", epoch) == 0  # nothing to renew


async def test_release_with_a_wrong_token_leaves_the_lock(scripts: Scripts, keys: ServiceKeys) -> None:
    await acquire(scripts, keys, "a")
    before = await scripts._redis.get(keys.master_lock)
    assert await release(scripts, keys, "b") == 0
    assert await scripts._redis.get(keys.master_lock) == before
    assert await scripts._redis.pttl(keys.master_lock) > 0
    assert await release(scripts, keys, "a") == 1
    assert await scripts._redis.exists(keys.master_lock) == 0
    assert await release(scripts, keys, "a") == 0


async def test_lock_has_a_ttl_and_renew_resets_it_rather_than_adding(scripts: Scripts, keys: ServiceKeys) -> None:
    r = scripts._redis
    _, epoch = await acquire(scripts, keys, "a", ttl=5_000)
    assert 0 < await r.pttl(keys.master_lock) <= 5_000
    for _ in range(5):  # redis-py's extend() would now be at ~30 s
        assert await renew(scripts, keys, "a", epoch, ttl=5_000) == 1
    assert 4_000 < await r.pttl(keys.master_lock) <= 5_000
    assert await acquire(scripts, keys, "a", ttl=2_000) == [1, epoch]  # the acquire-as-renew path resets too
    assert 0 < await r.pttl(keys.master_lock) <= 2_000


async def test_lock_expires_and_the_next_holder_gets_a_new_epoch(scripts: Scripts, keys: ServiceKeys) -> None:
    _, old = await acquire(scripts, keys, "a", ttl=50)
    await asyncio.sleep(0.12)
    assert await renew(scripts, keys, "a", old) == 0
    ok, epoch = await acquire(scripts, keys, "b")
    assert ok == 1 and epoch > old


async def test_fenced_set_accepts_the_current_epoch_only(scripts: Scripts, keys: ServiceKeys) -> None:
    target = f"{keys.prefix}:probe"
    r = scripts._redis
    with pytest.raises(StaleEpoch, match="stale epoch 1, current none"):  # no master ever elected
        await fenced_set(scripts, keys, 1, target, {"holder": "a"})
    _, ea = await acquire(scripts, keys, "a")
    await fenced_set(scripts, keys, ea, target, {"holder": "a", "n": 1})
    assert await r.hgetall(target) == {"holder": "a", "n": "1"}

    await release(scripts, keys, "a")
    _, eb = await acquire(scripts, keys, "b")
    with pytest.raises(StaleEpoch, match=f"stale epoch {ea}, current {eb}"):
        await fenced_set(scripts, keys, ea, target, {"holder": "a", "n": 2})
    with pytest.raises(StaleEpoch):  # a future epoch is no better than a past one
        await fenced_set(scripts, keys, eb + 1, target, {"holder": "a", "n": 2})
    assert await r.hgetall(target) == {"holder": "a", "n": "1"}
    await fenced_set(scripts, keys, eb, target, {"holder": "b", "n": 1})
    assert await r.hgetall(target) == {"holder": "b", "n": "1"}


async def test_every_election_script_touches_one_cluster_slot(scripts: Scripts, keys: ServiceKeys) -> None:
    for name, script_keys in [
        ("lock_acquire", [keys.master_lock, keys.master_epoch]),
        ("lock_renew", [keys.master_lock]),
        ("lock_release", [keys.master_lock]),
        ("lock_take_over", [keys.master_lock, keys.master_epoch]),
        ("fenced_set", [keys.master_epoch, f"{keys.prefix}:election_probe"]),
    ]:
        assert len({key_slot(k.encode()) for k in script_keys}) == 1, name


# --- MasterElection, one step() at a time, with a fake clock ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """on_elected / on_deposed callbacks; the duties run until cancelled, as real master duties do."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.duties_cancelled = 0

    async def on_elected(self, epoch: int) -> None:
        self.events.append(f"elected {epoch}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.duties_cancelled += 1
            raise

    async def on_deposed(self) -> None:
        self.events.append("deposed")


MakeElection = Callable[..., MasterElection]


@pytest.fixture
async def election() -> AsyncIterator[MakeElection]:
    """Elections driven by step(), their presence connections closed after the test (run() would close them)."""
    made: list[MasterElection] = []

    def make(redis: aioredis.Redis, keys: ServiceKeys, clock: FakeClock, holder: str = "me") -> MasterElection:
        made.append(MasterElection(redis, keys, holder=holder, ttl_ms=3000, renew_interval_ms=1000, clock=clock))
        return made[-1]

    yield make
    for e in made:
        await e.close_presence()


async def step(e: MasterElection, rec: Recorder) -> float:
    delay = await e.step(rec.on_elected, rec.on_deposed)
    await asyncio.sleep(0)  # let a just-started duties task run up to its first await
    return delay


async def test_renew_interval_must_be_below_half_the_ttl(any_redis: aioredis.Redis, keys: ServiceKeys) -> None:
    with pytest.raises(ValueError, match="< ttl_ms / 2"):
        MasterElection(any_redis, keys, holder="x", ttl_ms=1000, renew_interval_ms=500)


async def test_elected_then_renews_and_the_next_round_is_at_most_the_lease(
    any_redis: aioredis.Redis, keys: ServiceKeys, election: MakeElection
) -> None:
    clock, rec = FakeClock(), Recorder()
    e = election(any_redis, keys, clock)
    start = await server_ms(any_redis)
    assert await step(e, rec) == 1.0
    epoch = e.epoch
    assert e.is_master and epoch >= start and rec.events == [f"elected {epoch}"]
    assert await current_master(any_redis, keys) == ("me", epoch)
    clock.now += 2.5  # late renew: the next round must come before the lease's end, not a full interval later
    assert await step(e, rec) == 1.0  # renewed: the lease restarts from this round
    assert e.is_master and e.epoch == epoch and rec.events == [f"elected {epoch}"]


async def test_a_master_paused_past_its_ttl_is_no_longer_master_before_any_round_trip(
    any_redis: aioredis.Redis, keys: ServiceKeys, election: MakeElection
) -> None:
    clock, rec = FakeClock(), Recorder()
    e = election(any_redis, keys, clock)
    await step(e, rec)
    epoch = e.epoch
    clock.now += 3.0  # a SIGSTOP of exactly the TTL; the real lock is still in Redis (real time barely moved)
    assert not e.is_master  # what duties check before each write
    await step(e, rec)
    assert rec.events == [f"elected {epoch}", "deposed"] and rec.duties_cancelled == 1
    # it stepped down with its old term's token gone: it cannot resume its epoch, the old lock must expire first
    assert not e.is_master and await current_master(any_redis, keys) == ("me", epoch)


async def test_redis_errors_keep_the_master_until_the_local_lease_runs_out(
    any_redis: aioredis.Redis, keys: ServiceKeys, election: MakeElection, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, rec = FakeClock(), Recorder()
    e = election(any_redis, keys, clock)
    await step(e, rec)
    elected = [f"elected {e.epoch}"]

    async def broken(*args: object) -> None:
        raise RedisConnectionError("redis is down")

    monkeypatch.setattr(e._scripts, "call", broken)
    clock.now += 1.0
    assert await step(e, rec) == 1.0  # 2 s of lease left: still master, try again in an interval
    clock.now += 1.5
    assert await step(e, rec) == pytest.approx(0.5)  # wake at the lease's end, not a full interval later
    assert e.is_master and rec.events == elected
    clock.now += 0.5
    await step(e, rec)
    assert not e.is_master and rec.events == [*elected, "deposed"] and rec.duties_cancelled == 1


async def test_a_refused_renew_deposes_at_once_and_another_is_elected_with_a_higher_epoch(
    any_redis: aioredis.Redis, keys: ServiceKeys, election: MakeElection
) -> None:
    clock, rec_a, rec_b = FakeClock(), Recorder(), Recorder()
    a, b = election(any_redis, keys, clock, "a"), election(any_redis, keys, clock, "b")
    await step(a, rec_a)
    await step(b, rec_b)
    assert a.is_master and not b.is_master and rec_b.events == []
    await any_redis.delete(keys.master_lock)  # as if it expired in Redis
    await step(b, rec_b)
    assert b.is_master and b.epoch > a.epoch
    await step(a, rec_a)  # a's lease has not run out locally, but Redis refuses its renew
    assert not a.is_master and rec_a.events == [f"elected {a.epoch}", "deposed"] and rec_a.duties_cancelled == 1


async def test_stop_releases_the_lock_and_cancels_the_duties(any_redis: aioredis.Redis, keys: ServiceKeys) -> None:
    rec = Recorder()
    e = MasterElection(any_redis, keys, holder="me", ttl_ms=3000, renew_interval_ms=1000)
    task = asyncio.create_task(e.run(rec.on_elected, rec.on_deposed))
    async with asyncio.timeout(5):
        while not e.is_master:
            await asyncio.sleep(0.01)
    await e.stop()
    assert task.done() and rec.events == [f"elected {e.epoch}", "deposed"] and rec.duties_cancelled == 1
    assert await current_master(any_redis, keys) == (None, e.epoch)
    await task


async def test_stop_ends_even_when_the_duties_lose_a_cancellation(
    any_redis: aioredis.Redis, keys: ServiceKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation lost in a Redis read (redis-py) used to leave a shutting-down master waiting for ever."""
    monkeypatch.setattr("flexlb.master.election.DUTIES_CANCEL_RETRY_S", 0.05, raising=False)  # absent before
    rec = Recorder()

    async def swallows_one_cancellation(epoch: int) -> None:
        rec.events.append(f"elected {epoch}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            rec.duties_cancelled += 1  # as a read that completed at the same moment: the cancellation is gone
        await rec.on_elected(epoch)  # polls on, until cancelled again

    e = MasterElection(any_redis, keys, holder="me", ttl_ms=3000, renew_interval_ms=1000)
    task = asyncio.create_task(e.run(swallows_one_cancellation, rec.on_deposed))
    async with asyncio.timeout(5):
        while not e.is_master:
            await asyncio.sleep(0.01)
        await e.stop()
    assert task.done() and rec.duties_cancelled == 2 and rec.events[-1] == "deposed"
    assert await current_master(any_redis, keys) == (None, e.epoch)


async def test_a_stop_during_the_acquire_starts_no_duties_and_releases_the_lock(
    any_redis: aioredis.Redis, keys: ServiceKeys
) -> None:
    e = MasterElection(any_redis, keys, holder="me", ttl_ms=3000, renew_interval_ms=1000)
    rec = Recorder()
    acquire = e._scripts.call

    async def stop_meanwhile(name: str, *args: object) -> object:
        reply = await acquire(name, *args)
        if name == "lock_acquire":
            stopping = asyncio.create_task(e.stop())  # the SIGTERM arrives while the lock is being taken
            await asyncio.sleep(0)
            assert not stopping.done()
        return reply

    e._scripts.call = stop_meanwhile  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await e.run(rec.on_elected, rec.on_deposed)
    assert rec.events == ["deposed"] and rec.duties_cancelled == 0  # never started
    assert await current_master(any_redis, keys) == (None, e.epoch)


async def test_a_take_over_replaces_only_the_term_seen_gone(
    any_redis: aioredis.Redis, scripts: Scripts, keys: ServiceKeys
) -> None:
    """lua/lock_take_over.lua: a standby that saw the holder's presence connection gone replaces exactly that term,
    with a higher epoch; a term renewed or replaced since is left alone."""
    _, first = await acquire(scripts, keys, "a", holder="a [presence 01]")
    seen = await any_redis.get(keys.master_lock)
    take = [keys.master_lock, keys.master_epoch]
    stale = f"zz|{first - 1}|someone"
    assert await scripts.call("lock_take_over", take, [stale, "b", TTL, "b"]) == [0, first, "a [presence 01]"]
    won, epoch = await scripts.call("lock_take_over", take, [seen, "b", TTL, "b [presence 02]"])
    assert won == 1 and epoch > first
    assert await any_redis.get(keys.master_lock) == f"b|{epoch}|b [presence 02]"
    assert await any_redis.pttl(keys.master_lock) > 0  # the lock keeps a TTL
    assert await renew(scripts, keys, "a", first) == 0  # the old term cannot renew
