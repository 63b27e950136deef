"""Sampling and scoring one batch of prompt groups, with refilling sample filters.

DAPO-style dynamic sampling drops groups that carry no signal (all rewards equal) and
samples new prompts until the batch is full again, bounded by the filter's `max_tries`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grouprl.data.datasets import PromptExample
from grouprl.rollout.base import Rollouts


@dataclass
class ScoredBatch:
    """B prompt groups of G completions with their rewards (rows of a group contiguous)."""

    examples: list[PromptExample]
    indices: list[int]  # dataset indices of the prompts (stable prompt keys)
    rollouts: Rollouts
    rewards_NK: Tensor
    errors: dict[str, int] = field(default_factory=dict)
    reward_metrics: dict[str, float] = field(default_factory=dict)  # e.g. ttrl/majority_ratio

    @property
    def num_groups(self) -> int:
        return len(self.examples)

    def select_groups(self, groups: list[int]) -> ScoredBatch:
        G = self.rollouts.group_size
        rows = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
        return ScoredBatch(
            [self.examples[g] for g in groups],
            [self.indices[g] for g in groups],
            self.rollouts.select(rows),
            self.rewards_NK[rows],
            dict(self.errors),
            dict(self.reward_metrics),
        )


def first_per_group(batch: ScoredBatch, k: int) -> ScoredBatch:
    """Keep the first k completions of every group (TTRL trains on the first N_train of the
    N_vote samples that voted); the group size becomes k."""
    G = batch.rollouts.group_size
    rows = torch.tensor(
        [g * G + j for g in range(batch.num_groups) for j in range(k)], dtype=torch.long
    )
    ro = batch.rollouts.select(rows)
    ro.group_size = k
    return ScoredBatch(
        batch.examples,
        batch.indices,
        ro,
        batch.rewards_NK[rows],
        dict(batch.errors),
        dict(batch.reward_metrics),
    )


def _pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Stack rollouts of different widths: prompts stay left-padded, completions right-padded."""
    P = max(r.prompt_ids_NP.shape[1] for r in parts)
    T = max(r.completion_ids_NT.shape[1] for r in parts)
    sampled = [r.sampling_logp_NT for r in parts]
    return Rollouts(
        prompt_ids_NP=torch.cat([_pad_to(r.prompt_ids_NP, P, pad_token_id, True) for r in parts]),
        prompt_mask_NP=torch.cat([_pad_to(r.prompt_mask_NP, P, 0.0, True) for r in parts]),
        completion_ids_NT=torch.cat(
            [_pad_to(r.completion_ids_NT, T, pad_token_id, False) for r in parts]
        ),
        attention_mask_NT=torch.cat([_pad_to(r.attention_mask_NT, T, 0.0, False) for r in parts]),
        loss_mask_NT=torch.cat([_pad_to(r.loss_mask_NT, T, 0.0, False) for r in parts]),
        truncated_N=torch.cat([r.truncated_N for r in parts]),
        completions=[c for r in parts for c in r.completions],
        group_size=parts[0].group_size,
        sampling_logp_NT=None
        if any(x is None for x in sampled)
        else torch.cat([_pad_to(x, T, 0.0, False) for x in sampled]),  # type: ignore[arg-type]
        meta=None
        if any(r.meta is None for r in parts)
        else [m for r in parts for m in r.meta],  # type: ignore[union-attr]
    )


def concat_batches(parts: list[ScoredBatch], pad_token_id: int) -> ScoredBatch:
    if len(parts) == 1:
        return parts[0]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p.errors.items():
            errors[k] = errors.get(k, 0) + v
    return ScoredBatch(
        [e for p in parts for e in p.examples],
        [i for p in parts for i in p.indices],
        concat_rollouts([p.rollouts for p in parts], pad_token_id),
        torch.cat([p.rewards_NK for p in parts]),
        errors,
        parts[-1].reward_metrics,
    )


def batch_inputs(batch: ScoredBatch, rewards_N: Tensor, weights_K: Tensor) -> dict[str, Any]:
    """The named inputs advantage estimators and sample filters may ask for."""
    G = batch.rollouts.group_size
    B = batch.num_groups
    return {
        "rewards_BG": rewards_N.view(B, G),
        "rewards_BGK": batch.rewards_NK.view(B, G, -1),
        "weights_K": weights_K,
        "lengths_BG": batch.rollouts.lengths_N.view(B, G),
        "truncated_BG": batch.rollouts.truncated_N.view(B, G),
        "prompt_keys_B": [str(i) for i in batch.indices],
    }
