"""Rollout engines (registered by name) and the Rollouts batch they produce."""

from grouprl.rollout import hf  # noqa: F401  (registers "hf")
from grouprl.rollout.base import ROLLOUT_ENGINES, Rollouts, SamplingParams

__all__ = ["ROLLOUT_ENGINES", "Rollouts", "SamplingParams"]
