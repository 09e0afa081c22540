"""The proxy's release of a request's reservation: once the answer was sent whole, so the answer never waits for it,
and always run to its end (also for a client that went away, or cancelled mid-schedule), with its failures logged.

The proxy runs in-process on a stand-in router (a scheduler whose release waits at a gate the test opens) in front
of a stand-in worker, so the test sees the answer arrive while the release is still held."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from flexlb.domain import Choice, ErrorCode, Role, ScheduleRequest, ScheduleResult, WorkerSpec, WorkerStatus, WorkerView
from flexlb.http.routes import CONTEXT
from flexlb.proxy import setup_proxy
from flexlb.settings import FlexlbConfig

GUARD_S = 10.0  # a failure guard only: what is awaited here happens at once when the code is right


class GatedScheduler:
    """Schedules every request on ``worker``; each release waits until ``gate`` is open, then is recorded."""

    def __init__(self, worker: WorkerSpec) -> None:
        self.worker = worker
        self.refuse = False  # answer schedules with NO_PDFUSION_WORKER
        self.schedule_gate = asyncio.Event()  # schedules wait here once cleared
        self.schedule_gate.set()
        self.scheduling = asyncio.Event()
        self.gate = asyncio.Event()
        self.releasing: list[int] = []  # releases started
        self.released: list[int] = []  # releases finished
        self.started = asyncio.Event()
        self.done = asyncio.Event()  # a release finished
        self.fail = False  # releases raise
        self.tasks: set[asyncio.Task[int]] = set()
        self.last_snapshot = None  # the block size: the default
        self.view = SimpleNamespace(block_size=lambda: 64, all=lambda: iter(()))  # no vLLM workers: whitespace tokens

    async def schedule(self, request: ScheduleRequest) -> ScheduleResult:
        self.scheduling.set()
        await self.schedule_gate.wait()
        if self.refuse:
            return ScheduleResult(success=False, code=ErrorCode.NO_PDFUSION_WORKER, message="no worker")
        choice = Choice(WorkerView(self.worker, WorkerStatus()))
        return ScheduleResult(success=True, choices={Role.PDFUSION: choice})

    def release_soon(self, request_id: int) -> asyncio.Task[int]:
        task = asyncio.ensure_future(self.release(request_id))
        self.tasks.add(task)  # referenced until done, as the scheduler's are
        task.add_done_callback(self.tasks.discard)
        return task

    async def release(self, request_id: int) -> int:
        self.releasing.append(request_id)
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise RuntimeError(f"release {request_id} exploded")
        self.released.append(request_id)
        self.done.set()
        return 1


async def _worker_app() -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "hi"}], "request_id": body["request_id"]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices": [{"text": "hi"}]}\n\n')
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[str, GatedScheduler]]:
    worker_runner, worker_port = await _serve(await _worker_app())
    scheduler = GatedScheduler(WorkerSpec("127.0.0.1", worker_port, Role.PDFUSION))
    app = web.Application()
    app[CONTEXT] = SimpleNamespace(  # type: ignore[misc]
        scheduler=scheduler,
        queue=None,
        service_id="release-test",
        model_names=frozenset(),
        metrics=SimpleNamespace(registry=CollectorRegistry()),
    )
    setup_proxy(app, FlexlbConfig())
    runner, port = await _serve(app)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        scheduler.gate.set()  # let any release still held end
        await runner.cleanup()
        await worker_runner.cleanup()


BODY = {"prompt": "one two three", "max_tokens": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_the_answer_does_not_wait_for_the_release(proxy: tuple[str, GatedScheduler], stream: bool) -> None:
    url, scheduler = proxy
    async with aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(GUARD_S):
                async with http.post(f"{url}/v1/completions", json=BODY | {"stream": stream}) as resp:
                    answer = await resp.read()
        except TimeoutError:
            raise AssertionError("the answer waited for the release") from None
    assert resp.status == 200 and b"hi" in answer
    request_id = int(resp.headers["X-Request-Id"])
    # The answer is out, its release started and is still held at the gate.
    assert scheduler.releasing == [request_id] and scheduler.released == []

    scheduler.gate.set()
    async with asyncio.timeout(GUARD_S):
        await scheduler.done.wait()
    assert scheduler.released == [request_id]


async def test_the_next_request_on_the_connection_does_not_wait_for_the_release(
    proxy: tuple[str, GatedScheduler],
) -> None:
    """aiohttp serves a keep-alive connection's requests one after the other: a handler that waited for its release
    held the client's next request back by a Redis round trip (and a batch's wait)."""
    url, scheduler = proxy
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:  # one connection for both
        ids = []
        for _ in range(2):
            try:
                async with asyncio.timeout(GUARD_S):
                    async with http.post(f"{url}/v1/completions", json=BODY) as resp:
                        assert resp.status == 200 and b"hi" in await resp.read()
            except TimeoutError:
                raise AssertionError("the second request waited for the first one's release") from None
            ids.append(int(resp.headers["X-Request-Id"]))
    assert scheduler.releasing == ids and scheduler.released == []  # both still held at the gate
    scheduler.gate.set()
    async with asyncio.timeout(GUARD_S):
        while len(scheduler.released) < 2:
            await asyncio.sleep(0.01)
    assert sorted(scheduler.released) == sorted(ids)


async def test_a_client_that_goes_away_still_gets_its_release(
    proxy: tuple[str, GatedScheduler],
) -> None:
    url, scheduler = proxy
    scheduler.gate.set()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", json=BODY | {"stream": True}) as resp:
            request_id = int(resp.headers["X-Request-Id"])
            resp.close()  # gone before reading the stream
    async with asyncio.timeout(GUARD_S):
        await scheduler.done.wait()
    assert scheduler.released == [request_id]


async def test_a_refused_request_holds_nothing_and_costs_no_release(
    proxy: tuple[str, GatedScheduler],
) -> None:
    url, scheduler = proxy
    scheduler.refuse = True
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", json=BODY) as resp:
            error = await resp.json()
    assert resp.status == 503 and error["error"]["code"] == "no_pdfusion_worker"
    assert scheduler.releasing == []


async def test_a_client_gone_while_its_schedule_runs_gets_its_release(
    proxy: tuple[str, GatedScheduler],
) -> None:
    url, scheduler = proxy
    scheduler.gate.set()
    scheduler.schedule_gate.clear()
    async with aiohttp.ClientSession() as http:
        sent = asyncio.create_task(http.post(f"{url}/v1/completions", json=BODY))
        async with asyncio.timeout(GUARD_S):
            await scheduler.scheduling.wait()
        sent.cancel()  # the client goes away while the scheduler may be reserving
        with contextlib.suppress(asyncio.CancelledError):
            await sent
    async with asyncio.timeout(GUARD_S):
        await scheduler.done.wait()
    assert len(scheduler.released) == 1


async def test_a_failed_release_is_logged_and_the_answer_stands(
    proxy: tuple[str, GatedScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    url, scheduler = proxy
    scheduler.gate.set()
    scheduler.fail = True
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        with caplog.at_level(logging.ERROR, logger="flexlb.proxy"):
            async with aiohttp.ClientSession() as http:
                for _ in range(2):  # the second on the same connection: the router still serves it
                    async with http.post(f"{url}/v1/completions", json=BODY) as resp:
                        assert resp.status == 200 and b"hi" in await resp.read()
        failed = [r for r in caplog.records if r.getMessage().startswith("release of request")]
        assert len(failed) == 2 and all("expires by its TTL" in r.getMessage() for r in failed)
        assert "exploded" in caplog.text and len(scheduler.releasing) == 2
        gc.collect()  # an exception never retrieved is reported when its task is collected
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)
