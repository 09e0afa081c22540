"""How often Python's cyclic garbage collector runs in a flexlb process.

Python's defaults (a young collection every 700 net container allocations, a full one after 100 young ones when
the survivors grew the heap by a quarter) suit short scripts. A router allocates a few hundred containers per
decision and keeps large long-lived ones (the fleet view, the block mirror: one entry per cached block), so at a
few thousand decisions per second it ran a full collection about every second, each walking the whole mirror
(~35 ms at 16 workers in ``flexlb bench schedule``): the schedule p99 was those pauses. With the young threshold at
10,000 (about 20 decisions' worth of allocations) and older generations collected 50 and 100 times less often,
full collections come every few minutes; a young one walks at most that many objects (a few ms).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

OLDER_THRESHOLDS = (50, 100)  # young collections per middle one, middle ones per full one
PYTHON_DEFAULTS = (700, 10, 10)


def apply_gc_policy(young_threshold: int) -> tuple[int, int, int]:
    """Set the collector's thresholds for a long-running server (FLEXLB_CONFIG ``gcYoungThreshold``); 0 keeps
    Python's defaults. Returns the thresholds in force."""
    thresholds = (young_threshold, *OLDER_THRESHOLDS) if young_threshold > 0 else PYTHON_DEFAULTS
    gc.set_threshold(*thresholds)
    log.debug("garbage collector thresholds %s", thresholds)
    return thresholds
