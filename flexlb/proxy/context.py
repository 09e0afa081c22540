"""What the proxy handlers share, built once per router process by ``setup_proxy``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from aiohttp import web

from flexlb.proxy.auth import UpstreamAuth
from flexlb.proxy.breaker import Breakers
from flexlb.proxy.http1 import UpstreamPool
from flexlb.proxy.metrics import ProxyMetrics
from flexlb.schedule_api import RouterContext
from flexlb.settings import FlexlbConfig
from flexlb.tokenize import PromptTokenizer, WhitespaceTokenizer


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    retries: int  # schedules again after a failure before the first byte
    connect_timeout_s: float
    headers_timeout_s: float  # streamed requests
    response_timeout_s: float | None  # requests not streamed; None = no limit
    bootstrap_port: int  # disaggregated prefill / decode
    served_model_name: str  # "" = the service id, and `model` forwarded unchanged
    admission_ttft_ms: float = 0.0  # > 0: admission by estimated wait, requests queue in the router (queueing.py)
    queue_timeout_ms: int = 60_000  # how long a request may wait in the router's queue before QUEUE_TIMEOUT

    @classmethod
    def from_config(cls, config: FlexlbConfig) -> ProxyOptions:
        return cls(
            retries=config.proxy_retries,
            connect_timeout_s=config.proxy_connect_timeout_ms / 1000,
            headers_timeout_s=config.proxy_headers_timeout_ms / 1000,
            response_timeout_s=config.proxy_response_timeout_ms / 1000 or None,
            bootstrap_port=config.bootstrap_port,
            served_model_name=config.served_model_name,
            admission_ttft_ms=float(config.proxy_admission_ttft_ms),
            queue_timeout_ms=config.proxy_queue_timeout_ms,
        )


@dataclass(slots=True)
class ProxyContext:
    router: RouterContext
    options: ProxyOptions
    metrics: ProxyMetrics
    rng: random.Random  # request ids and bootstrap rooms
    created: int  # epoch seconds: the model's "created" in /v1/models
    breakers: Breakers | None = None  # per-worker circuit breakers (flexlb/proxy/breaker.py); None: none
    session: UpstreamPool | None = None  # the one client to the workers, open while the app runs
    upstream_auth: UpstreamAuth = field(default_factory=UpstreamAuth)  # the Authorization each engine gets
    tokenizer: PromptTokenizer = field(default_factory=WhitespaceTokenizer)  # prompts -> the engines' token ids

    @property
    def model_name(self) -> str:
        """The name GET /v1/models lists."""
        return self.options.served_model_name or self.router.service_id

    def new_id(self) -> int:
        """A fresh positive int64, random so that routers sharing Redis need no coordination (two live requests
        share an id with probability 2**-63)."""
        return self.rng.getrandbits(63) or 1


PROXY = web.AppKey("proxy", ProxyContext)
