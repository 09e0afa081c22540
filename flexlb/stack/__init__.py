"""Local stacks of real processes, shared by `flexlb up`, `flexlb demo`, `flexlb launch`, the benchmarks and the tests.

``processes`` is the launcher (own process group, log file, readiness wait, SIGTERM then SIGKILL); ``local`` a
redis-server with services of masters, routers and simulated workers on it; ``worker_options`` the simulated workers'
settings; ``interrupts`` and ``terminal`` the signal handling and status line of a command that runs a stack. This
package imports neither ``flexlb.demo`` nor ``flexlb.bench`` (tests/unit/test_import_direction.py).
"""
