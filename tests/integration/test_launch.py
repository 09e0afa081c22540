"""`flexlb launch` as an operator runs it (a real process, real simulated engines, a real router): three sim engines
come up and are registered; one killed with SIGKILL is deregistered, restarted and scheduled to again; SIGINT while
the engines are still starting leaves no process behind (their own children included); not enough GPUs is an error
before anything starts; a first start that fails names the engine, its port and its log's last lines; `vllm serve`
gets its command line and GPU slice; registration through a router's admin API and `flexlb worker add` carry the
engine kind."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from flexlb.cli import main
from flexlb.embedded_redis import EmbeddedRedis, free_port
from flexlb.launch.plan import ports_in_use

FLEXLB = [sys.executable, "-m", "flexlb.cli"]
NEVER_HEALTHY = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"]


def free_base_port(span: int) -> int:
    """A port P with P .. P + span - 1 free."""
    for _ in range(200):
        base = free_port()
        if base + span < 65536 and not ports_in_use("127.0.0.1", range(base, base + span)):
            return base
    raise AssertionError(f"no {span} free consecutive ports")


def wait_for(check: Callable[[], object], what: str, timeout_s: float, output: Path | None = None) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = f"\noutput:\n{output.read_text()[-6000:]}" if output is not None else ""
            raise AssertionError(f"{what}: not within {timeout_s:g} s{tail}")
        time.sleep(0.05)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may not reap orphans at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(root: int) -> dict[int, str]:
    """Every live process under ``root``, by pid, with its command line."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    found[child] = ""
                frontier.append(child)
    return found


def launch(args: list[str], output: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(output, "wb") as out:
        return subprocess.Popen([*FLEXLB, "launch", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen[bytes], sig: int, output: Path) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"flexlb launch did not stop within 60 s:\n{output.read_text()[-6000:]}") from None


def http_json(url: str, body: dict[str, object] | None = None) -> dict:  # type: ignore[type-arg]
    """GET ``url`` (POST ``body``, when given) and the JSON answer, whatever the status."""
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return orjson.loads(exc.read())


def workers(router: str) -> list[dict]:  # type: ignore[type-arg]
    return http_json(f"{router}/rtp_llm/workers")["workers"]


def schedule(router: str, request_id: int) -> int:
    """The HTTP port of the worker a schedule call chooses (0: none)."""
    body = http_json(f"{router}/rtp_llm/schedule", {"request_id": request_id, "seq_len": 100})
    http_json(f"{router}/rtp_llm/release", {"request_id": request_id})
    return body["server_status"][0]["http_port"] if body.get("success") else 0


def test_three_sim_engines_a_killed_one_is_restarted_and_routed_to_again(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    base, router_port, service = free_base_port(6), free_port(), f"t{uuid.uuid4().hex[:12]}"
    output = tmp_path / "launch.out"
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "FLEXLB_CONFIG": orjson.dumps({"loadBalanceStrategy": "ROUND_ROBIN"}).decode(),
    }
    args = ["--engine", "sim", "--count", "3", "--base-port", str(base), "--service", service, "--serve",
            "--serve-port", str(router_port), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    process = launch(args, output, env)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in output.read_text(), "all three healthy", 60, output)
        text = output.read_text()
        pids = {int(port): int(pid) for port, pid in re.findall(r"http://127\.0\.0\.1:(\d+)  pid (\d+)", text)}
        ports = [base, base + 2, base + 4]  # the simulator's status gRPC takes each HTTP port + 1
        assert sorted(pids) == ports, text
        router = f"http://127.0.0.1:{router_port}"
        assert f"serving on {router}" in text
        assert sorted((w["http_port"], w["role"], w["engine"]) for w in workers(router)) == [
            (p, "PDFUSION", "sim") for p in ports
        ]
        ids = iter(range(1, 10_000))
        wait_for(lambda: {schedule(router, next(ids)) for _ in range(6)} >= set(ports), "each one scheduled", 30)

        victim, old_pid = ports[1], pids[ports[1]]
        os.kill(old_pid, signal.SIGKILL)
        gone = f"engine 1 (port {victim}, pid {old_pid}, no GPU) was killed by SIGKILL"
        wait_for(lambda: gone in output.read_text(), "the death noticed", 20, output)
        assert f"deregistered 127.0.0.1:{victim}; restarting it in 1.0 s" in output.read_text()
        back = re.compile(rf"engine 1 \(port {victim}, pid (\d+), no GPU\): healthy after")
        new_pid = int(wait_for(lambda: back.search(output.read_text().split(gone, 1)[1]), "restarted", 30)[1])
        assert new_pid != old_pid and running(new_pid) and not running(old_pid)
        wait_for(lambda: any(schedule(router, next(ids)) == victim for _ in range(6)), "routed to again", 30)
    finally:
        status = stop(process, signal.SIGINT, output)
    assert status == 0, output.read_text()[-6000:]
    assert not any(running(pid) for pid in [*pids.values(), new_pid])
    assert not ports_in_use("127.0.0.1", [*ports, router_port]), "a process of the launch still listens"


def test_sigint_during_start_up_leaves_no_process(tmp_path: Path) -> None:
    """Two engines that never get healthy (each with a child of its own), a router and its own redis-server: SIGINT
    while they start stops them all, the engines' children too."""
    output = tmp_path / "launch.out"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    args = ["--engine", "cmd", "--cmd", shlex.join(NEVER_HEALTHY), "--count", "2", "--base-port",
            str(free_base_port(2)), "--serve", "--serve-port", str(free_port()),
            "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    process = launch(args, output, env)
    try:

        def started() -> dict[int, str]:
            found = descendants(process.pid)
            sleeps = [c for c in found.values() if c.startswith("sleep 600")]
            servers = [c for c in found.values() if "redis-server" in c or " serve " in c]
            return found if len(sleeps) == 2 and len(servers) == 2 else {}

        children = wait_for(started, "engines (and their children), router and redis-server started", 30, output)
        assert "engines healthy" not in output.read_text()
    finally:
        status = stop(process, signal.SIGINT, output)
    assert status == 0, output.read_text()[-6000:]
    assert "SIGINT: stopping every process" in output.read_text()
    left = {pid: cmd for pid, cmd in children.items() if running(pid)}
    assert not left, f"still running after the stop: {left}"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--gpus", "0", "--tensor-parallel-size", "2"], {},
         "not enough GPUs: 1 engine x tensor-parallel-size 2 = 2 GPUs needed, 1 available (0 from --gpus)"),
        (["--count", "3"], {"FLEXLB_GPUS": "0,1"},
         "not enough GPUs: 3 engines x tensor-parallel-size 1 = 3 GPUs needed, 2 available (0, 1 from FLEXLB_GPUS)"),
    ],
)  # fmt: skip
def test_not_enough_gpus_is_an_error_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], message: str
) -> None:
    argv = ["launch", "--engine", "sim", "--serve", "--log-dir", str(tmp_path / "logs"), *args]
    result = subprocess.run([*FLEXLB, *argv], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()

    # In this process, with every way of starting a process refused: none is tried.
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr("flexlb.launch.run.spawn", refuse)
    monkeypatch.setattr("flexlb.stack.local.Stack.start_redis", refuse)
    monkeypatch.setattr("subprocess.Popen", refuse)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2


@pytest.mark.parametrize(
    ("program", "extra", "expected"),
    [
        ("import sys; print('unknown flag --foo'); sys.exit(3)", [], "exited with status 3 before it was healthy"),
        ("import time; print('loading weights', flush=True); time.sleep(600)", ["--startup-timeout", "1"],
         "was not healthy within 1 s"),
    ],
)  # fmt: skip
def test_a_failed_first_start_names_the_engine_and_its_log(
    tmp_path: Path, program: str, extra: list[str], expected: str
) -> None:
    base = free_base_port(1)
    output = tmp_path / "launch.out"
    template = shlex.join([sys.executable, "-c", program])
    process = launch(["--engine", "cmd", "--cmd", template, "--base-port", str(base), "--no-register", *extra], output)
    status = process.wait(timeout=60)
    text = output.read_text()
    assert status == 1, text
    assert re.search(rf"engine 0 \(port {base}, pid \d+, no GPU\) {re.escape(expected)}", text), text
    assert "last lines of" in text and program.split("'")[1] in text, text


def test_registered_through_a_routers_admin_api_with_the_engine_kind(tmp_path: Path, start_router) -> None:  # type: ignore[no-untyped-def]
    """``--router URL``: workers of the engine kind asked for (the simulator in vLLM's dialect: polled over its
    /metrics), on consecutive ports; SIGTERM deregisters them."""
    router = start_router({"contendForMaster": True, "engineMetricsIntervalMs": 50})
    base = free_base_port(2)
    output = tmp_path / "launch.out"
    args = ["--engine", "sim", "--worker-engine", "vllm", "--count", "2", "--base-port", str(base), "--router",
            router.url, "--log-dir", str(tmp_path / "logs"), "--", "--kv-blocks", "100"]  # fmt: skip
    process = launch(args, output)
    try:

        def polled() -> list[tuple[int, str, int]]:
            found = sorted((w["http_port"], w["engine"], w["kv_total"]) for w in workers(router.url))
            return found if found == [(base, "vllm", 6400), (base + 1, "vllm", 6400)] else []

        wait_for(polled, "both registered as vllm workers and polled (100 KV blocks of 64)", 60, output)
    finally:
        status = stop(process, signal.SIGTERM, output)
    assert status == 0, output.read_text()[-6000:]
    assert workers(router.url) == []


def test_flexlb_worker_add_takes_the_engine_kind(
    redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis as redis_sync

    from flexlb.state.keys import ServiceKeys

    service = f"t{uuid.uuid4().hex[:12]}"
    common = ["worker", "--redis-url", redis_server.url, "--service", service]
    assert main([*common, "add", "127.0.0.1:9000", "--role", "pdfusion", "--engine", "sglang"]) == 0
    assert "registered PDFUSION worker 127.0.0.1:9000 (sglang)" in capsys.readouterr().out
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.hget(ServiceKeys(service).worker("127.0.0.1:9000"), "engine") == "sglang"
    finally:
        client.close()
    assert main([*common, "add", "127.0.0.1:9002", "--role", "pdfusion", "--engine", "tgi"]) == 2
    assert "unknown engine 'tgi'" in capsys.readouterr().err


FAKE_VLLM = """#!{python}
# `vllm serve MODEL --host H --port P --tensor-parallel-size T ...`, played by the simulator in vLLM's dialect
import json, os, sys
args = sys.argv[1:]
port = args[args.index("--port") + 1]
with open(os.path.join(os.environ["FAKE_VLLM_RECORDS"], port + ".json"), "w") as f:
    json.dump({{"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}, f)
os.execv(sys.executable, [sys.executable, "-m", "flexlb.cli", "sim-worker", "--engine", "vllm", "--role", "pdfusion",
                          "--port", port, "--model", args[1]])
"""


def test_vllm_engines_get_their_command_line_and_gpu_slices(tmp_path: Path) -> None:
    """``--engine vllm`` runs ``vllm serve`` from PATH (here a stand-in that records what it was given)."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir()
    records.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(FAKE_VLLM.format(python=sys.executable))
    vllm.chmod(0o755)
    base = free_base_port(2)
    output = tmp_path / "launch.out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_VLLM_RECORDS": str(records)}
    args = ["--engine", "vllm", "--model", "org/model", "--count", "2", "--tensor-parallel-size", "2", "--gpus",
            "0,1,2,3", "--base-port", str(base), "--no-register", "--", "--max-model-len", "128"]  # fmt: skip
    process = launch(args, output, env)
    try:
        wait_for(lambda: "2 vllm engines healthy" in output.read_text(), "both healthy", 60, output)
    finally:
        status = stop(process, signal.SIGTERM, output)
    assert status == 0, output.read_text()[-6000:]
    seen = {int(p.stem): orjson.loads(p.read_bytes()) for p in records.iterdir()}
    assert seen == {
        port: {
            "argv": ["serve", "org/model", "--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2",
                     "--max-model-len", "128"],
            "cuda": cuda,
        }
        for port, cuda in ((base, "0,1"), (base + 1, "2,3"))
    }  # fmt: skip
    assert f"engine 1 (port {base + 1}, pid" in output.read_text() and "GPUs 2,3)" in output.read_text()
