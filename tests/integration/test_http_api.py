"""The HTTP API of a real router process: bad input is refused clearly and touches nothing; the RTP-LLM frontend's
requests get every field it reads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import RouterProcess, eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore

PREFILL = WorkerSpec("10.5.0.1", 8000, Role.PREFILL, grpc_port=8001, group="g1", max_concurrency=8)
DECODE = WorkerSpec("10.5.0.2", 8010, Role.DECODE, grpc_port=8011, group="g1", max_concurrency=8)


@pytest.fixture(scope="module")
def api_service() -> str:
    return f"api{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def router(redis_server: EmbeddedRedis, api_service: str) -> Iterator[RouterProcess]:
    proc = RouterProcess(redis_server.url, api_service).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
async def fleet(real_redis: aioredis.Redis, api_service: str) -> AsyncIterator[FleetStore]:
    store = FleetStore(real_redis, api_service)
    for spec in (PREFILL, DECODE):
        await store.register_worker(spec, WorkerStatus(kv_total=100_000, block_size=16, running=1, waiting=2))
    await store.set_cache_blocks(PREFILL.worker_id, [111, 222])
    yield store
    for spec in (PREFILL, DECODE):
        await store.remove_worker(spec.worker_id)


async def dump_service(redis: aioredis.Redis, service: str) -> dict[str, bytes]:
    """Every key of the service with its serialized value: equal dumps mean Redis was not touched."""
    raw = redis.connection_pool.connection_kwargs.get("decode_responses")
    assert raw, "fixture clients decode responses"
    out = {}
    async for key in redis.scan_iter(match=f"flexlb:{{{service}}}:*"):
        out[key] = await redis.execute_command("DUMP", key, NEVER_DECODE=True)
    return out


VALID = {"request_id": 77, "seq_len": 100, "block_cache_keys": [111]}
BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("empty body", b"", 400, "empty body"),
    ("whitespace body", b"  \n", 400, "empty body"),
    ("malformed JSON", b'{"request_id": 1,', 400, "malformed JSON"),
    ("not an object", b"[1, 2]", 400, "expected a JSON object, got list"),
    ("request_id missing", b'{"seq_len": 10}', 400, "request_id: required"),
    ("request_id 0", orjson.dumps({**VALID, "request_id": 0}), 400, "request_id: must not be 0"),
    ("request_id string", orjson.dumps({**VALID, "request_id": "77"}), 400, "request_id: expected an integer, got str"),
    ("request_id float", orjson.dumps({**VALID, "request_id": 7.5}), 400, "request_id: expected an integer"),
    ("request_id bool", orjson.dumps({**VALID, "request_id": True}), 400, "request_id: expected an integer, got bool"),
    ("request_id > int64", b'{"request_id": 9223372036854775808, "seq_len": 1}', 400, "request_id"),
    ("seq_len negative", orjson.dumps({**VALID, "seq_len": -1}), 400, "seq_len: -1 is out of range"),
    ("seq_len string", orjson.dumps({**VALID, "seq_len": "100"}), 400, "seq_len: expected an integer, got str"),
    ("keys not a list", orjson.dumps({**VALID, "block_cache_keys": 5}), 400, "block_cache_keys: expected a list"),
    ("key not int", orjson.dumps({**VALID, "block_cache_keys": [1, "x"]}), 400, "block_cache_keys[1]"),
    ("timeout negative", orjson.dumps({**VALID, "generate_timeout": -5}), 400, "generate_timeout"),
    ("model not str", orjson.dumps({**VALID, "model": 3}), 400, "model: expected a string"),
    ("unknown model", orjson.dumps({**VALID, "model": "gpt-9"}), 404, "unknown model 'gpt-9'"),
    ("10 MB body", b'{"request_id": 1, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}', 413, "too large"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_schedule_input_is_refused_clearly_and_touches_nothing(
    router: RouterProcess, fleet: FleetStore, case: str, body: bytes, status: int, message: str
) -> None:
    before = await dump_service(fleet.redis, fleet.keys.service)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/rtp_llm/schedule", data=body) as resp:
            assert resp.status == status, await resp.text()
            assert resp.content_type == "application/json"
            answer = await resp.json()
        assert answer["success"] is False
        assert answer["code"] == (8601 if status == 404 else 8406)
        assert message in answer["error_message"], answer["error_message"]
        assert "Traceback" not in answer["error_message"]
        assert await dump_service(fleet.redis, fleet.keys.service) == before
        # the router keeps serving
        async with http.post(f"{router.url}/rtp_llm/schedule", json={**VALID, "request_id": 9000}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": 9000}) as resp:
            assert (await resp.json())["released"] == 2


@pytest.mark.parametrize(
    ("path", "method", "body", "status"),
    [
        ("/rtp_llm/release", "POST", b"{", 400),
        ("/rtp_llm/release", "POST", b'{"request_id": 0}', 400),
        ("/rtp_llm/workers", "POST", b'{"ip": "1.2.3.4", "http_port": 70000, "role": "prefill"}', 400),
        ("/rtp_llm/workers", "POST", b'{"ip": "1.2.3.4", "http_port": 80, "role": "chef"}', 400),
        ("/rtp_llm/workers", "POST", b'{"ip": "{evil}", "http_port": 80, "role": "prefill"}', 400),
        ("/rtp_llm/workers", "POST", b'{"ip": "1.2.3.4:80", "http_port": 80, "role": "prefill"}', 400),
        ("/rtp_llm/workers", "POST", b'{"ip": 5, "http_port": 80, "role": "prefill"}', 400),
        ("/rtp_llm/workers/9.9.9.9:1/status", "POST", b'{"running": 1}', 404),
        ("/rtp_llm/workers/10.5.0.1:8000/status", "POST", b'{"running": -1}', 400),
        ("/rtp_llm/workers/10.5.0.1:8000/status", "POST", b'{"speed": 1}', 400),
        ("/rtp_llm/workers/9.9.9.9:1", "DELETE", b"", 404),
        ("/no/such/path", "GET", b"", 404),
        ("/rtp_llm/schedule", "GET", b"", 405),
    ],
)
async def test_other_endpoints_answer_json_errors(
    router: RouterProcess, fleet: FleetStore, path: str, method: str, body: bytes, status: int
) -> None:
    before = await dump_service(fleet.redis, fleet.keys.service)
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{router.url}{path}", data=body) as resp:
            assert resp.status == status
            answer = await resp.json()
    assert answer["success"] is False and answer["error_message"]
    assert await dump_service(fleet.redis, fleet.keys.service) == before


async def test_rtp_llm_frontend_request_gets_every_field_it_reads(router: RouterProcess, fleet: FleetStore) -> None:
    # shaped like the RTP-LLM frontend's request (see FLEXLB_REFERENCE.md); extra fields are ignored
    request = {
        "model": "engine_service",
        "block_cache_keys": [111, 222, 333],
        "seq_len": 64,
        "debug": False,
        "request_priority": 100,
        "generate_timeout": 3_600_000,
        "request_id": 1234567890123,
        "request_time_ms": 1_700_000_000_000,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/rtp_llm/master/info", data=b"{}") as resp:
            info = await resp.json()
        assert info["code"] == 200 and info["real_master_host"] == f"127.0.0.1:{router.port}"
        assert info["queue_length"] == 0

        async with http.post(f"{router.url}/rtp_llm/schedule", json=request) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["success"] is True and answer["code"] == 200 and answer["error_message"] == ""
        assert answer["real_master_host"] == info["real_master_host"] and answer["queue_length"] == 0
        by_role = {s["role"]: s for s in answer["server_status"]}
        assert set(by_role) == {"PREFILL", "DECODE"}
        prefill, decode = by_role["PREFILL"], by_role["DECODE"]
        assert (prefill["server_ip"], prefill["http_port"], prefill["grpc_port"]) == ("10.5.0.1", 8000, 8001)
        assert (decode["server_ip"], decode["http_port"], decode["grpc_port"]) == ("10.5.0.2", 8010, 8011)
        assert prefill["group"] == decode["group"] == "g1"
        for s in (prefill, decode):
            assert s["request_id"] == request["request_id"] and s["success"] is True and s["code"] == 200
            assert isinstance(s["prefill_time"], int)
            for field in ("running_batch_size", "queue_size", "waiting_time_ms", "available_kv_cache_len",
                          "estimate_ttft_ms", "estimate_tpot_ms", "hit_cache_len"):  # fmt: skip
                assert field in s["debug_info"], field
        # two of three blocks cached (block size 16): 32 hit tokens, 32 to compute at the default 10 tokens/ms,
        # behind 2 waiting tasks: 2 x 5 ms overhead + own 5 ms overhead + 32/10 ms = 18.2 ms
        assert prefill["debug_info"]["hit_cache_len"] == 32
        assert prefill["debug_info"]["estimate_ttft_ms"] == pytest.approx(18.2)
        assert prefill["prefill_time"] == 18
        assert prefill["debug_info"]["running_batch_size"] == 1 and prefill["debug_info"]["queue_size"] == 2

        async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": request["request_id"]}) as resp:
            assert (await resp.json())["released"] == 2

        # the original answers failures with its codes and a message the frontend logs
        await fleet.update_status(DECODE.worker_id, {"alive": "false"})
        async with http.post(f"{router.url}/rtp_llm/schedule", json=request) as resp:
            assert resp.status == 503
            answer = await resp.json()
        assert answer["success"] is False and answer["code"] == 8403 and answer["server_status"] == []
        assert answer["error_message"].startswith("NO_DECODE_WORKER: none of 1 DECODE workers is alive")


async def test_schedule_snapshot_and_health(router: RouterProcess, fleet: FleetStore) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/rtp_llm/schedule", json={"request_id": 5, "seq_len": 10}) as resp:
            assert resp.status == 200

        async def snapshot_with_the_reservation() -> dict | None:
            # the snapshot is the router's view: the fixture's re-registration of the workers (entries on the change
            # stream) may still be on its way and show their pending load as registered for a moment
            async with http.post(f"{router.url}/rtp_llm/schedule_snapshot", data=b"") as resp:
                snap = await resp.json()
            workers = {w["worker_id"]: w for w in snap["workers"]}
            pending = {wid: (w["pending_count"], w["pending_tokens"]) for wid, w in workers.items()}
            return snap if pending == {PREFILL.worker_id: (1, 10), DECODE.worker_id: (1, 10)} else None

        snap = await eventually(snapshot_with_the_reservation, "the reservation in the router's view")
        async with http.get(f"{router.url}/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with http.post(f"{router.url}/rtp_llm/release", json={"request_id": 5}) as resp:
            assert resp.status == 200
    assert snap["strategies"]["PREFILL"] == "SHORTEST_TTFT" and snap["strategies"]["DECODE"] == "WEIGHTED_CACHE"


async def test_a_debug_request_gets_the_decision_explained(router: RouterProcess, fleet: FleetStore) -> None:
    """Issue 11: `debug: true` (the original frontend's flag) returns each role's best candidates and the rule."""
    request = {"request_id": 4242, "seq_len": 64, "block_cache_keys": [111, 222, 333], "debug": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/rtp_llm/schedule", json=request) as resp:
            answer = await resp.json()
        await http.post(f"{router.url}/rtp_llm/release", json={"request_id": 4242})
        async with http.post(f"{router.url}/rtp_llm/schedule", json={**request, "debug": False}) as resp:
            plain = await resp.json()
        await http.post(f"{router.url}/rtp_llm/release", json={"request_id": 4242})
    by_role = {s["role"]: s["debug_info"] for s in answer["server_status"]}
    decision = by_role["PREFILL"]["decision"]
    assert decision["chosen"] == PREFILL.worker_id and decision["strategy"] == "SHORTEST_TTFT"
    assert decision["reason"] == "the shortest estimated TTFT"
    (candidate,) = decision["candidates"]
    assert candidate["worker"] == PREFILL.worker_id and candidate["hit_tokens"] == 32
    assert by_role["DECODE"]["decision"]["chosen"] == DECODE.worker_id
    assert all("decision" not in s["debug_info"] for s in plain["server_status"])
