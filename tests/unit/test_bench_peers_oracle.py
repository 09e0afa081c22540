"""bench peers' oracle bound on the workers' hit ratio: what a perfect placement with infinite KV reaches, and the
target of issue 11 (flexlb's hit ratio with 1 router within 5% of it)."""

from __future__ import annotations

import pytest
from test_bench_peers_plan import _run

from flexlb.bench import peers as pp
from flexlb.bench.workloads.spec import RequestSpec

SHARED = " ".join(f"s{i}" for i in range(128))  # two 64-token blocks (one token per word in the simulator)


def test_the_oracle_counts_every_full_block_an_earlier_request_had() -> None:
    specs = [RequestSpec(prompt=f"{SHARED} first tail"), RequestSpec(prompt=f"{SHARED} second tail")]
    # the first request finds nothing; the second finds both shared blocks (128 of its 130 tokens)
    assert pp.oracle_hit_ratio(specs, 64) == pytest.approx(128 / 260)
    assert pp.oracle_hit_ratio([RequestSpec(prompt="a b c")], 64) == 0.0


def test_the_oracle_target_wants_95_percent_of_the_bound() -> None:
    combined = {
        "flexlb x1": pp.combine([_run([70.0], 0, 600, 1.0)]),
        "flexlb x4": pp.combine([_run([50.0], 0, 100, 1.0)]),
    }
    targets = pp.check_targets(combined, [], oracle_hit_ratio=0.7)
    assert [t.name for t in targets] == ["flexlb x1: workers' hit ratio (>= 95% of the oracle's)"]
    assert targets[0].goal == pytest.approx(0.665) and targets[0].passed is False  # 0.6 measured
    assert pp.check_targets(combined, [], oracle_hit_ratio=0.6)[0].passed is True
    assert pp.check_targets(combined, []) == []  # no bound: no target
