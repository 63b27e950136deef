"""Entropy steering: extra rollouts at a hotter or colder temperature, by where the policy's
entropy stands against a target."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import ROLLOUT_STRATEGIES, Strategy, replace_rows


def group_advantages(rewards_BG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage within each group, (r − mean) / (std + eps), NaN rewards ignored
    (their advantage is NaN); unbiased std, 0 for a group of one."""
    valid = ~torch.isnan(rewards_BG)
    n = valid.sum(dim=1, keepdim=True).clamp(min=1)
    r = torch.where(valid, rewards_BG, 0.0)
    mean = r.sum(dim=1, keepdim=True) / n
    var = torch.where(valid, (rewards_BG - mean) ** 2, 0.0).sum(dim=1, keepdim=True)
    std = (var / (n - 1).clamp(min=1)).sqrt()
    return torch.where(valid, (rewards_BG - mean) / (std + eps), float("nan"))


@ROLLOUT_STRATEGIES.register("aepo")
class AEPO(Strategy):
    """AEPO: arbitrary entropy targets through the temperature of extra, positive-only
    samples.

    "Arbitrary Entropy Policy Optimization", arXiv 2510.08141 (authors' code
    597358816/AEPO `verl/trainer/ray_trainer.py`, read through notes).

        H = the last update's mean token entropy (the `entropy` metric)
        T' = temperature_high (1.2) if H <= target else temperature_low (0.8)
        the first ⌈prompt_frac·B⌉ prompts (¼) get G extra rollouts at T'
        an extra rollout is kept when its GRPO advantage within its extra group > min_adv
            (0.05); kept ones get A = 1 (REINFORCE on positives, outside any group's
            statistics: Rollouts.fixed_adv_N) and replace the first rows of the batch:
            at most replace_low (60) rows when H <= target, replace_high (30) otherwise

    The entropy read is the last update's before the collection began (`begin`): the
    previous step's, or with train.async one_step the one before (the collection overlaps
    the update), as the code does in its order (it starts from 0: the first step samples
    hotter); saved in checkpoints with the strategy's state. Not with a refilling sample
    filter (its rows would be judged by the groups they land in). The
    code's H is −mean log π of the sampled tokens at T = 1; ours is the `entropy` metric,
    the mean of the policy's per-token entropy at the sampling temperature (the same in
    expectation when sampling at T = 1). The code samples n = G = 5 extras per prompt and
    recomputes π_old at T = 1; AEPO turns the KL term off.
    """

    refill_safe = False  # its rows replace the batch's first rows, in whatever group

    def __init__(
        self,
        *,
        target: float = 0.5,
        prompt_frac: float = 0.25,
        temperature_high: float = 1.2,
        temperature_low: float = 0.8,
        min_adv: float = 0.05,
        replace_low: int = 60,
        replace_high: int = 30,
    ) -> None:
        for key, val in (("target", target), ("min_adv", min_adv)):
            if not math.isfinite(val):
                raise ValueError(f"rollout.strategy.{key}: must be finite, got {val}")
        if not 0 < prompt_frac <= 1:
            raise ValueError(f"rollout.strategy.prompt_frac: must be in (0, 1], got {prompt_frac}")
        for key, val in (
            ("temperature_high", temperature_high),
            ("temperature_low", temperature_low),
        ):
            if not (math.isfinite(val) and val > 0):
                raise ValueError(f"rollout.strategy.{key}: must be > 0, got {val}")
        for key, n in (("replace_low", replace_low), ("replace_high", replace_high)):
            if n < 0:
                raise ValueError(f"rollout.strategy.{key}: must be >= 0, got {n}")
        self.target, self.prompt_frac, self.min_adv = target, prompt_frac, min_adv
        self.temperature_high, self.temperature_low = temperature_high, temperature_low
        self.replace_low, self.replace_high = replace_low, replace_high
        self.entropy: float | None = None  # what the running collection reads
        self.observed: float | None = None  # the latest update's, for the next collection

    def observe(self, update_metrics: dict[str, float]) -> None:
        value = update_metrics.get("entropy")
        if value is not None and math.isfinite(value):
            self.observed = float(value)

    def begin(self) -> None:
        self.entropy = self.observed

    def state_dict(self) -> dict[str, Any]:
        return {"entropy": self.entropy, "observed": self.observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("entropy", "observed"):
            value = state.get(key)
            setattr(self, key, None if value is None else float(value))

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        entropy = 0.0 if self.entropy is None else self.entropy  # the code starts at 0
        low = entropy <= self.target
        temperature = self.temperature_high if low else self.temperature_low
        budget = self.replace_low if low else self.replace_high
        n_prompts = min(B, math.ceil(self.prompt_frac * B))
        examples = batch.examples[:n_prompts]
        new = ctx.sample(examples, [ex.text for ex in examples], G, temperature=temperature)
        adv_BG = group_advantages(new.rewards_N.view(n_prompts, G).float())
        kept = [i for i in range(n_prompts * G) if bool(adv_BG.view(-1)[i] > self.min_adv)]
        kept = kept[: min(budget, batch.rollouts.num_rollouts)]
        metrics = {
            "aepo/entropy": entropy,
            "aepo/temperature": temperature,
            "aepo/kept_rows": float(len(kept)),
        }
        if not kept:
            return batch, metrics
        ro = new.rollouts
        fixed = torch.ones(ro.num_rollouts)
        new = replace(
            new,
            rollouts=replace(
                ro,
                fixed_adv_N=fixed,
                # sampled at another temperature than the one the learner scores at
                sampling_logp_NT=None
                if ro.sampling_logp_NT is None
                else torch.full_like(ro.sampling_logp_NT, float("nan")),
            ),
            # outside every group's statistics, also for estimators reading rewards_BGK
            rewards_N=torch.full_like(new.rewards_N, float("nan")),
            rewards_NK=torch.full_like(new.rewards_NK, float("nan")),
        )
        rows = list(range(len(kept)))  # the batch's first rows, as AEPO's code replaces
        batch = replace_rows(batch, new, rows, kept, ctx.pad_token_id)
        return batch, metrics
