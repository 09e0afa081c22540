"""KV events from the simulated worker, in vLLM's wire format (``flexlb.kv_events.wire``): a PUB socket
(topic, sequence, batch) and the ROUTER replay socket, from the engine's real cache state (``SimEngine
.publish_kv_events``).

Events of one event-loop iteration go out as one batch (an engine step stores and evicts many blocks); the last
``buffer_steps`` batches are kept for replay. ``drop`` is a test hook: batches whose sequence it accepts are
buffered (replayable) but not sent live, as if the network lost them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import zmq
import zmq.asyncio

from flexlb.kv_events.wire import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
    KVEventBatch,
    encode_batch,
    read_seq,
    seq_bytes,
)

log = logging.getLogger("flexlb.sim.kv_events")


class KvEventSink(Protocol):
    """What the engine tells about its cache."""

    def stored(
        self, block_hashes: list[EngineHash], parent: EngineHash | None, token_ids: list[int], block_size: int
    ) -> None: ...

    def removed(self, block_hashes: list[EngineHash]) -> None: ...

    def cleared(self) -> None: ...


class KvEventPublisher:
    """The PUB and replay sockets of one simulated worker (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        replay_port: int | None = None,
        *,
        topic: str = "",
        buffer_steps: int = 10_000,
        drop: Callable[[int], bool] | None = None,
    ) -> None:
        self.endpoint = f"tcp://{host}:{port}"
        self.replay_endpoint = f"tcp://{host}:{replay_port if replay_port is not None else port + 1}"
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._drop = drop
        self._pending: list[Event] = []
        self._scheduled = False
        self._seq = 0
        self._ctx = zmq.asyncio.Context.instance()
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind both sockets (OSError-like ZMQError when a port is taken) and serve replays."""
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.endpoint)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.replay_endpoint)
        self._replay_task = asyncio.create_task(self._serve_replays(), name="kv events replay")
        log.info("KV events on %s, replay on %s", self.endpoint, self.replay_endpoint)

    async def stop(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)

    # ---- KvEventSink ----

    def stored(
        self, block_hashes: list[EngineHash], parent: EngineHash | None, token_ids: list[int], block_size: int
    ) -> None:
        self._add(BlockStored(block_hashes, parent, token_ids, block_size, None, "GPU"))

    def removed(self, block_hashes: list[EngineHash]) -> None:
        self._add(BlockRemoved(block_hashes, "GPU"))

    def cleared(self) -> None:
        self._add(AllBlocksCleared())

    # ----

    def _add(self, event: Event) -> None:
        self._pending.append(event)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        events, self._pending = self._pending, []
        if not events or self._pub is None:
            return
        seq, self._seq = self._seq, self._seq + 1
        payload = encode_batch(KVEventBatch(time.time(), events))
        self._buffer.append((seq, payload))
        if self._drop is not None and self._drop(seq):
            return
        with contextlib.suppress(zmq.Again):  # PUB never blocks; a full queue drops, as vLLM's would
            self._pub.send_multipart([self._topic, seq_bytes(seq), payload], flags=zmq.NOBLOCK)

    async def _serve_replays(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3:
                log.warning("replay request of %d frames (expected identity, empty, seq): ignored", len(frames))
                continue
            identity, _, start_frame = frames
            try:
                start = read_seq(start_frame)
            except ValueError:
                continue
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._router.send_multipart([identity, b"", seq_bytes(seq), payload])
            await self._router.send_multipart([identity, b"", seq_bytes(END_SEQ), b""])


def drop_range(text: str) -> Callable[[int], bool]:
    """``--kv-events-drop A:B``: the batches with sequence A to B (inclusive) are not sent live."""
    first, _, last = text.partition(":")
    low, high = int(first), int(last or first)
    if low < 0 or high < low:
        raise ValueError(f"--kv-events-drop: expected A:B with 0 <= A <= B, got {text!r}")
    return lambda seq: low <= seq <= high
