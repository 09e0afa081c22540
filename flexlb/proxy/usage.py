"""The cached prompt tokens an engine reports for a request (OpenAI's ``usage.prompt_tokens_details.cached_tokens``,
which vLLM, SGLang and the simulator send), read from the bytes of its answer: the whole body, or the stream's
chunk that carries ``usage``. Pure; the relay hands it only bytes that mention usage."""

from __future__ import annotations

from typing import Any

import orjson

USAGE_MARK = b'"usage"'


def cached_tokens(data: bytes) -> int | None:
    """``cached_tokens`` of the usage in ``data`` (a JSON body, or SSE ``data:`` lines), None where it says none."""
    if data.lstrip().startswith(b"{"):
        return _from_object(_json(data))
    found = None
    for line in data.split(b"\n"):
        if line.startswith(b"data:") and USAGE_MARK in line:
            found = _from_object(_json(line[5:])) if found is None else found
    return found


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _from_object(obj: Any) -> int | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
