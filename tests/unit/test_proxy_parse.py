"""The proxy's request validation and the pure helpers around a proxied request: tokens as the workers count them,
the body forwarded, the worker(s) it goes to, the OpenAI-style errors."""

from __future__ import annotations

import random

import orjson
import pytest

from flexlb.blocks import render_chat, tokenize
from flexlb.domain import Choice, ErrorCode, Role, ScheduleResult, WorkerSpec, WorkerStatus, WorkerView
from flexlb.proxy.errors import ProxyError, from_schedule, sse_error_event
from flexlb.proxy.parse import Route, parse_request
from flexlb.proxy.pd import bootstrap_fields
from flexlb.proxy.plan import forward_body, plan
from flexlb.proxy.upstream import Target


def parse(route: Route, body: object) -> object:
    return parse_request(route, orjson.dumps(body))


def refusal(route: Route, raw: bytes) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        parse_request(route, raw)
    assert info.value.status == 400
    return info.value


def test_chat_is_tokenised_as_the_workers_render_it() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    req = parse(Route.CHAT, {"messages": messages, "stream": True, "max_completion_tokens": 5, "model": "m"})
    assert req.tokens == tokenize(render_chat(messages))
    assert req.stream is True and req.model == "m" and req.body["max_completion_tokens"] == 5


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("a b c", tokenize("a b c")),
        ([5, 6, 7], [5, 6, 7]),
        (["a b"], tokenize("a b")),  # a one-element batch
        ([[1, 2]], [1, 2]),
    ],
)
def test_completion_prompts(prompt: object, tokens: list[int]) -> None:
    req = parse(Route.COMPLETIONS, {"prompt": prompt})
    assert req.tokens == tokens and req.stream is False and req.model is None


def test_generate_takes_text_or_input_ids() -> None:
    assert parse(Route.GENERATE, {"text": "x y", "sampling_params": {"max_new_tokens": 3}}).tokens == tokenize("x y")
    assert parse(Route.GENERATE, {"input_ids": [1, 2, 3], "stream": True}).tokens == [1, 2, 3]


@pytest.mark.parametrize(
    ("route", "raw", "param", "words"),
    [
        (Route.CHAT, b"{", None, "malformed JSON"),
        (Route.CHAT, b"", None, "empty body"),
        (Route.CHAT, b'"text"', None, "expected a JSON object, got string"),
        (Route.CHAT, b"{}", "messages", "required"),
        (Route.CHAT, b'{"messages": []}', "messages", "got an empty array"),
        (Route.CHAT, b'{"messages": {"role": "user"}}', "messages", "got object"),
        (Route.CHAT, b'{"messages": [{"role": "user", "content": 3}]}', "messages", "messages[0].content"),
        (Route.CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', "max_tokens", "integer"),
        (Route.CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens", "boolean"),
        (Route.COMPLETIONS, b'{"prompt": "x", "max_tokens": -1}', "max_tokens", "at least 1"),
        (Route.COMPLETIONS, b'{"prompt": ["a", "b"]}', "prompt", "batches of several prompts"),
        (Route.COMPLETIONS, b'{"prompt": [1, -2]}', "prompt", "token ids"),
        (Route.COMPLETIONS, b'{"prompt": ""}', "prompt", "empty"),
        (Route.COMPLETIONS, b'{"prompt": "x", "model": 7}', "model", "string"),
        (Route.COMPLETIONS, b'{"prompt": "x", "stream": 1}', "stream", "boolean"),
        (Route.COMPLETIONS, b'{"prompt": "x", "stream_options": []}', "stream_options", "object"),
        (Route.GENERATE, b'{"text": ["a", "b"]}', "text", "batches"),
        (Route.GENERATE, b'{"input_ids": "1 2"}', "input_ids", "token ids"),
        (Route.GENERATE, b'{"text": "a", "sampling_params": 3}', "sampling_params", "object"),
        (Route.GENERATE, b'{"text": "a", "sampling_params": {"max_new_tokens": 1.5}}', "sampling_params.max_new_tokens",
         "integer"),
    ],
)  # fmt: skip
def test_bad_bodies_are_400s_naming_the_field(route: Route, raw: bytes, param: str | None, words: str) -> None:
    error = refusal(route, raw)
    assert error.param == param and words in error.message, error.message
    body = error.body()["error"]
    assert body == {
        "message": error.message,
        "type": "invalid_request_error",
        "param": param,
        "code": "invalid_request",
    }


def test_the_forwarded_body_carries_the_request_id_and_the_workers_model_name() -> None:
    chat = parse(Route.CHAT, {"model": "svc", "messages": [{"role": "user", "content": "x"}], "request_id": 5})
    assert forward_body(chat, 42, "served") == {**chat.body, "request_id": 42, "model": "served"}
    assert forward_body(chat, 42, "") == {**chat.body, "request_id": 42}  # no served name: model unchanged
    generate = parse(Route.GENERATE, {"text": "x"})
    assert forward_body(generate, 42, "served") == {"text": "x", "request_id": 42}  # /generate has no model


def view(ip: str, role: Role, block_size: int = 64) -> WorkerView:
    return WorkerView(WorkerSpec(ip, 8000, role), WorkerStatus(block_size=block_size))


def test_plan_sends_pd_to_decode_with_its_prefill_and_fused_to_one_worker() -> None:
    p, d, f = view("p", Role.PREFILL), view("d", Role.DECODE), view("f", Role.PDFUSION)
    answering, prefill = plan({Role.DECODE: Choice(d), Role.PREFILL: Choice(p), Role.VIT: Choice(view("v", Role.VIT))})
    assert answering == Target(Role.DECODE, d.spec) and prefill == Target(Role.PREFILL, p.spec)
    assert plan({Role.PDFUSION: Choice(f)}) == (Target(Role.PDFUSION, f.spec), None)
    with pytest.raises(ProxyError) as info:
        plan({Role.VIT: Choice(view("v", Role.VIT))})
    assert info.value.status == 503


def test_bootstrap_fields_name_the_prefill_worker_and_a_63_bit_room() -> None:
    fields = bootstrap_fields(Target(Role.PREFILL, WorkerSpec("10.0.0.7", 30000, Role.PREFILL)), 8998, random.Random(1))
    assert fields["bootstrap_host"] == "10.0.0.7" and fields["bootstrap_port"] == 8998
    assert 0 <= fields["bootstrap_room"] < 1 << 63


def test_schedule_failures_map_to_http_status_and_a_code_name() -> None:
    no_worker = from_schedule(ScheduleResult(False, ErrorCode.NO_PDFUSION_WORKER, "NO_PDFUSION_WORKER: none alive"))
    assert (no_worker.status, no_worker.code, no_worker.type) == (503, "no_pdfusion_worker", "server_error")
    assert from_schedule(ScheduleResult(False, ErrorCode.STATE_UNAVAILABLE, "Redis down")).status == 503
    assert from_schedule(ScheduleResult(False, ErrorCode.QUEUE_FULL, "full")).status == 429


def test_a_mid_stream_error_is_one_sse_event() -> None:
    event = sse_error_event("worker died")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:])["error"]["message"] == "worker died"
