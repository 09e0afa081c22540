"""Parsing of the operator flags, ports, log levels and formats (flexlb/cli_options.py, flexlb/logs.py, cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import re

import pytest

from flexlb.cli import build_parser, main
from flexlb.cli_options import FlagError, flag_environment, port, worker_address
from flexlb.logs import JsonFormatter, TextFormatter, parse_level
from flexlb.settings import ConfigError, load_settings


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize(
    "argv", [["serve", "--port", "105537"], ["serve", "--port", "-1"], ["master", "--port", "65536"]]
)
def test_ports_out_of_range_are_refused_not_wrapped(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # parsing only: a port let through would start a router here
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "out of range 0-65535" in capsys.readouterr().err


def test_sim_worker_ports_are_checked_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sim-worker", "--role", "prefill", "--port", "70000"])
    assert "port 70000 is out of range 0-65535" in capsys.readouterr().err


def test_port_type() -> None:
    assert port("0") == 0 and port("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match="expected a port number"):
        port("http")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and re.fullmatch(r"flexlb \S+\n", capsys.readouterr().out)


def test_log_level_before_or_after_the_sub_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--log-level", "debug", "blocks", "x"]).log_level == "DEBUG"
    assert parser.parse_args(["blocks", "x", "--log-level", "warning"]).log_level == "WARNING"
    after = parser.parse_args(["--log-level", "debug", "serve", "--log-level", "error", "--log-format", "json"])
    assert after.log_level == "ERROR" and after.log_format == "json"
    assert parser.parse_args(["blocks", "x"]).log_level is None  # main() makes that INFO


def test_an_unknown_log_level_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["blocks", "x", "--log-level", "verbose"])
    assert exited.value.code == 2
    assert (
        "unknown log level 'verbose'; expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in capsys.readouterr().err
    )
    with pytest.raises(ValueError):
        parse_level("INFOO")


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("flexlb.proxy", logging.WARNING, __file__, 1, "request %s failed", (7,), None)
    rec.__dict__.update(extra)
    return rec


ISO_WITH_OFFSET = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def test_text_lines_carry_the_time_zone() -> None:
    line = TextFormatter().format(record())
    assert re.match(ISO_WITH_OFFSET + r" WARNING flexlb.proxy \[\d+\] request 7 failed$", line), line


def test_json_lines_are_one_object_with_the_record_fields() -> None:
    line = JsonFormatter().format(record(request_id=7, worker="10.0.0.1:8000"))
    assert "\n" not in line
    obj = json.loads(line)
    assert re.fullmatch(ISO_WITH_OFFSET, obj.pop("time"))
    assert isinstance(obj.pop("pid"), int)
    assert obj == {
        "level": "WARNING",
        "logger": "flexlb.proxy",
        "message": "request 7 failed",
        "request_id": 7,
        "worker": "10.0.0.1:8000",
    }
    assert "request_id" not in json.loads(JsonFormatter().format(record()))


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://10.0.0.1:8000", "10.0.0.1:8000"),
        ("10.0.0.1:8000", "10.0.0.1:8000"),
        ("http://worker-0.svc:30000/", "worker-0.svc:30000"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("http://worker", "worker:80"),
    ],
)
def test_worker_urls(url: str, address: str) -> None:
    assert worker_address(url, "--worker-urls") == address


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://w:8000", "plain HTTP"),
        ("http://w:8000/v1", "without a path"),
        ("http://w:99999", "not a number in 1-65535"),
        ("http://w:0", "port 0"),
    ],
)
def test_bad_worker_urls_name_the_flag(url: str, problem: str) -> None:
    with pytest.raises(FlagError, match=problem) as info:
        worker_address(url, "--decode")
    assert str(info.value).startswith(f"--decode {url}")


def test_policies_map_onto_strategies() -> None:
    env = flag_environment(serve_args("--policy", "cache_aware"), {})
    assert env == {"LOAD_BALANCE_STRATEGY": "SHORTEST_TTFT"}  # decode keeps its default, WEIGHTED_CACHE
    env = flag_environment(serve_args("--policy", "power_of_two"), {})
    assert env == {"LOAD_BALANCE_STRATEGY": "LOWEST_CONCURRENCY", "DECODE_LOAD_BALANCE_STRATEGY": "LOWEST_CONCURRENCY"}
    config = load_settings({**env}).flexlb
    assert (config.load_balance_strategy, config.decode_load_balance_strategy) == ("LOWEST_CONCURRENCY",) * 2


def test_an_unknown_policy_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_args("--policy", "fastest")
    err = capsys.readouterr().err
    assert "invalid choice: 'fastest'" in err and "cache_aware" in err and "power_of_two" in err


def test_request_timeout_sets_both_proxy_timeouts() -> None:
    env = flag_environment(serve_args("--request-timeout-secs", "1.5"), {})
    config = load_settings(env).flexlb
    assert config.proxy_response_timeout_ms == 1500 and config.proxy_headers_timeout_ms == 1500
    with pytest.raises(FlagError, match="--request-timeout-secs must be positive"):
        flag_environment(serve_args("--request-timeout-secs", "0"), {})


def test_flags_beat_the_environment() -> None:
    environ = {"FLEXLB_CONFIG": '{"loadBalanceStrategy": "RANDOM"}', "LOAD_BALANCE_STRATEGY": "RANDOM"}
    env = flag_environment(serve_args("--policy", "round_robin"), environ)
    assert load_settings({**environ, **env}).flexlb.load_balance_strategy == "ROUND_ROBIN"


def test_worker_flags_add_workers_to_model_service_config() -> None:
    environ = {"MODEL_SERVICE_CONFIG": '{"service_id": "svc", "vit_endpoint": {"address": "10.0.0.9:80"}}'}
    args = serve_args(
        "--prefill", "http://10.0.0.1:8000", "9000",
        "--prefill", "http://10.0.0.2:8000", "9000",
        "--decode", "http://10.0.0.3:8000",
        "--decode", "10.0.0.4:8000",
        "--engine", "sglang",
    )  # fmt: skip
    env = flag_environment(args, environ)
    settings = load_settings({**environ, **env})
    assert settings.service.service_id == "svc" and settings.flexlb.bootstrap_port == 9000
    workers = {(w.worker_id, w.role.value, w.engine.value) for w in settings.service.endpoints}
    assert workers == {
        ("10.0.0.9:80", "VIT", "rtp_llm"),
        ("10.0.0.1:8000", "PREFILL", "sglang"),
        ("10.0.0.2:8000", "PREFILL", "sglang"),
        ("10.0.0.3:8000", "DECODE", "sglang"),
        ("10.0.0.4:8000", "DECODE", "sglang"),
    }
    fused = load_settings(flag_environment(serve_args("--worker-urls", "http://a:1", "http://b:2"), {}))
    assert {(w.worker_id, w.role.value) for w in fused.service.endpoints} == {("a:1", "PDFUSION"), ("b:2", "PDFUSION")}


def test_different_bootstrap_ports_are_refused() -> None:
    args = serve_args("--prefill", "http://a:1", "9000", "--prefill", "http://b:1", "9001")
    with pytest.raises(FlagError, match=r"bootstrap ports \[9000, 9001\] differ"):
        flag_environment(args, {})


def test_a_worker_in_flags_and_in_the_environment_is_an_error() -> None:
    environ = {"MODEL_SERVICE_CONFIG": '{"pd_fusion_endpoint": {"address": "127.0.0.1:8000"}}'}
    env = flag_environment(serve_args("--worker-urls", "http://127.0.0.1:8000"), environ)
    with pytest.raises(ConfigError, match=re.escape("127.0.0.1:8000 is already listed")):
        load_settings({**environ, **env})
