"""Worker status hash <-> domain objects. The hash's field names are documented in docs/redis-keys.md."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from flexlb.domain import DEFAULT_BLOCK_SIZE, Role, WorkerSpec, WorkerStatus, WorkerView

# Written by upsert_worker.lua itself, never by a caller.
SCRIPT_OWNED = frozenset({"status_version", "updated_ms", "pending_count", "pending_tokens"})
STATUS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WorkerStatus) if f.name not in SCRIPT_OWNED)
_STATUS_TYPES = {f.name: f.type for f in fields(WorkerStatus)}


def spec_fields(spec: WorkerSpec) -> dict[str, str]:
    return {
        "ip": spec.ip,
        "http_port": str(spec.http_port),
        "grpc_port": str(spec.effective_grpc_port),
        "group": spec.group,
        "max_concurrency": str(spec.max_concurrency),
    }


def encode_status_value(name: str, value: Any) -> str:
    if name == "alive":
        return "1" if value else "0"
    return str(value)


def status_fields(status: WorkerStatus) -> dict[str, str]:
    return {name: encode_status_value(name, getattr(status, name)) for name in STATUS_FIELDS}


def _int(h: dict[str, str], name: str, default: int = 0) -> int:
    v = h.get(name)
    return int(float(v)) if v not in (None, "") else default


def _float(h: dict[str, str], name: str) -> float:
    v = h.get(name)
    return float(v) if v not in (None, "") else 0.0


def view_from_hash(worker_id: str, h: dict[str, str], hit_blocks: int = 0) -> WorkerView:
    """Decode a worker's status hash; missing fields take the dataclass defaults."""
    ip, _, port = worker_id.rpartition(":")
    spec = WorkerSpec(
        ip=h.get("ip") or ip,
        http_port=_int(h, "http_port", int(port)),
        role=Role.parse(h.get("role") or "PREFILL"),
        grpc_port=_int(h, "grpc_port"),
        group=h.get("group", ""),
        max_concurrency=_int(h, "max_concurrency"),
    )
    status = WorkerStatus(
        alive=h.get("alive") == "1",  # as reserve.lua: no report, not alive
        running=_int(h, "running"),
        waiting=_int(h, "waiting"),
        queued_tokens=_int(h, "queued_tokens"),
        kv_used=_int(h, "kv_used"),
        kv_total=_int(h, "kv_total"),
        block_size=_int(h, "block_size", DEFAULT_BLOCK_SIZE) or DEFAULT_BLOCK_SIZE,
        step_latency_ms=_float(h, "step_latency_ms"),
        prefill_tokens_per_ms=_float(h, "prefill_tokens_per_ms"),
        status_version=_int(h, "status_version"),
        updated_ms=_int(h, "updated_ms"),
    )
    return WorkerView(
        spec=spec,
        status=status,
        pending_count=_int(h, "pending_count"),
        pending_tokens=_int(h, "pending_tokens"),
        hit_blocks=hit_blocks,
    )


def parse_status_value(name: str, raw: str) -> str:
    """Validate one status field given as text (CLI / admin API); returns its stored form or raises ValueError."""
    if name not in STATUS_FIELDS:
        raise ValueError(f"unknown status field {name!r}; known: {', '.join(STATUS_FIELDS)}")
    kind = _STATUS_TYPES[name]
    if name == "alive":
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
