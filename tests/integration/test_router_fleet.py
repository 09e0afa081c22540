"""A router's process lifecycle, as real processes: `flexlb serve --processes 2` (one port, metrics summed over the
processes, a killed child restarted), SIGTERM under load (in-flight requests finish or end clearly, reservations and
the master lock are given back, exit 0), and readiness (/health says starting until Redis first answers)."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.state.store import FleetStore

MODEL = "flexlb-sim"
PROMPT = " ".join(f"w{i}" for i in range(100))


def poll(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    """Call ``check`` until it returns something truthy; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s}s (last: {last!r})")


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection: SO_REUSEPORT spreads connections, not requests, over the processes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def health(port: int) -> dict[str, Any]:
    status, body = request(port, "GET", "/health")
    return {"http": status, **orjson.loads(body)}


def schedule_on_one_connection(port: int, request_id: int) -> int:
    """GET /health then a schedule request on the same (kept-alive) connection: the pid that served the schedule."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        pid = orjson.loads(conn.getresponse().read())["pid"]
        conn.request("POST", "/rtp_llm/schedule", body=orjson.dumps({"request_id": request_id, "seq_len": 10}))
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 503  # no worker registered: refused, and counted all the same
        return pid
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    """The sum of every sample of ``name`` in one /metrics answer."""
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    pattern = re.compile(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$")
    return sum(float(m.group(1)) for line in body.decode().splitlines() if (m := pattern.match(line)))


def distinct_pids(port: int, count: int) -> set[int]:
    pids: set[int] = set()

    def enough() -> bool:
        pids.add(health(port)["pid"])
        return len(pids) >= count

    poll(enough, f"{count} router processes answering")
    return pids


def test_metrics_of_a_two_process_router_are_the_sum_over_both(start_router: Any) -> None:
    router = start_router({"contendForMaster": True}, processes=2)
    served: Counter[int] = Counter()

    def both_served_some() -> bool:
        served[schedule_on_one_connection(router.port, sum(served.values()) + 1)] += 1
        return len(served) == 2 and min(served.values()) >= 3

    poll(both_served_some, "both processes served schedule requests")
    sent = sum(served.values())
    assert metric(router.port, "flexlb_schedule_requests_total") == sent
    # one /metrics answer for both, whichever process gives it
    assert metric(router.port, "flexlb_schedule_requests_total") == sent
    assert metric(router.port, 'flexlb_schedule_requests_total{code="8400"}') == sent
    assert poll(lambda: metric(router.port, "flexlb_master_is_master") == 1, "one of the two processes is master")
    assert metric(router.port, "flexlb_redis_up") == 1  # livemin: one sample, not one per process
    assert "Traceback" not in router.log()


def test_a_killed_child_is_restarted_and_the_parent_stops_cleanly(start_router: Any) -> None:
    router = start_router(processes=2)
    first = distinct_pids(router.port, 2)
    for i in range(6):
        schedule_on_one_connection(router.port, i + 1)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    poll(lambda: f"(pid {victim}) was killed by SIGKILL; restarting it" in router.log(), "the parent saw the death")

    seen: set[int] = set()

    def restarted() -> bool:
        answer = health(router.port)  # raises if the port stopped serving
        assert answer["http"] == 200, answer
        seen.add(answer["pid"])
        return bool(seen - first)

    poll(restarted, "a new router process answering")
    assert victim not in seen
    assert metric(router.port, "flexlb_schedule_requests_total") == 6  # the dead process's counts stay in the sum

    log = router.log()
    metrics_dir = re.search(r"metrics in (\S+)\)", log)
    assert metrics_dir is not None and os.path.isdir(metrics_dir.group(1))
    assert router.stop() == 0
    assert not os.path.exists(metrics_dir.group(1))
    for pid in first | seen:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"router process {pid} outlived its parent")
    assert "all router processes stopped" in router.log() and "Traceback" not in router.log()


def test_health_says_starting_until_redis_first_answers(start_router: Any) -> None:
    port = free_port()
    router = start_router(redis_url=f"redis://127.0.0.1:{port}/0", wait=False)

    def answered() -> dict[str, Any] | None:
        try:
            return health(router.port)
        except OSError:
            return None  # not listening yet

    assert poll(answered, "/health answering") == {
        "http": 503,
        "status": "starting",
        "redis_up": False,
        "degraded": False,
        "pid": router.process.pid,
    }
    assert health(router.port)["status"] == "starting"
    with EmbeddedRedis(port=port):
        ready = poll(lambda: (h := health(router.port))["http"] == 200 and h, "/health 200 once Redis answers")
        assert ready["status"] == "ok" and ready["redis_up"] is True
        assert router.stop() == 0
    assert "Traceback" not in router.log()


# ---- SIGTERM under load ----


async def sim_state(http: aiohttp.ClientSession, worker: Any) -> dict[str, Any]:
    async with http.get(f"{worker.url}/get_server_info") as resp:
        return (await resp.json())["internal_states"][0]


async def pending_count(redis: aioredis.Redis, store: FleetStore, *workers: Any) -> int:
    return sum([int(await redis.hget(store.keys.worker(w.worker_id), "pending_count") or 0) for w in workers])


async def stream_completion(http: aiohttp.ClientSession, url: str, max_tokens: int, started: Any) -> tuple[str, str]:
    """One streamed request: ("complete", "") when it reached [DONE], else ("error", what ended it)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    try:
        async with http.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200, await resp.text()
            first = True
            async for line in resp.content:
                if first:
                    started()
                    first = False
                if line.strip() == b"data: [DONE]":
                    return "complete", ""
            return "error", "stream ended without [DONE]"
    except aiohttp.ClientError as exc:
        return "error", repr(exc)


async def test_sigterm_lets_requests_finish_then_cuts_the_rest_and_releases_everything(
    real_redis: aioredis.Redis, real_store: FleetStore, start_sim_worker: Any, start_router: Any, start_master: Any
) -> None:
    # Real time: a decode step is 8.5-16 ms (1-16 requests on a worker), so 100 tokens finish within the 4 s
    # shutdown deadline and 2500 tokens (20 s at least) do not. The lock TTL is long: only a hand-over lets the
    # standby take over soon.
    # The workers' status port is closed (and never given up on): no master hands their reservations over, so only
    # the proxy's releases can free them.
    master_config = {"masterLockTtlMs": 30_000, "masterRenewIntervalMs": 1000, "workerDownAfterFailedPolls": 10**6}
    master_env = {"WORKER_TIMEOUT_US": str(600 * 10**6)}
    # room for all 16 on either worker: however the router spreads them, none waits in a worker's queue
    a = start_sim_worker(wait=False, time_scale=1.0, args=("--max-concurrency", "16"))
    b = start_sim_worker(wait=False, time_scale=1.0, args=("--max-concurrency", "16"))
    config = {"servedModelName": MODEL, "contendForMaster": True, "shutdownTimeoutMs": 4000, **master_config}
    router = start_router(config, env=master_env, wait=False)
    for proc in (a, b, router):
        proc.wait_ready()
    for w in (a, b):
        spec = WorkerSpec("127.0.0.1", w.port, Role.PDFUSION, grpc_port=free_port())
        await real_store.register_worker(spec, WorkerStatus())

    async with aiohttp.ClientSession() as http:

        async def router_is_master() -> bool:
            async with http.post(f"{router.url}/rtp_llm/master/info") as resp:
                return (await resp.json())["this_process_is_master"]

        await eventually(router_is_master, "the router holds the master lock")
        standby = start_master(master_config, env=master_env)

        async def start_streams(max_tokens: int) -> list[asyncio.Task[tuple[str, str]]]:
            """Eight streams, once each has its first chunk."""
            streaming = 0
            all_streaming = asyncio.Event()

            def started() -> None:
                nonlocal streaming
                streaming += 1
                if streaming == 8:
                    all_streaming.set()

            tasks = [asyncio.create_task(stream_completion(http, router.url, max_tokens, started)) for _ in range(8)]
            await asyncio.wait_for(all_streaming.wait(), 15)
            return tasks

        cut = await start_streams(2500)
        finishing = await start_streams(100)  # started last, so all 16 are in flight at the SIGTERM
        assert await pending_count(real_redis, real_store, a, b) == 16
        router.process.send_signal(signal.SIGTERM)
        cut_outcomes = await asyncio.gather(*cut)
        finished_outcomes = await asyncio.gather(*finishing)
        exit_status = await asyncio.to_thread(router.process.wait, 4 + 10)  # the deadline plus a margin

        assert exit_status == 0, router.log()
        assert "shutting down: 16 requests in flight" in router.log()
        assert finished_outcomes == [("complete", "")] * 8, finished_outcomes
        # the connection closed mid-stream: a client error, not a hang
        assert all(kind == "error" for kind, _ in cut_outcomes), cut_outcomes

        # at once: the router wrote every release before it exited
        for w in (a, b):
            pending = await real_redis.hget(real_store.keys.worker(w.worker_id), "pending_count")
            assert (pending, await real_redis.zcard(real_store.keys.reservations(w.worker_id))) == ("0", 0)

        async def workers_idle() -> bool:
            return all([(await sim_state(http, w))["running"] == 0 for w in (a, b)])

        await eventually(workers_idle, "the cut requests cancelled on the workers")

        async def standby_took_over() -> bool:
            async with http.get(f"{standby.url}/health") as resp:
                return (await resp.json())["is_master"]

        await eventually(standby_took_over, "the standby master took the handed-over lock (TTL 30 s)")

    log = router.log()
    assert "released the master lock" in log and "Traceback" not in log
