"""`flexlb demo`'s pure parts: options, the workload and its KV sizing, the report, the terminal, signal handling."""

from __future__ import annotations

import math
import os
import signal

import pytest

from flexlb.blocks import block_cache_keys, tokenize
from flexlb.cli import build_parser
from flexlb.demo import WORKER_OPTIONS
from flexlb.demo.cli import params_from
from flexlb.demo.params import (
    DEFAULT_REQUESTS,
    GROUPS,
    QUICK_REQUESTS,
    STRATEGIES,
    DemoParams,
    Fleet,
    build_workload,
    describe,
)
from flexlb.demo.report import cpu_usage, fleet_counters, progress_line, render_table
from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.stack.interrupts import Interrupts
from flexlb.stack.terminal import Terminal


def parse(*argv: str) -> DemoParams:
    return params_from(build_parser().parse_args(["demo", *argv]))


def test_defaults_quick_and_fleet_options() -> None:
    p = parse()
    assert (p.fleet, p.requests, p.routers, p.concurrency, p.time_scale) == (Fleet(4), DEFAULT_REQUESTS, 2, 8, 1.0)
    assert p.strategies == STRATEGIES == ("RANDOM", "ROUND_ROBIN", "LOWEST_CONCURRENCY", "SHORTEST_TTFT")
    assert parse("--quick").requests == QUICK_REQUESTS and parse("--quick", "--requests", "7").requests == 7
    assert parse("--prefill-workers", "3").fleet == Fleet(3, 2)
    assert parse("--decode-workers", "1").fleet == Fleet(4, 1)
    assert parse("--workers", "6").fleet == Fleet(6)
    with pytest.raises(ValueError, match="--workers"):
        parse("--workers", "2", "--decode-workers", "1")


def test_strategies_option_takes_canonical_and_older_names() -> None:
    assert parse("--strategies", "shortest_ttft, random").strategies == ("SHORTEST_TTFT", "RANDOM")
    with pytest.raises(SystemExit):
        parse("--strategies", "FASTEST")
    with pytest.raises(SystemExit):
        parse("--strategies", ",")


def test_fleet_roles_and_worker_options() -> None:
    assert Fleet(2).roles() == [Role.PDFUSION, Role.PDFUSION] and not Fleet(2).disaggregated
    assert Fleet(2, 1).roles() == [Role.PREFILL, Role.PREFILL, Role.DECODE]
    with pytest.raises(ValueError):
        Fleet(0)
    p = DemoParams(time_scale=0.5, kv_blocks=100)
    assert p.worker_options(Role.PDFUSION).argv() == [
        "--kv-blocks",
        "100",
        "--max-concurrency",
        "8",
        "--time-scale",
        "0.5",
    ]
    assert p.worker_options(Role.DECODE).kv_blocks == WORKER_OPTIONS[Role.DECODE].kv_blocks  # not overridden
    assert WORKER_OPTIONS[Role.PREFILL] == WORKER_OPTIONS[Role.PDFUSION]  # the stack's prefill = the demo's workers
    config = describe(p)
    assert config["worker_options"] == {"PDFUSION": p.worker_options(Role.PDFUSION).argv()}


def test_every_strategy_gets_the_same_requests() -> None:
    a, b = build_workload(DemoParams()), build_workload(DemoParams())
    assert len(a) == DEFAULT_REQUESTS and a == b
    assert len({s.tag for s in a}) == GROUPS
    assert len(build_workload(DemoParams(requests=5))) == 5
    hot = build_workload(DemoParams(workload="hot-prefix", requests=50))
    assert len(hot) == 50 and {s.tag for s in hot} <= {"hot0", "cold"}


def test_the_kv_cache_holds_a_fair_share_of_the_prefixes_but_not_all_of_them() -> None:
    """The sizing the demo depends on (flexlb/demo/params.py): cache-blind routing must evict, cache-aware need not."""
    params = DemoParams()
    specs = build_workload(params)
    kv = params.worker_options(Role.PDFUSION).kv_blocks
    prefixes: dict[str, set[int]] = {}
    own_blocks = 0
    for spec in specs:
        tokens = tokenize(spec.rendered())
        prefixes.setdefault(spec.tag, set()).update(block_cache_keys(tokens, DEFAULT_BLOCK_SIZE))
        own = math.ceil((len(tokens) + spec.max_tokens) / DEFAULT_BLOCK_SIZE) - len(prefixes[spec.tag])
        own_blocks = max(own_blocks, own)  # blocks a running request holds beyond its group's prefix
    per_group = {len(keys) for keys in prefixes.values()}
    assert per_group == {32}  # the questions never fill a block: a request's block keys are its group's
    everything = sum(len(keys) for keys in prefixes.values())
    assert everything > 2.5 * kv  # every prefix on every worker: most of them evicted
    workers = params.fleet.compute
    share = math.ceil(GROUPS / workers) * 32
    running = WORKER_OPTIONS[Role.PDFUSION].max_concurrency * own_blocks
    assert share + running + 32 <= kv  # a worker's share, its running requests and one stray group fit


def test_progress_and_status_lines_overwrite_each_other() -> None:
    line = progress_line(2, 4, "ROUND_ROBIN", 48, 96, 1, 3.25)
    assert line.startswith("[2/4] ROUND_ROBIN ") and "[############............]" in line
    assert "   48/96 done  1 errors    3.2 s" in line and len(line) == 100
    assert "[........................]" in progress_line(1, 1, "RANDOM", 0, 0 + 10, 0, 0.0)
    out: list[str] = []
    term = Terminal(out.append)
    term.overwrite("a")
    term.overwrite("b")
    term.line("done")
    term.line("next")
    term.line()  # nothing open: writes nothing
    assert "".join(out) == "\ra\rb\rdone\nnext\n"


def test_fleet_counters_and_cpu_usage() -> None:
    rows = [
        {"url": "a", "requests": 30.0, "prompt_tokens": 1000.0, "cached_tokens": 800.0},
        {"url": "b", "requests": 10.0, "prompt_tokens": 1000.0, "cached_tokens": 200.0},
        {"url": "c", "error": "unreadable"},
    ]
    c = fleet_counters(rows)
    assert (c["hit_ratio"], c["busiest_share"], c["requests"], c["unreadable"]) == (0.5, 0.75, 30 + 10, 1)
    assert fleet_counters([])["hit_ratio"] is None and fleet_counters([])["busiest_share"] is None
    cpu = cpu_usage({"client": 1.0, "w": 2.0, "gone": None}, {"client": 2.5, "w": 2.5, "gone": 1.0}, 2.0)
    assert cpu == {"seconds": {"client": 1.5, "w": 0.5}, "total_s": 2.0, "cores": 1.0}


def _strategy(name: str, ttft: float, hit: float) -> dict:
    summary = {
        "requests": 10,
        "errors": 0,
        "request_throughput": 5.0,
        "ttft_ms": {"mean": ttft, "p50": ttft, "p99": ttft},
        "e2e_ms": {"mean": 2 * ttft, "p99": 3 * ttft},
    }
    return {
        "strategy": name,
        "interrupted": False,
        "summary": summary,
        "fleet": {"hit_ratio": hit, "busiest_share": 0.3},
    }


def test_render_table_has_a_row_per_strategy_and_the_oracle() -> None:
    oracle = {
        "requests": 10,
        "hit_ratio": 0.9,
        "ttft_ms": {"mean": 5.0, "p50": 4.0, "p99": 9.0},
        "e2e_ms": {"mean": 50.0, "p99": 90.0},
        "ttft_comparable": True,
    }
    result = {
        "config": describe(DemoParams()),
        "strategies": [_strategy("RANDOM", 120.0, 0.25), _strategy("SHORTEST_TTFT", 40.0, 0.85)],
        "oracle": oracle,
    }
    text = render_table(result)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["strategy", "requests", "errors", "req/s"]
    assert lines[2].split() == [
        "RANDOM",
        "10",
        "0",
        "5.0",
        "120.0",
        "120.0",
        "120.0",
        "240.0",
        "360.0",
        "25.0%",
        "30.0%",
    ]
    assert lines[4].split() == ["oracle", "(bound)", "10", "-", "-", "5.0", "4.0", "9.0", "50.0", "90.0", "90.0%", "-"]
    assert "decode worker starts decoding" not in text
    result["oracle"] = {**oracle, "ttft_comparable": False}
    text = render_table(result)
    assert "decode worker starts decoding without waiting" in text
    assert text.splitlines()[4].split()[5:9] == ["-", "-", "-", "-"]


def test_a_signal_interrupts_and_is_not_lost_when_swallowed() -> None:
    interrupts = Interrupts()
    before = signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        interrupts.check()  # nothing yet
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested and interrupts.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()  # again: a swallowed first one is not lost
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGTERM) == before
