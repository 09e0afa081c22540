"""Request validation and response bodies of the simulated worker's HTTP API (OpenAI, SGLang and vLLM shapes; pure).

Unknown fields are ignored, as real engines do; a known field of the wrong type is a 400 that names it. The fields
routers add (``ROUTER_EXTRA_FIELDS``) are unknown here, whatever their type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from flexlb.blocks import render_chat
from flexlb.sim.tokens import chat_tokens, text_tokens, token_strs_available
from flexlb.tokenize.base import TokenizerError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 128  # OpenAI's chat default is "up to the context"; a bounded default keeps KV sane
DEFAULT_GENERATE_MAX_NEW_TOKENS = 128  # SGLang's default
TOKEN_ID_LIMIT = 1 << 31
INT64_MAX = (1 << 63) - 1
LOAD_FORMATS = ("sglang", "vllm")  # GET /get_load: SGLang's per-rank list, or vLLM router's {"load": n}
# Sampling and PD fields that sglang-router and vllm-router add to requests: accepted, whatever their type, and ignored
# (kv_transfer_params is read leniently: only a PREFILL worker's response carries one, see kv_transfer_params(); the
# bootstrap fields too: a worker started with a KV wait timeout reads usable ones, see bootstrap_room()).
ROUTER_EXTRA_FIELDS = (
    "no_stop_trim",
    "ignore_eos",  # the simulator never stops early: it always produces max_tokens
    "skip_special_tokens",
    "separate_reasoning",
    "stream_reasoning",
    "return_hidden_states",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "kv_transfer_params",
)


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What one API call asks the engine for."""

    tokens: list[int]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    request_id: int | None = None  # the caller's id (reported in worker status), else the engine picks one


# ---- parsing ----


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "empty body: expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"expected a JSON object, got {type(data).__name__}")
    return data


def parse_completion_request(body: dict[str, Any], served_model: str) -> GenerationParams:
    """``POST /v1/completions``: prompt as a string, token ids, or a one-element batch of either."""
    _check_model(body, served_model)
    _check_n(body)
    return _params(body, _prompt_tokens(body.get("prompt")), _completion_max_tokens(body))


def parse_completion_render(body: dict[str, Any], served_model: str) -> list[GenerationParams]:
    """vLLM ``POST /v1/completions/render``: a completion request, one result per prompt (batches allowed here)."""
    _check_model(body, served_model)
    _check_n(body)
    max_tokens = _completion_max_tokens(body)
    return [_params(body, tokens, max_tokens) for tokens in _prompt_batch(body.get("prompt"))]


def parse_chat_request(body: dict[str, Any], served_model: str) -> GenerationParams:
    """``POST /v1/chat/completions``: messages rendered with ``render_chat`` and tokenised."""
    _check_model(body, served_model)
    _check_n(body)
    tokens = _chat_tokens(body.get("messages"))
    names = ("max_completion_tokens", "max_tokens")  # the newer name wins when both are sent, as in vLLM
    return _params(body, tokens, _max_tokens(body, names, DEFAULT_CHAT_MAX_TOKENS))


def parse_generate_request(body: dict[str, Any]) -> GenerationParams:
    """SGLang ``POST /generate``: ``text`` or ``input_ids``, ``sampling_params.max_new_tokens``, ``stream``."""
    if body.get("text") is not None:
        text = body["text"]
        if not isinstance(text, str):
            raise ApiError(400, "text: expected a string (batches are not supported)", param="text")
        tokens = text_tokens(text)
    elif body.get("input_ids") is not None:
        tokens = _token_ids(body["input_ids"], "input_ids")
    else:
        raise ApiError(400, "text or input_ids: required", param="text")
    sampling = body.get("sampling_params")
    if sampling is None:
        sampling = {}
    if not isinstance(sampling, dict):
        raise ApiError(400, "sampling_params: expected an object", param="sampling_params")
    max_new = _max_tokens(sampling, ("max_new_tokens",), DEFAULT_GENERATE_MAX_NEW_TOKENS)
    return _params(body, tokens, max_new)


@dataclass(frozen=True, slots=True)
class Tokenized:
    """What ``POST /tokenize`` asked for: the tokens of one prompt, or of each prompt of a batch (``batch``)."""

    prompts: list[str]  # the text each prompt tokenises to (for a chat, the rendered messages)
    batch: bool
    return_token_strs: bool
    tokens: list[list[int]]  # each prompt's tokens


def parse_tokenize_request(body: dict[str, Any], served_model: str) -> Tokenized:
    """``POST /tokenize``: vLLM's ``{"prompt"}`` or ``{"messages"}``, SGLang's ``{"prompt"}`` (a string or a batch of
    strings) or ``{"text"}``; tokenised exactly as a generation request with the same prompt or messages would be."""
    _check_model(body, served_model)
    strs = _optional_bool(body, "return_token_strs")
    if body.get("messages") is not None:
        return Tokenized([_chat_prompt(body["messages"])], False, strs, [_chat_tokens(body["messages"])])
    for name in ("prompt", "text"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return Tokenized([value], False, strs, [text_tokens(value)])
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return Tokenized(value, True, strs, [text_tokens(v) for v in value])
        raise ApiError(400, f"{name}: expected a string or a non-empty array of strings", param=name)
    raise ApiError(400, "prompt, text or messages: required", param="prompt")


def _chat_tokens(messages: Any) -> list[int]:
    """The chat's tokens as this worker's model tokenises it; a 400 naming the bad message otherwise."""
    _chat_prompt(messages)
    try:
        return chat_tokens(messages)
    except TokenizerError as exc:  # the chat template refused it, as a real engine would
        raise ApiError(400, str(exc), param="messages") from None


def _chat_prompt(messages: Any) -> str:
    """The rendered chat prompt (``render_chat``); a 400 naming the bad message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: required, a non-empty array of message objects", param="messages")
    try:
        return render_chat(messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _completion_max_tokens(body: dict[str, Any]) -> int:
    # max_completion_tokens is what newer OpenAI clients send; max_tokens, the completions field, wins over it.
    return _max_tokens(body, ("max_tokens", "max_completion_tokens"), DEFAULT_COMPLETION_MAX_TOKENS)


def _params(body: dict[str, Any], tokens: list[int], max_tokens: int) -> GenerationParams:
    if not tokens:
        raise ApiError(400, "the prompt is empty: it has no tokens", param="prompt")
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options")
    include_usage = _optional_bool(options or {}, "include_usage", "stream_options.include_usage")
    return GenerationParams(tokens, max_tokens, stream, include_usage, _request_id(body))


def _check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is None:
        return  # lenient: a single-model worker knows what is meant
    if not isinstance(model, str):
        raise ApiError(400, f"model: expected a string, got {type(model).__name__}", param="model")
    if model != served:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. This worker serves `{served}`.",
            code="model_not_found",
            param="model",
        )


def _check_n(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n: only 1 is supported by the simulator, got {n!r}", param="n")


def _prompt_tokens(prompt: Any) -> list[int]:
    if prompt is None:
        raise ApiError(400, "prompt: required", param="prompt")
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return _prompt_tokens(prompt[0])  # a one-element batch
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return _token_ids(prompt, "prompt")
    raise ApiError(
        400, "prompt: expected a string or an array of token ids (batched prompts are not supported)", param="prompt"
    )


def _prompt_batch(prompt: Any) -> list[list[int]]:
    """A completion prompt that may be a batch: strings or token-id arrays, one token list each."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return [_prompt_tokens(p) for p in prompt]
    return [_prompt_tokens(prompt)]


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < TOKEN_ID_LIMIT for t in value):
        raise ApiError(400, f"{name}: expected an array of token ids in [0, 2**31)", param=name)
    return value


def _max_tokens(data: dict[str, Any], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise ApiError(400, f"{name}: expected an integer, got {type(value).__name__}", param=name)
        if value <= 0:
            raise ApiError(400, f"{name}: must be at least 1, got {value}", param=name)
        return value
    return default


def _optional_bool(data: dict[str, Any], name: str, label: str | None = None) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{label or name}: expected a boolean, got {type(value).__name__}", param=label or name)
    return value


def _request_id(body: dict[str, Any]) -> int | None:
    value = body.get("request_id")
    if value is None:
        return None
    if not _is_int(value) or value == 0 or not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ApiError(400, "request_id: expected a non-zero int64", param="request_id")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- responses ----


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None,
    usage_: dict[str, Any],
    kv_transfer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }
    if kv_transfer is not None:
        body["kv_transfer_params"] = kv_transfer
    return body


def completion_chunk(
    rid: str, model: str, created: int, text: str, finish_reason: str | None, *, include_usage: bool
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None  # as OpenAI: null on every chunk but the last
    return chunk


def chat_body(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None,
    usage_: dict[str, Any],
    kv_transfer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }
    if kv_transfer is not None:
        body["kv_transfer_params"] = kv_transfer
    return body


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None, *, include_usage: bool
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(obj: str, rid: str, model: str, created: int, usage_: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def generate_body(
    text: str, rid: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish_reason: str | None
) -> dict[str, Any]:
    """SGLang's ``/generate`` answer; streamed events carry the text so far, as SGLang does."""
    finish = None if finish_reason is None else {"type": finish_reason, "length": completion_tokens}
    meta = {
        "id": rid,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "finish_reason": finish,
    }
    return {"text": text, "meta_info": meta}


def kv_transfer_params(engine_id: str, block_ids: list[int], host: str, port: int) -> dict[str, Any]:
    """What a PREFILL worker hands a vLLM-style PD router for the decode worker (vLLM's NixlConnector convention):
    the prompt's KV is ready at this engine, in these blocks (the request's block cache keys)."""
    return {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": engine_id,
        "remote_block_ids": block_ids,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
    }


@dataclass(frozen=True, slots=True)
class BootstrapRoom:
    """SGLang's PD fields of a request: the prefill worker's host, its bootstrap port and the room both sides use."""

    host: str
    port: int
    room: int

    @property
    def address(self) -> str:
        """The bootstrap server's ``host:port``."""
        return f"{self.host}:{self.port}"


def bootstrap_room(body: dict[str, Any]) -> BootstrapRoom | None:
    """The request's bootstrap fields when all three are usable (a host, a port, a room in [0, 2**64)), else None:
    like every router field, odd values are ignored, never an error."""
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if not isinstance(host, str) or not host or not _is_int(port) or not _is_int(room):
        return None
    if not 0 < port < 1 << 16 or not 0 <= room < 1 << 64:
        return None
    return BootstrapRoom(host, port, room)


def request_kv_transfer(body: dict[str, Any]) -> dict[str, Any] | None:
    """The request's ``kv_transfer_params`` if it is an object; anything else is ignored, never an error."""
    value = body.get("kv_transfer_params")
    return value if isinstance(value, dict) else None


def tokenize_body(tok: Tokenized, max_model_len: int) -> dict[str, Any]:
    """vLLM's TokenizeResponse; for a batch, SGLang's (``tokens``, ``count`` and ``token_strs`` per prompt)."""
    tokens = tok.tokens
    # one token per whitespace-separated word with the whitespace tokeniser; a real tokenizer's pieces are not served
    strs = tok.return_token_strs and token_strs_available()
    words = [text.split() for text in tok.prompts]
    if tok.batch:
        return {
            "tokens": tokens,
            "count": [len(t) for t in tokens],
            "max_model_len": max_model_len,
            "token_strs": words if strs else None,
        }
    return {
        "tokens": tokens[0],
        "count": len(tokens[0]),
        "max_model_len": max_model_len,
        "token_strs": words[0] if strs else None,
    }


def render_body(rid: str, model: str, params: GenerationParams, kv_transfer: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's render answer (a GenerateRequest): the prompt's token ids and what the request would generate."""
    return {
        "request_id": rid,
        "token_ids": params.tokens,
        "features": None,
        "sampling_params": {"n": 1, "max_tokens": params.max_tokens},
        "model": model,
        "stream": params.stream,
        "stream_options": {"include_usage": params.include_usage} if params.stream else None,
        "cache_salt": None,
        "priority": 0,
        "kv_transfer_params": kv_transfer,
    }


def sglang_load_body(running: int, waiting: int, used_kv_tokens: int, block_size: int) -> list[dict[str, Any]]:
    """SGLang's ``GET /get_load``: one object per data-parallel rank (the simulator has one).

    ``num_tokens`` is KV held by live requests (what sglang-router's cache-aware policy balances on); ``num_pages``
    the same in blocks, as newer SGLang reports it."""
    return [
        {
            "dp_rank": 0,
            "num_reqs": running + waiting,
            "num_waiting_reqs": waiting,
            "num_tokens": used_kv_tokens,
            "num_pages": used_kv_tokens // block_size,
        }
    ]


def vllm_load_body(running: int, waiting: int) -> dict[str, Any]:
    """vLLM router's ``GET /get_load``: ``{"load": running + waiting}``."""
    return {"load": running + waiting}
