"""`flexlb demo`: a local stack of real processes that compares routing strategies on a prefix-heavy workload.

``WORKER_OPTIONS`` are the simulated workers' per-role settings; the Procfile and docker-compose.yml use the same.
"""

from flexlb.demo.params import WORKER_OPTIONS, WorkerOptions

__all__ = ["WORKER_OPTIONS", "WorkerOptions"]
