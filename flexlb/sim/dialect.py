"""``flexlb sim-worker --engine vllm|sglang``: a simulated worker that passes for a vLLM or SGLang engine.

It serves the same HTTP API as in RTP-LLM mode (``flexlb.sim.http_api``: generation, ``/health``, ``/tokenize``,
``/get_load``, ``/get_server_info``), with that engine's metric names on ``/metrics`` (``flexlb.sim.metrics``), and
no status gRPC at all, as the real engines: flexlb must learn its load and health over HTTP.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.http_api import SIM, SimContext, create_sim_app
from flexlb.sim.kv_events import KvEventPublisher
from flexlb.sim.metrics import SIM_DIALECTS, dialect_registry

log = logging.getLogger("flexlb.sim.dialect")


def use_dialect(ctx: SimContext, dialect: str) -> None:
    """Serve ``dialect``'s metric names on this worker's ``/metrics`` (``rtp_llm``: flexlb_sim_*)."""
    ctx.registry = dialect_registry(ctx.engine, ctx.model_name, dialect)


async def run_engine_worker(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "flexlb-sim",
    *,
    dialect: str,
    load_format: str = "sglang",
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
    kv_events: KvEventPublisher | None = None,
    kv_wait_timeout_s: float = 0.0,
) -> None:
    """Serve one worker passing for ``dialect`` (vllm or sglang) on HTTP ``port`` until ``stop`` is set; ``api_key``
    and ``kv_wait_timeout_s`` as ``run_sim_worker``'s; ``kv_events``: publish the cache's KV events there (vLLM's
    ``--kv-events-config``)."""
    if dialect not in SIM_DIALECTS or dialect == "rtp_llm":
        raise ValueError(f"engine: vllm or sglang, not {dialect!r} (rtp_llm workers: run_sim_worker)")
    engine = SimEngine(config)
    app = create_sim_app(
        engine, model_name, load_format=load_format, api_key=api_key, kv_wait_timeout_s=kv_wait_timeout_s
    )
    use_dialect(app[SIM], dialect)
    if kv_events is not None:
        await kv_events.start()
        engine.publish_kv_events(kv_events)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    try:
        await runner.setup()  # starts the engine
        await web.TCPSite(runner, host, port).start()
        log.info("simulated %s worker passing for %s, %r on http://%s:%d", config.role.value, dialect, model_name,
                 host, port)  # fmt: skip
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
        if kv_events is not None:
            await kv_events.stop()
