"""Workload generators: prefixes really shared (in flexlb's block_cache_keys), turns extend, traces reproduce their
prefix sharing, scaling, and arrival processes."""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
from collections import Counter
from pathlib import Path

import orjson
import pytest

from flexlb.bench.workloads import WORKLOADS, Arrivals, RequestSpec, WorkloadError, apply_arrivals
from flexlb.bench.workloads.arrivals import fixed_offsets, poisson_offsets
from flexlb.bench.workloads.hot_prefix import HotPrefixParams
from flexlb.bench.workloads.mooncake import MooncakeParams
from flexlb.bench.workloads.multi_turn import MultiTurnParams
from flexlb.bench.workloads.shared_prefix import SharedPrefixParams
from flexlb.blocks import block_cache_keys

BLOCK = 64


def keys(spec: RequestSpec) -> list[int]:
    return block_cache_keys(spec.prompt_tokens(), BLOCK)


def shared_leading(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- generated shared prefix ----


def test_shared_prefix_groups_share_their_system_prompt_blocks_and_nothing_else() -> None:
    params = SharedPrefixParams(
        num_groups=3, prompts_per_group=4, system_prompt_len=256, question_len=100, output_len=8
    )
    specs = WORKLOADS["shared-prefix"].build(params, seed=7)
    assert len(specs) == 12
    assert Counter(s.tag for s in specs) == {"g0": 4, "g1": 4, "g2": 4}
    assert [s.tag for s in specs] != sorted(s.tag for s in specs), "requests are shuffled"
    assert all(s.api == "completions" and s.max_tokens == 8 for s in specs)
    assert all(len(s.prompt_tokens()) == 356 for s in specs)
    system_blocks = params.system_prompt_len // BLOCK
    all_keys = [keys(s) for s in specs]
    for i, a in enumerate(specs):
        for j, b in enumerate(specs):
            if i == j:
                continue
            n = shared_leading(all_keys[i], all_keys[j])
            if a.tag == b.tag:
                assert n == system_blocks  # the system prompt's 4 blocks, then the questions differ
            else:
                assert n == 0


def test_shared_prefix_is_deterministic_per_seed() -> None:
    w = WORKLOADS["shared-prefix"]
    params = SharedPrefixParams(num_groups=2, prompts_per_group=2, system_prompt_len=70, question_len=5)
    assert w.build(params, 1) == w.build(params, 1)
    assert w.build(params, 1) != w.build(params, 2)


def test_shared_prefix_rejects_empty_sizes() -> None:
    with pytest.raises(WorkloadError, match="--gsp-num-groups"):
        WORKLOADS["shared-prefix"].build(SharedPrefixParams(num_groups=0), 1)


# ---- multi-turn ----


def test_multi_turn_every_turn_extends_the_previous_one() -> None:
    params = MultiTurnParams(sessions=3, turns=4, first_len=100, question_len=20, output_len=30)
    specs = WORKLOADS["multi-turn"].build(params, seed=3)
    assert len(specs) == 12
    assert [s.tag for s in specs[:3]] == ["s0t0", "s1t0", "s2t0"]  # turn by turn over the sessions
    by_tag = {s.tag: (i, s) for i, s in enumerate(specs)}
    for session in range(3):
        assert by_tag[f"s{session}t0"][1].depends_on is None
        for turn in range(1, 4):
            prev_i, prev = by_tag[f"s{session}t{turn - 1}"]
            _, cur = by_tag[f"s{session}t{turn}"]
            assert cur.api == "chat" and cur.depends_on == prev_i
            assert len(cur.messages or ()) == len(prev.messages or ()) + 2  # the answer and a new question
            prev_tokens, cur_tokens = prev.prompt_tokens(), cur.prompt_tokens()
            assert cur_tokens[: len(prev_tokens)] == prev_tokens
            # + the answer, "<|user|>", the question, "<|assistant|>"
            assert len(cur_tokens) == len(prev_tokens) + 30 + 1 + 20 + 1
            prev_keys = keys(prev)
            assert keys(cur)[: len(prev_keys)] == prev_keys
    assert shared_leading(keys(by_tag["s0t0"][1]), keys(by_tag["s1t0"][1])) == 0


def test_multi_turn_system_prompt_is_shared_by_every_session() -> None:
    params = MultiTurnParams(sessions=2, turns=1, system_prompt_len=200, first_len=10)
    a, b = WORKLOADS["multi-turn"].build(params, seed=1)
    assert a.messages is not None and a.messages[0]["role"] == "system"
    assert shared_leading(keys(a), keys(b)) == 3  # "<|system|>" + 200 words: 3 full blocks


# ---- hot prefix ----


def test_hot_prefix_skews_onto_few_prefixes() -> None:
    params = HotPrefixParams(requests=400, prefixes=2, fraction=0.75, prefix_len=128, suffix_len=10, output_len=4)
    specs = WORKLOADS["hot-prefix"].build(params, seed=11)
    tags = Counter(s.tag for s in specs)
    assert sum(tags.values()) == 400
    assert 0.68 < (tags["hot0"] + tags["hot1"]) / 400 < 0.82
    assert tags["hot0"] > tags["hot1"] > 0  # Zipf: the first prefix is the hottest
    first_key: dict[str, set[int]] = {s.tag: set() for s in specs}
    for s in specs:
        k = keys(s)
        first_key[s.tag].add(k[0])
        if s.tag.startswith("hot"):
            assert len(k) == 2  # 138 tokens
    assert len(first_key["hot0"]) == 1 and len(first_key["hot1"]) == 1
    assert first_key["hot0"] != first_key["hot1"]
    assert len(first_key["cold"]) == tags["cold"]  # every cold prompt is unique
    assert not first_key["cold"] & (first_key["hot0"] | first_key["hot1"])


def test_hot_prefix_validates_fraction() -> None:
    with pytest.raises(WorkloadError, match="fraction"):
        WORKLOADS["hot-prefix"].build(HotPrefixParams(fraction=1.5), 1)


# ---- Mooncake trace replay ----

TRACE = [
    {"timestamp": 1000, "input_length": 1500, "output_length": 100, "hash_ids": [1, 2, 3]},
    {"timestamp": 1500, "input_length": 1200, "output_length": 50, "hash_ids": [1, 2, 4]},
    {"timestamp": 3000, "input_length": 700, "output_length": 20, "hash_ids": [5, 6]},
    {"timestamp": 4000, "input_length": 1536, "output_length": 10, "hash_ids": [1, 2, 3]},
    {"timestamp": 4200, "input_length": 2000, "output_length": 3, "hash_ids": [1, 7, 8, 9]},
]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(row) for row in TRACE) + b"\n\n")
    return path


def common_ids(a: list[int], b: list[int]) -> int:
    return shared_leading(a, b)


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_mooncake_reproduces_the_traces_prefix_sharing(trace_file: Path, scale: float) -> None:
    specs = WORKLOADS["mooncake"].build(MooncakeParams(trace=str(trace_file), length_scale=scale), seed=0)
    assert len(specs) == len(TRACE)
    per_id = round(512 * scale) // BLOCK  # flexlb blocks per trace block
    for row, spec in zip(TRACE, specs, strict=True):
        assert len(spec.prompt_tokens()) == round(row["input_length"] * scale)
        assert spec.max_tokens == max(1, round(row["output_length"] * scale))
    for i, (row_a, a) in enumerate(zip(TRACE, specs, strict=True)):
        for row_b, b in list(zip(TRACE, specs, strict=True))[i + 1 :]:
            ka, kb = keys(a), keys(b)
            expected = min(common_ids(row_a["hash_ids"], row_b["hash_ids"]) * per_id, len(ka), len(kb))
            assert shared_leading(ka, kb) == expected, (row_a, row_b)
    assert shared_leading(keys(specs[0]), keys(specs[1])) == 2 * per_id  # hash ids 1, 2


def test_mooncake_time_scale_start_and_limit(trace_file: Path) -> None:
    build = WORKLOADS["mooncake"].build
    specs = build(MooncakeParams(trace=str(trace_file), time_scale=0.5), seed=0)
    assert [s.arrival_s for s in specs] == [0.0, 0.25, 1.0, 1.5, 1.6]
    sliced = build(MooncakeParams(trace=str(trace_file), start=1, limit=2), seed=0)
    assert [s.arrival_s for s in sliced] == [0.0, 1.5]
    assert [len(s.prompt_tokens()) for s in sliced] == [1200, 700]


def test_mooncake_errors_name_the_problem(tmp_path: Path, trace_file: Path) -> None:
    build = WORKLOADS["mooncake"].build
    with pytest.raises(WorkloadError, match="--trace"):
        build(MooncakeParams(), seed=0)
    with pytest.raises(WorkloadError, match="cannot read"):
        build(MooncakeParams(trace=str(tmp_path / "missing.jsonl")), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n{"timestamp": 1}\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl:2: missing field 'input_length'"):
        build(MooncakeParams(trace=str(bad)), seed=0)
    with pytest.raises(WorkloadError, match="no requests"):
        build(MooncakeParams(trace=str(trace_file), start=99), seed=0)
    with pytest.raises(WorkloadError, match="shorter than one token"):
        build(MooncakeParams(trace=str(trace_file), length_scale=0.0001), seed=0)


# ---- arrivals ----


def test_poisson_arrivals_have_the_rates_mean_gap() -> None:
    offsets = poisson_offsets(20_000, rate=50.0, rng=random.Random(7))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_fixed_arrivals_and_apply() -> None:
    assert fixed_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    specs = [RequestSpec(prompt="a b", arrival_s=9.0) for _ in range(3)]
    fixed = apply_arrivals(specs, Arrivals("fixed", rate=4.0), random.Random(0))
    assert [s.arrival_s for s in fixed] == [0.0, 0.25, 0.5]
    assert apply_arrivals(specs, Arrivals("trace"), random.Random(0)) == specs
    assert apply_arrivals(specs, Arrivals("closed", concurrency=2), random.Random(0)) == specs
    poisson = apply_arrivals(specs, Arrivals("poisson", rate=4.0), random.Random(0))
    assert [dataclasses.replace(s, arrival_s=9.0) for s in poisson] == specs


def test_arrivals_validate() -> None:
    with pytest.raises(ValueError, match="rate"):
        Arrivals("poisson")
    with pytest.raises(ValueError, match="concurrency"):
        Arrivals("closed", concurrency=0)
    assert Arrivals("closed", concurrency=3).describe() == "closed loop, concurrency 3"


def test_request_spec_has_one_prompt_form() -> None:
    with pytest.raises(ValueError):
        RequestSpec()
    with pytest.raises(ValueError):
        RequestSpec(prompt="x", messages=[{"role": "user", "content": "x"}])
    assert RequestSpec(messages=[{"role": "user", "content": "hi there"}]).rendered() == (
        "<|user|> hi there\n<|assistant|>"
    )
