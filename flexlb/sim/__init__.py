"""The simulated engine worker: an inference engine model with real timing, served over OpenAI/SGLang HTTP."""

from flexlb.sim.engine import EngineConfig, SimEngine
from flexlb.sim.http_api import create_sim_app, run_sim_worker

__all__ = ["EngineConfig", "SimEngine", "create_sim_app", "run_sim_worker"]
