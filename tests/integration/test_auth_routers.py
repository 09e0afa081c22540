"""Authentication and least privilege, on real processes over real sockets (redis-server, `flexlb serve`,
`flexlb sim-worker`): every endpoint refuses a missing, wrong or other API's key and accepts its own; the client's
key (or the engine's) reaches an engine that requires one; absurd status is refused and Redis left as it was; an
impostor registration is refused; a client token holds at most maxReservationsPerToken reservations and releases
only its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import ChildProcess

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.proto.flexlb_schedule_pb2 import ReleaseRequestPB, ScheduleRequestPB
from flexlb.proto.flexlb_schedule_pb2_grpc import FlexlbSchedulerStub
from flexlb.state.store import FleetStore

API_KEYS = ("sk-proxy-one", "sk-proxy-two")
SCHEDULE_TOKENS = ("sched-alpha", "sched-beta")
ADMIN_TOKEN = "admin-secret"
AUTH_ENV = {
    "FLEXLB_API_KEYS": ",".join(API_KEYS),
    "FLEXLB_SCHEDULE_TOKENS": ",".join(SCHEDULE_TOKENS),
    "FLEXLB_ADMIN_TOKEN": ADMIN_TOKEN,
}
KEY_OF = {"proxy": API_KEYS[1], "schedule": SCHEDULE_TOKENS[1], "admin": ADMIN_TOKEN}
OTHER_API = {"proxy": "admin", "schedule": "proxy", "admin": "schedule"}
MODEL = "flexlb-sim"
PROMPT = " ".join(f"w{i}" for i in range(40))
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

# Every route of a router, its API and a body it accepts once authorised.
ENDPOINTS: list[tuple[str, str, str, bytes]] = [
    ("proxy", "POST", "/v1/chat/completions", orjson.dumps(CHAT)),
    ("proxy", "POST", "/v1/completions", orjson.dumps({"model": MODEL, "prompt": "hi"})),
    ("proxy", "POST", "/generate", orjson.dumps({"text": "hi"})),
    ("proxy", "GET", "/v1/models", b""),
    ("schedule", "POST", "/rtp_llm/schedule", orjson.dumps({"request_id": 5, "seq_len": 10})),
    ("schedule", "POST", "/rtp_llm/release", orjson.dumps({"request_id": 5})),
    ("schedule", "POST", "/rtp_llm/master/info", b"{}"),
    ("admin", "GET", "/rtp_llm/workers", b""),
    ("admin", "POST", "/rtp_llm/workers", orjson.dumps({"ip": "127.0.0.1", "http_port": 9, "role": "prefill"})),
    ("admin", "POST", "/rtp_llm/workers/127.0.0.1:9/status", orjson.dumps({"running": 1})),
    ("admin", "PUT", "/rtp_llm/workers/127.0.0.1:9/cache", orjson.dumps({"block_cache_keys": [1]})),
    ("admin", "DELETE", "/rtp_llm/workers/127.0.0.1:9", b""),
    ("admin", "POST", "/rtp_llm/schedule_snapshot", b""),
    ("admin", "GET", "/rtp_llm/queue_snapshot", b""),
    ("admin", "POST", "/rtp_llm/queue_snapshot", b""),
]  # fmt: skip


async def call(
    http: aiohttp.ClientSession, base: str, method: str, path: str, body: bytes, key: str | None
) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with http.request(method, base + path, data=body or None, headers=headers) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None, resp.headers


def assert_refusal(api: str, status: int, body: Any, expected: int, what: str) -> None:
    assert status == expected, (what, status, body)
    text = orjson.dumps(body).decode()
    for secret in (*API_KEYS, *SCHEDULE_TOKENS, ADMIN_TOKEN, "wrong-key"):
        assert secret not in text, f"{what}: the answer echoes a key"
    if api == "proxy":  # OpenAI's shape
        assert body["error"]["type"] == "invalid_request_error", body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == (None if "missing" in what else "invalid_api_key"), body
    else:  # the schedule API's shape
        assert body["success"] is False and body["server_status"] == [], body
        assert body["code"] == (8610 if expected == 401 else 8611), body
        assert "FLEXLB_" in body["error_message"], body


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def dump_service(redis: aioredis.Redis, service: str) -> dict[str, bytes]:
    out = {}
    async for key in redis.scan_iter(match=f"flexlb:{{{service}}}:*"):
        out[key] = await redis.execute_command("DUMP", key, NEVER_DECODE=True)
    return out


async def test_every_endpoint_refuses_a_missing_wrong_or_foreign_key_and_accepts_its_own(
    start_router: Any, http: aiohttp.ClientSession
) -> None:
    router = start_router({"servedModelName": MODEL}, env=AUTH_ENV)
    for api, method, path, body in ENDPOINTS:
        where = f"{method} {path}"
        status, answer, headers = await call(http, router.url, method, path, body, None)
        assert_refusal(api, status, answer, 401, f"{where} missing")
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        status, answer, _ = await call(http, router.url, method, path, body, "wrong-key")
        assert_refusal(api, status, answer, 401, f"{where} wrong")
        status, answer, _ = await call(http, router.url, method, path, body, KEY_OF[OTHER_API[api]])
        assert_refusal(api, status, answer, 403, f"{where} another API's key")
        status, answer, _ = await call(http, router.url, method, path, body, KEY_OF[api])
        # Past authentication (a release of an id this client does not hold is its own 403, not about the key).
        assert status != 401 and "bearer key" not in orjson.dumps(answer).decode(), (where, status, answer)
    # Other schemes and a bare key are no Bearer credential.
    async with http.get(router.url + "/rtp_llm/workers", headers={"Authorization": f"Basic {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 401
    # Any of several keys works; the probes stay open.
    status, _, _ = await call(http, router.url, "GET", "/v1/models", b"", API_KEYS[0])
    assert status == 200
    for path in ("/health", "/metrics"):
        async with http.get(router.url + path) as resp:
            assert resp.status == 200, path
    assert "sk-proxy" not in router.log() and ADMIN_TOKEN not in router.log()


async def test_grpc_schedule_api_needs_the_schedule_token_in_metadata(start_router: Any) -> None:
    port = free_port()
    config = {"enableGrpcPrefillMaster": True, "grpcHost": "127.0.0.1", "grpcPort": port}
    start_router(config, env=AUTH_ENV)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = FlexlbSchedulerStub(channel)
        request = ScheduleRequestPB(request_id=11, seq_len=10)
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong-key"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Bearer {ADMIN_TOKEN}"),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Schedule(request, metadata=metadata)
            assert err.value.code() == code, metadata
            assert "FLEXLB_SCHEDULE_TOKENS" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Release(ReleaseRequestPB(request_id=11), metadata=metadata)
            assert err.value.code() == code
        good = (("authorization", f"Bearer {SCHEDULE_TOKENS[0]}"),)
        reply = await stub.Schedule(request, metadata=good)
        assert reply.code == 8400 or not reply.success  # no workers: refused by the scheduler, not by auth


async def test_the_clients_key_or_the_engines_reaches_an_engine_that_requires_one(
    real_store: FleetStore, start_router: Any, start_sim_worker: Any, http: aiohttp.ClientSession
) -> None:
    engine_key = "engine-secret"
    worker = start_sim_worker(args=("--api-key", engine_key))
    await real_store.register_worker(WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION), WorkerStatus())
    body = orjson.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
    # The engine refuses a request without its key: the simulator behaves as an engine with --api-key.
    status, answer, _ = await call(http, worker.url, "POST", "/v1/completions", body, None)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"

    # No keys on the router: the client's Authorization is forwarded as it came.
    open_router = start_router({"servedModelName": MODEL})
    status, answer, _ = await call(http, open_router.url, "POST", "/v1/completions", body, engine_key)
    assert status == 200, answer
    status, answer, _ = await call(http, open_router.url, "POST", "/v1/completions", body, "not-the-engines")
    assert status == 401, answer  # the engine's own refusal, passed on

    # Keys on the router and FLEXLB_ENGINE_API_KEY: the engine gets its key, not the client's.
    guarded = start_router({"servedModelName": MODEL}, env={**AUTH_ENV, "FLEXLB_ENGINE_API_KEY": engine_key})
    status, answer, _ = await call(http, guarded.url, "POST", "/v1/completions", body, API_KEYS[0])
    assert status == 200, answer
    # A per-engine key beats the default one.
    per_worker = orjson.dumps({worker.worker_id: engine_key}).decode()
    env = {**AUTH_ENV, "FLEXLB_ENGINE_API_KEY": "stale", "FLEXLB_ENGINE_API_KEYS": per_worker}
    mapped = start_router({"servedModelName": MODEL}, env=env)
    status, answer, _ = await call(http, mapped.url, "POST", "/v1/completions", body, API_KEYS[0])
    assert status == 200, answer
    for proc in (open_router, guarded, mapped):
        assert engine_key not in proc.log()


ABSURD_STATUS = [
    ({"running": 2**70}, "running"),
    ({"waiting": -1}, "waiting"),
    ({"kv_used": 1e30}, "kv_used"),
    ({"kv_total": 1.5}, "kv_total"),
    ({"prefill_tokens_per_ms": "inf"}, "prefill_tokens_per_ms"),
    ({"prefill_tokens_per_ms": 1e300}, "prefill_tokens_per_ms"),
    ({"step_latency_ms": -3}, "step_latency_ms"),
    ({"alive": 0}, "alive"),
    ({"alive": "false"}, "alive"),
    ({"available": None}, "available"),
    ({"block_size": 0}, "block_size"),
]


async def test_absurd_status_is_refused_and_redis_left_as_it_was(
    real_redis: aioredis.Redis, real_store: FleetStore, service: str, start_router: Any, http: aiohttp.ClientSession
) -> None:
    router = start_router(env=AUTH_ENV)
    spec = WorkerSpec("127.0.0.1", free_port(), Role.PREFILL)
    await real_store.register_worker(spec, WorkerStatus(kv_total=1000))
    before = await dump_service(real_redis, service)
    for fields, name in ABSURD_STATUS:
        path = f"/rtp_llm/workers/{spec.worker_id}/status"
        status, answer, _ = await call(http, router.url, "POST", path, json.dumps(fields).encode(), ADMIN_TOKEN)
        assert status == 400, (fields, answer)
        assert answer["error_message"].startswith(f"status.{name}:"), answer
        assert "expected" in answer["error_message"], answer  # names the bound
        registration = {"ip": "127.0.0.1", "http_port": free_port(), "role": "prefill", "status": fields}
        status, answer, _ = await call(
            http, router.url, "POST", "/rtp_llm/workers", json.dumps(registration).encode(), ADMIN_TOKEN
        )
        assert status == 400, (fields, answer)
    assert await dump_service(real_redis, service) == before
    # Sane values are stored, and the router keeps serving.
    sane = {"running": 3, "kv_used": 200, "prefill_tokens_per_ms": 12.5, "alive": True}
    status, answer, _ = await call(
        http, router.url, "POST", f"/rtp_llm/workers/{spec.worker_id}/status", orjson.dumps(sane), ADMIN_TOKEN
    )
    assert status == 200, answer
    stored = await real_redis.hgetall(real_store.keys.worker(spec.worker_id))
    assert (stored["running"], stored["kv_used"], stored["alive"]) == ("3", "200", "1")


async def test_a_registration_whose_status_port_answers_for_another_worker_is_refused(
    real_redis: aioredis.Redis,
    real_store: FleetStore,
    start_router: Any,
    start_sim_worker: Any,
    http: aiohttp.ClientSession,
) -> None:
    router = start_router(env=AUTH_ENV)
    real = start_sim_worker(role="prefill")
    impostor_port = free_port()
    # The attack: the impostor's own HTTP address with the real worker's status port, so the master's polls see a
    # healthy worker while users' prompts go to the impostor.
    impostor = {"ip": "127.0.0.1", "http_port": impostor_port, "role": "prefill", "grpc_port": real.port + 1}
    status, answer, _ = await call(http, router.url, "POST", "/rtp_llm/workers", orjson.dumps(impostor), ADMIN_TOKEN)
    assert status == 409, answer
    assert f"answers for the worker on HTTP port {real.port}, not {impostor_port}" in answer["error_message"]
    assert not await real_redis.exists(real_store.keys.worker(f"127.0.0.1:{impostor_port}"))
    # The real worker registers; one whose status port does not answer yet is accepted (the master marks it down).
    genuine = {"ip": "127.0.0.1", "http_port": real.port, "role": "prefill"}
    status, answer, _ = await call(http, router.url, "POST", "/rtp_llm/workers", orjson.dumps(genuine), ADMIN_TOKEN)
    assert status == 201, answer
    absent = {"ip": "127.0.0.1", "http_port": free_port(), "role": "prefill"}
    status, answer, _ = await call(http, router.url, "POST", "/rtp_llm/workers", orjson.dumps(absent), ADMIN_TOKEN)
    assert status == 201, answer


async def test_a_client_token_holds_at_most_its_cap_and_releases_only_its_own(
    real_redis: aioredis.Redis, real_store: FleetStore, start_router: Any, http: aiohttp.ClientSession
) -> None:
    grpc_port = free_port()
    config = {
        "maxReservationsPerToken": 2,
        "enableGrpcPrefillMaster": True,
        "grpcHost": "127.0.0.1",
        "grpcPort": grpc_port,
    }
    router = start_router(config, env=AUTH_ENV)
    spec = WorkerSpec("127.0.0.1", free_port(), Role.PDFUSION)
    await real_store.register_worker(spec, WorkerStatus(kv_total=1_000_000))
    alpha, beta = SCHEDULE_TOKENS

    async def schedule(rid: int, token: str) -> tuple[int, Any]:
        status, body, _ = await call(
            http, router.url, "POST", "/rtp_llm/schedule", orjson.dumps({"request_id": rid, "seq_len": 10}), token
        )
        return status, body

    assert (await schedule(1, alpha))[0] == 200
    assert (await schedule(2, alpha))[0] == 200
    status, body = await schedule(3, alpha)
    assert status == 429 and body["code"] == 8612, body
    assert "maxReservationsPerToken" in body["error_message"] and body["success"] is False
    assert (await schedule(3, beta))[0] == 200  # another client has its own cap
    status, body = await schedule(1, beta)  # an id another client holds
    assert status == 409, body

    # beta cannot release alpha's reservation: 403, and the reservation stays in Redis.
    status, body, _ = await call(http, router.url, "POST", "/rtp_llm/release", orjson.dumps({"request_id": 1}), beta)
    assert status == 403 and body["code"] == 8611, body
    assert await real_redis.exists(real_store.keys.request(1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = FlexlbSchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Release(ReleaseRequestPB(request_id=1), metadata=(("authorization", f"Bearer {beta}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await real_redis.exists(real_store.keys.request(1))
        # The cap holds over gRPC too (the same client, the same count).
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Schedule(
                ScheduleRequestPB(request_id=4, seq_len=10), metadata=(("authorization", f"Bearer {alpha}"),)
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # alpha releases its own, and may schedule again.
    status, body, _ = await call(http, router.url, "POST", "/rtp_llm/release", orjson.dumps({"request_id": 1}), alpha)
    assert status == 200 and body["released"] == 1, body
    assert not await real_redis.exists(real_store.keys.request(1))
    assert (await schedule(3, alpha))[0] == 409  # still beta's
    assert (await schedule(5, alpha))[0] == 200


class BareRouter(ChildProcess):
    """`flexlb serve` with the host it is given (or none), unlike conftest's RouterProcess."""

    what = "router"

    def __init__(self, redis_url: str, service: str, host: str | None, env: dict[str, str], log_path: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "flexlb.cli", "serve", "--port", str(self.port)]
        if host is not None:
            command += ["--host", host]
        full_env = {**os.environ, "REDIS_URL": redis_url, "FLEXLB_SERVICE_ID": service, **env}
        full_env["FLEXLB_CONFIG"] = '{"contendForMaster": false}'
        self._spawn(command, full_env, log_path)


@pytest.fixture
def bare_routers(redis_server: EmbeddedRedis, service: str, tmp_path: Any) -> Any:
    started: list[BareRouter] = []

    def start(host: str | None, env: dict[str, str] | None = None) -> BareRouter:
        router = BareRouter(redis_server.url, service, host, env or {}, str(tmp_path / f"r{len(started)}.log"))
        started.append(router)
        return router.wait_ready()

    yield start
    for router in started:
        router.stop()


def test_an_open_admin_api_on_every_interface_is_warned_about_and_the_default_is_loopback(bare_routers: Any) -> None:
    exposed = bare_routers("0.0.0.0")
    assert "SECURITY WARNING: the admin API" in exposed.log()
    guarded = bare_routers("0.0.0.0", {"FLEXLB_ADMIN_TOKEN": ADMIN_TOKEN})
    assert "SECURITY WARNING: the admin API" not in guarded.log()
    assert ADMIN_TOKEN not in guarded.log()
    default = bare_routers(None)
    assert f"on http://127.0.0.1:{default.port}" in default.log()
    assert "SECURITY WARNING" not in default.log()
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{default.port}"], capture_output=True, text=True)
    if listening.returncode == 0 and listening.stdout.strip():  # ss present: the socket is bound to loopback only
        assert all("127.0.0.1:" in line for line in listening.stdout.strip().splitlines()), listening.stdout
