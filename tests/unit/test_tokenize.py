"""The proxy's tokenisers: a Hugging Face tokenizer with its chat template (built in the test), the engine's
/tokenize with its cache and fallback, and the start-up error for a missing tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hf_tokenizer import build_tokenizer, expected_chat_ids
from tokenizers import Tokenizer

from flexlb.tokenize import ChatPrompt, TextPrompt, TokenizerError, TokenPrompt, check_messages
from flexlb.tokenize.base import whitespace_tokens
from flexlb.tokenize.engine import EngineTokenizer
from flexlb.tokenize.hf import HfTokenizer

MESSAGES = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": "what is the capital of france?"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("model"))


async def test_chat_is_rendered_with_the_models_template_and_encoded_as_the_engine_does(model_dir: Path) -> None:
    tok = HfTokenizer.load(str(model_dir))
    ids = await tok.tokens(ChatPrompt(check_messages(MESSAGES)))
    assert ids == expected_chat_ids(model_dir, MESSAGES)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert ids[0] == raw.token_to_id("<s>") and ids.count(raw.token_to_id("<s>")) == 1  # the template's BOS only
    assert ids != whitespace_tokens(ChatPrompt(tuple(MESSAGES)))


async def test_text_parts_and_completions(model_dir: Path) -> None:
    tok = HfTokenizer.load(str(model_dir / "tokenizer.json"))  # the file itself works too
    parts = [{"role": "user", "content": [{"type": "text", "text": "the quick"}, {"type": "text", "text": "fox"}]}]
    assert await tok.tokens(ChatPrompt(check_messages(parts))) == expected_chat_ids(
        model_dir, [{"role": "user", "content": "the quick\nfox"}]
    )  # parts joined by newlines, as vLLM does
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert await tok.tokens(TextPrompt("the lazy dog")) == raw.encode("the lazy dog").ids  # with the BOS
    assert await tok.tokens(TokenPrompt((7, 8))) == [7, 8]


def test_a_model_in_the_hugging_face_cache_layout_is_found(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--tiny"
    build_tokenizer(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert HfTokenizer.load(str(repo)).kind == f"hf:{repo / 'snapshots' / 'abc123'}"


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json there .*never downloads"):
        HfTokenizer.load(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        HfTokenizer.load(str(tmp_path / "bad"))


async def test_no_chat_template_refuses_chats_only(tmp_path: Path) -> None:
    tok = HfTokenizer.load(str(build_tokenizer(tmp_path, chat_template=None)))
    assert await tok.tokens(TextPrompt("the dog"))
    with pytest.raises(TokenizerError, match="no chat_template"):
        await tok.tokens(ChatPrompt(tuple(MESSAGES)))


class FakeEngines:
    """The engines' /tokenize as a function: answers per worker, and the calls made."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def post(self, worker: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append((worker, body))
        answer = self.answers[worker]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_engine_tokenize_is_asked_once_per_prompt_and_falls_over_to_the_next_engine() -> None:
    engines = FakeEngines({"a:1": ConnectionRefusedError("refused"), "b:2": (200, {"tokens": [5, 6, 7], "count": 3})})
    tok = EngineTokenizer(engines.post, lambda: ["a:1", "b:2"])
    chat = ChatPrompt(tuple(MESSAGES))
    assert await tok.tokens(chat) == [5, 6, 7]
    assert engines.calls[-1] == ("b:2", {"messages": MESSAGES, "add_generation_prompt": True})
    calls = len(engines.calls)
    assert await tok.tokens(ChatPrompt(tuple(dict(m) for m in MESSAGES))) == [5, 6, 7]  # equal messages: cached
    assert len(engines.calls) == calls
    await tok.tokens(ChatPrompt((*MESSAGES, {"role": "user", "content": "more"})))  # a new turn: asked
    assert len(engines.calls) == calls + 2


async def test_engine_tokenize_down_gives_whitespace_tokens_not_cached() -> None:
    engines = FakeEngines({"a:1": TimeoutError("slow")})
    tok = EngineTokenizer(engines.post, lambda: ["a:1"])
    assert await tok.tokens(TextPrompt("x y")) == whitespace_tokens(TextPrompt("x y"))
    engines.answers["a:1"] = (200, {"tokens": [1]})
    assert await tok.tokens(TextPrompt("x y")) == [1]


async def test_engine_refusing_the_prompt_is_the_requests_error() -> None:
    engines = FakeEngines({"a:1": (400, {"error": {"message": "bad role"}})})
    with pytest.raises(TokenizerError, match="bad role"):
        await EngineTokenizer(engines.post, lambda: ["a:1"]).tokens(TextPrompt("x"))
