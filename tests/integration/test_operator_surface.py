"""What an operator meets first, as real processes: a port in use refused in both modes, smg / vllm-router flags and
admin aliases, the original FlexLB's extra endpoints, OpenAI's error shape on /v1, JSON logs, and the proxy's
metrics scraped after real proxied requests to a simulated worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from conftest import ChildProcess

from flexlb.embedded_redis import EmbeddedRedis, free_port

CLI = [sys.executable, "-m", "flexlb.cli"]


def second_router(redis_url: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """A `flexlb serve` on ``port``: it must stop at once (a 20 s timeout fails the test, not a hang)."""
    env = {**os.environ, "REDIS_URL": redis_url, "FLEXLB_CONFIG": '{"contendForMaster": false}'}
    command = [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)


async def healthy(url: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as resp:
        return resp.status == 200


@pytest.mark.parametrize("first_processes", [1, 2])
async def test_a_port_in_use_is_refused_at_start_in_both_modes(
    redis_server: EmbeddedRedis, start_router: Any, first_processes: int
) -> None:
    first = start_router(processes=first_processes)
    for args in ((), ("--processes", "2")):
        done = second_router(redis_server.url, first.port, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"cannot listen on 127.0.0.1:{first.port} (--port): Address already in use" in done.stderr
        assert "Traceback" not in done.stderr and "started redis-server" not in done.stdout
    assert await healthy(first.url)  # the first keeps serving, alone


async def test_a_master_on_a_port_in_use_is_refused_at_start(redis_server: EmbeddedRedis, start_router: Any) -> None:
    """`flexlb master` too: one clear error, no traceback, no hang (it used to keep running past 60 s)."""
    first = start_router()
    env = {**os.environ, "REDIS_URL": redis_server.url}
    command = [*CLI, "master", "--host", "127.0.0.1", "--port", str(first.port)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"cannot listen on 127.0.0.1:{first.port} (--port): Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert await healthy(first.url)


def test_a_port_out_of_range_is_refused(redis_server: EmbeddedRedis) -> None:
    done = second_router(redis_server.url, 105537)
    assert done.returncode == 2 and "port 105537 is out of range 0-65535" in done.stderr


class FlagRouter(ChildProcess):
    """`flexlb serve` with operator flags, on a free port."""

    what = "router"

    def __init__(self, redis_url: str, service: str, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "FLEXLB_SERVICE_ID": service,
            # no master, no health checks: a worker killed by the test stays chosen, so its failure is the proxy's
            "FLEXLB_CONFIG": json.dumps({"contendForMaster": False, "healthCheckIntervalMs": 3_600_000}),
            **(env or {}),
        }
        command = [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self._spawn(command, full_env, f"/tmp/flexlb-flag-router-{self.port}.log")


@pytest.fixture
def start_flag_router(redis_server: EmbeddedRedis, service: str) -> Any:
    started: list[FlagRouter] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> FlagRouter:
        router = FlagRouter(redis_server.url, service, *flags, env=env)
        started.append(router)
        return router.wait_ready()

    yield start
    for router in started:
        router.stop()


def scrape(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def test_operator_flags_metrics_and_error_shapes_on_a_real_router(
    start_sim_worker: Any, start_flag_router: Any
) -> None:
    worker = start_sim_worker()
    # the worker by its DNS name: registered at the address the name resolves to (flexlb.discovery)
    router = start_flag_router(
        "--worker-urls", f"http://localhost:{worker.port}", "--policy", "round_robin",
        "--request-timeout-secs", "30", "--log-format", "json",
        env={"PROXY_RETRIES": "0"},
    )  # fmt: skip
    worker_id = f"127.0.0.1:{worker.port}"
    prompt = " ".join(f"w{i}" for i in range(100))
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> tuple[int, Any]:
            async with http.get(router.url + path) as resp:
                return resp.status, await resp.json(content_type=None)

        async def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
            async with http.post(router.url + path, json=body) as resp:
                return resp.status, await resp.json(content_type=None)

        status, listed = await get("/list_workers")
        assert status == 200 and listed["urls"] == [f"http://{worker_id}"]

        for stream in (True, False, True):
            body = {"prompt": prompt, "max_tokens": 4, "stream": stream}
            async with http.post(f"{router.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        # OpenAI's shape on every /v1 path
        status, model = await get("/v1/models")
        model_id = model["data"][0]["id"]
        assert await get(f"/v1/models/{model_id}") == (200, model["data"][0])
        status, error = await get("/v1/models/org/other-model")
        assert status == 404 and error["error"]["code"] == "model_not_found"
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] is None
        assert "'org/other-model' does not exist" in error["error"]["message"]
        status, error = await get("/v1/no-such-thing")
        assert status == 404 and set(error) == {"error"}
        assert error["error"] | {"message": ""} == {
            "message": "", "type": "invalid_request_error", "param": None, "code": None,
        }  # fmt: skip

        # the original FlexLB's endpoints
        status, notified = await post("/rtp_llm/notify_master", {"reqIp": "10.0.0.1", "roleId": "frontend"})
        assert status == 200 and notified["success"] and notified["real_master_host"]
        assert "master_lock_holder" in notified
        status, refused = await post("/rtp_llm/update_log_level", {"log_level": "chatty"})
        assert status == 400 and "log_level: unknown log level 'chatty'" in refused["error_message"]
        status, updated = await post("/rtp_llm/update_log_level", {"log_level": "debug"})
        assert status == 200 and updated["success"] and updated["log_level"] == "DEBUG", updated
        assert updated["processes"] == 1 and updated["applied"][0]["level"] == "DEBUG", updated
        status, scheduled = await post(
            "/rtp_llm/schedule", {"request_id": 77, "input_ids": list(range(130)), "request_priority": 2}
        )
        assert status == 200 and scheduled["success"], scheduled
        status, _ = await post("/rtp_llm/release", {"request_id": 77})
        assert status == 200

        worker.stop(signal.SIGKILL)  # proxyRetries 0: its connect failure uses up the retries
        async with http.post(f"{router.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as resp:
            assert resp.status == 502

        async with http.get(f"{router.url}/metrics") as resp:
            text = await resp.text()
    labels = {"route": "/v1/completions", "role": "PDFUSION"}
    assert scrape(text, "flexlb_proxy_ttft_seconds_count", **labels) == 2  # the two streams
    assert scrape(text, "flexlb_proxy_request_duration_seconds_count", **labels) == 3
    # the 502: no worker answered
    assert scrape(text, "flexlb_proxy_request_duration_seconds_count", route="/v1/completions", role="none") == 1
    assert scrape(text, "flexlb_proxy_ttft_seconds_bucket", le="60.0", **labels) == 2
    assert scrape(text, "flexlb_proxy_ttft_seconds_bucket", le="+Inf", model=model_id) == 2
    worker_labels = {"worker": worker_id, "role": "PDFUSION"}
    assert scrape(text, "flexlb_proxy_worker_requests_total", status_class="2xx", **worker_labels) == 3
    assert scrape(text, "flexlb_proxy_worker_requests_total", status_class="error", **worker_labels) == 1
    assert scrape(text, "flexlb_proxy_retries_exhausted_total", route="/v1/completions") == 1
    assert scrape(text, "flexlb_workers_healthy", role="PDFUSION") == 1  # no health checks: still believed alive
    assert scrape(text, "flexlb_workers_registered", role="PDFUSION") == 1
    assert scrape(text, "flexlb_workers_healthy", role="DECODE") == 0

    with open(router.log_path) as f:
        records = [json.loads(line) for line in f if line.startswith("{")]  # the others: the CLI's own prints
    # DEBUG is on since update_log_level above: a library's debug lines (redis-py's on a new connection) may follow
    foreign = [r for r in records if not r["logger"].startswith("flexlb") and r["level"] != "DEBUG"]
    assert records and not foreign, foreign[:3]
    assert any(r["level"] == "WARNING" and "log level set to DEBUG" in r["message"] for r in records)
    assert "Traceback" not in router.log()


async def test_smg_admin_aliases_need_the_admin_token(start_sim_worker: Any, start_router: Any) -> None:
    worker = start_sim_worker()
    router = start_router(env={"FLEXLB_ADMIN_TOKEN": "admin-secret"})
    url = f"http://127.0.0.1:{worker.port}"
    admin = {"Authorization": "Bearer admin-secret"}
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", f"/add_worker?url={url}"),
            ("POST", f"/remove_worker?url={url}"),
            ("GET", "/list_workers"),
            ("POST", "/rtp_llm/update_log_level"),
        ):
            async with http.request(method, router.url + path) as resp:
                assert resp.status == 401, path
        async with http.post(f"{router.url}/add_worker?url={url}&worker_type=decode", headers=admin) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{router.url}/rtp_llm/workers", headers=admin) as resp:
            workers = (await resp.json())["workers"]
        assert [(w["worker_id"], w["role"]) for w in workers] == [(worker.worker_id, "DECODE")]
        async with http.post(f"{router.url}/add_worker?url=ftp://x", headers=admin) as resp:
            assert resp.status == 400 and "url ftp://x" in (await resp.json())["error_message"]
        async with http.post(f"{router.url}/remove_worker?url={url}", headers=admin) as resp:
            assert resp.status == 200
        async with http.get(f"{router.url}/list_workers", headers=admin) as resp:
            assert (await resp.json())["urls"] == []
        async with http.post(f"{router.url}/remove_worker?url={url}", headers=admin) as resp:
            assert resp.status == 404
