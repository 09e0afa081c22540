"""Worker status hash <-> domain objects. The hash's field names are documented in docs/redis-keys.md."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE, EngineKind, Role, WorkerSpec, WorkerStatus, WorkerView
from flexlb.kv_events.endpoint import KvEventsEndpoint

log = logging.getLogger("flexlb.state")

# Written by upsert_worker.lua itself, never by a caller.
SCRIPT_OWNED = frozenset({"status_version", "updated_ms", "pending_count", "pending_tokens"})
STATUS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WorkerStatus) if f.name not in SCRIPT_OWNED)
_STATUS_TYPES = {f.name: f.type for f in fields(WorkerStatus)}
_BOOL_FIELDS = frozenset(name for name, kind in _STATUS_TYPES.items() if kind in ("bool", bool))


def spec_fields(spec: WorkerSpec) -> dict[str, str]:
    return {
        "ip": spec.ip,
        "http_port": str(spec.http_port),
        "grpc_port": str(spec.effective_grpc_port),
        "group": spec.group,
        "max_concurrency": str(spec.max_concurrency),
        "engine": spec.engine.value,
        # "" for none: a registration without them clears what an earlier one gave
        "kv_events": spec.kv_events.publisher if spec.kv_events is not None else "",
        "kv_events_replay": (spec.kv_events.replay or "") if spec.kv_events is not None else "",
    }


def encode_status_value(name: str, value: Any) -> str:
    if name in _BOOL_FIELDS:
        return "1" if value else "0"
    return str(value)


def status_fields(status: WorkerStatus) -> dict[str, str]:
    return {name: encode_status_value(name, getattr(status, name)) for name in STATUS_FIELDS}


# The status hash fields a WorkerView is decoded from, in the order WorkerDecoder.view takes them.
VIEW_FIELDS: tuple[str, ...] = (
    "ip", "http_port", "grpc_port", "role", "group", "max_concurrency", "engine", "kv_events", "kv_events_replay",
    # ^ identity: _IDENTITY fields
    "alive", "available", "running", "waiting", "queued_tokens", "kv_used", "kv_total", "block_size", "step_latency_ms",
    "prefill_tokens_per_ms", "status_version", "updated_ms", "pending_count", "pending_tokens",
)  # fmt: skip
_IDENTITY = 9


def _int(v: str | None, default: int = 0) -> int:
    if not v:
        return default
    try:
        return int(v)
    except ValueError:  # written as a float by a foreign writer
        return int(float(v))


def _float(v: str | None) -> float:
    return float(v) if v else 0.0


class WorkerDecoder:
    """Decodes status values into WorkerViews, reusing each worker's WorkerSpec while its identity is unchanged
    (a snapshot decodes every worker on every request: identity rarely changes, status always does)."""

    def __init__(self) -> None:
        self._specs: dict[str, tuple[tuple[str | None, ...], WorkerSpec]] = {}
        self._undecodable: set[str] = set()

    def spec(self, worker_id: str, identity: tuple[str | None, ...]) -> WorkerSpec:
        cached = self._specs.get(worker_id)
        if cached is not None and cached[0] == identity:
            return cached[1]
        ip, http_port, grpc_port, role, group, max_concurrency, engine, kv_events, kv_events_replay = identity
        default_ip, _, default_port = worker_id.rpartition(":")
        spec = WorkerSpec(
            ip=ip or default_ip,
            http_port=_int(http_port, int(default_port)),
            role=Role.parse(role or "PREFILL"),
            grpc_port=_int(grpc_port),
            group=group or "",
            max_concurrency=_int(max_concurrency),
            engine=EngineKind.parse(engine) if engine else EngineKind.RTP_LLM,  # missing: written before engines
            kv_events=KvEventsEndpoint(kv_events, kv_events_replay or None) if kv_events else None,
        )
        self._specs[worker_id] = (identity, spec)
        return spec

    def try_view(self, worker_id: str, values: Sequence[str | None], hit_blocks: int = 0) -> WorkerView | None:
        """:meth:`view`, or None (logged once per worker) for a hash with a value that cannot be decoded, such as an
        unknown role written by hand: one bad entry must not stop scheduling on every other worker."""
        try:
            view = self.view(worker_id, values, hit_blocks)
        except ValueError as exc:
            if worker_id not in self._undecodable:
                self._undecodable.add(worker_id)
                log.error("worker %s skipped: its status hash in Redis cannot be decoded: %s", worker_id, exc)
            return None
        self._undecodable.discard(worker_id)
        return view

    def view(self, worker_id: str, values: Sequence[str | None], hit_blocks: int = 0) -> WorkerView:
        """``values`` in VIEW_FIELDS order; missing fields take defaults (a missing ``alive`` is not alive,
        as reserve.lua treats it). Raises ValueError for values that cannot be decoded."""
        (alive, available, running, waiting, queued, kv_used, kv_total, block_size, step_ms, rate, version, updated,
         pending_count, pending_tokens) = values[_IDENTITY:]  # fmt: skip
        return WorkerView(
            spec=self.spec(worker_id, tuple(values[:_IDENTITY])),
            status=WorkerStatus(
                alive=alive == "1",
                available=available != "0",  # missing: available (written only by the master's hysteresis)
                running=_int(running),
                waiting=_int(waiting),
                queued_tokens=_int(queued),
                kv_used=_int(kv_used),
                kv_total=_int(kv_total),
                block_size=_int(block_size) or DEFAULT_BLOCK_SIZE,
                step_latency_ms=_float(step_ms),
                prefill_tokens_per_ms=_float(rate),
                status_version=_int(version),
                updated_ms=_int(updated),
            ),
            pending_count=_int(pending_count),
            pending_tokens=_int(pending_tokens),
            hit_blocks=hit_blocks,
        )

    def view_from_hash(self, worker_id: str, h: dict[str, str]) -> WorkerView | None:
        return self.try_view(worker_id, [h.get(f) for f in VIEW_FIELDS])


def parse_status_value(name: str, raw: str) -> str:
    """Validate one status field given as text (CLI / admin API); returns its stored form or raises ValueError."""
    if name not in STATUS_FIELDS:
        raise ValueError(f"unknown status field {name!r}; known: {', '.join(STATUS_FIELDS)}")
    kind = _STATUS_TYPES[name]
    if name in _BOOL_FIELDS:
        low = str(raw).strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, got {raw!r}")
        return "1" if low in ("1", "true", "yes") else "0"
    try:
        value = float(raw) if kind in ("float", float) else int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name}: must not be negative, got {raw!r}")
    return str(value)
