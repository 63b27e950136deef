"""Rollout strategies (`rollout.strategy`): what the collector does with a scored batch
before planning. `base.py` holds the registry and what strategies share; each other module
is one family."""

from typing import Any

from grouprl.training.strategies import (
    anchors,  # noqa: F401  (offpolicy_anchors)
    augment,  # noqa: F401  (difficulty_aug)
    budgets,  # noqa: F401  (anytime_budget)
    continuation,  # noqa: F401  (dataset_reset, serial_exit, segment_mc)
    entropy,  # noqa: F401  (aepo)
    guided,  # noqa: F401  (guide_hints, icpo, expo)
    hints,  # noqa: F401  (scaf_hints, sage_hints, icl_seed, igrpo)
)
from grouprl.training.strategies.base import ROLLOUT_STRATEGIES, Strategy


def build_strategy(spec: dict[str, Any] | None) -> Any:
    """The `rollout.strategy` named by spec ({name: ..., params...})."""
    spec = dict(spec or {"name": "plain"})
    name = spec.pop("name", "plain")
    ROLLOUT_STRATEGIES.check_params(name, spec, "rollout.strategy")
    return ROLLOUT_STRATEGIES.get(name)(**spec)


__all__ = ["ROLLOUT_STRATEGIES", "Strategy", "build_strategy"]
