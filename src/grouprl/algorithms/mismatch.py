"""Sampler/trainer mismatch: importance weights that correct for sampling with another engine.

An inference engine (vLLM) samples completions with its own kernels, so its probabilities
μ(y_t) differ slightly from the trainer's π_old(y_t) for the same weights; the policy
gradient then uses samples from μ as if they came from π_old. With ρ_t = π_old(y_t) /
μ(y_t) (the trainer's over the sampler's probability of each sampled token):

    none       w_t = 1
    tis        w_t = min(ρ_t, C)                          token-level truncated IS
    seq_tis    w_t = min(Π_t ρ_t, C)  for every token     sequence-level truncated IS
    seq_mask   w_t = 1 if (Π_t ρ_t)^(1/|y|) ∈ [1/C, C]    sequence-level masking by the
               else 0                                     geometric-mean ratio

Truncated IS (TIS) is the correction of Yao et al., "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (2025 blog, C = 2); the sequence-level and masked forms
follow the same idea at sequence granularity, as TRL's `vllm_importance_sampling_mode`
(token/sequence x truncate/mask, cap 3.0) and verl's rollout IS levels offer them. The
weights multiply the per-token policy loss and carry no gradient. Shapes: N completions,
T completion positions; masks are 1 on the tokens the weights apply to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grouprl.algorithms.regularizers import kl_estimate
from grouprl.registry import Registry

MISMATCH_CORRECTIONS: Registry = Registry("mismatch correction")


def _log_ratio_NT(logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """log ρ_t = log π_old − log μ on masked tokens, 0 elsewhere (no gradient)."""
    x = logp_NT.detach().double() - sampling_logp_NT.double()
    return torch.where(mask_NT != 0, x, 0.0)


def _check_cap(cap: float) -> float:
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 1.0:
        raise ValueError(f"cap must be a number > 1, got {cap!r}")
    if not math.isfinite(cap):
        raise ValueError(f"cap must be finite, got {cap!r}")
    return float(cap)


@MISMATCH_CORRECTIONS.register("none")
def none(logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """No correction: w = 1 (the sampler is the trainer's own forward, e.g. HF generate)."""
    return torch.ones_like(logp_NT, dtype=torch.float32)


@MISMATCH_CORRECTIONS.register("tis")
def tis(logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor, *, cap: float = 2.0) -> Tensor:
    """Token-level truncated IS: w_t = min(π_old(y_t)/μ(y_t), C) (Yao et al. 2025, C = 2)."""
    C = _check_cap(cap)
    w = _log_ratio_NT(logp_NT, sampling_logp_NT, mask_NT).exp().clamp(max=C)
    return torch.where(mask_NT != 0, w, 0.0).float()


@MISMATCH_CORRECTIONS.register("seq_tis")
def seq_tis(
    logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor, *, cap: float = 2.0
) -> Tensor:
    """Sequence-level truncated IS: every token of y gets w = min(Π_t ρ_t, C)."""
    C = _check_cap(cap)
    log_w_N = _log_ratio_NT(logp_NT, sampling_logp_NT, mask_NT).sum(dim=1)
    w_N = log_w_N.clamp(max=math.log(C)).exp()
    return torch.where(mask_NT != 0, w_N[:, None], 0.0).float()


@MISMATCH_CORRECTIONS.register("seq_mask")
def seq_mask(
    logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor, *, cap: float = 2.0
) -> Tensor:
    """Sequence-level masking: drop y (w = 0) when its geometric-mean ratio
    exp(mean_t log ρ_t) leaves [1/C, C]; keep it with w = 1 otherwise."""
    C = _check_cap(cap)
    n_N = (mask_NT != 0).sum(dim=1).clamp(min=1)
    mean_log_N = _log_ratio_NT(logp_NT, sampling_logp_NT, mask_NT).sum(dim=1) / n_N
    keep_N = mean_log_N.abs() <= math.log(C)
    return torch.where((mask_NT != 0) & keep_N[:, None], 1.0, 0.0).float()


def mismatch_stats(
    logp_NT: Tensor, sampling_logp_NT: Tensor, mask_NT: Tensor
) -> dict[str, Tensor | float]:
    """Per-token k3 estimate of KL(μ ‖ π_old) on the sampled tokens (`mismatch/kl`, as
    [N, T] for masked means) and the token ratio ρ's min / max (`mismatch/ratio_min|max`)
    and per-token ρ (`mismatch/ratio`, [N, T])."""
    x = logp_NT.detach().float()
    s = sampling_logp_NT.float()
    valid = mask_NT != 0
    kl_NT = torch.where(valid, kl_estimate(s, x, "k3"), 0.0)
    ratio_NT = torch.where(valid, (x - s).exp(), 0.0)
    vals = ratio_NT[valid]
    return {
        "mismatch/kl": kl_NT,
        "mismatch/ratio": ratio_NT,
        "mismatch/ratio_min": float(vals.min()) if vals.numel() else 1.0,
        "mismatch/ratio_max": float(vals.max()) if vals.numel() else 1.0,
    }
