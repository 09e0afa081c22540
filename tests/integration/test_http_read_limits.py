"""What a router process reads from a client is bounded: badly encoded bodies are refused (400), slow headers and
bodies and idle connections time out, and a body too big for its route is refused before it is read; streamed
answers are not cut by any of it. Real router processes, raw sockets where a client must misbehave."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import eventually

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

TIMEOUTS = {"httpHeaderTimeoutMs": 1000, "httpBodyTimeoutMs": 1000, "httpIdleTimeoutMs": 1500}
SCHEDULE = orjson.dumps({"request_id": 41, "seq_len": 64})


async def open_conn(router: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", router.port)


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> float:
    """Seconds until the server closed the connection (EOF or reset); fails after ``within_s``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the router kept the connection open for more than {within_s}s") from None
    return time.monotonic() - started


async def read_response(reader: asyncio.StreamReader, within_s: float) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(within_s):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        return status, orjson.loads(await reader.readexactly(length))


def request_head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("encoding", "path", "openai"),
    [
        ("gzip", "/rtp_llm/schedule", False),
        ("deflate", "/rtp_llm/schedule", False),
        ("gzip", "/v1/chat/completions", True),
        ("deflate", "/v1/completions", True),
    ],
)
async def test_a_body_not_validly_encoded_is_a_400_naming_the_encoding(
    start_router: Any, encoding: str, path: str, openai: bool
) -> None:
    router = start_router()
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the same connection serves on after the refusal
            headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
            async with http.post(router.url + path, data=SCHEDULE, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 400, body
            message = body["error"]["message"] if openai else body["error_message"]
            assert f"not valid {encoding}" in message
            if openai:
                assert body["error"]["code"] == "invalid_content_encoding"
            else:
                assert body["code"] == 8406 and body["success"] is False
        async with http.get(router.url + "/health") as resp:
            assert resp.status == 200
    assert "Traceback" not in router.log()


async def test_validly_encoded_bodies_are_decoded_and_unknown_encodings_are_415(
    start_router: Any, real_store: FleetStore
) -> None:
    await real_store.register_worker(WorkerSpec("10.9.0.1", 8000, Role.PDFUSION), WorkerStatus(kv_total=100_000))
    router = start_router()
    raw_deflate = zlib.compressobj(wbits=-15)
    encoded = {
        "gzip": gzip.compress(SCHEDULE),
        "deflate": zlib.compress(SCHEDULE),
        "identity": SCHEDULE,
        "gzip, gzip": gzip.compress(gzip.compress(SCHEDULE)),
    }
    async with aiohttp.ClientSession() as http:
        for encoding, data in [*encoded.items(), ("deflate", raw_deflate.compress(SCHEDULE) + raw_deflate.flush())]:
            headers = {"Content-Encoding": encoding}
            async with http.post(router.url + "/rtp_llm/schedule", data=data, headers=headers) as resp:
                assert resp.status == 200, (encoding, await resp.text())
            async with http.post(router.url + "/rtp_llm/release", json={"request_id": 41}) as resp:
                assert resp.status == 200
        async with http.post(router.url + "/rtp_llm/schedule", data=b"x", headers={"Content-Encoding": "br"}) as resp:
            assert resp.status == 415 and "'br' is not supported" in (await resp.json())["error_message"]
        bomb = gzip.compress(b"0" * (8 * 1024 * 1024))  # 8 MB of zeros in 8 kB
        async with http.post(router.url + "/v1/completions", data=bomb, headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 413 and "decoded from gzip" in (await resp.json())["error"]["message"]
    assert "Traceback" not in router.log()


async def test_slow_headers_are_cut_at_the_header_timeout(start_router: Any) -> None:
    router = start_router(TIMEOUTS)
    reader, writer = await open_conn(router)
    writer.write(b"POST /rtp_llm/schedule HTTP/1.1\r\nHost: router\r\n")

    async def trickle() -> None:  # slowloris: one header byte every 0.2 s, for longer than any timeout here
        for _ in range(100):
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(trickle())
    try:
        took = await closed_by_server(reader, within_s=5)
    finally:
        sender.cancel()
        writer.close()
    assert 0.8 <= took <= 3, took


async def test_a_trickled_body_is_answered_408_at_the_body_timeout(start_router: Any) -> None:
    router = start_router(TIMEOUTS)
    reader, writer = await open_conn(router)
    writer.write(request_head("/rtp_llm/schedule", len(SCHEDULE)))
    started = time.monotonic()

    async def trickle() -> None:
        for byte in SCHEDULE:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(trickle())
    try:
        status, body = await read_response(reader, within_s=5)
        assert status == 408 and "not received within 1s" in body["error_message"], body
        assert time.monotonic() - started < 3
        await closed_by_server(reader, within_s=5)  # and the connection is not kept
    finally:
        sender.cancel()
        writer.close()


async def test_a_declared_body_larger_than_the_limit_is_refused_before_it_is_sent(start_router: Any) -> None:
    router = start_router(TIMEOUTS)
    for path, openai in (("/rtp_llm/schedule", False), ("/v1/chat/completions", True)):
        reader, writer = await open_conn(router)
        writer.write(request_head(path, 10 * 1024 * 1024))  # and no body at all
        status, body = await read_response(reader, within_s=2)
        writer.close()
        assert status == 413, body
        message = body["error"]["message"] if openai else body["error_message"]
        assert "Content-Length 10485760 exceeds the limit" in message
        assert ("maxBlockCacheKeys" in message) is not openai


async def test_idle_and_half_sent_connections_are_closed(start_router: Any) -> None:
    router = start_router(TIMEOUTS)
    conns = []
    for i in range(200):
        reader, writer = await open_conn(router)
        if i % 3 == 1:
            writer.write(b"GET /health HTTP/1.1\r\nHost: r")  # headers never finished
        elif i % 3 == 2:
            writer.write(request_head("/rtp_llm/schedule", 100) + b'{"request_id"')  # body never finished
        conns.append((reader, writer))
    reader, writer = await open_conn(router)  # one that was served, then left idle
    writer.write(b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    conns.append((reader, writer))
    try:
        took = await asyncio.gather(*(closed_by_server(r, within_s=6) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
    assert max(took) < 6
    async with aiohttp.ClientSession() as http, http.get(router.url + "/health") as resp:
        assert resp.status == 200


async def test_a_stream_longer_than_every_read_timeout_is_not_cut(
    start_router: Any, start_sim_worker: Any, real_store: FleetStore
) -> None:
    worker = start_sim_worker(time_scale=1.0)  # real time: 600 tokens take about 5 s
    await real_store.register_worker(WorkerSpec("127.0.0.1", worker.port, Role.PDFUSION), WorkerStatus())
    router = start_router({**TIMEOUTS, "servedModelName": "flexlb-sim"})
    body = {"model": "flexlb-sim", "prompt": "hello there", "max_tokens": 600, "stream": True}
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(router.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            events = [line async for line in resp.content if line.startswith(b"data: ")]
        took = time.monotonic() - started
        assert events[-1].strip() == b"data: [DONE]" and len(events) > 500
        assert took > 2 * TIMEOUTS["httpIdleTimeoutMs"] / 1000, f"the stream took only {took:.1f}s: not a test"

        async def released() -> bool:
            return await real_store.redis.hget(real_store.keys.worker(worker.worker_id), "pending_count") == "0"

        await eventually(released, "the stream's reservation released")
