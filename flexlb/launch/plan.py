"""What `flexlb launch` starts: each engine's command line, port and GPUs, decided before anything starts (pure, but
for reading ``nvidia-smi -L`` and probing the ports). A ``PlanError`` is the operator's to fix: exit status 2."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flexlb.domain import EngineKind, Role

ENGINES = ("vllm", "sglang", "sim", "cmd")
GPUS_ENV = "FLEXLB_GPUS"
SIM_MODEL = "flexlb-sim"  # the simulator's served model name when --model is not given

# --engine cmd: the placeholders its template may use, each replaced per engine (literal braces: {{ and }}).
PLACEHOLDERS: Mapping[str, str] = {
    "port": "the engine's HTTP port (--base-port + index, or + 2 x index for a status-gRPC engine)",
    "host": "the address it listens on (--host)",
    "model": "--model",
    "tp": "--tensor-parallel-size",
    "index": "the engine's index, 0 to --count - 1",
    "gpus": "its GPUs, comma-separated as in CUDA_VISIBLE_DEVICES (empty when it has none)",
    "role": "its role in lower case: pdfusion, prefill or decode",
    "kv_events_port": "where it publishes KV events (--kv-events-port + 2 x index; only with --kv-events-port)",
    "kv_events_replay_port": "its KV events replay socket: {kv_events_port} + 1 (only with --kv-events-port)",
}

# What each engine kind is registered as by default: how the master polls it (flexlb.domain.EngineKind).
_DEFAULT_WORKER_ENGINE = {
    "vllm": EngineKind.VLLM,
    "sglang": EngineKind.SGLANG,
    "sim": EngineKind.SIM,
    "cmd": EngineKind.VLLM,
}
_SIM_DIALECT = {EngineKind.SIM: "rtp_llm", EngineKind.RTP_LLM: "rtp_llm", EngineKind.VLLM: "vllm",
                EngineKind.SGLANG: "sglang"}  # fmt: skip
_NVIDIA_SMI_GPU = re.compile(r"^GPU (\d+):", re.MULTILINE)
_WILDCARDS = ("0.0.0.0", "::", "")


class PlanError(ValueError):
    """The launch cannot start as asked (not enough GPUs, a bad template, a port in use); nothing was started."""


@dataclass(frozen=True, slots=True)
class Engine:
    """One engine process to keep running."""

    index: int
    port: int
    gpus: tuple[str, ...]
    command: tuple[str, ...]
    # publishes KV events there (ZMQ PUB), its replay socket on the port after; registered with it. None: no events
    kv_events_port: int | None = None

    @property
    def gpu_text(self) -> str:
        return ",".join(self.gpus)

    @property
    def label(self) -> str:
        return f"engine {self.index} (port {self.port}{f', GPUs {self.gpu_text}' if self.gpus else ''})"

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        extra = {"CUDA_VISIBLE_DEVICES": self.gpu_text} if self.gpus else {}
        return {**base, "PYTHONUNBUFFERED": "1", **extra}


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    engines: tuple[Engine, ...]
    engine: str  # vllm, sglang, sim or cmd
    worker_engine: EngineKind  # registered as: how the master polls it
    role: Role
    model: str
    host: str  # where the engines listen
    advertise_host: str  # the worker address registered (and health-checked)
    health_path: str
    gpu_source: str = ""  # where the GPU list came from, for messages
    ports_used: tuple[int, ...] = field(default=())  # every port the engines take (HTTP, and gRPC status if any)


def parse_gpus(text: str, where: str) -> tuple[str, ...]:
    """``0,1,2,3`` (indices or GPU UUIDs, as CUDA_VISIBLE_DEVICES takes them) -> the GPUs, in that order."""
    gpus = tuple(part.strip() for part in text.split(","))
    if not gpus or any(not g for g in gpus):
        raise PlanError(f"{where}: expected comma-separated GPU indices or UUIDs such as 0,1,2,3, got {text!r}")
    duplicates = sorted({g for g in gpus if gpus.count(g) > 1})
    if duplicates:
        raise PlanError(f"{where}: GPU {', '.join(duplicates)} listed twice in {text!r}")
    return gpus


def detect_gpus(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> tuple[str, ...] | None:
    """The indices ``nvidia-smi -L`` lists; None when it is not installed or fails (no driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(_NVIDIA_SMI_GPU.findall(listing))


def available_gpus(
    flag: str | None, environ: Mapping[str, str], engine: str, detect: Callable[[], tuple[str, ...] | None]
) -> tuple[tuple[str, ...], str]:
    """The GPUs to hand out and where they came from: ``--gpus``, else FLEXLB_GPUS, else ``nvidia-smi -L`` (not for
    the simulator, which needs none: it gets GPUs only when they are given)."""
    if flag is not None and flag.strip():
        return parse_gpus(flag, "--gpus"), "--gpus"
    if environ.get(GPUS_ENV, "").strip():
        return parse_gpus(environ[GPUS_ENV], GPUS_ENV), GPUS_ENV
    if engine == "sim":
        return (), ""
    found = detect()
    if found is None:
        return (), "nvidia-smi -L: not installed or failing"
    return found, "nvidia-smi -L"


def assign_gpus(count: int, tp: int, gpus: Sequence[str], source: str, *, required: bool) -> list[tuple[str, ...]]:
    """Engine i gets GPUs i*tp .. i*tp + tp - 1 of ``gpus``. No GPUs at all and not ``required``: none each."""
    if not gpus and not required:
        return [() for _ in range(count)]
    need = count * tp
    if len(gpus) < need:
        have = f"{len(gpus)} available ({', '.join(gpus)} from {source})" if gpus else f"none found ({source})"
        engines = f"{count} engine{'s' if count != 1 else ''}"
        raise PlanError(
            f"not enough GPUs: {engines} x tensor-parallel-size {tp} = {need} GPU{'s' if need != 1 else ''} needed,"
            f" {have};"
            f" give the GPUs with --gpus 0,1,... or {GPUS_ENV}, or lower --count or --tensor-parallel-size"
        )
    return [tuple(gpus[i * tp : (i + 1) * tp]) for i in range(count)]


def worker_engine_for(engine: str, flag: str | None) -> EngineKind:
    """The engine kind registered: --worker-engine (sim and cmd only), else the engine's own."""
    default = _DEFAULT_WORKER_ENGINE[engine]
    if flag is None:
        return default
    try:
        kind = EngineKind.parse(flag)
    except ValueError as exc:
        raise PlanError(f"--worker-engine: {exc}") from None
    if engine in ("vllm", "sglang") and kind is not default:
        raise PlanError(f"--worker-engine {kind.value} with --engine {engine}: a {engine} engine is polled as {engine}")
    return kind


def port_stride(worker_engine: EngineKind) -> int:
    """Engines on consecutive ports, or every other port for an engine that also serves RTP-LLM's status gRPC on
    its HTTP port + 1 (the simulator's default dialect)."""
    return 2 if worker_engine.speaks_status_rpc else 1


class _Values(dict[str, str]):
    def __missing__(self, key: str) -> str:
        if key in PLACEHOLDERS:  # known, but not given for this launch
            raise PlanError(f"--cmd uses {{{key}}}: give --kv-events-port")
        known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        raise PlanError(f"--cmd: unknown placeholder {{{key}}}; known: {known} (literal braces: {{{{ and }}}})")


def format_template(template: str, values: Mapping[str, str]) -> tuple[str, ...]:
    """``--cmd``: split as a shell would (no shell runs it), then fill each word's placeholders."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise PlanError(f"--cmd {template!r}: {exc}") from None
    if not words:
        raise PlanError("--cmd: the template is empty")
    out = []
    for word in words:
        try:
            out.append(word.format_map(_Values(values)))
        except PlanError:
            raise
        except (ValueError, IndexError, AttributeError) as exc:
            raise PlanError(f"--cmd: cannot fill {word!r}: {exc} (literal braces: {{{{ and }}}})") from None
    return tuple(out)


def engine_command(
    engine: str,
    *,
    model: str,
    host: str,
    port: int,
    tp: int,
    role: Role,
    worker_engine: EngineKind,
    index: int,
    gpus: Sequence[str],
    extra: Sequence[str] = (),
    template: str | None = None,
    python: str = sys.executable,
    kv_events_port: int | None = None,
) -> tuple[str, ...]:
    """One engine's command line; ``extra`` (the words after ``--``) goes at its end, unchanged. ``kv_events_port``:
    it publishes KV events there, its replay socket on the port after (vLLM and SGLang: ``--kv-events-config``)."""
    events: tuple[str, ...] = ()
    if engine == "vllm":
        base = ("vllm", "serve", model, "--host", host, "--port", str(port), "--tensor-parallel-size", str(tp))
        if kv_events_port is not None:
            config = {"enable_kv_cache_events": True, "publisher": "zmq", **_zmq_endpoints(host, kv_events_port)}
            events = ("--kv-events-config", json.dumps(config))
    elif engine == "sglang":
        base = (python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port),
                "--tp", str(tp))  # fmt: skip
        if kv_events_port is not None:
            events = ("--kv-events-config", json.dumps({"publisher": "zmq", **_zmq_endpoints(host, kv_events_port)}))
    elif engine == "sim":
        base = (python, "-m", "flexlb.cli", "sim-worker", "--role", role.value.lower(), "--host", host, "--port",
                str(port), "--model", model, "--engine", _SIM_DIALECT[worker_engine])  # fmt: skip
        if kv_events_port is not None:
            events = ("--kv-events-port", str(kv_events_port))  # its replay socket: the port after
    elif engine == "cmd":
        if template is None:
            raise PlanError("--engine cmd needs --cmd 'my-engine --port {port} ...'")
        values = {"port": str(port), "host": host, "model": model, "tp": str(tp), "index": str(index),
                  "gpus": ",".join(gpus), "role": role.value.lower()}  # fmt: skip
        if kv_events_port is not None:
            values |= {"kv_events_port": str(kv_events_port), "kv_events_replay_port": str(kv_events_port + 1)}
        if not model and "{model}" in template:
            raise PlanError("--cmd uses {model}: give --model")
        base = format_template(template, values)
    else:
        raise PlanError(f"unknown --engine {engine!r}; expected one of {', '.join(ENGINES)}")
    return (*base, *events, *extra)


def _zmq_endpoints(host: str, port: int) -> dict[str, str]:
    """The PUB and replay endpoints an engine binds (on its listen address: ``*`` for every interface)."""
    bind = "*" if host in _WILDCARDS else host
    return {"endpoint": f"tcp://{bind}:{port}", "replay_endpoint": f"tcp://{bind}:{port + 1}"}


def kv_events_ports(
    base: int | None, count: int, kind: EngineKind, engine: str, http_ports: Sequence[int]
) -> list[int | None]:
    """``--kv-events-port``: engine i publishes on ``base + 2 x i``, replays on the port after; checked against the
    HTTP (and status) ports and the engine's ability to publish."""
    if base is None:
        return [None] * count
    if engine == "sim" and kind.speaks_status_rpc:
        raise PlanError(
            "--kv-events-port: the simulator publishes KV events in its vllm or sglang dialect: add --worker-engine"
            " vllm (or sglang)"
        )
    ports = [base + 2 * i for i in range(count)]
    if base < 1 or ports[-1] + 1 > 65535:
        raise PlanError(
            f"--kv-events-port {base} with --count {count}: KV events take ports {base} to {ports[-1] + 1},"
            " which must stay within 1-65535"
        )
    clash = sorted({p + k for p in ports for k in (0, 1)} & set(http_ports))
    if clash:
        raise PlanError(
            f"--kv-events-port {base}: port {', '.join(map(str, clash))} is also an engine's HTTP (or status) port;"
            " give KV events a range of their own"
        )
    return ports


def advertised_host(host: str) -> str:
    """The address the engines are registered (and health-checked) at: the listen address, or for every interface
    this host's address."""
    if host not in _WILDCARDS:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def build_plan(
    *,
    engine: str,
    count: int,
    base_port: int,
    tp: int,
    role: Role,
    model: str | None,
    host: str,
    advertise_host: str | None,
    health_path: str,
    extra: Sequence[str],
    template: str | None,
    worker_engine: str | None,
    gpus_flag: str | None,
    environ: Mapping[str, str],
    detect: Callable[[], tuple[str, ...] | None] = detect_gpus,
    kv_events_base: int | None = None,
) -> LaunchPlan:
    if engine not in ENGINES:
        raise PlanError(f"unknown --engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine in ("vllm", "sglang") and not model:
        raise PlanError(f"--engine {engine} needs --model (a Hugging Face id or a local model directory)")
    if template is not None and engine != "cmd":
        raise PlanError("--cmd is the template of --engine cmd")
    if role is Role.VIT:
        raise PlanError("--role: pdfusion, prefill or decode")
    if not health_path.startswith("/"):
        raise PlanError(f"--health-path: expected a path such as /health, got {health_path!r}")
    kind = worker_engine_for(engine, worker_engine)
    stride = port_stride(kind)
    ports = [base_port + stride * i for i in range(count)]
    used = tuple(p + k for p in ports for k in range(stride))
    if base_port < 1 or used[-1] > 65535:
        raise PlanError(
            f"--base-port {base_port} with --count {count}: the engines need ports {base_port} to {used[-1]},"
            " which must stay within 1-65535"
        )
    events = kv_events_ports(kv_events_base, count, kind, engine, used)
    used += tuple(p + k for p in events if p is not None for k in (0, 1))
    gpus, source = available_gpus(gpus_flag, environ, engine, detect)
    slices = assign_gpus(count, tp, gpus, source, required=engine in ("vllm", "sglang"))
    name = model or (SIM_MODEL if engine == "sim" else "")
    engines = []
    for i, port in enumerate(ports):
        command = engine_command(
            engine, model=name, host=host, port=port, tp=tp, role=role, worker_engine=kind, index=i,
            gpus=slices[i], extra=extra, template=template, kv_events_port=events[i],
        )  # fmt: skip
        engines.append(Engine(index=i, port=port, gpus=slices[i], command=command, kv_events_port=events[i]))
    return LaunchPlan(
        engines=tuple(engines),
        engine=engine,
        worker_engine=kind,
        role=role,
        model=name,
        host=host,
        advertise_host=advertise_host or advertised_host(host),
        health_path=health_path,
        gpu_source=source,
        ports_used=used,
    )


def ports_in_use(host: str, ports: Sequence[int]) -> list[int]:
    """The ports something already listens on (bound as a server binds them, SO_REUSEADDR: TIME_WAIT is free)."""
    busy = []
    bind_host = "" if host in _WILDCARDS else host
    for p in ports:
        with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind_host, p))
            except OSError:
                busy.append(p)
    return busy
