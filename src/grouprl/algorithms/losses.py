"""Policy objectives: per-token losses (to minimize) before aggregation.

Each loss takes a `PolicyInputs` for one micro-batch and returns a `TermOutput` whose
per_token_NT is the negative per-token objective; the trainer adds regularizer terms and
aggregates once (see aggregation.py).
"""

from __future__ import annotations

from torch import Tensor

from grouprl.algorithms.types import PolicyInputs, TermOutput
from grouprl.registry import Registry

LOSSES: Registry = Registry("loss")


def broadcast_adv(adv: Tensor, like_NT: Tensor) -> Tensor:
    """Advantages [N] (per completion) or [N, T] (per token) as an [N, T] tensor."""
    if adv.dim() == 1 and adv.shape[0] == like_NT.shape[0]:
        adv = adv[:, None]
    elif adv.shape != like_NT.shape:
        raise ValueError(
            f"advantages must have shape [N] or [N, T] = {tuple(like_NT.shape)}, "
            f"got {tuple(adv.shape)}"
        )
    return adv.detach().to(like_NT.dtype).expand_as(like_NT)


@LOSSES.register("ppo_clip")
def ppo_clip(
    inp: PolicyInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> TermOutput:
    """Clipped surrogate of PPO with asymmetric clip range and optional dual clip.

    "Proximal Policy Optimization Algorithms" (arXiv 1707.06347); the decoupled upper bound
    (clip-higher, eps_high = 0.28) is from "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale" (arXiv 2503.14476). Dual clip: "Mastering Complex Control in MOBA Games
    with Deep Reinforcement Learning" (arXiv 1912.09729).

        ρ = exp(logπ_θ − logπ_old)
        J = min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A)
        dual clip c > 1, for A < 0:  J = max(J, c·A)
        per_token = −J

    stats_NT (TRL names), 0/1 per token: clip_ratio/low_mean = [ρ < 1 − eps_low and A < 0],
    clip_ratio/high_mean = [ρ > 1 + eps_high and A > 0], clip_ratio/region_mean = either.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"ppo_clip: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"ppo_clip: dual_clip must be > 1 (or None), got {dual_clip}")
    logp_NT = inp.logp_NT
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    # old log-probs are a constant of the rollout: the gradient flows only through logπ_θ.
    ratio_NT = (logp_NT - inp.old_logp_NT.detach()).exp()
    clipped_NT = ratio_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective_NT = (ratio_NT * adv_NT).minimum(clipped_NT * adv_NT)
    if dual_clip is not None:
        # For A < 0 the min above is unbounded below as ρ grows; cap the loss at c·|A|.
        bounded_NT = objective_NT.maximum(dual_clip * adv_NT)
        objective_NT = bounded_NT.where(adv_NT < 0, objective_NT)
    ratio = ratio_NT.detach()
    low_NT = (ratio < 1.0 - eps_low) & (adv_NT < 0)
    high_NT = (ratio > 1.0 + eps_high) & (adv_NT > 0)
    dtype = logp_NT.dtype
    return TermOutput(
        per_token_NT=-objective_NT,
        stats_NT={
            "clip_ratio/low_mean": low_NT.to(dtype),
            "clip_ratio/high_mean": high_NT.to(dtype),
            "clip_ratio/region_mean": (low_NT | high_NT).to(dtype),
        },
    )


@LOSSES.register("reinforce")
def reinforce(inp: PolicyInputs) -> TermOutput:
    """Vanilla policy gradient with the ratio fixed to 1: J = A·logπ_θ, per_token = −A·logπ_θ.

    Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist
    Reinforcement Learning" (Machine Learning, 1992); used by GTPO (arXiv 2508.03772).
    Its gradient equals ppo_clip's when π_old = π_θ (on-policy, one update per batch).
    """
    adv_NT = broadcast_adv(inp.adv_N, inp.logp_NT)
    return TermOutput(per_token_NT=-adv_NT * inp.logp_NT)
