"""A registration's KV events endpoints (``kv_events``, ``kv_events_replay``): parsed as MODEL_SERVICE_CONFIG's are
(admin API, CLI, /add_worker), stored in the worker's hash and read back into its WorkerSpec; `flexlb launch
--kv-events-port` gives each engine its publisher port (vLLM / SGLang ``--kv-events-config``, the simulator's
``--kv-events-port``, ``{kv_events_port}`` in a template) and registers it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flexlb.domain import EngineKind, Role, WorkerSpec
from flexlb.http.admin import kv_events_json, parse_kv_events, parse_worker_spec
from flexlb.http.wire import BadRequest
from flexlb.kv_events.endpoint import KvEventsEndpoint
from flexlb.launch.plan import PlanError, build_plan
from flexlb.launch.run import Launcher, Target
from flexlb.state.codec import VIEW_FIELDS, WorkerDecoder, spec_fields


def test_kv_events_as_in_model_service_config() -> None:
    assert parse_kv_events("tcp://10.0.0.2:5557", None, "10.0.0.1") == KvEventsEndpoint(
        "tcp://10.0.0.2:5557", "tcp://10.0.0.2:5558"
    )  # unset replay: the publisher's port + 1
    assert parse_kv_events(5557, False, "10.0.0.1") == KvEventsEndpoint("tcp://10.0.0.1:5557", None)
    assert parse_kv_events("5557", "none", "10.0.0.1") == KvEventsEndpoint("tcp://10.0.0.1:5557", None)
    assert parse_kv_events("tcp://*:5557", "tcp://0.0.0.0:6000", "10.0.0.1") == KvEventsEndpoint(
        "tcp://10.0.0.1:5557", "tcp://10.0.0.1:6000"
    )  # vLLM's bind address: the worker's host
    assert parse_kv_events(None, None, "h") is None and parse_kv_events("", None, "h") is None


@pytest.mark.parametrize(
    ("value", "replay", "message"),
    [
        ("tcp://x", None, 'kv_events: expected "tcp://host:port"'),
        (True, None, "kv_events: expected"),
        (70000, None, "kv_events: port 70000 is out of range"),
        (None, "tcp://a:1", "kv_events_replay: given without kv_events"),
        ("tcp://a:1", 3, "kv_events_replay: expected"),
    ],
)
def test_bad_kv_events_are_refused_naming_the_field(value: object, replay: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_kv_events(value, replay, "10.0.0.1")
    body = {"ip": "10.0.0.1", "http_port": 8000, "role": "pdfusion", "kv_events": value, "kv_events_replay": replay}
    with pytest.raises(BadRequest, match=message):
        parse_worker_spec(body)


def test_the_worker_hash_carries_them_and_a_registration_without_clears_them() -> None:
    events = KvEventsEndpoint("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558")
    spec = parse_worker_spec({"ip": "10.0.0.1", "http_port": 8000, "role": "pdfusion", "engine": "vllm",
                              "kv_events": 5557})  # fmt: skip
    assert spec.kv_events == events
    fields = spec_fields(spec) | {"role": "PDFUSION"}
    assert fields["kv_events"] == "tcp://10.0.0.1:5557" and fields["kv_events_replay"] == "tcp://10.0.0.1:5558"
    decoded = WorkerDecoder().view_from_hash(spec.worker_id, fields)
    assert decoded is not None and decoded.spec.kv_events == events and decoded.spec.engine is EngineKind.VLLM
    no_replay = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION, kv_events=KvEventsEndpoint("tcp://10.0.0.1:5557"))
    assert spec_fields(no_replay)["kv_events_replay"] == ""
    view = WorkerDecoder().view_from_hash("10.0.0.1:8000", spec_fields(no_replay) | {"role": "PDFUSION"})
    assert view is not None and view.spec.kv_events == KvEventsEndpoint("tcp://10.0.0.1:5557", None)
    plain = WorkerSpec("10.0.0.1", 8000, Role.PDFUSION)
    assert spec_fields(plain)["kv_events"] == spec_fields(plain)["kv_events_replay"] == ""
    old = {name: value for name, value in fields.items() if not name.startswith("kv_events")}  # written before
    assert WorkerDecoder().view_from_hash("10.0.0.1:8000", old).spec.kv_events is None  # type: ignore[union-attr]
    assert "kv_events" in VIEW_FIELDS and "kv_events_replay" in VIEW_FIELDS
    assert kv_events_json(spec) == {"kv_events": events.publisher, "kv_events_replay": events.replay}
    assert kv_events_json(plain) == {"kv_events": None, "kv_events_replay": None}


def plan(**changes: Any):  # type: ignore[no-untyped-def]
    options: dict[str, Any] = {
        "engine": "vllm", "count": 2, "base_port": 8000, "tp": 1, "role": Role.PDFUSION, "model": "Qwen/Qwen3-8B",
        "host": "127.0.0.1", "advertise_host": None, "health_path": "/health", "extra": ("--x",), "template": None,
        "worker_engine": None, "gpus_flag": "0,1", "environ": {}, "detect": lambda: None, "kv_events_base": 9000,
    }  # fmt: skip
    return build_plan(**{**options, **changes})


def test_vllm_and_sglang_engines_get_a_kv_events_config_each() -> None:
    p = plan()
    assert [e.kv_events_port for e in p.engines] == [9000, 9002]
    assert p.ports_used == (8000, 8001, 9000, 9001, 9002, 9003)  # checked for being free before anything starts
    command = p.engines[1].command
    i = command.index("--kv-events-config")
    assert json.loads(command[i + 1]) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:9002",
        "replay_endpoint": "tcp://127.0.0.1:9003",
    }
    assert command[-1] == "--x"  # the operator's words stay last: theirs win
    sglang = plan(engine="sglang", host="0.0.0.0").engines[0].command
    config = json.loads(sglang[sglang.index("--kv-events-config") + 1])
    assert config == {"publisher": "zmq", "endpoint": "tcp://*:9000", "replay_endpoint": "tcp://*:9001"}
    assert all("--kv-events-config" not in e.command for e in plan(kv_events_base=None).engines)


def test_sim_and_cmd_engines_get_their_kv_events_port() -> None:
    sim = plan(engine="sim", worker_engine="vllm", model=None, gpus_flag=None)
    assert [e.command[e.command.index("--kv-events-port") + 1] for e in sim.engines] == ["9000", "9002"]
    template = "my-engine --port {port} --events tcp://*:{kv_events_port} --replay tcp://*:{kv_events_replay_port}"
    cmd = plan(engine="cmd", template=template, gpus_flag=None)
    assert cmd.engines[1].command[-4:] == ("tcp://*:9002", "--replay", "tcp://*:9003", "--x")
    literal = plan(engine="cmd", template="e --p {{kv_events_port}}", gpus_flag=None, kv_events_base=None)
    assert literal.engines[0].command[:3] == ("e", "--p", "{kv_events_port}")  # literal braces: not a placeholder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"engine": "sim", "model": None, "gpus_flag": None}, "in its vllm or sglang dialect"),
        ({"kv_events_base": 8001}, "port 8001 is also an engine's HTTP"),
        ({"engine": "sim", "worker_engine": "sglang", "count": 1, "kv_events_base": 65535}, "within 1-65535"),
        ({"engine": "cmd", "template": "e --p {kv_events_port}", "kv_events_base": None}, "give --kv-events-port"),
    ],
)
def test_kv_events_ports_that_cannot_work_stop_the_launch(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan(**changes)


def test_each_engine_is_registered_with_its_kv_events(tmp_path: Path) -> None:
    p = plan(advertise_host="10.0.0.7")
    launcher = Launcher(p, Target(None, None, "svc"), tmp_path)
    spec = launcher.worker_spec(p.engines[1])
    assert spec.engine is EngineKind.VLLM and spec.worker_id == "10.0.0.7:8001"
    assert spec.kv_events == KvEventsEndpoint("tcp://10.0.0.7:9002", "tcp://10.0.0.7:9003")
    assert launcher.worker_spec(plan(kv_events_base=None).engines[0]).kv_events is None
