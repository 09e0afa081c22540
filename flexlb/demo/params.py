"""What `flexlb demo` runs: the fleet, the workers' settings, the workload and its sizing (pure; no I/O).

**Sizing.** The demo only shows something when placement matters, i.e. when the KV cache is under pressure: the
workload's distinct prefixes must not fit in one worker's cache, but a fair share of them must. Shared-prefix
sends ``GROUPS`` (16) groups, each a ``SYSTEM_PROMPT_LEN`` (2,048-token: 32 blocks of 64) system prompt followed by
a ``QUESTION_LEN`` (48-token) question of its own, shuffled; the question never fills a block, so a request's block
keys are its group's. A worker has ``kv_blocks`` 192 blocks: six prefixes, or four plus the two blocks each of its
running requests (``max_concurrency`` 8) holds beyond the shared prefix, plus a spare group.

- A cache-blind strategy (RANDOM, ROUND_ROBIN, LOWEST_CONCURRENCY) sends every group to every worker: each worker
  sees all 16 prefixes (512 blocks) through a 192-block LRU cache and keeps evicting them, so about 30% of the prompt
  tokens hit, and a miss pays a full 2,048-token prefill (~105 ms at 20 tokens/ms).
- A cache-aware strategy (SHORTEST_TTFT) keeps each group on the worker that already holds its prefix: 16 groups over
  4 workers are 4 per worker (128 blocks), which fit, so after each group's first request almost every request
  computes only its question (~6 ms).

With more KV (``--kv-blocks 1024``) nothing is evicted and the gap narrows to the cold misses of spreading every group
over every worker. Hot-prefix uses the same sizes: one hot 2,048-token prefix in 90% of the requests, unique (cold)
prompts in the rest, which evict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexlb.bench.workloads import WORKLOADS, RequestSpec
from flexlb.bench.workloads.hot_prefix import HotPrefixParams
from flexlb.bench.workloads.shared_prefix import SharedPrefixParams
from flexlb.domain import DEFAULT_BLOCK_SIZE, Role
from flexlb.stack.worker_options import WorkerOptions

STRATEGIES: tuple[str, ...] = ("RANDOM", "ROUND_ROBIN", "LOWEST_CONCURRENCY", "SHORTEST_TTFT")
DEMO_WORKLOADS: tuple[str, ...] = ("shared-prefix", "hot-prefix")

GROUPS = 16  # shared-prefix: distinct system prompts
SYSTEM_PROMPT_LEN = 2048  # tokens of a system prompt (hot-prefix: of the hot prefix): 32 KV blocks of 64
QUESTION_LEN = 48  # tokens after it, unique per request: under one block, so it never fills a cache block
OUTPUT_LEN = 32  # max_tokens of every request
HOT_FRACTION = 0.9  # hot-prefix: share of the requests that start with the hot prefix
DEFAULT_REQUESTS = 192  # per strategy; shared-prefix: 12 per group, about 10 s per strategy on 2 cores
QUICK_REQUESTS = 96  # `--quick`: the same fleet, sizing and speed with half the requests (CI)


# PREFILL and PDFUSION workers compute prompts under KV pressure (see the module docstring); DECODE workers hold
# every running request's whole prompt and output, so they get room for all of them.
WORKER_OPTIONS: Mapping[Role, WorkerOptions] = {
    Role.PDFUSION: WorkerOptions(kv_blocks=192, max_concurrency=8),
    Role.PREFILL: WorkerOptions(kv_blocks=192, max_concurrency=8),
    Role.DECODE: WorkerOptions(kv_blocks=1024, max_concurrency=32),
}


@dataclass(frozen=True, slots=True)
class Fleet:
    """``compute`` workers that prefill (PDFUSION when ``decode`` is 0, else PREFILL) and ``decode`` DECODE ones."""

    compute: int
    decode: int = 0

    def __post_init__(self) -> None:
        if self.compute < 1 or self.decode < 0:
            raise ValueError(f"a fleet needs at least one prefilling worker, got {self.compute} and {self.decode}")

    @property
    def disaggregated(self) -> bool:
        return self.decode > 0

    @property
    def compute_role(self) -> Role:
        return Role.PREFILL if self.disaggregated else Role.PDFUSION

    def roles(self) -> list[Role]:
        """One role per worker, prefilling workers first."""
        return [self.compute_role] * self.compute + [Role.DECODE] * self.decode

    def describe(self) -> str:
        if self.disaggregated:
            return f"{self.compute} prefill + {self.decode} decode workers"
        return f"{self.compute} pdfusion workers"


@dataclass(frozen=True, slots=True)
class DemoParams:
    workload: str = "shared-prefix"
    requests: int = DEFAULT_REQUESTS
    routers: int = 2
    fleet: Fleet = Fleet(4)
    concurrency: int = 8  # closed loop: requests in flight, over all routers
    time_scale: float = 1.0  # the workers' real seconds per model second
    kv_blocks: int | None = None  # overrides the prefilling workers' WORKER_OPTIONS kv_blocks
    strategies: tuple[str, ...] = STRATEGIES
    seed: int = 1
    quick: bool = False
    startup_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.workload not in DEMO_WORKLOADS:
            raise ValueError(f"workload: one of {', '.join(DEMO_WORKLOADS)}, not {self.workload!r}")
        if self.requests < 1 or self.routers < 1 or self.concurrency < 1:
            raise ValueError("requests, routers and concurrency must be at least 1")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be positive, got {self.kv_blocks}")
        if not self.strategies:
            raise ValueError("no strategy to run")

    def worker_options(self, role: Role) -> WorkerOptions:
        """The demo's WORKER_OPTIONS of ``role`` with this run's time scale (and KV override for prefilling ones)."""
        base = WORKER_OPTIONS[role]
        kv = self.kv_blocks if self.kv_blocks is not None and role is not Role.DECODE else base.kv_blocks
        return dataclasses.replace(base, kv_blocks=kv, time_scale=self.time_scale)


def workload_params(params: DemoParams) -> SharedPrefixParams | HotPrefixParams:
    """The bench workload's parameters for ``params.requests`` requests, sized as the module docstring says."""
    if params.workload == "shared-prefix":
        return SharedPrefixParams(
            num_groups=GROUPS,
            prompts_per_group=math.ceil(params.requests / GROUPS),
            system_prompt_len=SYSTEM_PROMPT_LEN,
            question_len=QUESTION_LEN,
            output_len=OUTPUT_LEN,
        )
    return HotPrefixParams(
        requests=params.requests,
        prefixes=1,
        fraction=HOT_FRACTION,
        prefix_len=SYSTEM_PROMPT_LEN,
        suffix_len=QUESTION_LEN,
        output_len=OUTPUT_LEN,
    )


def build_workload(params: DemoParams) -> list[RequestSpec]:
    """The requests every strategy gets, the same ones in the same order: ``params.requests`` of them."""
    return WORKLOADS[params.workload].build(workload_params(params), params.seed)[: params.requests]


def describe(params: DemoParams) -> dict[str, Any]:
    """The configuration as it goes to the JSON."""
    roles = sorted(set(params.fleet.roles()), key=list(Role).index)
    return {
        "workload": params.workload,
        "workload_params": dataclasses.asdict(workload_params(params)),
        "requests": params.requests,
        "routers": params.routers,
        "fleet": {
            "prefilling_workers": params.fleet.compute,
            "decode_workers": params.fleet.decode,
            "prefilling_role": params.fleet.compute_role.value,
            "description": params.fleet.describe(),
        },
        "worker_options": {role.value: params.worker_options(role).argv() for role in roles},
        "concurrency": params.concurrency,
        "time_scale": params.time_scale,
        "strategies": list(params.strategies),
        "seed": params.seed,
        "quick": params.quick,
        "block_size": DEFAULT_BLOCK_SIZE,
    }
