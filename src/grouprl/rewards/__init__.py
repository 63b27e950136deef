"""Reward functions: the TRL-compatible protocol, RewardSet, and the built-ins."""

from grouprl.rewards import (
    builtins,  # noqa: F401  (registers the built-ins in REWARDS)
    clinical,  # noqa: F401  (registers clinical_* / mcq_* objectives)
    length_control,  # noqa: F401  (registers format_length, budget_length, grpo_lambda_length)
    majority,  # noqa: F401  (registers majority_vote)
    model_rewards,  # noqa: F401  (registers the model-based rewards: reward_model, ...)
    ranking,  # noqa: F401  (registers rank_relevance)
    tools,  # noqa: F401  (registers tool_efficiency, tool_call_format)
)
from grouprl.rewards.base import (
    DEFAULT_TIMEOUT,
    REWARDS,
    RewardResult,
    RewardSet,
    RewardSpec,
    TrainerState,
    completion_text,
    load_reward_fn,
)
from grouprl.rewards.builtins import (
    choice_accuracy,
    exact_match,
    find_boxes,
    format_reward,
    math_accuracy,
)
from grouprl.rewards.health import NoRewardError, RewardFailureError

__all__ = [
    "DEFAULT_TIMEOUT",
    "REWARDS",
    "NoRewardError",
    "RewardFailureError",
    "RewardResult",
    "RewardSet",
    "RewardSpec",
    "TrainerState",
    "choice_accuracy",
    "completion_text",
    "exact_match",
    "find_boxes",
    "format_reward",
    "load_reward_fn",
    "math_accuracy",
]
