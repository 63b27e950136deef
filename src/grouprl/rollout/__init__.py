"""Rollout engines (registered by name), the protocol they follow and the Rollouts they produce."""

from grouprl.rollout import hf  # noqa: F401  (registers "hf")
from grouprl.rollout.base import (
    ROLLOUT_ENGINES,
    RolloutEngine,
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
    "Rollouts",
    "SamplingParams",
    "build_engine",
    "sampling_params",
]
