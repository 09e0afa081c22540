"""The README's and docs' shell blocks work when pasted whole: each ```bash block runs here.

A block runs with `bash -e -o pipefail` in its own temporary directory and process group, with a clean environment
(PATH, LANG, HOME = that directory; no REDIS_URL unless the block sets one), and fails on a non-zero exit or a
timeout. When it ends the test stops its whole process group (SIGTERM, then SIGKILL), so a block's `... &` servers
never outlive it. Blocks run one after another: many use the same fixed ports (7001, 8000, ...).

A marker on the line right before a block changes that:

- `<!-- shell-block: skip (REASON) -->`: not run here (GPUs, real engines, network, a running fleet, slow: N
  minutes); the test is skipped with that reason, one test id per block.
- `<!-- shell-block: serves URL -->`: a server in the foreground by design (`flexlb serve`, `flexlb launch --serve`);
  the test starts it, polls URL until it answers 200 (with a deadline), then stops it.
- `<!-- shell-block: after previous -->`: meant to be pasted after the previous bash block of the same page, in the
  same shell (it uses that block's variables and servers). The chain runs once, as one script; each block's test
  passes when its own part completed.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*shell-block:\s*(?P<kind>skip|serves|after previous)\s*(?P<arg>.*?)\s*-->$")
TIMEOUT_S = 60.0  # one block or chain; the slowest that runs (bench proxy) takes about 15 s on 2 cores
DONE = "@@shell-block-done {line}@@"
# `curl -s` exits 0 on an error answer: these in a block's output mean a step did not work as the page says
REFUSALS = ('"success":false', '"success": false', "NO_AVAILABLE_WORKER", "NO_PREFILL_WORKER", "NO_DECODE_WORKER")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    code: str
    kind: str  # "run", "skip", "serves" or "after previous"
    arg: str  # the skip reason or the URL served

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def extract(path: Path) -> list[Block]:
    """The page's ```bash blocks, each with the marker on the last non-blank line before its fence."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        if fence == "```bash":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.match(before)
            kind, arg = (match["kind"], match["arg"].strip("() ")) if match else ("run", "")
            code = "\n".join(lines[i + 1 : end])
            blocks.append(Block(str(path.relative_to(ROOT)), i + 1, code, kind, arg))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in extract(page)]


def chain_of(block: Block) -> list[Block]:
    """The blocks of the block's page pasted one after another in one shell: the block, those it comes after and
    those that come after it."""
    page = [b for b in BLOCKS if b.page == block.page]
    start = end = page.index(block)
    while page[start].kind == "after previous":
        assert start > 0, f"{block.id}: 'after previous' on the first bash block of its page"
        start -= 1
    while end + 1 < len(page) and page[end + 1].kind == "after previous":
        end += 1
    return page[start : end + 1]


def _environment(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(home), "TMPDIR": str(home)}


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the block's process group, SIGKILL what is left after 10 s; return once no member is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader, so only live members keep the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    process.poll()


def _start(script: str, workdir: Path, out_path: Path) -> subprocess.Popen[bytes]:
    # output to a file, not a pipe: a block's background servers would hold a pipe open after bash exits
    with open(out_path, "wb") as out:
        return subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=workdir,
            env=_environment(workdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for _stop_group
        )


def _tail(out_path: Path, limit: int = 6000) -> str:
    return out_path.read_text(errors="replace")[-limit:]


_CHAIN_OUTPUT: dict[str, tuple[int | None, str]] = {}  # head id -> (exit status, None on timeout; output)


def _run_chain(chain: list[Block], workdir: Path) -> tuple[int | None, str]:
    """Run the chain as one script, once per test session; the exit status (None on a timeout) and the output."""
    head = chain[0].id
    if head not in _CHAIN_OUTPUT:
        # each part prints its done line, so a follower's test knows how far the chain got
        script = "\n".join(f"{b.code}\necho '{DONE.format(line=b.line)}'" for b in chain)
        out_path = workdir / "output.txt"
        process = _start(script, workdir, out_path)
        try:
            status: int | None = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _stop_group(process)
        _CHAIN_OUTPUT[head] = (status, _tail(out_path, 20000))
    return _CHAIN_OUTPUT[head]


def _serve(block: Block, workdir: Path) -> None:
    out_path = workdir / "output.txt"
    process = _start(block.code, workdir, out_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            status = process.poll()
            assert status is None, f"{block.id} exited with {status} before {block.arg} answered:\n{_tail(out_path)}"
            try:
                with urllib.request.urlopen(block.arg, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while it starts
            assert time.monotonic() < deadline, f"{block.arg} not 200 within {TIMEOUT_S} s:\n{_tail(out_path)}"
            time.sleep(0.2)
    finally:
        _stop_group(process)


@pytest.mark.realredis
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_shell_block_works_when_pasted_whole(block: Block, tmp_path: Path) -> None:
    chain = chain_of(block)
    upto = chain[: chain.index(block) + 1]
    skipped = next((b for b in upto if b.kind == "skip"), None)
    if skipped is not None:
        pytest.skip(
            f"{block.id}: {skipped.arg}" if skipped is block else f"{block.id}: after {skipped.id}: {skipped.arg}"
        )
    if block.kind == "serves":
        _serve(block, tmp_path)
        return
    chain = list(itertools.takewhile(lambda b: b.kind != "skip", chain))  # a skipped block ends the script
    assert all(b.kind != "serves" for b in chain), f"{block.id}: a block after a 'serves' block cannot run"
    status, output = _run_chain(chain, tmp_path)
    if DONE.format(line=block.line) in output:
        part = output.split(DONE.format(line=block.line))[0].split("@@shell-block-done")[-1]
        refusals = [r for r in REFUSALS if r in part]
        assert not refusals, f"{block.id}: ran, but an answer in it was a refusal ({refusals}):\n{part[-6000:]}"
        return
    reached = [b for b in chain if DONE.format(line=b.line) in output]
    failed = chain[len(reached)]
    what = "timed out" if status is None else f"exited with {status}"
    where = "" if failed is block else f" in {failed.id}, before this block"
    pytest.fail(f"{block.id}: the chain from {chain[0].id} {what}{where}:\n{output[-6000:]}")


def test_every_marker_sits_right_before_a_bash_block() -> None:
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, text in enumerate(lines, 1):
            if "shell-block:" not in text:
                continue
            assert MARKER.match(text.strip()), f"{page.name}:{number}: unknown marker {text.strip()!r}"
            following = next((t.strip() for t in lines[number:] if t.strip()), "")
            assert following == "```bash", f"{page.name}:{number}: the marker is not right before a ```bash block"
            if text.strip().startswith("<!-- shell-block: skip"):
                assert MARKER.match(text.strip())["arg"].strip("() "), f"{page.name}:{number}: a skip needs a reason"


BACKGROUND_SERVER = re.compile(r"flexlb (?:sim-worker|serve)\b[^&\n]*?--port (\d+)[^&\n]*&")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind != "skip"], ids=lambda b: b.id)
def test_a_block_waits_for_each_server_it_starts_in_the_background(block: Block) -> None:
    """A curl right after `... --port P &` races the process's start-up (it failed in CI on a busy machine)."""
    for match in BACKGROUND_SERVER.finditer(block.code):
        port = match.group(1)
        later = block.code[match.end() :]
        if f"localhost:{port}" in later or f"127.0.0.1:{port}" in later or f'"http_port": {port}' in later:
            assert f"localhost:{port}/health" in later, f"{block.id}: uses port {port} without waiting for it to listen"
