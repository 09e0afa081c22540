"""Validation of the proxied request bodies and their prompt tokens (pure).

The proxy reads only what it needs to schedule (the prompt, ``stream``, ``model``) and the fields whose wrong type
would make a worker refuse the request anyway (``max_tokens``, ``stream_options``); everything else goes to the
worker untouched. ``parse_body`` keeps the prompt as it came (``flexlb.tokenize.Prompt``); the router's tokeniser
turns it into the engine's token ids (``with_tokens``), so the block cache keys match the workers' cache.
``parse_request`` does both with the simulator's whitespace tokeniser.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import orjson

from flexlb.blocks import TOKEN_ID_BITS
from flexlb.proxy.errors import invalid
from flexlb.tokenize.base import ChatPrompt, Prompt, TextPrompt, TokenPrompt, check_messages, whitespace_tokens

TOKEN_ID_LIMIT = 1 << TOKEN_ID_BITS


class Route(enum.StrEnum):
    """A proxied generation route; the value is its path, on the router and on the worker."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    GENERATE = "/generate"  # SGLang's native API


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    """A validated request: the body to forward and what scheduling needs from it."""

    route: Route
    body: dict[str, Any]
    tokens: list[int]  # the prompt as the workers tokenise it (empty until ``with_tokens``)
    stream: bool
    model: str | None
    output_tokens: int = 0  # max_tokens / max_completion_tokens / sampling_params.max_new_tokens; 0 = not given
    prompt: Prompt | None = None  # the prompt as the client sent it


def parse_request(route: Route, raw: bytes) -> ProxiedRequest:
    """``parse_body`` and the simulator's whitespace tokens (``flexlb.blocks``)."""
    parsed = parse_body(route, raw)
    assert parsed.prompt is not None
    return with_tokens(parsed, whitespace_tokens(parsed.prompt))


def with_tokens(parsed: ProxiedRequest, tokens: list[int]) -> ProxiedRequest:
    """``parsed`` with its prompt's tokens; ProxyError (400) when the prompt has none."""
    if not tokens:
        raise invalid("the prompt is empty: it has no tokens", _prompt_param(parsed.route))
    return dataclasses.replace(parsed, tokens=tokens)


def parse_body(route: Route, raw: bytes) -> ProxiedRequest:
    """Validate ``raw`` for ``route``; raise ProxyError (400) naming the field that is wrong."""
    body = _json_object(raw)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model: expected a string, got {_kind(model)}", "model")
    stream = _optional_bool(body, "stream", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"stream_options: expected an object, got {_kind(options)}", "stream_options")
    prompt: Prompt
    if route is Route.CHAT:
        prompt = _chat_prompt(body)
        _positive_int(body, "max_completion_tokens", "max_completion_tokens")
        _positive_int(body, "max_tokens", "max_tokens")
    elif route is Route.COMPLETIONS:
        prompt = _completion_prompt(body.get("prompt"))
        _positive_int(body, "max_tokens", "max_tokens")
    else:
        prompt = _generate_prompt(body)
    return ProxiedRequest(route, body, [], stream, model, _output_tokens(route, body), prompt)


def _output_tokens(route: Route, body: dict[str, Any]) -> int:
    """The output the client asked for at most (validated above where the route has the field), or 0."""
    if route is Route.GENERATE:
        params = body.get("sampling_params")
        value = params.get("max_new_tokens") if isinstance(params, dict) else None
    else:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise invalid("empty body: expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"expected a JSON object, got {_kind(data)}")
    return data


def _chat_prompt(body: dict[str, Any]) -> ChatPrompt:
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages: required, a non-empty array of message objects", "messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else _kind(messages)
        raise invalid(f"messages: expected a non-empty array of message objects, got {got}", "messages")
    try:
        return ChatPrompt(check_messages(messages))
    except ValueError as exc:  # check_messages names the message and field
        raise invalid(str(exc), "messages") from None


def _completion_prompt(prompt: Any) -> TextPrompt | TokenPrompt:
    """``/v1/completions`` prompt: a string, token ids, or a one-element batch of either."""
    if prompt is None:
        raise invalid("prompt: required", "prompt")
    if isinstance(prompt, str):
        return TextPrompt(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return _completion_prompt(prompt[0])
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return TokenPrompt(tuple(_token_ids(prompt, "prompt")))
    raise invalid(
        "prompt: expected a string or an array of token ids (batches of several prompts are not supported: "
        "send one request per prompt)",
        "prompt",
    )


def _generate_prompt(body: dict[str, Any]) -> TextPrompt | TokenPrompt:
    """SGLang ``/generate``: ``text`` or ``input_ids``; ``sampling_params.max_new_tokens``."""
    sampling = body.get("sampling_params")
    if sampling is not None:
        if not isinstance(sampling, dict):
            raise invalid(f"sampling_params: expected an object, got {_kind(sampling)}", "sampling_params")
        _positive_int(sampling, "max_new_tokens", "sampling_params.max_new_tokens")
    if body.get("text") is not None:
        text = body["text"]
        if not isinstance(text, str):
            raise invalid(f"text: expected a string (batches are not supported), got {_kind(text)}", "text")
        return TextPrompt(text)
    if body.get("input_ids") is not None:
        return TokenPrompt(tuple(_token_ids(body["input_ids"], "input_ids")))
    raise invalid("text or input_ids: required", "text")


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < TOKEN_ID_LIMIT for t in value):
        raise invalid(f"{name}: expected an array of token ids in [0, 2**{TOKEN_ID_BITS})", name)
    return value


def _positive_int(data: dict[str, Any], name: str, label: str) -> None:
    value = data.get(name)
    if value is None:
        return
    if not _is_int(value):
        raise invalid(f"{label}: expected an integer, got {_kind(value)} {_preview(value)}", label)
    if value <= 0:
        raise invalid(f"{label}: must be at least 1, got {value}", label)


def _optional_bool(data: dict[str, Any], name: str, label: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{label}: expected a boolean, got {_kind(value)} {_preview(value)}", label)
    return value


def _prompt_param(route: Route) -> str:
    return {Route.CHAT: "messages", Route.COMPLETIONS: "prompt", Route.GENERATE: "text"}[route]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """The JSON type of a decoded value, as a client would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _preview(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."
