"""Generated shared prefix (SGLang bench_serving's ``generated-shared-prefix``): groups of requests that share a long
system prompt, each followed by its own question; all requests shuffled together."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from flexlb.bench.workloads.spec import RequestSpec, WorkloadError
from flexlb.bench.workloads.text import random_words

OPTION_PREFIX = "gsp-"


@dataclass(frozen=True, slots=True)
class SharedPrefixParams:
    num_groups: int = field(default=8, metadata={"help": "groups, each with its own system prompt"})
    prompts_per_group: int = field(default=16, metadata={"help": "questions per group"})
    system_prompt_len: int = field(default=1024, metadata={"help": "tokens of each group's system prompt"})
    question_len: int = field(default=64, metadata={"help": "tokens of each question"})
    output_len: int = field(default=32, metadata={"help": "max_tokens of each request"})


def generate(params: SharedPrefixParams, rng: random.Random) -> list[RequestSpec]:
    """``num_groups * prompts_per_group`` completions: system prompt + question, shuffled; tag ``g<group>``."""
    for name in ("num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len"):
        if getattr(params, name) < 1:
            raise WorkloadError(f"--{OPTION_PREFIX}{name.replace('_', '-')} must be at least 1")
    specs = []
    for group in range(params.num_groups):
        system = random_words(rng, params.system_prompt_len)
        for _ in range(params.prompts_per_group):
            prompt = f"{system} {random_words(rng, params.question_len)}"
            specs.append(RequestSpec(prompt=prompt, max_tokens=params.output_len, tag=f"g{group}"))
    rng.shuffle(specs)
    return specs
