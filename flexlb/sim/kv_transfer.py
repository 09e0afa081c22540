"""A simulated worker's side of the PD KV hand-over, through the bootstrap server (``flexlb.sim.bootstrap``) that
the request's ``bootstrap_host:bootstrap_port`` names: a PREFILL worker records the room once its prefill computed
the prompt's KV (or failed), a DECODE worker waits for that, up to a deadline, before its first token."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from flexlb.sim.bootstrap import MAX_WAIT_MS
from flexlb.sim.engine import EngineRequest, KvTransferFailed
from flexlb.sim.protocol import BootstrapRoom

log = logging.getLogger("flexlb.sim.kv")

RETRY_S = 0.1  # between attempts on a bootstrap server that does not answer (still starting, or gone)
POLL_MARGIN_MS = 100  # a decode's last long poll ends this long before its deadline


class PdLink:
    """The bootstrap-server client of one worker: reports (PREFILL) and waits (DECODE), each within ``timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"the KV wait timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._reports: set[asyncio.Task[None]] = set()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ---- PREFILL ----

    def report_prefill(self, req: EngineRequest, room: BootstrapRoom, worker: str) -> None:
        """Once ``req``'s prefill computed its KV (or it ended without), record that in ``room``."""
        self._spawn(self._report_when_prefilled(req, room, worker), room)

    def report_refused(self, room: BootstrapRoom, worker: str, reason: str) -> None:
        """This prefill worker refused the room's request: its decode peer fails now instead of at its timeout."""
        self._spawn(self._report(room, {"state": "failed", "prefill": worker, "error": reason}), room)

    def _spawn(self, coro: Any, room: BootstrapRoom) -> None:
        task = asyncio.create_task(coro, name=f"sim-kv-report-{room.room}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_when_prefilled(self, req: EngineRequest, room: BootstrapRoom, worker: str) -> None:
        if await req.prefilled():
            state = {
                "state": "ready",
                "prefill": worker,
                "request_id": req.request_id,
                "queue_ms": req.queue_ms,
                "prefill_ms": req.prefill_ms,
                "prompt_tokens": req.prompt_tokens,
                "cached_tokens": req.cached_tokens,
            }
        else:
            error = f"request {req.request_id} ended before its prefill ({req.finish_reason})"
            state = {"state": "failed", "prefill": worker, "error": error}
        await self._report(room, state)

    async def _report(self, room: BootstrapRoom, state: dict[str, Any]) -> None:
        url = f"http://{room.address}/kv/rooms/{room.room}"
        last = "no attempt"
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    try:
                        async with self._http().post(url, data=orjson.dumps(state)) as resp:
                            if resp.status == 200:
                                return
                            last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    except aiohttp.ClientError as exc:
                        last = repr(exc)
                    await asyncio.sleep(RETRY_S)
        except TimeoutError:
            log.warning(
                "bootstrap room %d: could not record its KV as %s at the bootstrap server %s within %g s (%s)",
                room.room, state["state"], room.address, self.timeout_s, last,
            )  # fmt: skip

    # ---- DECODE ----

    @staticmethod
    def _ready(room: BootstrapRoom, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("state") == "ready":
            return state
        raise KvTransferFailed(
            f"bootstrap room {room.room}: the prefill worker at {state.get('prefill', room.host)} (bootstrap server"
            f" {room.address}) failed: {state.get('error', state)}"
        )

    async def wait_prefill(self, room: BootstrapRoom) -> dict[str, Any]:
        """The room's state once its prefill is ready. Raises KvTransferFailed, naming the room and the prefill's
        bootstrap address, when the prefill failed or said nothing within ``timeout_s``."""
        url = f"http://{room.address}/kv/rooms/{room.room}"
        last = "no answer"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    # A long poll that ends before the deadline, so the last answer says why (still pending).
                    wait_ms = min(MAX_WAIT_MS, int((deadline - loop.time()) * 1000) - POLL_MARGIN_MS)
                    try:
                        async with self._http().get(url, params={"wait_ms": str(max(wait_ms, 0))}) as resp:
                            if resp.status == 200:
                                return self._ready(room, await resp.json())
                            if resp.status == 202:
                                last = "the room is still pending"
                                if wait_ms >= POLL_MARGIN_MS:
                                    continue
                            else:
                                last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    except aiohttp.ClientError as exc:
                        last = repr(exc)
                    await asyncio.sleep(RETRY_S)
        except TimeoutError:
            raise KvTransferFailed(
                f"bootstrap room {room.room}: no KV from the prefill worker at {room.host} (bootstrap server"
                f" {room.address}) within {self.timeout_s:g} s ({last})"
            ) from None
