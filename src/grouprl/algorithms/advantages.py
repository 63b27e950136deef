"""Advantage estimators: rewards of a group of completions -> one advantage per completion.

Shapes: B prompts, G completions per prompt, N = B·G rollouts, K reward functions.
A NaN reward marks an unscorable sample: it is left out of every mean and std and gets
advantage 0. A group with fewer than two valid rewards, or whose valid rewards are all
equal, carries no learning signal and gets advantage exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grouprl.registry import Registry

ADVANTAGES: Registry = Registry("advantage")

GRPO_SCALES = ("group", "batch", "none")


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_BG(rewards_BG: Tensor) -> Tensor:
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G], got {tuple(rewards_BG.shape)}")
    return _as_float(rewards_BG)


def _centered(rewards_BG: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Valid mask, valid count per group and r − mean_G r over valid entries (0 elsewhere)."""
    valid_BG = ~torch.isnan(rewards_BG)
    n_B = valid_BG.sum(dim=-1)
    sum_B = torch.where(valid_BG, rewards_BG, 0.0).sum(dim=-1)
    mean_B = sum_B / n_B.clamp(min=1)
    centered_BG = torch.where(valid_BG, rewards_BG - mean_B[:, None], 0.0)
    return valid_BG, n_B, centered_BG


def _unbiased_std(centered: Tensor, n: Tensor, dim: int | None = None) -> Tensor:
    """sqrt(Σ c² / (n − 1)); n < 2 gives 0 (callers zero those groups anyway)."""
    sq = (centered**2).sum() if dim is None else (centered**2).sum(dim=dim)
    return torch.sqrt(sq / (n - 1).clamp(min=1))


def _no_signal(rewards_BG: Tensor, valid_BG: Tensor, n_B: Tensor) -> Tensor:
    """Groups with < 2 valid rewards or all valid rewards equal (tested exactly, not by std)."""
    hi_B = torch.where(valid_BG, rewards_BG, -torch.inf).amax(dim=-1)
    lo_B = torch.where(valid_BG, rewards_BG, torch.inf).amin(dim=-1)
    return (n_B < 2) | (hi_B == lo_B)


@ADVANTAGES.register("grpo")
def grpo(rewards_BG: Tensor, *, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative advantage of GRPO.

    "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
    (arXiv 2402.03300), outcome supervision:

        A_i = (r_i − mean_G r) / (std_G r + eps)

    with std the unbiased (n − 1) std over the group's valid rewards, as in TRL.
    scale="batch": divide by the unbiased std of all valid rewards of the batch instead.
    scale="none": A_i = r_i − mean_G r, the Dr.GRPO fix from "Understanding R1-Zero-Like
    Training: A Critical Perspective" (arXiv 2503.20783), which removes the std division
    that up-weights nearly solved or nearly failed prompts.

    NaN rewards are excluded from mean and std and get A = 0; groups with < 2 valid rewards
    or all-equal valid rewards get A = 0 exactly.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo: scale must be one of {', '.join(GRPO_SCALES)}; got {scale!r}")
    if eps < 0:
        raise ValueError(f"grpo: eps must be >= 0, got {eps}")
    rewards_BG = _check_BG(rewards_BG)
    valid_BG, n_B, centered_BG = _centered(rewards_BG)
    if scale == "group":
        adv_BG = centered_BG / (_unbiased_std(centered_BG, n_B, dim=-1)[:, None] + eps)
    elif scale == "batch":
        # Batch std is taken around the batch mean (TRL's scale_rewards="batch"), while the
        # baseline stays the group mean.
        flat_valid = valid_BG.flatten()
        flat_r = rewards_BG.flatten()[flat_valid]
        n = flat_valid.sum()
        batch_std = _unbiased_std(flat_r - flat_r.sum() / n.clamp(min=1), n)
        adv_BG = centered_BG / (batch_std + eps)
    else:
        adv_BG = centered_BG
    keep_BG = valid_BG & ~_no_signal(rewards_BG, valid_BG, n_B)[:, None]
    return torch.where(keep_BG, adv_BG, 0.0)


def combine_rewards(rewards_NK: Tensor, weights_K: Tensor) -> Tensor:
    """Weighted sum of K reward functions per sample: r_N = Σ_k w_k r_{N,k}.

    A sample is NaN (unscorable) when any reward with nonzero weight is NaN for it; NaN in a
    weight-0 column is ignored (that reward is only logged).
    """
    if rewards_NK.dim() != 2 or weights_K.shape != (rewards_NK.shape[1],):
        raise ValueError(
            f"combine_rewards: expected rewards [N, K] and weights [K], got "
            f"{tuple(rewards_NK.shape)} and {tuple(weights_K.shape)}"
        )
    rewards_NK = _as_float(rewards_NK)
    w_K = weights_K.to(rewards_NK.dtype)
    used_K = w_K != 0
    nan_N = (torch.isnan(rewards_NK) & used_K).any(dim=-1)
    # Zero unused columns before multiplying so that 0·NaN never enters the sum.
    total_N = (torch.where(used_K, rewards_NK, 0.0) * w_K).sum(dim=-1)
    return torch.where(nan_N, torch.nan, total_N)


def group_reward_stats(rewards_BG: Tensor) -> dict[str, float]:
    """Reward metrics with TRL's names.

    reward:               mean of all valid rewards (NaN if none).
    reward_std:           mean over groups of the per-group unbiased std of valid rewards; a
                          group with < 2 valid rewards counts as std 0.
    frac_reward_zero_std: fraction of groups whose valid rewards are all equal (including
                          groups with < 2 valid rewards): their advantage is 0.
    reward/nan_frac:      fraction of rewards that are NaN (unscorable).
    """
    rewards_BG = _check_BG(rewards_BG).double()
    valid_BG, n_B, centered_BG = _centered(rewards_BG)
    no_signal_B = _no_signal(rewards_BG, valid_BG, n_B)
    std_B = torch.where(n_B < 2, 0.0, _unbiased_std(centered_BG, n_B, dim=-1))
    return {
        "reward": float(torch.nanmean(rewards_BG)) if rewards_BG.numel() else float("nan"),
        "reward_std": float(std_B.mean()) if std_B.numel() else 0.0,
        "frac_reward_zero_std": float(no_signal_B.double().mean()) if n_B.numel() else 0.0,
        "reward/nan_frac": float((~valid_BG).double().mean()) if valid_BG.numel() else 0.0,
    }
