"""``POST /rtp_llm/update_log_level`` on ``flexlb serve --processes 2`` changes the level of both router processes
(over Redis pub/sub), and says so: each process logs a DEBUG line once its level is DEBUG, and the answer counts
both."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from conftest import eventually

from flexlb.state.keys import ServiceKeys

APPLIED = re.compile(r" DEBUG flexlb\.log_level \[(\d+)\] log level DEBUG applied in router process (\d+)")


async def test_update_log_level_reaches_every_router_process(
    real_redis: aioredis.Redis, service: str, start_router: Any
) -> None:
    router = start_router(processes=2)
    channel = ServiceKeys(service).log_level

    async def both_subscribed() -> bool:
        return dict(await real_redis.pubsub_numsub(channel)).get(channel) == 2

    await eventually(both_subscribed, "both router processes follow the log-level channel", timeout_s=20)
    assert not APPLIED.search(Path(router.log_path).read_text(errors="replace"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/rtp_llm/update_log_level", json={"log_level": "debug"}) as resp:
            body = await resp.json()
    assert resp.status == 200 and body["log_level"] == "DEBUG", body
    assert body["processes"] == 2 and body["reached"] == 2, body
    pids = {a["pid"] for a in body["applied"]}
    assert len(pids) == 2 and {a["level"] for a in body["applied"]} == {"DEBUG"}, body

    async def debug_lines_from_both() -> set[int]:
        text = Path(router.log_path).read_text(errors="replace")
        found = {int(m.group(1)) for m in APPLIED.finditer(text) if m.group(1) == m.group(2)}
        return found if found == pids else set()

    # Logged at DEBUG by each process after it applied the level: it shows only where the level really changed.
    await eventually(debug_lines_from_both, "a DEBUG line from each router process")
