"""The options a stack starts a simulated worker (`flexlb sim-worker`) with."""

from __future__ import annotations

from dataclasses import dataclass

from flexlb.domain import Role
from flexlb.sim.engine import EngineConfig


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Per-worker options (`flexlb demo`'s are WORKER_OPTIONS in flexlb/demo/params.py; the Procfile's are the same)."""

    kv_blocks: int
    max_concurrency: int
    time_scale: float = 1.0

    def argv(self) -> list[str]:
        """As `flexlb sim-worker` options, in this order."""
        return [
            "--kv-blocks", str(self.kv_blocks),
            "--max-concurrency", str(self.max_concurrency),
            "--time-scale", f"{self.time_scale:g}",
        ]  # fmt: skip

    def engine_config(self, role: Role) -> EngineConfig:
        return EngineConfig(
            role=role, kv_blocks=self.kv_blocks, max_concurrency=self.max_concurrency, time_scale=self.time_scale
        )
