"""Rollout engines (registered by name), the protocol they follow and the Rollouts they produce."""

from grouprl.rollout import hf, vllm_colocate, vllm_server  # noqa: F401  (register hf, vllm)
from grouprl.rollout.base import (
    ROLLOUT_ENGINES,
    RolloutEngine,
    RolloutEngineError,
    Rollouts,
    SamplingParams,
    build_engine,
    sampling_params,
)
from grouprl.rollout.hf import HFEngine

__all__ = [
    "ROLLOUT_ENGINES",
    "HFEngine",
    "RolloutEngine",
    "RolloutEngineError",
    "Rollouts",
    "SamplingParams",
    "build_engine",
    "sampling_params",
]
