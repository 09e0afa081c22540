"""MODEL_SERVICE_CONFIG's per-endpoint ``engine``: parsed in settings, carried on the worker spec through Redis."""

from __future__ import annotations

import json

import fakeredis
import pytest

from flexlb.domain import EngineKind, Role, WorkerSpec
from flexlb.settings import ConfigError, load_settings
from flexlb.state.store import FleetStore


def service(document: object) -> dict[str, str]:
    return {"MODEL_SERVICE_CONFIG": json.dumps(document)}


def test_each_endpoint_names_its_engine_and_rtp_llm_is_the_default() -> None:
    settings = load_settings(
        service(
            {
                "role_endpoints": [
                    {
                        "group": "g",
                        "prefill_endpoint": {"address": ["10.0.0.1:8000"], "engine": "vllm"},
                        "decode_endpoint": {"address": ["10.0.0.2:8000"], "engine": "SGLang"},
                    }
                ],
                "vit_endpoint": {"address": "10.0.0.3:8000"},
            }
        )
    )
    engines = {w.worker_id: w.to_spec().engine for w in settings.service.endpoints}
    assert engines == {
        "10.0.0.1:8000": EngineKind.VLLM,
        "10.0.0.2:8000": EngineKind.SGLANG,
        "10.0.0.3:8000": EngineKind.RTP_LLM,
    }


@pytest.mark.parametrize("bad", ["trtllm", 3, None, ""])
def test_an_unknown_engine_is_an_error_naming_the_field_and_the_kinds(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(service({"pd_fusion_endpoint": {"address": "10.0.0.1:8000", "engine": bad}}))
    message = str(info.value)
    assert "MODEL_SERVICE_CONFIG.pd_fusion_endpoint.engine" in message and '"vllm"' in message


async def test_the_engine_survives_the_round_trip_through_redis() -> None:
    redis = fakeredis.FakeAsyncRedis(decode_responses=True, version=(7, 0))
    store = FleetStore(redis, "engines")
    try:
        await store.register_worker(WorkerSpec("10.0.0.1", 8000, Role.PDFUSION, engine=EngineKind.SGLANG))
        await store.register_worker(WorkerSpec("10.0.0.2", 8000, Role.PDFUSION))
        # a hash written before engines existed has no engine field: RTP-LLM, as it was
        await store.register_worker(WorkerSpec("10.0.0.3", 8000, Role.PDFUSION))
        await redis.hdel(store.keys.worker("10.0.0.3:8000"), "engine")
        engines = {v.worker_id: v.spec.engine for v in await store.list_workers()}
        assert engines == {
            "10.0.0.1:8000": EngineKind.SGLANG,
            "10.0.0.2:8000": EngineKind.RTP_LLM,
            "10.0.0.3:8000": EngineKind.RTP_LLM,
        }
    finally:
        await redis.aclose()
