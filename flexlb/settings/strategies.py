"""Strategy names: flexlb's, and the original FlexLB's older ones mapped to them (FLEXLB_CONFIG's
``*LoadBalanceStrategy`` fields, `flexlb demo --strategy`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from flexlb.settings.common import ConfigError, _show, _squash

# Every part logs as "flexlb.settings", the one logger of the configuration (operators and tests filter on it).
log = logging.getLogger("flexlb.settings")

STRATEGIES: Final[tuple[str, ...]] = (
    "RANDOM",
    "ROUND_ROBIN",
    "LOWEST_CONCURRENCY",
    "SHORTEST_TTFT",
    "WEIGHTED_CACHE",
    "LEAST_KV_USED",
)

# Names from the original's LoadBalanceStrategyEnum (org.flexlb.enums, rtp_llm/flexlb in alibaba/rtp-llm) over its
# history that flexlb does not use, mapped to the flexlb strategy doing the same job. LOWEST_CACHE_USED was the
# original's decode default and picked the worker with the least KV cache used, hence LEAST_KV_USED. Names with no
# clear equivalent (WEIGHTED, MAX_THROUGHPUT_FIRST, the endpoint types) stay errors rather than a guess.
LEGACY_STRATEGIES: Final[Mapping[str, str]] = {
    "ROUND_ROBIN_LOWEST_CONCURRENCY": "LOWEST_CONCURRENCY",
    "LOWEST_CACHE_USED": "LEAST_KV_USED",
    "COST_BASED_DECODE": "WEIGHTED_CACHE",
    "COST_BASED_PREFILL": "SHORTEST_TTFT",
    "CACHE_AFFINITY_FIRST": "SHORTEST_TTFT",
    "FORCE_CHAT_STICKY": "SHORTEST_TTFT",
}


# so names are compared without case or separators.
_CANONICAL_BY_SQUASHED: Final = {_squash(s): s for s in STRATEGIES}
_LEGACY_BY_SQUASHED: Final = {_squash(k): (k, v) for k, v in LEGACY_STRATEGIES.items()}


def parse_strategy(value: str, where: str = "strategy") -> str:
    """Return the canonical strategy for ``value``; an older name is mapped with a warning, an unknown one raises."""
    squashed = _squash(value)
    if squashed in _CANONICAL_BY_SQUASHED:
        return _CANONICAL_BY_SQUASHED[squashed]
    if squashed in _LEGACY_BY_SQUASHED:
        old, new = _LEGACY_BY_SQUASHED[squashed]
        log.warning("%s: strategy %s is an older FlexLB name; flexlb uses %s instead", where, old, new)
        return new
    raise ConfigError(
        f"{where}: unknown strategy {_show(value)}; expected one of {', '.join(STRATEGIES)}"
        f" (older names accepted: {', '.join(LEGACY_STRATEGIES)})"
    )
