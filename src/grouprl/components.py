"""Build the configured algorithm components from their registries.

The trainer only ever sees the objects built here, so adding a method means registering
a component and writing a recipe, never editing the trainer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grouprl.config import Config, ConfigError
from grouprl.registry import RegistryError


@dataclass
class Components:
    advantage: Callable[..., Any]  # rewards_BG -> adv_BG
    loss: Callable[..., Any]  # PolicyInputs -> TermOutput
    aggregation: Callable[..., Any]  # (values_NT, mask_NT, BatchNorm) -> scalar
    aggregation_name: str
    regularizers: list[Any]

    @property
    def needs_ref(self) -> bool:
        return any(getattr(r, "needs_ref", False) for r in self.regularizers)

    @property
    def needs_entropy_grad(self) -> bool:
        return any(getattr(r, "needs_entropy", False) for r in self.regularizers)


def split_spec(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    params = dict(spec)
    return str(params.pop("name")), params


def _partial(registry: Any, key: str, spec: dict[str, Any]) -> Callable[..., Any]:
    name, params = split_spec(spec)
    try:
        registry.get(name)
        registry.check_params(name, params, where=key)
    except RegistryError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return functools.partial(registry.get(name), **params)


def build_components(cfg: Config) -> Components:
    from grouprl.algorithms import ADVANTAGES, AGGREGATIONS, LOSSES, REGULARIZERS

    loss_spec = dict(cfg.loss)
    agg_name = str(loss_spec.pop("aggregation", "token_mean"))
    try:
        aggregation = AGGREGATIONS.get(agg_name)
    except RegistryError as exc:
        raise ConfigError(f"loss.aggregation: {exc}") from None
    regs = []
    for i, spec in enumerate(cfg.regularizers):
        name, params = split_spec(spec)
        try:
            regs.append(REGULARIZERS.build(name, **params))
        except (RegistryError, ValueError, TypeError) as exc:
            raise ConfigError(f"regularizers.{i}: {exc}") from None
    return Components(
        advantage=_partial(ADVANTAGES, "advantage", cfg.advantage),
        loss=_partial(LOSSES, "loss", loss_spec),
        aggregation=aggregation,
        aggregation_name=agg_name,
        regularizers=regs,
    )


def build_rewards(cfg: Config) -> Any:
    from grouprl.rewards import RewardSet

    if not cfg.rewards:
        raise ConfigError(
            "rewards: no reward function configured; add e.g. rewards: [math_accuracy]"
        )
    try:
        return RewardSet.from_config(cfg.rewards)
    except ConfigError:
        raise
    except Exception as exc:  # file not found, bad function name, unknown key...
        raise ConfigError(f"rewards: {exc}") from None


def check_components(cfg: Config) -> None:
    build_components(cfg)
