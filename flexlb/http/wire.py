"""JSON wire format of the schedule API: validation of requests, shapes of responses (the original's field names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from flexlb.blocks import block_cache_keys
from flexlb.domain import DEFAULT_BLOCK_SIZE, Choice, ErrorCode, QueueStay, Role, ScheduleRequest, ScheduleResult

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_SEQ_LEN = 100_000_000  # far beyond any context window: larger is a client bug
MAX_BLOCK_CACHE_KEYS = 65_536  # maxBlockCacheKeys' default
KEY_JSON_BYTES = 21  # the longest int64 in JSON ("-9223372036854775808") and its comma
BODY_SLACK_BYTES = 64 * 1024  # the other fields, whitespace


class BadRequest(ValueError):
    """A request the client must fix; the message names the field and what was wrong."""

    def __init__(self, message: str, *, status: int = 400, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise BadRequest("empty body: expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    return data


def int_field(
    data: dict[str, Any], name: str, *, required: bool, default: int = 0, low: int = INT64_MIN, high: int = INT64_MAX
) -> int:
    value = data.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name}: required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: expected an integer, got {type(value).__name__} {_preview(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is out of range [{low}, {high}]")
    return value


def _preview(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_request_id(data: dict[str, Any]) -> int:
    rid = int_field(data, "request_id", required=True)
    if rid == 0:
        raise BadRequest("request_id: must not be 0 (the original reserves 0 for 'no id')")
    return rid


def schedule_body_limit(max_keys: int) -> int:
    """The longest body a schedule request with ``max_keys`` block keys can need: a longer one is refused before
    it is read (its keys would be refused after parsing anyway)."""
    return max_keys * KEY_JSON_BYTES + BODY_SLACK_BYTES


def _input_ids(data: dict[str, Any]) -> list[int] | None:
    """The original frontend's ``input_ids`` (the prompt's token ids), checked; None when absent."""
    ids = data.get("input_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) > MAX_SEQ_LEN:
        raise BadRequest(f"input_ids: expected a list of token ids, got {type(ids).__name__}")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not INT64_MIN <= token <= INT64_MAX:
            raise BadRequest(f"input_ids[{i}]: expected a 64-bit integer token id, got {_preview(token)}")
    return ids


def _default_block_size() -> int:
    return DEFAULT_BLOCK_SIZE


def parse_schedule_request(
    data: dict[str, Any],
    max_keys: int = MAX_BLOCK_CACHE_KEYS,
    block_size: Callable[[], int] = _default_block_size,
) -> ScheduleRequest:
    """Validate a schedule request body; unknown fields are ignored as in the original. Without
    ``block_cache_keys``, ``input_ids`` (as the original's frontend sends) give them: cut into blocks of
    ``block_size()`` tokens (the fleet's; asked only then) and hashed as the workers hash them; ``seq_len`` then
    defaults to their number."""
    request_id = parse_request_id(data)
    input_ids = _input_ids(data)
    seq_len = int_field(
        data, "seq_len", required=input_ids is None, default=len(input_ids or ()), low=0, high=MAX_SEQ_LEN
    )
    # the original's frontend sends request_priority; its newest master reads "priority" (the same 1-100 levels)
    field_name = "request_priority" if "request_priority" in data or "priority" not in data else "priority"
    priority = int_field(data, field_name, required=False, low=-(1 << 31), high=(1 << 31) - 1)
    keys = data.get("block_cache_keys")
    if keys is None:
        keys = [] if input_ids is None else block_cache_keys(input_ids, block_size())
    if not isinstance(keys, list):
        raise BadRequest(f"block_cache_keys: expected a list of integers, got {type(keys).__name__}")
    if len(keys) > max_keys:
        raise BadRequest(f"block_cache_keys: {len(keys)} keys, more than the limit of {max_keys} (maxBlockCacheKeys)")
    if len(keys) > seq_len:  # one key per full block of at least one token
        raise BadRequest(f"block_cache_keys: {len(keys)} keys for seq_len {seq_len}: at most one key per token")
    for i, key in enumerate(keys):
        if isinstance(key, bool) or not isinstance(key, int) or not INT64_MIN <= key <= INT64_MAX:
            raise BadRequest(f"block_cache_keys[{i}]: expected a 64-bit integer, got {_preview(key)}")
    timeout = int_field(data, "generate_timeout", required=False, default=3_600_000, low=1)
    request_time = data.get("request_time_ms")
    if request_time is not None:
        request_time = int_field(data, "request_time_ms", required=False, low=0)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model: expected a string, got {type(model).__name__}")
    return ScheduleRequest(
        request_id=request_id,
        seq_len=seq_len,
        block_cache_keys=tuple(keys),
        generate_timeout_ms=timeout,
        model=model,
        request_time_ms=request_time,
        priority=priority,
        explain=data.get("debug") is True,  # the original frontend's flag: debug_info then says why
    )


def error_body(code: ErrorCode, message: str, *, master_host: str | None = None) -> dict[str, Any]:
    return {
        "server_status": [],
        "success": False,
        "code": int(code),
        "error_message": message,
        "real_master_host": master_host,
        "queue_length": None,
    }


def _server_status(
    role: Role, choice: Choice, request_id: int, degraded: bool, queue: QueueStay | None
) -> dict[str, Any]:
    view = choice.worker
    spec, status = view.spec, view.status
    return {
        "role": role.value,
        "server_ip": spec.ip,
        "http_port": spec.http_port,
        "grpc_port": spec.effective_grpc_port,
        "group": spec.group,
        "request_id": request_id,
        "prefill_time": round(choice.estimate_ttft_ms),
        "success": True,
        "code": int(ErrorCode.OK),
        "message": "",
        "debug_info": {
            "running_batch_size": status.running,
            "queue_size": status.waiting + view.pending_count,
            "waiting_time_ms": 0 if queue is None else round(_waited_ms(queue)),
            "available_kv_cache_len": max(view.kv_free, 0) if status.kv_total > 0 else 0,
            "estimate_ttft_ms": round(choice.estimate_ttft_ms, 3),
            "estimate_tpot_ms": status.step_latency_ms,
            "hit_cache_len": view.hit_tokens,
            "reserved_tokens": choice.reserve_tokens,
            "degraded": degraded,
            **({"decision": choice.explanation} if choice.explanation is not None else {}),
            **({"queue": _queue_info(queue)} if queue is not None and choice.explanation is not None else {}),
        },
    }


def _waited_ms(queue: QueueStay) -> float:
    """The wait both fields of an answer report (``waiting_time_ms`` rounds it further): rounded once, so they agree
    (47.46 ms was 47 in one and 47.5, then 48, in the other)."""
    return round(queue.waited_ms, 1)


def _queue_info(queue: QueueStay) -> dict[str, Any]:
    return {"waited_ms": _waited_ms(queue), "position": queue.position, "depth": queue.depth}


def schedule_body(result: ScheduleResult, request_id: int, *, master_host: str | None) -> dict[str, Any]:
    if not result.success:
        return error_body(result.code, result.message, master_host=master_host)
    return {
        "server_status": [
            _server_status(r, c, request_id, result.degraded, result.queue) for r, c in result.choices.items()
        ],
        "success": True,
        "code": int(ErrorCode.OK),
        "error_message": "",
        "real_master_host": master_host,
        "queue_length": 0,
        "degraded": result.degraded,
    }


# Answers a client should retry a moment later: when (seconds), in Retry-After.
RETRY_AFTER_S: dict[ErrorCode, int] = {
    ErrorCode.QUEUE_FULL: 1,
    ErrorCode.QUEUE_TIMEOUT: 1,
    ErrorCode.STATE_UNAVAILABLE: 1,
}


def http_status_for(code: ErrorCode) -> int:
    """4xx for the client's mistakes, 503 for no capacity or no shared state, as flexlb promises."""
    if code == ErrorCode.OK:
        return 200
    if code == ErrorCode.UNKNOWN_MODEL:
        return 404
    if code in (ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED):
        return 400
    if code == ErrorCode.QUEUE_FULL:
        return 429
    # REQUEST_CANCELLED answers the queued requests of a router shutting down: 503, another router can take them
    return 503
