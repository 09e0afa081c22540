"""One streaming request to an OpenAI-compatible endpoint, timed from the client side.

TTFT runs from sending the request to the first streamed chunk with content; E2E to the end of the stream. Output
tokens come from ``usage.completion_tokens`` when the endpoint reports it (``stream_options.include_usage``), else
from the number of content chunks; cached tokens from ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import aiohttp
import orjson

from flexlb.bench.workloads.spec import RequestSpec

ERROR_TEXT_LIMIT = 300
_DONE: dict[str, Any] = {}  # sentinel event: "data: [DONE]"


@dataclass(slots=True)
class RequestRecord:
    """What one request measured; times in seconds since the run started, durations in ms."""

    index: int
    tag: str
    api: str
    max_tokens: int
    scheduled_s: float | None = None  # open loop: when it was due (a chat turn may wait for its previous turn)
    start_s: float = 0.0
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage, when reported
    cached_tokens: int | None = None
    status: int | None = None  # HTTP status
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_ms or 0.0) / 1000

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def base_url(target: str) -> str:
    """``http://host:port`` from what a user typed (a trailing ``/`` or ``/v1`` is dropped)."""
    url = target.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = f"http://{url}"
    return url


def payload(spec: RequestSpec, model: str | None, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.prompt is not None:
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [dict(m) for m in spec.messages or ()]
    if model:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM and SGLang: generate exactly max_tokens
    return body


def _error_text(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error")
        if message:
            return str(message)[:ERROR_TEXT_LIMIT]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        pass
    return body.decode("utf-8", "replace").strip()[:ERROR_TEXT_LIMIT] or "(empty body)"


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON payloads of ``data:`` lines; ends after ``data: [DONE]`` (yielded as the empty ``_DONE``) or at EOF."""
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, event: lines
        data = line[5:].strip()
        if data == b"[DONE]":
            yield _DONE
            return
        event = orjson.loads(data)
        if isinstance(event, dict):
            yield event


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if isinstance(choice.get("text"), str):
        return choice["text"]
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _finished(event: dict[str, Any]) -> bool:
    choices = event.get("choices") or []
    return bool(choices) and isinstance(choices[0], dict) and choices[0].get("finish_reason") is not None


class StreamingClient:
    """Sends request specs to ``target`` over one aiohttp session and fills in their records."""

    def __init__(
        self, session: aiohttp.ClientSession, target: str, *, model: str | None = None, ignore_eos: bool = True
    ) -> None:
        self.session = session
        self.base = base_url(target)
        self.model = model
        self.ignore_eos = ignore_eos

    def url(self, spec: RequestSpec) -> str:
        return f"{self.base}/v1/completions" if spec.api == "completions" else f"{self.base}/v1/chat/completions"

    async def send(self, spec: RequestSpec, record: RequestRecord, t0: float) -> RequestRecord:
        """Send ``spec`` now; ``t0`` is the run's ``time.perf_counter()`` origin. Never raises but on cancel."""
        body = orjson.dumps(payload(spec, self.model, self.ignore_eos))
        start = time.perf_counter()
        record.start_s = start - t0
        try:
            await self._stream(body, spec, record, start)
        except asyncio.CancelledError:
            record.error = "cancelled: the run was interrupted"
            raise
        except TimeoutError:
            record.error = "timeout (--request-timeout)"
        except aiohttp.ClientError as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
        except ValueError as exc:  # a data line that is not JSON, or a line longer than aiohttp's limit
            record.error = f"malformed stream: {exc}"[:ERROR_TEXT_LIMIT]
        finally:
            record.e2e_ms = (time.perf_counter() - start) * 1000
        return record

    async def _stream(self, body: bytes, spec: RequestSpec, record: RequestRecord, start: float) -> None:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with self.session.post(self.url(spec), data=body, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {_error_text(await resp.read())}"
                return
            if resp.content_type != "text/event-stream":
                record.error = f"not a stream: the answer's Content-Type is {resp.content_type}"
                return
            chunks, finished, done = 0, False, False
            async for event in sse_events(resp.content):
                if event is _DONE:
                    done = True
                    break
                if "error" in event:
                    record.error = f"error in stream: {_error_text(orjson.dumps(event))}"
                    return
                if _content(event):
                    if record.ttft_ms is None:
                        record.ttft_ms = (time.perf_counter() - start) * 1000
                    chunks += 1
                finished = finished or _finished(event)
                usage = event.get("usage")
                if isinstance(usage, dict):
                    _read_usage(usage, record)
            if record.output_tokens == 0:
                record.output_tokens = chunks
            if not (done or finished):
                record.error = "the stream ended before [DONE] or a finish_reason"
            elif record.ttft_ms is None:
                record.error = "the stream carried no content"


def _read_usage(usage: dict[str, Any], record: RequestRecord) -> None:
    if isinstance(usage.get("completion_tokens"), int):
        record.output_tokens = usage["completion_tokens"]
    if isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]
