"""MODEL_SERVICE_CONFIG refuses keys it does not know (with the closest known one), honours worker_status_port and
takes DNS names; the schedule API takes the original frontend's input_ids and request_priority."""

from __future__ import annotations

import json
import logging

import pytest

from flexlb.blocks import block_cache_keys
from flexlb.http.wire import BadRequest, parse_schedule_request
from flexlb.settings import ConfigError, parse_service_config


def config(document: object) -> dict[str, str]:
    return {"MODEL_SERVICE_CONFIG": json.dumps(document)}


@pytest.mark.parametrize(
    ("document", "where", "near"),
    [
        ({"prefil_endpoint": {"address": "10.0.0.1:8000"}}, "MODEL_SERVICE_CONFIG.prefil_endpoint", "prefill_endpoint"),
        ({"serviceid": "x"}, "MODEL_SERVICE_CONFIG.serviceid", "service_id"),
        ({"role_endpoint": []}, "MODEL_SERVICE_CONFIG.role_endpoint", "role_endpoints"),
        (
            {"role_endpoints": [{"group": "g", "decode_endpiont": {"address": "10.0.0.1:8000"}}]},
            "MODEL_SERVICE_CONFIG.role_endpoints[0].decode_endpiont",
            "decode_endpoint",
        ),
        (
            {"prefill_endpoint": {"adress": "10.0.0.1:8000"}},
            "MODEL_SERVICE_CONFIG.prefill_endpoint.adress",
            "address",
        ),
        (
            {"role_endpoints": [{"pd_fusion_endpoint": {"address": "a:1", "worker_status_prot": 9}}]},
            "MODEL_SERVICE_CONFIG.role_endpoints[0].pd_fusion_endpoint.worker_status_prot",
            "worker_status_port",
        ),
    ],
)
def test_an_unknown_key_is_an_error_naming_the_closest_known_one(document: object, where: str, near: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_service_config(config(document))
    assert str(info.value).startswith(f"{where}: unknown key; did you mean {near!r}?")


def test_an_unknown_key_with_nothing_close_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(known here: decode_endpoint, "):
        parse_service_config(config({"zzz": 1}))


def test_keys_of_the_original_flexlb_ignores_only_warn(caplog: pytest.LogCaptureFixture) -> None:
    document = {"kvcm": {}, "prefill_endpoint": {"address": "10.0.0.1:8000", "multi_engine_num": 2}}
    with caplog.at_level(logging.WARNING):
        service = parse_service_config(config(document))
    assert [w.worker_id for w in service.endpoints] == ["10.0.0.1:8000"]
    assert "MODEL_SERVICE_CONFIG.prefill_endpoint.multi_engine_num is an option of the original" in caplog.text
    assert "MODEL_SERVICE_CONFIG.kvcm is an option of the original" in caplog.text


def test_worker_status_port_is_the_status_grpc_port_of_every_worker_listed() -> None:
    document = {"decode_endpoint": {"address": ["10.0.0.1:8000", "10.0.0.2:8000"], "worker_status_port": 18002}}
    specs = [w.to_spec() for w in parse_service_config(config(document)).endpoints]
    assert [s.effective_grpc_port for s in specs] == [18002, 18002]
    default = parse_service_config(config({"decode_endpoint": {"address": "10.0.0.1:8000"}})).endpoints[0]
    assert default.to_spec().effective_grpc_port == 8001


@pytest.mark.parametrize(("value", "problem"), [(0, "between 1 and 65535"), ("x", "expected an integer")])
def test_a_bad_worker_status_port_names_the_field(value: object, problem: str) -> None:
    document = {"decode_endpoint": {"address": "10.0.0.1:8000", "worker_status_port": value}}
    with pytest.raises(ConfigError) as info:
        parse_service_config(config(document))
    assert str(info.value).startswith("MODEL_SERVICE_CONFIG.decode_endpoint.worker_status_port: ")
    assert problem in str(info.value)


def test_dns_names_and_worker_urls_are_addresses() -> None:
    document = {"prefill_endpoint": {"address": ["prefill-0.prefill.svc.cluster.local:8000", "http://prefill-1:8000/"]}}
    workers = parse_service_config(config(document)).endpoints
    assert [w.worker_id for w in workers] == ["prefill-0.prefill.svc.cluster.local:8000", "prefill-1:8000"]


def test_a_dns_name_without_a_port_says_a_port_is_needed() -> None:
    with pytest.raises(ConfigError, match=r"has no port .*a DNS name is fine"):
        parse_service_config(config({"prefill_endpoint": {"address": "prefill.svc"}}))


def test_input_ids_give_the_block_keys_with_the_fleets_block_size() -> None:
    ids = list(range(100))
    req = parse_schedule_request({"request_id": 1, "input_ids": ids}, block_size=lambda: 16)
    assert req.seq_len == 100 and list(req.block_cache_keys) == block_cache_keys(ids, 16)
    assert len(req.block_cache_keys) == 6
    given = parse_schedule_request({"request_id": 1, "input_ids": ids, "seq_len": 100, "block_cache_keys": [5]})
    assert given.block_cache_keys == (5,)  # the frontend's own keys win


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"request_id": 1, "input_ids": "1 2 3"}, "input_ids: expected a list of token ids"),
        ({"request_id": 1, "input_ids": [1, "2"]}, "input_ids[1]: expected a 64-bit integer token id"),
        ({"request_id": 1, "input_ids": [1, True]}, "input_ids[1]"),
        ({"request_id": 1}, "seq_len: required"),
        ({"request_id": 1, "seq_len": 3, "request_priority": "high"}, "request_priority: expected an integer"),
    ],
)
def test_bad_input_ids_and_priorities_name_the_field(body: dict[str, object], problem: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_schedule_request(body)
    assert info.value.message.startswith(problem)


def test_request_priority_is_carried() -> None:
    assert parse_schedule_request({"request_id": 1, "seq_len": 3, "request_priority": 7}).priority == 7
    assert parse_schedule_request({"request_id": 1, "seq_len": 3, "priority": 80}).priority == 80  # newest original
    both = {"request_id": 1, "seq_len": 3, "request_priority": 7, "priority": 80}
    assert parse_schedule_request(both).priority == 7
    assert parse_schedule_request({"request_id": 1, "seq_len": 3}).priority == 0
