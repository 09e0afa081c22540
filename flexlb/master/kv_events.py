"""The master's subscriber to one worker's KV events (vLLM ``--kv-events-config``, SGLang, ``flexlb sim-worker
--kv-events-port``): the exact cache index of that worker.

It reads the PUB socket (topic, 8-byte sequence, msgpack batch; ``flexlb.kv_events.wire``), asks the ROUTER replay
socket for what it missed (from 0 on every connection: a late subscriber rebuilds the history the publisher still
buffers; from the next sequence on a gap), takes a sequence that goes back on the live socket, or a replayed history
that does not hold the last batch applied, for a restarted engine (its entries cleared, rebuilt from what follows),
turns the events into flexlb block keys (``kv_index``) and writes the diff with the term's epoch
(``FleetStore.apply_cache_diff``), one script call per ``flush_interval_s`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.kv_events.wire import END_SEQ, BadBatch, decode_batch, read_seq, seq_bytes
from flexlb.master.kv_index import WorkerKvIndex
from flexlb.scheduler import REDIS_UNAVAILABLE
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.master.kv_events")

Clock = Callable[[], float]


class KvEventsSubscriber:
    """One worker's events -> its entries in the fleet's index, for one master term (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        role: str,
        endpoint: KvEventsEndpoint,
        store: FleetStore,
        epoch: int,
        *,
        flush_interval_s: float = 0.05,
        replay_timeout_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.store = store
        self.epoch = epoch
        self.flush_interval_s = flush_interval_s
        self.replay_timeout_s = replay_timeout_s
        self.clock = clock
        self.name = f"{role} worker {worker_id} (KV events {endpoint.publisher})"
        self.index = WorkerKvIndex()
        self.last_seq = -1  # the last batch applied
        self._live_last = -1  # the last sequence seen on the live socket: one publisher life's are increasing
        self._redis_failing = False
        self.restarts = 0  # engine restarts seen (tests, logs)
        self.replays = 0
        self._last_digest = b""  # of the last batch applied: a restarted engine's batch of that number differs
        self._ctx = zmq.asyncio.Context.instance()

    async def run(self) -> None:
        """Follow the events until cancelled; raises StaleEpoch when a newer master exists."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.endpoint.topic.encode())
        # every (re)connection: the engine may have restarted meanwhile with nothing on the live socket to tell
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED)
        sub.connect(self.endpoint.publisher)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            self.index = WorkerKvIndex(written=await self.store.cache_blocks(self.worker_id))
            log.info("%s: following (the index holds %d of its blocks)", self.name, self.index.written_count)
            next_flush = self.clock()
            while True:
                timeout_ms = max(0, int((next_flush - self.clock()) * 1000)) if self.index.has_changes else 1000
                ready = dict(await poller.poll(timeout_ms))
                if monitor in ready:
                    await monitor.recv_multipart()
                    await self._on_connected()
                if sub in ready:
                    while True:  # everything queued, then one write
                        try:
                            frames = await sub.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        await self._on_live(frames)
                if self.clock() >= next_flush:
                    await self.flush()
                    next_flush = self.clock() + self.flush_interval_s
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            log.warning("%s: a message of %d frames, not 3 (topic, seq, batch): ignored", self.name, len(frames))
            return
        try:
            seq = read_seq(frames[1])
        except ValueError as exc:
            log.warning("%s: %s: ignored", self.name, exc)
            return
        if seq <= self._live_last:  # the live stream went back: a new publisher, i.e. a restarted engine
            self._restarted(f"sequence {seq} after {self._live_last}")
            if seq > 0:
                await self._catch_up(0)
        self._live_last = seq
        if seq <= self.last_seq:
            return  # applied already, from a replay
        if seq > self.last_seq + 1:
            log.info("%s: missed sequences %d..%d: asking the replay socket", self.name, self.last_seq + 1, seq - 1)
            await self._catch_up(self.last_seq + 1)
            if seq <= self.last_seq:
                return
            if seq > self.last_seq + 1:
                log.warning(
                    "%s: sequences %d..%d are lost (not in the replay buffer): blocks stored then are not indexed",
                    self.name, self.last_seq + 1, seq - 1,
                )  # fmt: skip
        self._apply(seq, frames[2])

    def _restarted(self, why: str) -> None:
        self.restarts += 1
        log.warning("%s restarted (%s): its index entries are rebuilt from its new events", self.name, why)
        self.index.clear()
        self.last_seq = self._live_last = -1
        self._last_digest = b""

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except BadBatch as exc:
            log.warning("%s: batch %d is not a KVEventBatch (%s): skipped", self.name, seq, exc)
        else:
            self.index.apply(batch.events)
        self.last_seq = seq
        self._last_digest = _digest(payload)

    async def _on_connected(self) -> None:
        """(Re)connected: ask for the whole buffered history. A restarted engine shows as a history that ends
        before the last batch applied, or holds another batch under its number; the same engine, as nothing new."""
        history = await self._replay(0)
        if history is None:
            return
        mine = dict(history).get(self.last_seq)
        last = history[-1][0] if history else -1
        if self.last_seq >= 0 and (last < self.last_seq or (mine is not None and _digest(mine) != self._last_digest)):
            self._restarted(f"its replay buffer ends at {last}, the last batch applied was {self.last_seq}")
        self._apply_history(history, start=0)

    async def _catch_up(self, start: int) -> None:
        """Apply the replay socket's batches from ``start``."""
        history = await self._replay(start)
        if history is not None:
            self._apply_history(history, start)

    def _apply_history(self, history: list[tuple[int, bytes]], start: int) -> None:
        for seq, payload in history:
            if seq > self.last_seq:
                self._apply(seq, payload)
        # a history from 0 that begins at 0 is the whole of it: keys the index holds that it does not are stale
        # (an earlier life, another master's term)
        if start == 0 and (not history or history[0][0] == 0):
            self.index.reconcile_all()
        self._live_last = max(self._live_last, self.last_seq)

    async def _replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """The batches the replay socket buffers from ``start``, in order; None without an answer (or a socket)."""
        if self.endpoint.replay is None:
            return None
        self.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)  # a REQ socket would take one reply of the many
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.endpoint.replay)
        history: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart([b"", seq_bytes(start)])
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 3:
                        continue
                    seq = read_seq(frames[1])
                    if seq == END_SEQ or not frames[2]:
                        return history
                    history.append((seq, frames[2]))
        except TimeoutError:
            log.warning("%s: no answer from the replay socket %s within %.1fs", self.name, self.endpoint.replay,
                        self.replay_timeout_s)  # fmt: skip
            return None
        finally:
            dealer.close(linger=0)

    async def flush(self) -> None:
        """Write what changed since the last write, in one fenced script call."""
        add, remove = self.index.take_diff()
        if not add and not remove:
            return
        try:
            await self.store.apply_cache_diff(self.epoch, self.worker_id, add, remove)
        except REDIS_UNAVAILABLE as exc:
            self.index.undo_take(add, remove)
            if not self._redis_failing:
                log.warning("%s: cannot write its cache index to Redis: %r", self.name, exc)
                self._redis_failing = True
            return
        except BaseException:
            self.index.undo_take(add, remove)
            raise
        if self._redis_failing:
            log.info("%s: cache index writes work again", self.name)
            self._redis_failing = False

    def forgotten(self) -> None:
        """The master forgot the worker (silent past the worker timeout): its index entries are gone from Redis."""
        self.index.forget_written()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()
