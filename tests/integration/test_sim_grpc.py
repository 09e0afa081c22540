"""A real simulator process (`flexlb sim-worker`) serves HTTP on --port and the status gRPC on --port + 1; the master's
WorkerStatusClient reads the same state the HTTP API shows, and SIGTERM / SIGINT stop it with exit status 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import SimWorkerProcess

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.master.worker_client import WorkerStatusClient, WorkerUnreachable
from flexlb.proto.flexlb_worker_pb2 import WorkerStatusPB

PROMPT = " ".join(f"word{i}" for i in range(400))  # 6 full blocks of 64
DEADLINE_S = 1.0  # per RPC
CLI = ("-m", "flexlb.cli", "sim-worker", "--role", "pdfusion")


@pytest.fixture
def sim_worker(tmp_path: Path) -> Iterator[SimWorkerProcess]:
    """A ready `flexlb sim-worker`; at the end SIGTERM must stop it with exit status 0 and no traceback."""
    worker = SimWorkerProcess(str(tmp_path / "sim-worker.log"), entry=CLI).wait_ready()
    try:
        yield worker
    finally:
        code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log()
    assert "Traceback" not in worker.log()


@pytest.fixture
async def client(sim_worker: SimWorkerProcess) -> AsyncIterator[WorkerStatusClient]:
    async with WorkerStatusClient(sim_worker.grpc_address) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def complete(http: aiohttp.ClientSession, worker: SimWorkerProcess, request_id: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": 3, "request_id": request_id}
    async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def server_info(http: aiohttp.ClientSession, worker: SimWorkerProcess) -> dict[str, Any]:
    async with http.get(f"{worker.url}/get_server_info") as resp:
        assert resp.status == 200
        return await resp.json()


async def poll_status(
    client: WorkerStatusClient, done: Callable[[WorkerStatusPB], bool], timeout_s: float = 5.0
) -> WorkerStatusPB:
    """Poll GetWorkerStatus (as the master does) until ``done`` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.get_worker_status(-1, DEADLINE_S)
        if done(status):
            return status
        assert time.monotonic() < deadline, f"status never matched; last:\n{status}"
        await asyncio.sleep(0.01)


async def test_worker_status_matches_what_http_shows(
    sim_worker: SimWorkerProcess, client: WorkerStatusClient, http: aiohttp.ClientSession
) -> None:
    first = await complete(http, sim_worker, 1001)
    second = await complete(http, sim_worker, 1002)
    info = await server_info(http, sim_worker)
    config, state = info["engine_config"], info["internal_states"][0]

    status = await client.get_worker_status(-1, DEADLINE_S)

    assert status.role == "RoleType.PDFUSION"
    assert status.alive
    assert status.total_kv_cache == config["kv_blocks"] * config["block_size"] == info["max_total_num_tokens"]
    assert status.available_kv_cache == state["available_kv_cache"]  # idle: nothing moved since
    assert status.available_concurrency == config["max_concurrency"]
    assert (status.running_query_len, status.waiting_query_len, list(status.running_task_info)) == (0, 0, [])
    assert status.iterate_count == state["counters"]["iterations"]
    assert status.step_latency_ms == pytest.approx(state["last_step_latency_ms"])
    assert (status.dp_size, status.tp_size, status.dp_rank, status.precision) == (1, 1, 0, "FP16")
    assert status.latest_finished_version == 2
    tasks = {t.request_id: t for t in status.finished_task_list}
    assert set(tasks) == {1001, 1002}
    for task, reply in ((tasks[1001], first), (tasks[1002], second)):
        usage = reply["usage"]
        assert task.input_length == usage["prompt_tokens"] == len(tokenize(PROMPT))
        assert task.prefix_length == usage["prompt_tokens_details"]["cached_tokens"]
        assert task.end_time_ms > 0 and not task.is_waiting
    assert tasks[1001].prefix_length == 0
    assert tasks[1002].prefix_length > 0  # the second one hit the first one's blocks

    again = await client.get_worker_status(status.latest_finished_version, DEADLINE_S)
    assert list(again.finished_task_list) == []  # nothing finished after the version we asked for
    assert again.status_version > status.status_version
    third = await client.get_worker_status(status.latest_finished_version, DEADLINE_S)
    assert third.status_version > again.status_version


async def test_cache_status_sends_the_prompt_keys_once_per_version(
    sim_worker: SimWorkerProcess, client: WorkerStatusClient, http: aiohttp.ClientSession
) -> None:
    empty = await client.get_cache_status(-1, True, DEADLINE_S)
    assert dict(empty.cache_keys) == {}  # nothing cached yet

    await complete(http, sim_worker, 7)
    cache = await client.get_cache_status(empty.version, True, DEADLINE_S)
    info = await server_info(http, sim_worker)
    # The router computes the keys the same way from the same prompt.
    keys = block_cache_keys(tokenize(PROMPT), cache.block_size)
    assert len(keys) == 6
    assert dict(cache.cache_keys) == dict.fromkeys(keys, True)
    assert cache.version != empty.version
    assert cache.version == info["internal_states"][0]["cache_version"]
    assert cache.block_size == info["page_size"]
    assert cache.total_kv_cache == info["max_total_num_tokens"]
    assert cache.available_kv_cache == info["internal_states"][0]["available_kv_cache"]

    same = await client.get_cache_status(cache.version, True, DEADLINE_S)
    assert (same.version, dict(same.cache_keys)) == (cache.version, {})  # unchanged: no keys resent
    not_asked = await client.get_cache_status(-1, False, DEADLINE_S)
    assert dict(not_asked.cache_keys) == {}


async def test_a_streaming_request_shows_as_running_while_it_streams(
    sim_worker: SimWorkerProcess, client: WorkerStatusClient, http: aiohttp.ClientSession
) -> None:
    max_concurrency = (await server_info(http, sim_worker))["max_running_requests"]
    # ~20k decode steps at time scale 0.05: seconds of streaming, far longer than the polls below need.
    body = {"prompt": PROMPT, "max_tokens": 20_000, "stream": True, "request_id": 4242}
    async with http.post(f"{sim_worker.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readline()  # the first token is out: it is running

        status = await poll_status(client, lambda s: any(t.request_id == 4242 for t in s.running_task_info))
        (task,) = [t for t in status.running_task_info if t.request_id == 4242]
        assert not task.is_waiting
        assert task.input_length == len(tokenize(PROMPT))
        assert task.iterate_count >= 1 and task.end_time_ms == 0
        assert status.running_query_len == 1
        assert status.available_concurrency == max_concurrency - 1
        assert not any(t.request_id == 4242 for t in status.finished_task_list)

    # The client went away: the worker cancels the request, which moves to the finished list.
    status = await poll_status(client, lambda s: any(t.request_id == 4242 for t in s.finished_task_list))
    assert not any(t.request_id == 4242 for t in status.running_task_info)


@pytest.mark.parametrize(
    ("entry", "sig"),
    [(CLI, signal.SIGINT), (("-m", "flexlb.sim"), signal.SIGTERM), (("-m", "flexlb.sim"), signal.SIGINT)],
    ids=["cli-sigint", "module-sigterm", "module-sigint"],
)
async def test_a_signal_stops_http_and_grpc_with_exit_status_0(
    entry: tuple[str, ...], sig: signal.Signals, tmp_path: Path
) -> None:
    worker = SimWorkerProcess(str(tmp_path / "sim.log"), entry=entry).wait_ready()
    try:
        async with WorkerStatusClient(worker.grpc_address) as client:
            assert (await client.get_worker_status(-1, DEADLINE_S)).alive
            code = await asyncio.to_thread(worker.stop, sig)
            assert code == 0, worker.log()
            assert "Traceback" not in worker.log()
            with pytest.raises(WorkerUnreachable):  # the gRPC port is closed too
                await client.get_worker_status(-1, DEADLINE_S)
    finally:
        worker.stop(signal.SIGKILL)
