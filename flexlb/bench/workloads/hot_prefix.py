"""Hot-prefix skew: most requests share one of a few hot prefixes, the rest are cold (unique) prompts.

The workload on which prefix-only routing piles every hot request onto the worker that cached the prefix first.
Hot prefix i is picked with weight 1 / (i + 1) (Zipf, s = 1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from flexlb.bench.workloads.spec import RequestSpec, WorkloadError
from flexlb.bench.workloads.text import random_words

OPTION_PREFIX = "hot-"


@dataclass(frozen=True, slots=True)
class HotPrefixParams:
    requests: int = field(default=200, metadata={"help": "requests to generate"})
    prefixes: int = field(default=1, metadata={"help": "hot prefixes (Zipf weights 1, 1/2, 1/3, ...)"})
    fraction: float = field(default=0.9, metadata={"help": "share of requests that start with a hot prefix"})
    prefix_len: int = field(default=1024, metadata={"help": "tokens of each hot prefix"})
    suffix_len: int = field(default=64, metadata={"help": "tokens after the hot prefix, unique per request"})
    cold_len: int = field(default=0, metadata={"help": "tokens of a cold prompt (0: prefix-len + suffix-len)"})
    output_len: int = field(default=32, metadata={"help": "max_tokens of each request"})


def generate(params: HotPrefixParams, rng: random.Random) -> list[RequestSpec]:
    """``requests`` completions in random order; tag ``hot<i>`` or ``cold``."""
    for name in ("requests", "prefixes", "prefix_len", "suffix_len", "output_len"):
        if getattr(params, name) < 1:
            raise WorkloadError(f"--{OPTION_PREFIX}{name.replace('_', '-')} must be at least 1")
    if not 0 <= params.fraction <= 1:
        raise WorkloadError(f"--{OPTION_PREFIX}fraction must be in [0, 1], got {params.fraction}")
    if params.cold_len < 0:
        raise WorkloadError(f"--{OPTION_PREFIX}cold-len must not be negative")
    cold_len = params.cold_len or params.prefix_len + params.suffix_len
    prefixes = [random_words(rng, params.prefix_len) for _ in range(params.prefixes)]
    weights = [1 / (i + 1) for i in range(params.prefixes)]
    specs = []
    for _ in range(params.requests):
        if rng.random() < params.fraction:
            (i,) = rng.choices(range(params.prefixes), weights=weights)
            prompt, tag = f"{prefixes[i]} {random_words(rng, params.suffix_len)}", f"hot{i}"
        else:
            prompt, tag = random_words(rng, cold_len), "cold"
        specs.append(RequestSpec(prompt=prompt, max_tokens=params.output_len, tag=tag))
    return specs
