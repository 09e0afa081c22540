"""The engine's own ``POST /tokenize`` (vLLM, SGLang), asked on a cache miss only.

Results are kept in an LRU keyed by a hash chained over the prompt's messages (a chat) or its text, so a prompt seen
before (the same conversation sent again, a retry, another router's client repeating it) costs no round trip; a miss
costs one to one of the fleet's engines, shared by the concurrent requests with the same prompt. vLLM takes
``{"messages", "add_generation_prompt"}`` and ``{"prompt"}``; SGLang's takes ``{"prompt"}`` (for chats on SGLang give
``tokenizerPath``). When no engine answers, the request is tokenised by whitespace (its ``seq_len`` is a guess and its
blocks match nothing) and a warning is logged once per outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from flexlb.tokenize.base import ChatPrompt, Prompt, TextPrompt, TokenizerError, TokenPrompt, whitespace_tokens

log = logging.getLogger("flexlb.tokenize")

# (worker id "host:port", JSON body) -> (HTTP status, decoded JSON answer); raises OSError / TimeoutError
Post = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]
Targets = Callable[[], Sequence[str]]  # the worker ids to ask, in the order to try them


def prompt_key(prompt: Prompt) -> bytes:
    """A hash chained over the prompt's messages (each one's canonical JSON), or of its text."""
    if isinstance(prompt, TextPrompt):
        return hashlib.blake2b(b"t" + prompt.text.encode(), digest_size=16).digest()
    h = b"c"
    assert isinstance(prompt, ChatPrompt)
    for message in prompt.messages:
        h = hashlib.blake2b(h + orjson.dumps(message, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
    return h


def tokenize_body(prompt: ChatPrompt | TextPrompt) -> dict[str, Any]:
    if isinstance(prompt, ChatPrompt):
        return {"messages": list(prompt.messages), "add_generation_prompt": True}
    return {"prompt": prompt.text, "add_special_tokens": True}


def answer_tokens(status: int, answer: Any) -> list[int]:
    """The ``tokens`` of a /tokenize answer; ValueError for anything else (a 4xx is the prompt's TokenizerError)."""
    if 400 <= status < 500:
        message = answer.get("message") if isinstance(answer, dict) else None
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            message = error.get("message", message)
        raise TokenizerError(f"the engine refused to tokenise the prompt (HTTP {status}): {message or answer}")
    if status != 200 or not isinstance(answer, dict):
        raise ValueError(f"HTTP {status}")
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError("no list of token ids in 'tokens'")
    return tokens


class EngineTokenizer:
    """Tokens from an engine's ``/tokenize``, cached (see the module docstring)."""

    kind = "engine"

    def __init__(
        self,
        post: Post,
        targets: Targets,
        *,
        cache_size: int = 4096,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._post = post
        self._targets = targets
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._pending: dict[bytes, asyncio.Future[list[int]]] = {}
        self._close = close
        self._failing = False
        self.round_trips = 0  # /tokenize calls made (tests and logs)

    async def tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, TokenPrompt):
            return list(prompt.ids)
        key = prompt_key(prompt)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        pending = self._pending.get(key)
        if pending is not None:  # the same prompt is being tokenised for another request
            return await asyncio.shield(pending)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            tokens = await self._ask(prompt)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters (if any) get it; none is not an error
            raise
        finally:
            del self._pending[key]
        if not future.done():
            future.set_result(tokens)
        return tokens

    async def _ask(self, prompt: ChatPrompt | TextPrompt) -> list[int]:
        body = tokenize_body(prompt)
        errors = []
        for worker in self._targets():
            self.round_trips += 1
            try:
                tokens = answer_tokens(*await self._post(worker, body))
            except (OSError, TimeoutError, ValueError) as exc:
                errors.append(f"{worker}: {type(exc).__name__}: {exc}")
                continue
            if self._failing:
                log.info("the engines' /tokenize answers again (%s)", worker)
                self._failing = False
            self._remember(prompt_key(prompt), tokens)
            return tokens
        if not self._failing:
            why = "; ".join(errors) or "no alive vLLM or SGLang worker in the fleet"
            log.warning("no engine answered POST /tokenize (%s): tokenising by whitespace meanwhile", why)
            self._failing = True
        return whitespace_tokens(prompt)  # not cached: the engine's answer is wanted once it is back

    def _remember(self, key: bytes, tokens: list[int]) -> None:
        self._cache[key] = tokens
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        if self._close is not None:
            await self._close()
