"""The stack files work: every Procfile line is started (ports moved to free ones) and a request is scheduled
through both routers onto workers the master polled; every docker-compose.yml command parses with the CLI, and
`docker compose config` accepts the file where docker compose is installed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexlb.cli import build_parser
from flexlb.demo import WORKER_OPTIONS
from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.embedded_redis import free_port_pair

ROOT = Path(__file__).resolve().parents[2]
PORT = re.compile(r"(?<![\d.])(6390|7001|7002|7100|8000|8010|8020|8030)(?!\d)")


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def compose_commands() -> dict[str, list[str]]:
    """service -> command list. The file writes every command as a JSON array, so no YAML parser is needed."""
    commands, service = {}, None
    for line in (ROOT / "docker-compose.yml").read_text().splitlines():
        if m := re.match(r"^  ([a-z0-9]+):\s*$", line):
            service = m.group(1)
        elif (m := re.match(r"^    command: (\[.*\])\s*$", line)) and service:
            commands[service] = json.loads(m.group(1))
    return commands


def test_every_compose_command_is_a_valid_flexlb_command_line() -> None:
    commands = compose_commands()
    assert {"master", "router1", "router2", "prefill1", "decode1"} <= set(commands)
    flexlb = {name: cmd for name, cmd in commands.items() if cmd[0] == "flexlb"}
    assert len(flexlb) == len(commands) - 1  # all but redis
    for name, cmd in flexlb.items():
        try:
            build_parser().parse_args(cmd[1:])
        except SystemExit:
            pytest.fail(f"docker-compose.yml service {name}: `{' '.join(cmd)}` is not a valid flexlb command line")


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2), else a ``docker-compose`` (v1: validates the file without a daemon), else None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def test_compose_file_is_valid_for_docker_compose() -> None:
    compose = _compose_cli()
    if compose is None:
        pytest.skip("neither docker compose nor docker-compose is installed here")
    result = subprocess.run([*compose, "config", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_compose_and_procfile_run_the_same_worker_settings() -> None:
    def options(words: list[str]) -> list[str]:
        return [w for w in words if w.startswith("--") and w not in ("--host", "--port")]

    proc = {name: shlex.split(line) for name, line in procfile().items() if "sim-worker" in line}
    compose = {name: cmd for name, cmd in compose_commands().items() if "sim-worker" in cmd}
    assert set(proc) == set(compose)
    for name in proc:
        strip = [w for w in proc[name] if not w.isdigit()]
        assert options(strip) == options([w for w in compose[name] if not w.isdigit()]), name
        values = dict(zip(proc[name], proc[name][1:], strict=False))
        cvalues = dict(zip(compose[name], compose[name][1:], strict=False))
        for option in ("--role", "--kv-blocks", "--max-concurrency", "--time-scale"):
            assert values[option] == cvalues[option], (name, option)


def worker_options(words: list[str]) -> dict[str, str]:
    """A sim-worker command line's options and values, but where the worker listens and its role."""
    start = words.index("sim-worker") + 1
    pairs = dict(zip(words[start::2], words[start + 1 :: 2], strict=True))
    return {k: v for k, v in pairs.items() if k not in ("--host", "--port", "--role")}


def test_the_stack_files_run_the_workers_of_flexlb_demo() -> None:
    """Every simulated worker of the Procfile and of docker-compose.yml has exactly `flexlb demo`'s options for its
    role (the role counts may differ: the demo's default fleet is PDFUSION, the stack's is PREFILL + DECODE)."""
    lines = {name: shlex.split(line) for name, line in procfile().items() if "sim-worker" in line}
    commands = {f"compose {n}": c for n, c in compose_commands().items() if "sim-worker" in c}
    assert len(lines) == 4 and len(commands) == 4
    for name, words in {**lines, **commands}.items():
        role = Role.parse(words[words.index("--role") + 1])
        expected = WORKER_OPTIONS[role].argv()
        assert worker_options(words) == dict(zip(expected[::2], expected[1::2], strict=True)), name


@pytest.fixture
def procfile_stack(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Every Procfile line, in its own process group, with its ports moved to free ones (worker ports in pairs)."""
    ports: dict[str, int] = {}

    def moved(match: re.Match[str]) -> str:
        old = match.group(1)
        if old not in ports:
            ports[old] = free_port_pair()
        return str(ports[old])

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    processes = []
    for name, line in procfile().items():
        with open(tmp_path / f"{name}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    ["bash", "-c", PORT.sub(moved, line)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        yield {old: new for old, new in ports.items()}
    finally:
        for p in processes:
            with_group(p, signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with_group(p, signal.SIGKILL)
                p.wait()
        for log in sorted(tmp_path.glob("*.log")):
            assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]


def with_group(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:
        return 0, {"error": repr(exc)}


def test_the_procfile_stack_schedules_through_both_routers(procfile_stack: dict[str, int]) -> None:
    routers = [f"http://127.0.0.1:{procfile_stack[p]}" for p in ("7001", "7002")]
    deadline = time.monotonic() + 30

    def until(what: str, check):  # type: ignore[no-untyped-def]
        while not (result := check()):
            assert time.monotonic() < deadline, f"{what}: not within 30 s"
            time.sleep(0.1)
        return result

    def master_known() -> dict | None:
        status, info = post(f"{routers[0]}/rtp_llm/master/info", {})
        return info if status == 200 and info.get("master_lock_holder") else None

    info = until("the master elected", master_known)
    assert info["master_lock_holder"].endswith(":master") and not info["this_process_is_master"]

    # the Procfile's --kv-blocks (flexlb demo's), in tokens: a status the master polled, not a default
    prefill_kv = WORKER_OPTIONS[Role.PREFILL].kv_blocks * DEFAULT_BLOCK_SIZE
    for rid, router in enumerate(routers, start=1):

        def scheduled(rid: int = rid, router: str = router) -> dict | None:
            status, body = post(f"{router}/rtp_llm/schedule", {"request_id": rid, "seq_len": 100})
            if status != 200:
                return None
            post(f"{router}/rtp_llm/release", {"request_id": rid})
            prefill = next(s for s in body["server_status"] if s["role"] == "PREFILL")
            return body if prefill["debug_info"]["available_kv_cache_len"] == prefill_kv else None

        body = until(f"{router}: a schedule on polled workers", scheduled)
        assert {s["role"] for s in body["server_status"]} == {"PREFILL", "DECODE"}
        worker_ports = {procfile_stack[p] for p in ("8000", "8010", "8020", "8030")}
        assert {s["http_port"] for s in body["server_status"]} <= worker_ports
