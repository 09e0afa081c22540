"""The simulator's request parsing and response bodies for what sglang-router and vllm-router send and read (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from flexlb.blocks import render_chat, tokenize
from flexlb.sim import protocol as p
from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.http_api import create_sim_app

MODEL = "sim"
MESSAGES = [{"role": "user", "content": "hello there"}]
ODD_EXTRAS: dict[str, Any] = {name: {"any": ["shape", 1]} for name in p.ROUTER_EXTRA_FIELDS}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, p.DEFAULT_COMPLETION_MAX_TOKENS),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 5, "max_completion_tokens": 7}, 5),
        ({"max_tokens": None, "max_completion_tokens": 7}, 7),
    ],
)
def test_completion_max_completion_tokens_acts_when_max_tokens_is_absent(fields: dict[str, Any], expected: int) -> None:
    assert p.parse_completion_request({"prompt": "a b", **fields}, MODEL).max_tokens == expected


def test_chat_max_completion_tokens_wins_as_in_vllm() -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 7}
    assert p.parse_chat_request(body, MODEL).max_tokens == 7


@pytest.mark.parametrize("value", ["3", 0, 1.5, True])
def test_a_bad_max_completion_tokens_is_a_400_naming_it(value: Any) -> None:
    with pytest.raises(p.ApiError) as err:
        p.parse_completion_request({"prompt": "a", "max_completion_tokens": value}, MODEL)
    assert err.value.status == 400 and err.value.param == "max_completion_tokens"


def test_router_extra_fields_of_any_type_are_ignored() -> None:
    plain = p.parse_completion_request({"prompt": "a b c", "max_tokens": 2}, MODEL)
    assert p.parse_completion_request({"prompt": "a b c", "max_tokens": 2, **ODD_EXTRAS}, MODEL) == plain
    chat = p.parse_chat_request({"messages": MESSAGES, **ODD_EXTRAS}, MODEL)
    assert chat.tokens == tokenize(render_chat(MESSAGES))
    generate = p.parse_generate_request({"text": "a b", "sampling_params": dict(ODD_EXTRAS), **ODD_EXTRAS})
    assert generate.tokens == tokenize("a b")


@pytest.mark.parametrize("value", [None, "text", 5, ["a"], {"do_remote_prefill": True}])
def test_request_kv_transfer_is_lenient(value: Any) -> None:
    assert p.request_kv_transfer({"kv_transfer_params": value}) == (value if isinstance(value, dict) else None)
    assert p.request_kv_transfer({}) is None


def test_tokenize_request_shapes() -> None:
    text = "the quick  brown\nfox"
    single = p.tokenize_body(p.parse_tokenize_request({"prompt": text}, MODEL), 4096)
    assert single == {"tokens": tokenize(text), "count": 4, "max_model_len": 4096, "token_strs": None}
    assert p.tokenize_body(p.parse_tokenize_request({"text": text}, MODEL), 4096) == single
    strs = p.tokenize_body(p.parse_tokenize_request({"prompt": text, "return_token_strs": True}, MODEL), 1)
    assert strs["token_strs"] == ["the", "quick", "brown", "fox"]
    batch = p.tokenize_body(p.parse_tokenize_request({"prompt": ["a b", "c"]}, MODEL), 1)
    assert batch["tokens"] == [tokenize("a b"), tokenize("c")] and batch["count"] == [2, 1]
    chat = p.tokenize_body(p.parse_tokenize_request({"messages": MESSAGES, "model": MODEL}, MODEL), 1)
    assert chat["tokens"] == tokenize(render_chat(MESSAGES))
    empty = p.tokenize_body(p.parse_tokenize_request({"prompt": ""}, MODEL), 1)
    assert (empty["tokens"], empty["count"]) == ([], 0)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"text": [1, 2]}, 400, "text"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"content": "no role"}]}, 400, "messages"),
        ({"prompt": "x", "model": "other"}, 404, "model"),
        ({"prompt": "x", "return_token_strs": "yes"}, 400, "return_token_strs"),
    ],
)
def test_bad_tokenize_requests_are_refused_clearly(body: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(p.ApiError) as err:
        p.parse_tokenize_request(body, MODEL)
    assert (err.value.status, err.value.param) == (status, param)


def test_completion_render_takes_a_batch_of_prompts() -> None:
    rendered = p.parse_completion_render({"prompt": ["a b", [1, 2, 3]], "max_completion_tokens": 4}, MODEL)
    assert [r.tokens for r in rendered] == [tokenize("a b"), [1, 2, 3]]
    assert {r.max_tokens for r in rendered} == {4}
    (one,) = p.parse_completion_render({"prompt": [5, 6]}, MODEL)
    assert one.tokens == [5, 6]
    with pytest.raises(p.ApiError):
        p.parse_completion_render({"prompt": ""}, MODEL)  # as the real request: an empty prompt has no tokens


def test_render_body_is_a_vllm_generate_request() -> None:
    params = p.parse_chat_request({"messages": MESSAGES, "stream": True}, MODEL)
    body = p.render_body("chatcmpl-x", MODEL, params, {"do_remote_decode": True})
    assert body["token_ids"] == tokenize(render_chat(MESSAGES))
    assert body["sampling_params"]["max_tokens"] == p.DEFAULT_CHAT_MAX_TOKENS
    assert (body["request_id"], body["model"], body["stream"]) == ("chatcmpl-x", MODEL, True)
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    assert {"features", "stream_options", "cache_salt", "priority"} <= body.keys()


def test_load_bodies() -> None:
    assert p.sglang_load_body(2, 3, 640, 64) == [
        {"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 3, "num_tokens": 640, "num_pages": 10}
    ]
    assert p.vllm_load_body(2, 3) == {"load": 5}


def test_kv_transfer_params_and_the_bodies_that_carry_them() -> None:
    kv = p.kv_transfer_params("engine-1", [11, -12], "127.0.0.1", 8000)
    assert kv == {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": "engine-1",
        "remote_block_ids": [11, -12],
        "remote_host": "127.0.0.1",
        "remote_port": 8000,
        "tp_size": 1,
    }
    usage = p.usage(3, 1, 0)
    assert p.completion_body("id", MODEL, 0, "x", "length", usage, kv)["kv_transfer_params"] == kv
    assert p.chat_body("id", MODEL, 0, "x", "length", usage, kv)["kv_transfer_params"] == kv
    assert "kv_transfer_params" not in p.completion_body("id", MODEL, 0, "x", "length", usage)
    assert "kv_transfer_params" not in p.chat_body("id", MODEL, 0, "x", "length", usage)


def test_create_sim_app_checks_the_load_format() -> None:
    with pytest.raises(ValueError, match="load_format"):
        create_sim_app(SimEngine(EngineConfig()), MODEL, load_format="json")
