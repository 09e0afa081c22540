"""Fuzzing every HTTP endpoint of real router processes with hypothesis: never a 5xx, never a traceback in the
router's log, Redis unchanged by a rejected request, the router's RSS bounded.

Two routers on one redis-server: the data plane (schedule API, proxy, read-only endpoints) in front of a real
simulated worker with a small KV pool (so no fuzzed ``max_tokens`` can run long), and the admin API on a service of
its own with decoy workers (a fuzzed status update must not take the data plane's worker down). Requests are sent
with ``http.client``, whose bytes and headers the test controls.

Profiles: ``FLEXLB_FUZZ_PROFILE=ci`` (the default: derandomized, a bounded number of examples) or ``dev`` (random,
more examples).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from conftest import RouterProcess, SimWorkerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.embedded_redis import EmbeddedRedis
from flexlb.state.store import FleetStore

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("ci", derandomize=True, max_examples=25, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
FUZZ = settings.get_profile(os.environ.get("FLEXLB_FUZZ_PROFILE", "ci"))

MODEL = "flexlb-sim"
RSS_GROWTH_BOUND_MB = 60
CALL_TIMEOUT_S = 15.0
PROXY_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")


# ---------------------------------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    redis_url: str
    data: RouterProcess
    data_service: str
    admin: RouterProcess
    admin_service: str
    worker_id: str
    decoys: tuple[str, ...]
    rss_start: dict[int, float]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _register(url: str, service: str, specs: list[WorkerSpec]) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        store = FleetStore(client, service)
        for spec in specs:
            await store.register_worker(spec, WorkerStatus(kv_total=1_000_000, block_size=16))
    finally:
        await client.aclose()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


ROUTER_CONFIG = {
    "servedModelName": MODEL,
    "workerStatusMaxAgeMs": 0,  # no master refreshes the statuses here
    "healthCheckIntervalMs": 3_600_000,  # nor does a health check write during a comparison
}


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_service, admin_service = f"fz{uuid.uuid4().hex[:10]}", f"fa{uuid.uuid4().hex[:10]}"
    log = str(tmp_path_factory.mktemp("fuzz") / "sim.log")
    worker = SimWorkerProcess(log, role="pdfusion", args=("--kv-blocks", "64", "--block-size", "16"), time_scale=0.01)
    data = RouterProcess(redis_server.url, data_service, ROUTER_CONFIG)
    admin = RouterProcess(redis_server.url, admin_service, ROUTER_CONFIG)
    procs = [worker, data, admin]
    try:
        for proc in procs:
            proc.wait_ready()
        spec = WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION, max_concurrency=100_000)
        _run(_register(redis_server.url, data_service, [spec]))
        decoys = [WorkerSpec("10.77.0.1", 8000, Role.PREFILL), WorkerSpec("10.77.0.2", 8000, Role.DECODE)]
        _run(_register(redis_server.url, admin_service, decoys))
        warm(data)
        yield Fleet(
            redis_server.url,
            data,
            data_service,
            admin,
            admin_service,
            spec.worker_id,
            tuple(d.worker_id for d in decoys),
            {p.process.pid: rss_mb(p.process.pid) for p in (data, admin)},
        )
    finally:
        for proc in procs:
            proc.stop()


def warm(router: RouterProcess) -> None:
    """One request per route before the RSS baseline: imports and buffers of a first request are not growth."""
    deadline = time.monotonic() + 10
    while call(router, "POST", "/rtp_llm/schedule", b'{"request_id": 1, "seq_len": 1}', {})[0] != 200:
        assert time.monotonic() < deadline, "the data router never scheduled on its worker"
        time.sleep(0.05)
    call(router, "POST", "/rtp_llm/release", b'{"request_id": 1}', {})
    for path in PROXY_PATHS:
        call(router, "POST", path, b'{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}', {})


# ----------------------------------------------------------------------------------------------------- helpers


def call(router: RouterProcess, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=CALL_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def snapshot(url: str, service: str, *, with_change_log: bool = True) -> dict[bytes, bytes]:
    """Every key of the service with its DUMP: equal snapshots mean Redis was not touched."""
    client = redis.Redis.from_url(url)
    try:
        out = {}
        for key in client.scan_iter(match=f"flexlb:{{{service}}}:*", count=1000):
            if not with_change_log and key.rsplit(b":", 1)[-1] in (b"changes", b"changes_seq"):
                continue
            out[key] = client.dump(key)
        return out
    finally:
        client.close()


def until(check: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(0.02)


def assert_error_body(status: int, raw: bytes, path: str) -> None:
    """A refusal is JSON naming the problem, in the shape of its route."""
    body = json.loads(raw)
    if path.startswith("/v1/") or path in PROXY_PATHS:
        assert body["error"]["message"], body
    else:
        assert body["success"] is False and body["error_message"], body


def exchange(
    fleet: Fleet, router: RouterProcess, service: str, method: str, path: str, body: bytes | None, headers: dict
) -> tuple[int, bytes]:
    """One request, checked: no 5xx, a JSON refusal, Redis unchanged when refused."""
    proxied = path in PROXY_PATHS
    before = snapshot(fleet.redis_url, service, with_change_log=not proxied)
    status, raw = call(router, method, path, body, headers)
    assert status < 500, f"{method} {path} -> {status}: {raw[:500]!r}"
    if status >= 400:
        assert_error_body(status, raw, path)
        if proxied:  # a worker's refusal is relayed: the proxy reserved and releases after answering
            until(lambda: snapshot(fleet.redis_url, service, with_change_log=False) == before, "Redis back as before")
        else:
            assert snapshot(fleet.redis_url, service) == before, f"a refused {method} {path} changed Redis"
    return status, raw


# ---------------------------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=40)


def fields(**known: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of ``known`` fields: half of them well typed throughout (so requests get through to the deeper
    checks), the others with some fields missing, any JSON value in some, and unknown keys."""
    typed = st.fixed_dictionaries(known)
    optional = {name: st.one_of(strategy, json_values) for name, strategy in known.items()}
    extra = st.dictionaries(st.text(max_size=6), json_values, max_size=2)
    mixed = st.fixed_dictionaries({}, optional=optional).flatmap(lambda d: extra.map(lambda e: {**e, **d}))
    return st.one_of(typed, mixed)


def encoded(obj: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[bytes, dict[str, str]]]:
    """A body and its headers: JSON (as Python writes it: big ints, NaN), raw bytes, or either one encoded, truly or
    falsely."""

    def dumps(value: Any) -> bytes:
        return json.dumps(value).encode()

    plain = st.one_of(obj.map(dumps), st.binary(max_size=64))
    encodings = st.sampled_from(["", "gzip", "deflate", "gzip-lie", "deflate-lie", "br", "x-unknown", "identity"])

    def encode(pair: tuple[bytes, str]) -> tuple[bytes, dict[str, str]]:
        data, encoding = pair
        if encoding == "gzip":
            data = gzip.compress(data)
        elif encoding == "deflate":
            data = zlib.compress(data)
        name = encoding.removesuffix("-lie")
        return data, ({"Content-Encoding": name} if name else {})

    return st.tuples(plain, encodings).map(encode)


schedule_bodies = fields(
    request_id=st.integers(min_value=1, max_value=2**40),
    seq_len=st.integers(min_value=0, max_value=2000),
    block_cache_keys=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=8),
    generate_timeout=st.integers(min_value=-5, max_value=10**7),
    request_time_ms=st.integers(min_value=-5, max_value=2**45),
    model=st.sampled_from([MODEL, "engine_service", "nope"]),
)
messages = st.lists(
    fields(role=st.sampled_from(["user", "system", "assistant", "tool"]), content=st.text(max_size=40)),
    min_size=1,
    max_size=3,
)
proxy_bodies = fields(
    model=st.sampled_from([MODEL, "other"]),
    messages=messages,
    prompt=st.one_of(st.text(max_size=60), st.lists(st.integers(min_value=-2, max_value=70_000), max_size=20)),
    text=st.text(max_size=60),
    input_ids=st.lists(st.integers(min_value=-2, max_value=70_000), max_size=20),
    max_tokens=small_ints,
    max_completion_tokens=small_ints,
    sampling_params=fields(max_new_tokens=small_ints),
    stream=st.booleans(),
    stream_options=fields(include_usage=st.booleans()),
)
STATUS_FIELDS = (
    "alive", "available", "running", "waiting", "queued_tokens", "kv_used", "kv_total", "block_size",
    "step_latency_ms", "prefill_tokens_per_ms", "bogus",
)  # fmt: skip
status_bodies = st.dictionaries(st.sampled_from(STATUS_FIELDS), json_values, max_size=4)
worker_specs = fields(
    ip=st.sampled_from(["127.0.0.1", "::1", "not a host", ""]),  # loopback: the identity check is refused at once
    http_port=st.integers(min_value=-1, max_value=70_000),
    grpc_port=st.integers(min_value=-1, max_value=70_000),
    role=st.sampled_from(["PREFILL", "decode", "VIT", "PDFUSION", "boss"]),
    group=st.text(max_size=6),
    max_concurrency=st.integers(min_value=-1, max_value=2_000_000),
    status=status_bodies,
)
worker_ids = st.one_of(st.sampled_from(["10.77.0.1:8000", "10.77.0.2:8000", "10.99.9.9:1"]), st.text(max_size=20))


def quoted(worker_id: str) -> str:
    return urllib.parse.quote(worker_id, safe="") or "%20"


# --------------------------------------------------------------------------------------------------- the tests


@FUZZ
@given(body=encoded(schedule_bodies))
def test_fuzz_schedule(fleet: Fleet, body: tuple[bytes, dict[str, str]]) -> None:
    data, headers = body
    status, raw = exchange(fleet, fleet.data, fleet.data_service, "POST", "/rtp_llm/schedule", data, headers)
    if status == 200:  # give the capacity back, as a client does
        rid = json.loads(raw)["server_status"][0]["request_id"]
        release = json.dumps({"request_id": rid}).encode()
        assert call(fleet.data, "POST", "/rtp_llm/release", release, {})[0] == 200


@FUZZ
@given(body=encoded(fields(request_id=st.integers(min_value=-5, max_value=2**64), model=st.just(MODEL))))
def test_fuzz_release(fleet: Fleet, body: tuple[bytes, dict[str, str]]) -> None:
    exchange(fleet, fleet.data, fleet.data_service, "POST", "/rtp_llm/release", *body)


@FUZZ
@given(path=st.sampled_from(PROXY_PATHS), body=encoded(proxy_bodies))
def test_fuzz_proxy_routes(fleet: Fleet, path: str, body: tuple[bytes, dict[str, str]]) -> None:
    status, _ = exchange(fleet, fleet.data, fleet.data_service, "POST", path, *body)
    if status < 400:  # the proxy releases once the answer is out: wait for it before the next example compares

        def released() -> bool:
            client = redis.Redis.from_url(fleet.redis_url)
            try:
                key = f"flexlb:{{{fleet.data_service}}}:worker:{fleet.worker_id}"
                return client.hget(key, "pending_count") in (b"0", None)
            finally:
                client.close()

        until(released, f"{path}: the proxied request's reservation released")


READ_ONLY = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/rtp_llm/queue_snapshot"),
    ("POST", "/rtp_llm/queue_snapshot"),
    ("POST", "/rtp_llm/master/info"),
    ("POST", "/rtp_llm/schedule_snapshot"),
    ("GET", "/rtp_llm/workers"),
    ("PATCH", "/rtp_llm/schedule"),
    ("GET", "/no/such/route"),
    ("POST", "/v1/embeddings"),
]


@FUZZ
@given(
    route=st.sampled_from(READ_ONLY), body=encoded(json_values), query=st.sampled_from(["", "?source=redis", "?x=%ff"])
)
def test_fuzz_read_only_and_unknown_routes(
    fleet: Fleet, route: tuple[str, str], body: tuple[bytes, dict[str, str]], query: str
) -> None:
    method, path = route
    exchange(fleet, fleet.data, fleet.data_service, method, path + query, *body)


@FUZZ
@given(body=encoded(worker_specs))
def test_fuzz_worker_registration(fleet: Fleet, body: tuple[bytes, dict[str, str]]) -> None:
    status, raw = exchange(fleet, fleet.admin, fleet.admin_service, "POST", "/rtp_llm/workers", *body)
    if status < 400:  # registered: take it out again, so the next examples see the decoys only
        worker_id = json.loads(raw)["worker_id"]
        if worker_id not in fleet.decoys:
            assert call(fleet.admin, "DELETE", f"/rtp_llm/workers/{quoted(worker_id)}", None, {})[0] < 300


@FUZZ
@given(worker_id=worker_ids, body=encoded(status_bodies))
def test_fuzz_worker_status(fleet: Fleet, worker_id: str, body: tuple[bytes, dict[str, str]]) -> None:
    path = f"/rtp_llm/workers/{quoted(worker_id)}/status"
    exchange(fleet, fleet.admin, fleet.admin_service, "POST", path, *body)


@FUZZ
@given(worker_id=worker_ids, body=encoded(fields(blocks=st.lists(st.integers(), max_size=6), keys=json_values)))
def test_fuzz_worker_cache(fleet: Fleet, worker_id: str, body: tuple[bytes, dict[str, str]]) -> None:
    path = f"/rtp_llm/workers/{quoted(worker_id)}/cache"
    exchange(fleet, fleet.admin, fleet.admin_service, "PUT", path, *body)


@FUZZ
@given(worker_id=st.one_of(st.just("10.99.9.9:1"), st.text(max_size=20)))
def test_fuzz_worker_removal_of_unknown_workers(fleet: Fleet, worker_id: str) -> None:
    if worker_id in fleet.decoys:
        return
    exchange(fleet, fleet.admin, fleet.admin_service, "DELETE", f"/rtp_llm/workers/{quoted(worker_id)}", None, {})


def test_fuzzed_routers_logged_no_traceback_and_kept_their_memory(fleet: Fleet) -> None:
    """Runs after the fuzz tests of this module (pytest keeps the file's order)."""
    for router in (fleet.data, fleet.admin):
        assert router.process.poll() is None, "a router died"
        with open(router.log_path, errors="replace") as f:
            log = f.read()
        assert "Traceback" not in log and "Unhandled exception" not in log, log[-4000:]
        growth = rss_mb(router.process.pid) - fleet.rss_start[router.process.pid]
        assert growth < RSS_GROWTH_BOUND_MB, f"router RSS grew by {growth:.0f} MB"
