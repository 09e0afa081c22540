"""flexlb.settings: FLEXLB_CONFIG, MODEL_SERVICE_CONFIG and the other variables, parsed from a plain dict."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from flexlb.domain import Role
from flexlb.settings import (
    CONFIG_FIELDS,
    IGNORED_KEYS,
    STRATEGIES,
    ConfigError,
    FlexlbConfig,
    ServiceConfig,
    StaticWorker,
    load_settings,
    render_config_table,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# The brief's field table, written out independently of the code so a changed default or name fails here.
EXPECTED_DEFAULTS: dict[str, object] = {
    "loadBalanceStrategy": "SHORTEST_TTFT",
    "decodeLoadBalanceStrategy": "WEIGHTED_CACHE",
    "vitLoadBalanceStrategy": "RANDOM",
    "weightedCacheDecayFactor": 0.001,
    "enableQueueing": False,
    "maxQueueSize": 1_000_000,
    "maxRetryCount": 0,
    "prefillQueueSizeThreshold": 3,
    "decodeAvailableMemoryThreshold": 90,
    "hysteresisBiasPercent": 15,
    "scheduleWorkerSize": 0,
    "resourceCheckIntervalMs": 10,
    "maxPrefillQueueSize": 20,
    "decodeFullSpeedThreshold": 40,
    "decodeStopThreshold": 80,
    "admissionMinPermits": 1,
    "admissionMaxPermits": 1024,
    "reservationTtlMs": 60_000,
    "scheduleRetries": 3,
    "defaultPrefillTokensPerMs": 10.0,
    "prefillOverheadMs": 5.0,
    "ttftTieRatio": 0.1,
    "ttftBestFraction": 0.3,
    "degradedMaxStalenessMs": 10_000,
    "workerStatusMaxAgeMs": 15_000,
    "inflightPrefixTtlMs": 10_000,
    "approxPrefixTtlMs": 600_000,
    "approxPrefixMaxBlocks": 32_768,
    "blockMirror": True,
    "redisTimeoutMs": 1000,
    "httpHost": "127.0.0.1",
    "httpPort": 7001,
    "shutdownTimeoutMs": 30_000,
    "httpHeaderTimeoutMs": 10_000,
    "httpBodyTimeoutMs": 15_000,
    "httpFastPath": True,
    "gcYoungThreshold": 10_000,
    "httpIdleTimeoutMs": 30_000,
    "maxBlockCacheKeys": 65_536,
    "contendForMaster": True,
    "masterLockTtlMs": 3000,
    "masterRenewIntervalMs": 1000,
    "workerDownAfterFailedPolls": 2,
    "statusIdleIntervalMs": 60,
    "statusColdAfterMs": 10_000,
    "statusColdIntervalMs": 500,
    "pollShards": 1,
    "cacheSyncMinIntervalMs": 50,
    "cacheSyncMaxIntervalMs": 3000,
    "engineMetricsIntervalMs": 200,
    "healthCheckIntervalMs": 500,
    "healthCheckTimeoutMs": 1000,
    "healthFailureThreshold": 3,
    "healthSuccessThreshold": 2,
    "breakerFailureThreshold": 3,
    "breakerCooldownMs": 5000,
    "tokenizerPath": "",
    "servedModelName": "",
    "proxyAdmissionTtftMs": 5_000,
    "proxyQueueTimeoutMs": 60_000,
    "proxyRetries": 2,
    "proxyConnectTimeoutMs": 2000,
    "proxyHeadersTimeoutMs": 30_000,
    "proxyResponseTimeoutMs": 600_000,
    "bootstrapPort": 8998,
    "enableGrpcPrefillMaster": False,
    "grpcHost": "127.0.0.1",
    "grpcPort": 7051,
    "maxReservationsPerToken": 0,
}


def flexlb(**config: object) -> dict[str, str]:
    """An environment whose FLEXLB_CONFIG holds ``config``."""
    return {"FLEXLB_CONFIG": json.dumps(config)}


def service(document: object) -> dict[str, str]:
    return {"MODEL_SERVICE_CONFIG": json.dumps(document)}


def error_of(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    return str(info.value)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "flexlb.settings"]


# ----------------------------------------------------------------------------------------------------- defaults


def test_defaults_without_any_variable() -> None:
    settings = load_settings({})
    cfg = settings.flexlb
    assert {f.key: getattr(cfg, f.attr) for f in CONFIG_FIELDS} == EXPECTED_DEFAULTS
    assert cfg.load_balance_strategy == "SHORTEST_TTFT"
    assert cfg.reservation_ttl_ms == 60_000
    assert cfg.enable_grpc_prefill_master is False
    assert settings.service == ServiceConfig(service_id="default", endpoints=())
    assert settings.service.roles == ()
    assert settings.redis_url is None
    assert settings.sync_status_interval_ms == 20
    assert settings.sync_request_timeout_ms == 100
    assert settings.task_timeout_ms == 3000
    assert settings.worker_timeout_ms == 3000


def test_field_names_follow_the_naming_rules() -> None:
    assert [f.key for f in CONFIG_FIELDS] == list(EXPECTED_DEFAULTS)
    by_key = {f.key: f for f in CONFIG_FIELDS}
    assert by_key["loadBalanceStrategy"].attr == "load_balance_strategy"
    assert by_key["loadBalanceStrategy"].env == "LOAD_BALANCE_STRATEGY"
    assert by_key["enableQueueing"].env == "ENABLE_QUEUEING"
    assert by_key["reservationTtlMs"].attr == "reservation_ttl_ms"
    assert by_key["ttftBestFraction"].type is float
    assert by_key["maxQueueSize"].type is int


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.flexlb.max_queue_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.redis_url = "redis://x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (Role.PREFILL, "LOWEST_CONCURRENCY"),
        (Role.PDFUSION, "LOWEST_CONCURRENCY"),
        (Role.DECODE, "LEAST_KV_USED"),
        (Role.VIT, "ROUND_ROBIN"),
    ],
)
def test_strategy_for_role(role: Role, expected: str) -> None:
    cfg = FlexlbConfig(
        load_balance_strategy="LOWEST_CONCURRENCY",
        decode_load_balance_strategy="LEAST_KV_USED",
        vit_load_balance_strategy="ROUND_ROBIN",
    )
    assert cfg.strategy_for(role) == expected


def test_direct_construction_rejects_a_non_canonical_strategy() -> None:
    with pytest.raises(ConfigError, match="load_balance_strategy"):
        FlexlbConfig(load_balance_strategy="ROUND_ROBIN_LOWEST_CONCURRENCY")


# ---------------------------------------------------------------------------------------- parsing FLEXLB_CONFIG


def test_json_values_are_parsed() -> None:
    cfg = load_settings(
        flexlb(
            loadBalanceStrategy="RANDOM",
            decodeLoadBalanceStrategy="LEAST_KV_USED",
            enableQueueing=True,
            maxQueueSize=500,
            weightedCacheDecayFactor=0.01,
            httpHost="127.0.0.1",
            httpPort=0,
            reservationTtlMs=1234,
        )
    ).flexlb
    assert cfg.load_balance_strategy == "RANDOM"
    assert cfg.decode_load_balance_strategy == "LEAST_KV_USED"
    assert cfg.enable_queueing is True
    assert cfg.max_queue_size == 500
    assert cfg.weighted_cache_decay_factor == 0.01
    assert cfg.http_host == "127.0.0.1"
    assert cfg.http_port == 0
    assert cfg.reservation_ttl_ms == 1234
    assert cfg.max_retry_count == 0  # untouched fields keep their defaults


def test_json_number_leniency() -> None:
    # An int for a float field, an integral float for an int field, and (as the original's Jackson) a scalar string.
    raw = '{"prefillOverheadMs": 7, "maxQueueSize": 1e3, "maxRetryCount": "4", "enableQueueing": "yes"}'
    cfg = load_settings({"FLEXLB_CONFIG": raw}).flexlb
    assert cfg.prefill_overhead_ms == 7.0
    assert isinstance(cfg.prefill_overhead_ms, float)
    assert cfg.max_queue_size == 1000
    assert isinstance(cfg.max_queue_size, int)
    assert cfg.max_retry_count == 4
    assert cfg.enable_queueing is True


@pytest.mark.parametrize(
    ("env", "json_value", "text", "attr", "expected"),
    [
        ("MAX_QUEUE_SIZE", 5, "77", "max_queue_size", 77),
        ("ENABLE_QUEUEING", False, "true", "enable_queueing", True),
        ("LOAD_BALANCE_STRATEGY", "RANDOM", "ROUND_ROBIN", "load_balance_strategy", "ROUND_ROBIN"),
        ("TTFT_TIE_RATIO", 0.5, "0.25", "ttft_tie_ratio", 0.25),
        ("HTTP_HOST", "10.0.0.1", "127.0.0.1", "http_host", "127.0.0.1"),
    ],
)
def test_environment_beats_json(env: str, json_value: object, text: str, attr: str, expected: object) -> None:
    key = next(f.key for f in CONFIG_FIELDS if f.env == env)
    assert getattr(load_settings({**flexlb(**{key: json_value}), env: text}).flexlb, attr) == expected
    # And the JSON value is used when the variable is absent.
    assert getattr(load_settings(flexlb(**{key: json_value})).flexlb, attr) == json_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
        (" true ", True),
    ],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    opposite = not expected
    environ = {**flexlb(enableQueueing=opposite), "ENABLE_QUEUEING": text}
    assert load_settings(environ).flexlb.enable_queueing is expected


@pytest.mark.parametrize(
    ("env", "text", "attr", "expected"),
    [
        ("MAX_QUEUE_SIZE", " 42 ", "max_queue_size", 42),
        ("MAX_RETRY_COUNT", "+3", "max_retry_count", 3),
        ("WEIGHTED_CACHE_DECAY_FACTOR", "0.25", "weighted_cache_decay_factor", 0.25),
        ("WEIGHTED_CACHE_DECAY_FACTOR", "1e-3", "weighted_cache_decay_factor", 0.001),
        ("DEFAULT_PREFILL_TOKENS_PER_MS", "12", "default_prefill_tokens_per_ms", 12.0),
        ("HTTP_HOST", " ::1 ", "http_host", "::1"),
        ("DECODE_LOAD_BALANCE_STRATEGY", "random", "decode_load_balance_strategy", "RANDOM"),
    ],
)
def test_environment_coercion(env: str, text: str, attr: str, expected: object) -> None:
    value = getattr(load_settings({env: text}).flexlb, attr)
    assert value == expected
    assert type(value) is type(expected)


def test_blank_environment_variable_counts_as_unset() -> None:
    cfg = load_settings({**flexlb(maxQueueSize=9), "MAX_QUEUE_SIZE": "  ", "HTTP_HOST": ""}).flexlb
    assert cfg.max_queue_size == 9
    assert cfg.http_host == "127.0.0.1"


def test_empty_flexlb_config_is_defaults() -> None:
    assert load_settings({"FLEXLB_CONFIG": "  "}).flexlb == FlexlbConfig()
    assert load_settings({"FLEXLB_CONFIG": "{}"}).flexlb == FlexlbConfig()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"FLEXLB_CONFIG": '{"maxQueueSize": "abc"}'}, 'FLEXLB_CONFIG.maxQueueSize: expected an integer, got "abc"'),
        ({"MAX_QUEUE_SIZE": "abc"}, 'MAX_QUEUE_SIZE (environment): expected an integer, got "abc"'),
        ({"MAX_QUEUE_SIZE": "1.5"}, 'MAX_QUEUE_SIZE (environment): expected an integer, got "1.5"'),
        ({"FLEXLB_CONFIG": '{"maxQueueSize": true}'}, "FLEXLB_CONFIG.maxQueueSize: expected an integer, got true"),
        ({"FLEXLB_CONFIG": '{"maxRetryCount": 1.5}'}, "FLEXLB_CONFIG.maxRetryCount: expected an integer, got 1.5"),
        ({"FLEXLB_CONFIG": '{"httpPort": null}'}, "FLEXLB_CONFIG.httpPort: expected an integer, got null"),
        (
            {"FLEXLB_CONFIG": '{"ttftTieRatio": false}'},
            "FLEXLB_CONFIG.ttftTieRatio: expected a number, got false",
        ),
        (
            {"TTFT_TIE_RATIO": "nan"},
            'TTFT_TIE_RATIO (environment): expected a number, got "nan"',
        ),
        (
            {"ENABLE_QUEUEING": "maybe"},
            'ENABLE_QUEUEING (environment): expected a boolean (true/false/1/0/yes/no), got "maybe"',
        ),
        (
            {"FLEXLB_CONFIG": '{"enableQueueing": 1}'},
            "FLEXLB_CONFIG.enableQueueing: expected a boolean (true/false/1/0/yes/no), got 1",
        ),
        ({"FLEXLB_CONFIG": '{"httpHost": 5}'}, "FLEXLB_CONFIG.httpHost: expected a string, got 5"),
        ({"FLEXLB_CONFIG": '{"httpHost": " "}'}, "FLEXLB_CONFIG.httpHost: must not be empty"),
        (
            {"FLEXLB_CONFIG": '{"loadBalanceStrategy": ["RANDOM"]}'},
            'FLEXLB_CONFIG.loadBalanceStrategy: expected a string, got ["RANDOM"]',
        ),
    ],
)
def test_type_errors_name_field_and_source(environ: dict[str, str], message: str) -> None:
    assert error_of(environ) == message


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MAX_QUEUE_SIZE": "-5"}, "MAX_QUEUE_SIZE (environment): must not be negative, got -5"),
        (flexlb(maxRetryCount=-1), "FLEXLB_CONFIG.maxRetryCount: must not be negative, got -1"),
        (flexlb(reservationTtlMs=-1), "FLEXLB_CONFIG.reservationTtlMs: must be at least 1, got -1"),
        (flexlb(resourceCheckIntervalMs=0), "FLEXLB_CONFIG.resourceCheckIntervalMs: must be at least 1, got 0"),
        (flexlb(degradedMaxStalenessMs=-10), "FLEXLB_CONFIG.degradedMaxStalenessMs: must not be negative, got -10"),
        ({"REDIS_TIMEOUT_MS": "0"}, "REDIS_TIMEOUT_MS (environment): must be at least 1, got 0"),
        (flexlb(prefillOverheadMs=-0.5), "FLEXLB_CONFIG.prefillOverheadMs: must not be negative, got -0.5"),
        (
            flexlb(defaultPrefillTokensPerMs=0),
            "FLEXLB_CONFIG.defaultPrefillTokensPerMs: must be greater than 0, got 0",
        ),
        (flexlb(ttftBestFraction=0), "FLEXLB_CONFIG.ttftBestFraction: must be greater than 0, got 0"),
        (flexlb(ttftBestFraction=1.5), "FLEXLB_CONFIG.ttftBestFraction: must be at most 1, got 1.5"),
        (
            flexlb(decodeAvailableMemoryThreshold=101),
            "FLEXLB_CONFIG.decodeAvailableMemoryThreshold: must be between 0 and 100, got 101",
        ),
        ({"HTTP_PORT": "70000"}, "HTTP_PORT (environment): must be between 0 and 65535, got 70000"),
        (
            flexlb(decodeFullSpeedThreshold=80),
            "FLEXLB_CONFIG.decodeFullSpeedThreshold: decodeFullSpeedThreshold (80) must be below"
            " decodeStopThreshold (80)",
        ),
    ],
)
def test_range_errors_name_field_and_source(environ: dict[str, str], message: str) -> None:
    assert error_of(environ) == message


def test_malformed_json_names_variable_and_position() -> None:
    message = error_of({"FLEXLB_CONFIG": '{"maxQueueSize": 1,,}'})
    assert message.startswith("FLEXLB_CONFIG: invalid JSON: ")
    assert "line 1, column 20 (char 19)" in message


def test_flexlb_config_must_be_an_object() -> None:
    assert error_of({"FLEXLB_CONFIG": "[1, 2]"}) == "FLEXLB_CONFIG: expected a JSON object, got [1, 2]"


def test_unknown_strategy_lists_valid_names() -> None:
    message = error_of(flexlb(decodeLoadBalanceStrategy="FASTEST"))
    assert message.startswith('FLEXLB_CONFIG.decodeLoadBalanceStrategy: unknown strategy "FASTEST"; expected one of')
    for name in STRATEGIES:
        assert name in message
    env_message = error_of({"VIT_LOAD_BALANCE_STRATEGY": "WEIGHTED"})
    assert env_message.startswith('VIT_LOAD_BALANCE_STRATEGY (environment): unknown strategy "WEIGHTED"')


# ---------------------------------------------------------------------------------------- compatibility warnings


@pytest.mark.parametrize(
    ("old", "expected"),
    [
        ("ROUND_ROBIN_LOWEST_CONCURRENCY", "LOWEST_CONCURRENCY"),
        ("round_robin_lowest_concurrency", "LOWEST_CONCURRENCY"),
        ("LOWEST_CACHE_USED", "LEAST_KV_USED"),
        ("LowestCacheUsed", "LEAST_KV_USED"),
        ("COST_BASED_DECODE", "WEIGHTED_CACHE"),
        ("COST_BASED_PREFILL", "SHORTEST_TTFT"),
        ("CACHE_AFFINITY_FIRST", "SHORTEST_TTFT"),
        ("FORCE_CHAT_STICKY", "SHORTEST_TTFT"),
    ],
)
def test_legacy_strategy_names_warn_and_map(caplog: pytest.LogCaptureFixture, old: str, expected: str) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings(flexlb(loadBalanceStrategy=old)).flexlb
    assert cfg.load_balance_strategy == expected
    (warning,) = warnings_of(caplog)
    assert warning.startswith("FLEXLB_CONFIG.loadBalanceStrategy: strategy ")
    assert f"flexlb uses {expected} instead" in warning


def test_legacy_strategy_from_environment_warns_with_its_source(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings({"DECODE_LOAD_BALANCE_STRATEGY": "LOWEST_CACHE_USED"}).flexlb
    assert cfg.decode_load_balance_strategy == "LEAST_KV_USED"
    (warning,) = warnings_of(caplog)
    assert warning.startswith("DECODE_LOAD_BALANCE_STRATEGY (environment): strategy LOWEST_CACHE_USED")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SHORTEST_TTFT", "SHORTEST_TTFT"),
        ("ShortestTTFT", "SHORTEST_TTFT"),
        ("ShortestTtft", "SHORTEST_TTFT"),
        ("RoundRobin", "ROUND_ROBIN"),
        ("weighted-cache", "WEIGHTED_CACHE"),
        ("least_kv_used", "LEAST_KV_USED"),
    ],
)
def test_canonical_names_in_other_spellings_are_silent(
    caplog: pytest.LogCaptureFixture, name: str, expected: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        assert load_settings(flexlb(vitLoadBalanceStrategy=name)).flexlb.vit_load_balance_strategy == expected
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("key", list(IGNORED_KEYS))
def test_ignored_legacy_keys_warn(caplog: pytest.LogCaptureFixture, key: str) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings(flexlb(**{key: 500, "maxQueueSize": 8})).flexlb
    assert cfg == FlexlbConfig(max_queue_size=8)
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"FLEXLB_CONFIG.{key} is an option of the original FlexLB that flexlb ignores")


def test_original_example_config_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    # The FLEXLB_CONFIG of the original's README, verbatim.
    original = (
        '{"deploy":"DISAGGREGATED", "loadBalanceStrategy":"ROUND_ROBIN_LOWEST_CONCURRENCY",'
        ' "prefillBatchWaitTimeMs":100, "kvCache":"LOCAL_STATIC", "staticCacheBlockSize":500, "batchSize":1,'
        ' "prefillLbTimeoutMs":300, "prefillGenerateTimeoutMs": 5000, "enableGrpcPrefillMaster": false}'
    )
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings({"FLEXLB_CONFIG": original}).flexlb
    assert cfg.load_balance_strategy == "LOWEST_CONCURRENCY"
    assert cfg.enable_grpc_prefill_master is False
    assert len(warnings_of(caplog)) == 8  # 7 ignored keys, 1 strategy name


@pytest.mark.parametrize(
    "environ", [flexlb(enableGrpcPrefillMaster=True), {"ENABLE_GRPC_PREFILL_MASTER": "yes"}], ids=["json", "env"]
)
def test_enable_grpc_prefill_master_turns_on_the_grpc_api_without_a_warning(
    caplog: pytest.LogCaptureFixture, environ: dict[str, str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings(environ).flexlb
    assert cfg.enable_grpc_prefill_master is True
    assert (cfg.grpc_host, cfg.grpc_port) == ("127.0.0.1", 7051)
    assert warnings_of(caplog) == []


def test_grpc_port_is_a_port_and_0_means_any() -> None:
    assert load_settings(flexlb(grpcPort=0)).flexlb.grpc_port == 0
    assert load_settings({"GRPC_PORT": "9100"}).flexlb.grpc_port == 9100
    assert error_of(flexlb(grpcPort=70000)) == "FLEXLB_CONFIG.grpcPort: must be between 0 and 65535, got 70000"
    assert error_of(flexlb(grpcHost=" ")) == "FLEXLB_CONFIG.grpcHost: must not be empty"


def test_unknown_key_warns_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings(flexlb(decodeConcurrencyLimit=32, max_queue_size=3)).flexlb
    assert cfg == FlexlbConfig()
    assert warnings_of(caplog) == [
        "FLEXLB_CONFIG.decodeConcurrencyLimit: unknown key ignored",
        "FLEXLB_CONFIG.max_queue_size: unknown key ignored; did you mean maxQueueSize?",
    ]


def test_whale_master_config_is_read_when_flexlb_config_is_unset(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flexlb.settings"):
        cfg = load_settings({"WHALE_MASTER_CONFIG": '{"maxQueueSize": 11}'}).flexlb
    assert cfg.max_queue_size == 11
    assert any("WHALE_MASTER_CONFIG" in w for w in warnings_of(caplog))
    assert error_of({"WHALE_MASTER_CONFIG": '{"maxQueueSize": "x"}'}).startswith("WHALE_MASTER_CONFIG.maxQueueSize:")
    both = {"FLEXLB_CONFIG": '{"maxQueueSize": 12}', "WHALE_MASTER_CONFIG": '{"maxQueueSize": 11}'}
    assert load_settings(both).flexlb.max_queue_size == 12


# ----------------------------------------------------------------------------------------- MODEL_SERVICE_CONFIG


def test_form_a_role_endpoints() -> None:
    document = {
        "service_id": "model.service",
        "role_endpoints": [
            {
                "group": "g1",
                "prefill_endpoint": {
                    "address": '["127.0.0.1:8080", "127.0.0.1:8090"]',
                    "protocol": "http",
                    "path": "/",
                    "type": "SpecifiedIpPortList",
                },
                "decode_endpoint": {"address": ["127.0.0.2:8080"], "type": "SpecifiedIpPortList"},
            },
            {
                "group": "g2",
                "pd_fusion_endpoint": {"address": "10.0.0.5:9000", "protocol": "http", "path": "/"},
                "vit_endpoint": {"address": "10.0.0.6:9000, 10.0.0.7:9001", "type": "SpecifiedIpPort"},
            },
        ],
    }
    cfg = load_settings(service(document)).service
    assert cfg.service_id == "model.service"
    assert cfg.endpoints == (
        StaticWorker("127.0.0.1", 8080, Role.PREFILL, "g1"),
        StaticWorker("127.0.0.1", 8090, Role.PREFILL, "g1"),
        StaticWorker("127.0.0.2", 8080, Role.DECODE, "g1"),
        StaticWorker("10.0.0.6", 9000, Role.VIT, "g2"),
        StaticWorker("10.0.0.7", 9001, Role.VIT, "g2"),
        StaticWorker("10.0.0.5", 9000, Role.PDFUSION, "g2"),
    )
    assert cfg.roles == (Role.PREFILL, Role.DECODE, Role.PDFUSION, Role.VIT)
    assert cfg.endpoints[0].worker_id == "127.0.0.1:8080"
    spec = cfg.endpoints[2].to_spec()
    assert (spec.worker_id, spec.role, spec.group) == ("127.0.0.2:8080", Role.DECODE, "g1")


def test_form_b_original_example_with_string_in_string_address() -> None:
    # MODEL_SERVICE_CONFIG of the original's README, verbatim: a JSON array inside a JSON string.
    raw = (
        '{"prefill_endpoint": {"path": "/", "protocol": "http", "type": "SpecifiedIpPortList",'
        ' "address": "[\\"127.0.0.1:8080\\", \\"127.0.0.1:8090\\"]"}, "service_id": "model.service"}'
    )
    cfg = load_settings({"MODEL_SERVICE_CONFIG": raw}).service
    assert cfg == ServiceConfig(
        service_id="model.service",
        endpoints=(
            StaticWorker("127.0.0.1", 8080, Role.PREFILL, ""),
            StaticWorker("127.0.0.1", 8090, Role.PREFILL, ""),
        ),
    )
    assert cfg.roles == (Role.PREFILL,)


def test_form_b_all_roles_and_hostnames_and_ipv6() -> None:
    document = {
        "prefill_endpoint": {"address": '["localhost:8080"]', "type": "SpecifiedIpPortList"},
        "decode_endpoint": {"address": "[::1]:8080"},
        "vit_endpoint": None,
    }
    cfg = load_settings(service(document)).service
    assert cfg.service_id == "default"
    assert cfg.endpoints == (StaticWorker("localhost", 8080, Role.PREFILL), StaticWorker("::1", 8080, Role.DECODE))
    assert cfg.roles == (Role.PREFILL, Role.DECODE)


def test_flexlb_service_id_overrides() -> None:
    environ = {**service({"service_id": "from_json"}), "FLEXLB_SERVICE_ID": "from-env"}
    assert load_settings(environ).service.service_id == "from-env"
    assert load_settings({"FLEXLB_SERVICE_ID": "only.env"}).service.service_id == "only.env"


@pytest.mark.parametrize("good", ["a", "model.service", "Model_1-2.x", "x" * 64])
def test_valid_service_ids(good: str) -> None:
    assert load_settings(service({"service_id": good})).service.service_id == good


@pytest.mark.parametrize("bad", ["", "has space", "a{b}", "a:b", "x" * 65, "añb", 5])
def test_invalid_service_id_in_json(bad: object) -> None:
    message = error_of(service({"service_id": bad}))
    assert message.startswith(f"MODEL_SERVICE_CONFIG.service_id: {json.dumps(bad, ensure_ascii=False)} is not a valid")
    assert "Redis" in message


def test_invalid_service_id_in_environment() -> None:
    message = error_of({"FLEXLB_SERVICE_ID": "a/b"})
    assert message.startswith('FLEXLB_SERVICE_ID (environment): "a/b" is not a valid service id')


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", '"127.0.0.1" has no port'),
        ('["127.0.0.1"]', '"127.0.0.1" has no port'),
        (["127.0.0.1:8080", "127.0.0.2"], '"127.0.0.2" has no port'),
        ("127.0.0.1:abc", 'port "abc" of "127.0.0.1:abc" is not an integer'),
        ("127.0.0.1:", 'port "" of "127.0.0.1:" is not an integer'),
        ("127.0.0.1:-1", 'port "-1" of "127.0.0.1:-1" is not an integer'),
        ("127.0.0.1:0", 'port 0 of "127.0.0.1:0" is out of range (1-65535)'),
        ('["127.0.0.1:70000"]', 'port 70000 of "127.0.0.1:70000" is out of range (1-65535)'),
        (":8080", '":8080" has no valid host'),
        ("https://127.0.0.1:8080", '"https://127.0.0.1:8080" has no valid host'),
        ("::1:8080", '"::1:8080": write an IPv6 address as "[address]:port"'),
        ("[]", "no addresses listed"),
        ('["127.0.0.1:8080"', 'expected "ip:port"'),
        ('["127.0.0.1:8080",]', "not a JSON array of addresses"),
        ("[1, 2]", 'expected "ip:port", a list of them or a JSON array in a string, got "[1, 2]"'),
        (8080, 'expected "ip:port", a list of them or a JSON array in a string, got 8080'),
    ],
)
def test_bad_addresses_name_the_field(address: object, problem: str) -> None:
    document = {"role_endpoints": [{"group": "g", "prefill_endpoint": {"address": address}}]}
    message = error_of(service(document))
    assert message.startswith("MODEL_SERVICE_CONFIG.role_endpoints[0].prefill_endpoint.address: ")
    assert problem in message


def test_bad_address_in_form_b_names_the_field() -> None:
    message = error_of(service({"decode_endpoint": {"address": "10.0.0.1:99999", "type": "SpecifiedIpPortList"}}))
    assert message == (
        'MODEL_SERVICE_CONFIG.decode_endpoint.address: port 99999 of "10.0.0.1:99999" is out of range (1-65535)'
    )


def test_missing_address() -> None:
    message = error_of(service({"role_endpoints": [{"decode_endpoint": {"type": "SpecifiedIpPortList"}}]}))
    assert message == "MODEL_SERVICE_CONFIG.role_endpoints[0].decode_endpoint.address: missing"


@pytest.mark.parametrize("kind", ["VipServer", "domain", "ServiceDiscovery", 3])
def test_unsupported_endpoint_type(kind: object) -> None:
    document = {"role_endpoints": [{}, {"decode_endpoint": {"address": "a.b.c", "type": kind}}]}
    message = error_of(service(document))
    assert message.startswith(
        f"MODEL_SERVICE_CONFIG.role_endpoints[1].decode_endpoint.type: endpoint type {json.dumps(kind)} is not"
        " supported"
    )
    assert "flexlb worker add" in message


def test_a_worker_can_be_listed_once() -> None:
    document = {
        "prefill_endpoint": {"address": "10.0.0.1:80"},
        "role_endpoints": [{"group": "g", "decode_endpoint": {"address": ["10.0.0.2:80", "10.0.0.1:80"]}}],
    }
    message = error_of(service(document))
    assert message.startswith(
        "MODEL_SERVICE_CONFIG.role_endpoints[0].decode_endpoint.address: 10.0.0.1:80 is already listed in"
        " prefill_endpoint"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1]", "MODEL_SERVICE_CONFIG: expected a JSON object, got [1]"),
        ('{"role_endpoints": {}}', "MODEL_SERVICE_CONFIG.role_endpoints: expected a list, got {}"),
        ('{"role_endpoints": ["x"]}', 'MODEL_SERVICE_CONFIG.role_endpoints[0]: expected an object, got "x"'),
        (
            '{"role_endpoints": [{"group": 1}]}',
            "MODEL_SERVICE_CONFIG.role_endpoints[0].group: expected a string, got 1",
        ),
        (
            '{"vit_endpoint": "10.0.0.1:80"}',
            "MODEL_SERVICE_CONFIG.vit_endpoint: expected an object with address, protocol, path and type, got"
            ' "10.0.0.1:80"',
        ),
    ],
)
def test_service_config_shape_errors(raw: str, message: str) -> None:
    assert error_of({"MODEL_SERVICE_CONFIG": raw}) == message


def test_malformed_service_config_json() -> None:
    message = error_of({"MODEL_SERVICE_CONFIG": '{"service_id": }'})
    assert message.startswith("MODEL_SERVICE_CONFIG: invalid JSON: ")
    assert "line 1, column 16 (char 15)" in message


# ---------------------------------------------------------------------------------------------- other variables


def test_other_variables() -> None:
    settings = load_settings(
        {
            "REDIS_URL": "redis://:secret@redis:6379/2",
            "SYNC_STATUS_INTERVAL": "50",
            "SYNC_REQUEST_TIMEOUT_MS": "250",
            "TASK_TIMEOUT_US": "2500500",
            "WORKER_TIMEOUT_US": "500",
        }
    )
    assert settings.redis_url == "redis://:secret@redis:6379/2"
    assert settings.sync_status_interval_ms == 50
    assert settings.sync_request_timeout_ms == 250
    assert settings.task_timeout_ms == 2501  # rounded up
    assert settings.worker_timeout_ms == 1  # never 0


@pytest.mark.parametrize("url", ["rediss://host:6380", "unix:///tmp/redis.sock"])
def test_redis_url_schemes(url: str) -> None:
    assert load_settings({"REDIS_URL": url}).redis_url == url


def test_bad_redis_url_does_not_echo_the_password() -> None:
    message = error_of({"REDIS_URL": "http://:hunter2@host"})
    assert message.startswith("REDIS_URL (environment): expected one of redis://, rediss://, unix://, redis+cluster://")
    assert message.endswith("got http")
    assert "hunter2" not in error_of({"REDIS_URL": "hunter2@host:6379"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SYNC_STATUS_INTERVAL": "fast"}, 'SYNC_STATUS_INTERVAL (environment): expected an integer, got "fast"'),
        ({"SYNC_REQUEST_TIMEOUT_MS": "0"}, "SYNC_REQUEST_TIMEOUT_MS (environment): must be at least 1, got 0"),
        ({"TASK_TIMEOUT_US": "-1"}, "TASK_TIMEOUT_US (environment): must be at least 1, got -1"),
        ({"WORKER_TIMEOUT_US": "3e6"}, 'WORKER_TIMEOUT_US (environment): expected an integer, got "3e6"'),
    ],
)
def test_other_variable_errors(environ: dict[str, str], message: str) -> None:
    assert error_of(environ) == message


def test_reads_os_environ_only_without_a_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("FLEXLB_SERVICE_ID", "from_os")
    monkeypatch.delenv("FLEXLB_CONFIG", raising=False)
    monkeypatch.delenv("WHALE_MASTER_CONFIG", raising=False)
    monkeypatch.delenv("MODEL_SERVICE_CONFIG", raising=False)
    from_os = load_settings()
    assert from_os.flexlb.max_queue_size == 7
    assert from_os.service.service_id == "from_os"
    given = load_settings({})
    assert given.flexlb.max_queue_size == 1_000_000
    assert given.service.service_id == "default"


# -------------------------------------------------------------------------------------------------------- docs


def test_docs_contain_the_generated_table() -> None:
    table = render_config_table()
    for f in CONFIG_FIELDS:
        assert f"`{f.key}` | `{f.env}`" in table
    assert "`TASK_TIMEOUT_US`" in table
    assert table in DOCS.read_text(encoding="utf-8"), (
        "docs/configuration.md is stale: paste `python -m flexlb.settings`"
    )


def test_master_renew_must_fit_twice_in_the_lock_ttl() -> None:
    message = error_of(flexlb(masterLockTtlMs=1000, masterRenewIntervalMs=500))
    assert "masterRenewIntervalMs (500)" in message and "masterLockTtlMs (1000)" in message


def test_cache_sync_bounds_must_be_ordered() -> None:
    message = error_of(flexlb(cacheSyncMinIntervalMs=5000))
    assert "cacheSyncMinIntervalMs (5000)" in message
