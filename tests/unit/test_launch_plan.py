"""`flexlb launch`'s plan (flexlb.launch.plan): each engine's command line, port and GPU slice, and the errors that
stop a launch before anything starts; and the registration path carrying the engine kind (admin API, CLI)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from flexlb.domain import EngineKind, Role
from flexlb.http.admin import parse_worker_spec
from flexlb.http.wire import BadRequest
from flexlb.launch.plan import PlanError, assign_gpus, build_plan, detect_gpus, format_template, parse_gpus

NO_GPUS: dict[str, str] = {}


def plan(**changes: Any):  # type: ignore[no-untyped-def]
    options: dict[str, Any] = {
        "engine": "vllm", "count": 2, "base_port": 8000, "tp": 2, "role": Role.PDFUSION, "model": "Qwen/Qwen3-8B",
        "host": "127.0.0.1", "advertise_host": None, "health_path": "/health", "extra": (), "template": None,
        "worker_engine": None, "gpus_flag": "0,1,2,3", "environ": NO_GPUS, "detect": lambda: None,
    }  # fmt: skip
    return build_plan(**{**options, **changes})


def test_vllm_engines_on_consecutive_ports_each_with_its_gpu_slice() -> None:
    p = plan(extra=("--max-model-len", "4096"))
    assert [(e.port, e.gpus) for e in p.engines] == [(8000, ("0", "1")), (8001, ("2", "3"))]
    assert p.engines[1].command == (
        "vllm", "serve", "Qwen/Qwen3-8B", "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "2",
        "--max-model-len", "4096",
    )  # fmt: skip
    assert p.worker_engine is EngineKind.VLLM and p.ports_used == (8000, 8001)
    env = p.engines[1].env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "7"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["PATH"] == "/bin"


def test_sglang_command() -> None:
    p = plan(engine="sglang", count=1, tp=4, role=Role.PREFILL, extra=("--enable-metrics",))
    assert p.engines[0].command == (
        sys.executable, "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-8B", "--host", "127.0.0.1",
        "--port", "8000", "--tp", "4", "--enable-metrics",
    )  # fmt: skip
    assert p.role is Role.PREFILL and p.engines[0].gpus == ("0", "1", "2", "3")


def test_sim_needs_no_gpu_and_skips_the_status_grpc_port_of_its_default_dialect() -> None:
    p = plan(engine="sim", model=None, count=3, tp=1, gpus_flag=None)
    assert [(e.port, e.gpus) for e in p.engines] == [(8000, ()), (8002, ()), (8004, ())]
    assert p.ports_used == (8000, 8001, 8002, 8003, 8004, 8005)
    assert "CUDA_VISIBLE_DEVICES" not in p.engines[0].env({})
    assert p.engines[2].command == (
        sys.executable, "-m", "flexlb.cli", "sim-worker", "--role", "pdfusion", "--host", "127.0.0.1", "--port",
        "8004", "--model", "flexlb-sim", "--engine", "rtp_llm",
    )  # fmt: skip
    assert p.worker_engine is EngineKind.SIM
    vllm = plan(engine="sim", model=None, count=2, tp=1, gpus_flag=None, worker_engine="vllm")
    assert [e.port for e in vllm.engines] == [8000, 8001] and vllm.engines[0].command[-2:] == ("--engine", "vllm")
    assert vllm.worker_engine is EngineKind.VLLM
    given = plan(engine="sim", model=None, count=2, tp=1, gpus_flag="5,6")  # given GPUs are handed out anyway
    assert [e.gpus for e in given.engines] == [("5",), ("6",)]


def test_cmd_template_placeholders() -> None:
    template = "my-engine --port {port} --host {host} --model '{model}' --tp {tp} --name e{index}-{role} --gpus={gpus}"
    p = plan(engine="cmd", template=template, model="a model", extra=("--x",), gpus_flag="3,4,5,6")
    assert p.engines[1].command == (
        "my-engine", "--port", "8001", "--host", "127.0.0.1", "--model", "a model", "--tp", "2", "--name",
        "e1-pdfusion", "--gpus=5,6", "--x",
    )  # fmt: skip
    assert format_template("x --cfg '{{\"a\": {port}}}'", {"port": "1"}) == ("x", "--cfg", '{"a": 1}')
    with pytest.raises(PlanError, match=r"unknown placeholder \{prot\}; known: \{port\}"):
        plan(engine="cmd", template="x {prot}")
    with pytest.raises(PlanError, match="give --model"):
        plan(engine="cmd", template="x {model}", model=None)
    with pytest.raises(PlanError, match="needs --cmd"):
        plan(engine="cmd")
    # no GPU known: a command runs without any (it may well need none)
    assert plan(engine="cmd", template="x", gpus_flag=None).engines[0].gpus == ()


def test_gpus_from_the_flag_the_environment_or_nvidia_smi() -> None:
    assert plan(gpus_flag=None, environ={"FLEXLB_GPUS": "4,5,6,7"}).engines[1].gpus == ("6", "7")
    assert plan(gpus_flag=None, detect=lambda: ("0", "1", "2", "3")).gpu_source == "nvidia-smi -L"
    with pytest.raises(PlanError, match=r"2 engines x tensor-parallel-size 2 = 4 GPUs needed, 3 available \(0, 1, 2"):
        plan(gpus_flag="0,1,2")
    with pytest.raises(PlanError, match=r"none found \(nvidia-smi -L: not installed or failing\)"):
        plan(gpus_flag=None)
    with pytest.raises(PlanError, match="listed twice"):
        parse_gpus("0,1,0", "--gpus")
    with pytest.raises(PlanError, match="comma-separated"):
        parse_gpus("0,,1", "--gpus")
    assert assign_gpus(2, 1, (), "", required=False) == [(), ()]


def test_nvidia_smi_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n"
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert argv == ["nvidia-smi", "-L"]
        return subprocess.CompletedProcess(argv, 0, listing, "")

    assert detect_gpus(run) == ("0", "1")

    def failing(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(9, argv)

    assert detect_gpus(failing) is None


def test_plan_errors() -> None:
    with pytest.raises(PlanError, match="needs --model"):
        plan(model=None)
    with pytest.raises(PlanError, match="polled as vllm"):
        plan(worker_engine="sglang")
    with pytest.raises(PlanError, match="within 1-65535"):
        plan(base_port=65535)
    with pytest.raises(PlanError, match="--cmd is the template of --engine cmd"):
        plan(template="x")


def test_the_admin_api_takes_the_engine_kind() -> None:
    base = {"ip": "127.0.0.1", "http_port": 8000, "role": "pdfusion"}
    assert parse_worker_spec(base).engine is EngineKind.RTP_LLM
    assert parse_worker_spec({**base, "engine": "vllm"}).engine is EngineKind.VLLM
    with pytest.raises(BadRequest, match="engine: unknown engine 'tgi'"):
        parse_worker_spec({**base, "engine": "tgi"})
    with pytest.raises(BadRequest, match="engine: expected one of"):
        parse_worker_spec({**base, "engine": 3})
