"""The schedule API's fast path (flexlb/http/fast_path.py) against aiohttp's: two real router processes of one
service, one with ``httpFastPath`` on, one with it off, get the same raw requests and must answer alike; pipelined
requests are answered in order, also when the connection passes to aiohttp midway."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
import pytest

from flexlb.domain import Role, WorkerSpec, WorkerStatus
from flexlb.state.store import FleetStore

WORKER = WorkerSpec("10.7.0.1", 8000, Role.PDFUSION, max_concurrency=64)
TOKEN = "schedule-token-fast-path"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
FAST_SERVER = "flexlb"  # the fast path's Server header; aiohttp's names aiohttp


def raw(path: str, body: bytes, extra: str = AUTH, *, method: str = "POST", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    head = f"{method} {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
    return (head + (f"Content-Length: {size}\r\n" if size >= 0 else "") + extra + "\r\n").encode() + body


def schedule(rid: int, **fields: Any) -> bytes:
    return orjson.dumps({"request_id": rid, "seq_len": 64, **fields})


async def exchange(port: int, data: bytes, answers: int = 1) -> list[tuple[int, dict[str, str], Any]]:
    """Send ``data`` on one connection; read ``answers`` responses: (status, headers, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            for _ in range(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers["content-length"]))
                out.append((status, headers, orjson.loads(body)))
    finally:
        writer.close()
    return out


def comparable(answer: tuple[int, dict[str, str], Any]) -> tuple[Any, ...]:
    status, headers, body = answer
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "real_master_host"}  # each router names itself
    kept = {k: headers[k] for k in ("retry-after", "www-authenticate", "content-type") if k in headers}
    return status, kept, body


CASES: list[tuple[str, bytes]] = [
    ("schedule", raw("/rtp_llm/schedule", schedule(501))),
    ("release", raw("/rtp_llm/release", orjson.dumps({"request_id": 501}))),
    ("release again", raw("/rtp_llm/release", orjson.dumps({"request_id": 501}))),
    ("malformed JSON", raw("/rtp_llm/schedule", b'{"request_id": 1,')),
    ("not an object", raw("/rtp_llm/schedule", b"[1]")),
    ("empty body", raw("/rtp_llm/schedule", b"")),
    ("unknown model", raw("/rtp_llm/schedule", schedule(502, model="gpt-9"))),
    ("bad request id", raw("/rtp_llm/release", b'{"request_id": "x"}')),
    ("no token", raw("/rtp_llm/schedule", schedule(503), extra="")),
    ("wrong token", raw("/rtp_llm/schedule", schedule(504), extra="Authorization: Bearer nope\r\n")),
    ("declared too large", raw("/rtp_llm/schedule", b"", length=50 * 1024 * 1024)),
    ("gzip body", raw("/rtp_llm/schedule", gzip.compress(schedule(505)), AUTH + "Content-Encoding: gzip\r\n")),
    ("release gzip", raw("/rtp_llm/release", orjson.dumps({"request_id": 505}))),
    ("chunked", raw("/rtp_llm/schedule", b"0\r\n\r\n", AUTH + "Transfer-Encoding: chunked\r\n", length=-1)),
    ("query string", raw("/rtp_llm/schedule?x=1", schedule(506))),
    ("release query", raw("/rtp_llm/release", orjson.dumps({"request_id": 506}))),
    ("GET schedule", raw("/rtp_llm/schedule", b"", method="GET")),
]


@pytest.fixture
async def two_routers(real_store: FleetStore, start_router: Any) -> tuple[Any, Any]:
    await real_store.register_worker(WORKER, WorkerStatus(kv_total=1_000_000, block_size=16))
    env = {"FLEXLB_SCHEDULE_TOKENS": TOKEN}
    fast = start_router({"httpFastPath": True}, env=env)
    slow = start_router({"httpFastPath": False}, env=env)
    return fast, slow


async def test_the_fast_path_answers_as_aiohttp_does(two_routers: tuple[Any, Any], real_store: FleetStore) -> None:
    fast, slow = two_routers
    # one router after the other: the cases reserve and release the same request ids
    on = [(await exchange(fast.port, data))[0] for _, data in CASES]
    off = [(await exchange(slow.port, data))[0] for _, data in CASES]
    for (name, _), a, b in zip(CASES, on, off, strict=True):
        assert comparable(a) == comparable(b), name
        assert "Traceback" not in orjson.dumps(a[2]).decode(), name
    # the fast router answered the plain schedule calls itself and left the rest to aiohttp
    (plain,) = await exchange(fast.port, raw("/rtp_llm/release", orjson.dumps({"request_id": 1})))
    (gzipped,) = await exchange(fast.port, CASES[11][1])
    assert plain[1]["server"] == FAST_SERVER
    assert gzipped[1]["server"] != FAST_SERVER and gzipped[0] == 200
    await exchange(fast.port, raw("/rtp_llm/release", orjson.dumps({"request_id": 505})))
    assert await real_store.request_workers(505) == []


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(two_routers: tuple[Any, Any]) -> None:
    fast, _ = two_routers
    health = b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n"
    data = (
        raw("/rtp_llm/schedule", schedule(601))
        + raw("/rtp_llm/release", orjson.dumps({"request_id": 601}))
        + health  # aiohttp's from here on
        + raw("/rtp_llm/schedule", schedule(602))
        + raw("/rtp_llm/release", orjson.dumps({"request_id": 602}))
    )
    answers = await exchange(fast.port, data, answers=5)
    statuses = [a[0] for a in answers]
    assert statuses == [200, 200, 200, 200, 200], answers
    assert answers[0][2]["success"] and answers[1][2]["released"] == 1
    assert answers[3][2]["success"] and answers[4][2]["released"] == 1
    servers = [a[1]["server"] == FAST_SERVER for a in answers]
    assert servers == [True, True, False, False, False]


async def test_connection_close_is_honoured_and_a_half_sent_request_waits_for_its_body(
    two_routers: tuple[Any, Any],
) -> None:
    fast, _ = two_routers
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    try:
        whole = raw("/rtp_llm/schedule", schedule(701), AUTH + "Connection: close\r\n")
        cut = whole.index(b"\r\n\r\n") + 6
        writer.write(whole[:cut])  # the head and two bytes of the body
        await writer.drain()
        await asyncio.sleep(0.05)  # not synchronisation: gives the router a chance to answer too early
        writer.write(whole[cut:])
        async with asyncio.timeout(10):
            answer = await reader.read()  # the whole answer, then EOF: the router closed the connection
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert b"Connection: close" in head
    assert orjson.loads(body)["success"] is True
    await exchange(fast.port, raw("/rtp_llm/release", orjson.dumps({"request_id": 701})))


async def test_nothing_is_answered_after_an_answer_that_closes_the_connection(
    two_routers: tuple[Any, Any], real_store: FleetStore
) -> None:
    fast, _ = two_routers
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    try:  # pipelined: a request that asks to close, then one more that must not be scheduled
        writer.write(
            raw("/rtp_llm/schedule", schedule(801), AUTH + "Connection: close\r\n")
            + raw("/rtp_llm/schedule", schedule(802))
        )
        async with asyncio.timeout(10):
            answer = await reader.read()  # to EOF
    finally:
        writer.close()
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert await real_store.request_workers(802) == []  # never scheduled
    await exchange(fast.port, raw("/rtp_llm/release", orjson.dumps({"request_id": 801})))
