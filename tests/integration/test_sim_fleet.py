"""`flexlb sim-worker --count N`: N simulated workers in one real process, each with its own engine behind its own
HTTP port and status gRPC port (HTTP + 1), read with grpcio and with the light client the master uses."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp
import pytest
from conftest import eventually

from flexlb.master.worker_client import WorkerStatusClient
from flexlb.ports import free_ports

COUNT = 3
PROMPT = " ".join(f"w{i}" for i in range(130))  # two full blocks of 64 tokens


@pytest.fixture
def fleet(start_sim_worker: Any) -> Any:
    base = free_ports(2 * COUNT)
    worker = start_sim_worker(port=base, args=("--count", str(COUNT)), wait=False)
    return worker


async def healthy(http: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.parametrize("transport", ["grpc", "lite"])
async def test_each_worker_has_its_own_engine_on_its_own_ports(fleet: Any, transport: str) -> None:
    base = fleet.port
    ports = [base + 2 * i for i in range(COUNT)]
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: healthy(http, ports[-1]), "the last worker's HTTP port answers", timeout_s=30)
        body = {"prompt": PROMPT, "max_tokens": 2}
        async with http.post(f"http://127.0.0.1:{ports[1]}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] == 2
        async with http.get(f"http://127.0.0.1:{ports[1]}/get_server_info") as resp:
            info = await resp.json()
        assert info["internal_states"][0]["counters"]["finished"] == 1

    statuses, caches = [], []
    for port in ports:
        async with WorkerStatusClient(f"127.0.0.1:{port + 1}", transport=transport) as client:  # type: ignore[arg-type]
            assert client.transport == transport
            first = await client.get_worker_status(0, deadline_s=5)
            again = await client.get_worker_status(first.latest_finished_version, deadline_s=5)
            assert again.status_version > first.status_version  # a new version every report, idle or not
            assert list(again.finished_task_list) == []
            statuses.append(first)
            caches.append(await client.get_cache_status(-1, True, deadline_s=5))

    # only worker 1 ran the request: its finished task and cached blocks, none on the others
    assert [len(s.finished_task_list) for s in statuses] == [0, 1, 0]
    assert [len(c.cache_keys) for c in caches] == [0, 2, 0]
    assert all(s.alive and s.total_kv_cache > 0 for s in statuses)

    assert fleet.stop(signal.SIGTERM) == 0


async def test_bad_count_options_are_refused(tmp_path: Any) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "flexlb.cli", "sim-worker", "--role", "decode", "--port", "9000"]
    for extra, message in (
        (["--count", "0"], "--count must be at least 1"),
        (["--count", "2", "--grpc-port", "9100"], "--grpc-port applies to one worker"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
