"""Which tokeniser a router uses, from ``tokenizerPath`` and the fleet (the one place settings become a tokeniser).

- ``tokenizerPath`` set: that Hugging Face tokenizer (a start-up error when it cannot be loaded);
- else, while the fleet has alive ``vllm`` or ``sglang`` workers: their ``/tokenize`` (``EngineTokenizer``);
- else the simulator's whitespace tokeniser (flexlb's simulator, RTP-LLM fleets sending token ids).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiohttp

from flexlb.domain import EngineKind, WorkerView
from flexlb.tokenize.base import Prompt, PromptTokenizer, WhitespaceTokenizer
from flexlb.tokenize.engine import EngineTokenizer
from flexlb.tokenize.hf import HfTokenizer

HTTP_TOKENIZE = frozenset({EngineKind.VLLM, EngineKind.SGLANG})  # engines serving POST /tokenize
TOKENIZE_TIMEOUT_S = 2.0
_REFRESH_S = 1.0  # how stale the list of engines to ask may be (rebuilding it reads every worker of the view)


class TokenizeTargets:
    """The alive vLLM / SGLang workers of a view, rotated so that misses spread over them; the list is rebuilt at
    most once a second (it reads the whole view)."""

    def __init__(
        self, workers: Callable[[], Iterable[WorkerView]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._workers = workers
        self._clock = clock
        self._ids: list[str] = []
        self._at = -_REFRESH_S
        self._turn = itertools.count()

    def __call__(self) -> Sequence[str]:
        now = self._clock()
        if now - self._at >= _REFRESH_S:
            views = self._workers()
            self._ids = sorted(v.worker_id for v in views if v.spec.engine in HTTP_TOKENIZE and v.status.alive)
            self._at = now
        ids = self._ids
        if not ids:
            return ()
        start = next(self._turn) % len(ids)
        return ids[start:] + ids[:start]


class FleetTokenizer:
    """``tokenizerPath`` unset: the engines' /tokenize while the fleet has such engines, else whitespace."""

    def __init__(self, engine: EngineTokenizer, targets: TokenizeTargets) -> None:
        self._engine = engine
        self._targets = targets
        self._whitespace = WhitespaceTokenizer()

    @property
    def kind(self) -> str:
        return "engine" if self._targets() else "whitespace"

    async def tokens(self, prompt: Prompt) -> list[int]:
        if self._targets():
            return await self._engine.tokens(prompt)
        return await self._whitespace.tokens(prompt)

    async def close(self) -> None:
        await self._engine.close()


def _http_post(auth_header: Callable[[str], str | None]) -> tuple[Any, Callable[[], Any]]:
    """A POST to an engine's /tokenize on a session opened on first use (on the serving loop), and its closer."""
    session: aiohttp.ClientSession | None = None
    timeout = aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S)

    async def post(worker_id: str, body: dict[str, Any]) -> tuple[int, Any]:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(timeout=timeout)
        header = auth_header(worker_id)
        headers = {"Authorization": header} if header else None
        try:
            async with session.post(f"http://{worker_id}/tokenize", json=body, headers=headers) as resp:
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:
                    answer = None
                return resp.status, answer
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc

    async def close() -> None:
        if session is not None:
            await session.close()

    return post, close


def tokenizer_for(
    tokenizer_path: str,
    workers: Callable[[], Iterable[WorkerView]],
    auth_header: Callable[[str], str | None] = lambda _: None,
) -> PromptTokenizer:
    """The router's tokeniser (see the module docstring); TokenizerError when ``tokenizer_path`` cannot be loaded."""
    if tokenizer_path:
        return HfTokenizer.load(tokenizer_path)
    post, close = _http_post(auth_header)
    targets = TokenizeTargets(workers)
    return FleetTokenizer(EngineTokenizer(post, targets, close=close), targets)
