"""Benchmark workloads: pure generators of request specs from parameters and a seeded ``random.Random``.

``WORKLOADS`` maps each ``flexlb bench run --workload`` name to its parameters, option prefix and generator.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flexlb.bench.workloads import hot_prefix, mooncake, multi_turn, shared_prefix
from flexlb.bench.workloads.arrivals import Arrivals, apply_arrivals
from flexlb.bench.workloads.spec import RequestSpec, WorkloadError

__all__ = ["WORKLOADS", "Arrivals", "RequestSpec", "Workload", "WorkloadError", "apply_arrivals"]


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    summary: str
    params_type: type
    option_prefix: str  # of its command-line options: "gsp-" gives --gsp-num-groups
    generate: Callable[[Any, random.Random], list[RequestSpec]]
    has_timestamps: bool = False  # its specs carry their own arrival times (trace replay)

    def build(self, params: Any, seed: int) -> list[RequestSpec]:
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} takes {self.params_type.__name__}, got {type(params).__name__}")
        # Seeded per workload as well: two workloads with the same seed draw different words (no shared cache).
        return self.generate(params, random.Random(f"{self.name}:{seed}"))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "shared-prefix",
            "groups of prompts sharing a long system prompt (SGLang's generated-shared-prefix)",
            shared_prefix.SharedPrefixParams,
            shared_prefix.OPTION_PREFIX,
            shared_prefix.generate,
        ),
        Workload(
            "multi-turn",
            "chat sessions, each turn resending the conversation so far",
            multi_turn.MultiTurnParams,
            multi_turn.OPTION_PREFIX,
            multi_turn.generate,
        ),
        Workload(
            "mooncake",
            "replay of a Mooncake JSON-lines trace (--trace PATH)",
            mooncake.MooncakeParams,
            mooncake.OPTION_PREFIX,
            mooncake.generate,
            has_timestamps=True,
        ),
        Workload(
            "hot-prefix",
            "most requests share one or a few hot prefixes, the rest are unique",
            hot_prefix.HotPrefixParams,
            hot_prefix.OPTION_PREFIX,
            hot_prefix.generate,
        ),
    )
}
