"""AdamW and the learning-rate schedules (constant or cosine, with linear warm-up)."""

from __future__ import annotations

import math
from typing import Any

import torch

from grouprl.config import HF_SCHEDULES, ConfigError, TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    kwargs: dict | None = None,
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if schedule in HF_SCHEDULES:
        return _hf_lambda(schedule, warmup_steps, total_steps, kwargs or {})(step)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def _hf_lambda(name: str, warmup: int, total: int, kwargs: dict) -> Any:
    """The factor function of transformers' schedule `name` (built on a throwaway optimizer)."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        sched = get_scheduler(
            name,
            dummy,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=kwargs or None,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"train.lr_schedule {name!r} (train.lr_schedule_kwargs {kwargs}): {exc}"
        ) from None
    return sched.lr_lambdas[0]


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """A LambdaLR whose factor is `lr_factor` (transformers' function for its schedules)."""
    if cfg.lr_schedule in HF_SCHEDULES:
        factor = _hf_lambda(cfg.lr_schedule, cfg.warmup_steps, total_steps, cfg.lr_schedule_kwargs)
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(
            s, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps
        ),
    )
