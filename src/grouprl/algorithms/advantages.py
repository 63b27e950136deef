"""Advantage estimators: rewards of a group of completions -> one advantage per completion.

Shapes: B prompts, G completions per prompt, N = B·G rollouts, K reward functions.
A NaN reward marks an unscorable sample: it is left out of every mean and std and gets
advantage 0. An infinite reward is treated the same way (as `RewardSet` already turns a
function's non-finite value into NaN): no finite advantage could be derived from it. A
group with fewer than two valid rewards, or whose valid rewards are all equal, carries no
learning signal and gets advantage exactly 0 (where a method differs, its docstring says
so).

Calling convention (the trainer dispatches by parameter name): the parameters before `*`
are inputs, named from `rewards_BG`, `rewards_BGK`, `weights_K`, `lengths_BG`,
`seq_logp_BG`, `answers_BG`, `baseline_B`, `prompt_keys_B` and, for the modifiers in
`ADVANTAGE_MODIFIERS`, `adv_BG`; the keyword-only parameters after `*` are config with the
paper's defaults. Stateful estimators are classes: keyword-only `__init__`, `__call__` with
the inputs, and `state_dict()` / `load_state_dict()` with plain python data.

Every estimator computes its statistics in float64 and returns float32 advantages (`grpo`:
the rewards' own floating dtype), so rewards up to ~1e150 in magnitude (any float32 value)
still give advantages: in float32, the squared deviations of rewards >= ~2e19 overflow,
the std becomes inf and every advantage 0.

Group size: estimators whose baseline or scale comes from the other completions of the
same prompt are registered with `min_group_size=2`, so G = 1 (or
`rollout.num_train_samples: 1`) is refused at start-up instead of training on advantages
that are always 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grouprl.registry import Registry

ADVANTAGES: Registry = Registry("advantage")
ADVANTAGE_MODIFIERS: Registry = Registry("advantage modifier")

GRPO_SCALES = ("group", "batch", "none")


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_BG(rewards_BG: Tensor) -> Tensor:
    if rewards_BG.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G], got {tuple(rewards_BG.shape)}")
    return _as_float(rewards_BG)


def _scorable(x: Tensor) -> Tensor:
    """x in float64 with ±inf as NaN: an infinite reward is unscorable, like a NaN one."""
    x = x.to(torch.float64)
    return torch.where(torch.isinf(x), torch.nan, x)


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


# Group-relative: the baseline (and std) come from the group, so G = 1 gives A = 0 always.
@ADVANTAGES.register("grpo", min_group_size=2)
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
    or all-equal valid rewards get A = 0 exactly. Computed in float64; the result has the
    rewards' floating dtype.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo: scale must be one of {', '.join(GRPO_SCALES)}; got {scale!r}")
    if eps < 0:
        raise ValueError(f"grpo: eps must be >= 0, got {eps}")
    out_dtype = _check_BG(rewards_BG).dtype
    rewards_BG = _scorable(rewards_BG)
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
    return torch.where(keep_BG, adv_BG, 0.0).to(out_dtype)


def combine_rewards(rewards_NK: Tensor, weights_K: Tensor, *, missing: str = "skip") -> Tensor:
    """Weighted sum of K reward functions per sample: r_N = Σ_k w_k r_{N,k}.

    NaN (a function returned None, failed, or gave a non-finite number) in a column of
    nonzero weight: with `missing="skip"` (the default, TRL's `nansum`) that term is left
    out of the sum, and the sample is unscorable (NaN) only when every weighted reward is
    NaN, so a multi-task set where each function scores its own rows works; with
    `missing="unscorable"` any such NaN makes the sample unscorable. Weight-0 columns are
    only logged. The sum is taken in float64 and returned in the rewards' floating dtype; a
    sum beyond that dtype's range is unscorable too (NaN), never inf.
    """
    if rewards_NK.dim() != 2 or weights_K.shape != (rewards_NK.shape[1],):
        raise ValueError(
            f"combine_rewards: expected rewards [N, K] and weights [K], got "
            f"{tuple(rewards_NK.shape)} and {tuple(weights_K.shape)}"
        )
    if missing not in MISSING_REWARDS:
        raise ValueError(
            f"combine_rewards: missing must be one of {MISSING_REWARDS}, got {missing!r}"
        )
    out_dtype = _as_float(rewards_NK).dtype
    r_NK = _scorable(rewards_NK)
    w_K = weights_K.to(torch.float64)
    used_NK = (w_K != 0) & ~torch.isnan(r_NK)
    if missing == "skip":
        nan_N = ~used_NK.any(dim=-1)
    else:
        nan_N = (torch.isnan(r_NK) & (w_K != 0)).any(dim=-1)
    # Zero what is left out before multiplying so that 0·NaN never enters the sum.
    total_N = (torch.where(used_NK, r_NK, 0.0) * w_K).sum(dim=-1).to(out_dtype)
    return torch.where(nan_N | ~torch.isfinite(total_N), torch.nan, total_N)


# how combine_rewards treats a NaN weighted reward (train.missing_rewards)
MISSING_REWARDS = ("skip", "unscorable")


def group_reward_stats(rewards_BG: Tensor) -> dict[str, float]:
    """Reward metrics with TRL's names.

    reward:               mean of all valid rewards (NaN if none).
    reward_std:           mean over groups of the per-group unbiased std of valid rewards; a
                          group with < 2 valid rewards counts as std 0.
    frac_reward_zero_std: fraction of groups whose valid rewards are all equal (including
                          groups with < 2 valid rewards): their advantage is 0.
    reward/nan_frac:      fraction of rewards that are NaN or infinite (unscorable).
    """
    rewards_BG = _scorable(_check_BG(rewards_BG))
    valid_BG, n_B, centered_BG = _centered(rewards_BG)
    no_signal_B = _no_signal(rewards_BG, valid_BG, n_B)
    std_B = torch.where(n_B < 2, 0.0, _unbiased_std(centered_BG, n_B, dim=-1))
    return {
        "reward": float(torch.nanmean(rewards_BG)) if rewards_BG.numel() else float("nan"),
        "reward_std": float(std_B.mean()) if std_B.numel() else 0.0,
        "frac_reward_zero_std": float(no_signal_B.double().mean()) if n_B.numel() else 0.0,
        "reward/nan_frac": float((~valid_BG).double().mean()) if valid_BG.numel() else 0.0,
    }


@ADVANTAGES.register("flow_grpo", min_group_size=2)
def flow_grpo(rewards_BG: Tensor, turns_BG: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Flow-GRPO: every model turn is a sample carrying its trajectory's outcome.

    "In-the-Flow Agentic System Optimization for Effective Planning and Tool Use"
    (AgentFlow, arXiv 2510.05592): the trajectory's final reward r_i is broadcast to each of
    its K_i turns, and GRPO's normalization runs over all turns of the prompt's G
    trajectories, so a trajectory counts K_i times in the baseline and the std:

        mu = sum_i K_i r_i / sum_i K_i
        sigma^2 = sum_i K_i (r_i - mu)^2 / (sum_i K_i - 1)
        A_i = (r_i - mu) / (sigma + eps)    for every token of every turn of trajectory i

    With token-mean aggregation a turn trained as its own sample (prompt = the trajectory
    so far) has the same loss as its tokens inside the trajectory (observations masked,
    tests/test_multiturn.py), so this estimator is the whole method. K_i = 1 everywhere is
    GRPO. NaN rewards get A = 0 and count nowhere; groups without signal get 0.
    """
    if eps < 0:
        raise ValueError(f"flow_grpo: eps must be >= 0, got {eps}")
    out_dtype = _check_BG(rewards_BG).dtype
    rewards_BG = _scorable(rewards_BG)
    valid_BG = ~torch.isnan(rewards_BG)
    k_BG = torch.where(valid_BG, turns_BG.to(torch.float64).clamp(min=1), 0.0)
    r_BG = torch.where(valid_BG, rewards_BG, 0.0)
    n_B = k_BG.sum(dim=-1)
    mu_B = (k_BG * r_BG).sum(dim=-1) / n_B.clamp(min=1)
    centered_BG = torch.where(valid_BG, rewards_BG - mu_B[:, None], 0.0)
    var_B = (k_BG * centered_BG**2).sum(dim=-1) / (n_B - 1).clamp(min=1)
    adv_BG = centered_BG / (var_B.sqrt()[:, None] + eps)
    keep_BG = valid_BG & ~_no_signal(rewards_BG, valid_BG, valid_BG.sum(dim=-1))[:, None]
    return torch.where(keep_BG, adv_BG, 0.0).to(out_dtype)


@ADVANTAGES.register("dgpo", min_group_size=2)
def dgpo(rewards_BG: Tensor, *, temperature: float = 2.0, eps: float = 1e-6) -> Tensor:
    """MathForge's DGPO: difficulty-balanced advantages with difficulty-aware prompt weights.

    "Harder is Better: Boosting Mathematical Reasoning via Difficulty-Aware GRPO and
    Multi-Aspect Question Reformulation" (MathForge, arXiv 2601.20614, §3.1, Eq. 3-6):

        A_i = (r_i − mean_G r) / MAD_G(r),   MAD_G(r) = (1/G) Σ_i |r_i − mean_G r|
              (so Σ_i |A_i| = G in every group with signal: no group outweighs another
              by its spread, where GRPO's z-score gives 2G·sqrt(p(1 − p)))
        D_s = −mean_G r_s,   λ_s = B_v · softmax_s(D_s / T) over the B_v valid prompts
        A_{s,i} ← λ_s · A_{s,i}    (harder prompts weigh more; Σ_valid λ_s = B_v)

    Valid: ≥ 2 scorable rewards, not all equal; the others get A = 0 (the recipe's
    `valid_groups` filter also drops their tokens from the normalizer, as the paper's
    "valid token-level loss averaging"). NaN rewards are left out of the statistics and get
    A = 0. Computed in float64.
    """
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"dgpo: temperature must be > 0, got {temperature}")
    if eps < 0:
        raise ValueError(f"dgpo: eps must be >= 0, got {eps}")
    out_dtype = _check_BG(rewards_BG).dtype
    r_BG = _scorable(rewards_BG)
    valid_BG, n_B, centered_BG = _centered(r_BG)
    mad_B = centered_BG.abs().sum(dim=-1) / n_B.clamp(min=1)
    ok_B = ~_no_signal(r_BG, valid_BG, n_B)
    adv_BG = centered_BG / (mad_B[:, None] + eps)
    mean_B = torch.where(valid_BG, r_BG, 0.0).sum(dim=-1) / n_B.clamp(min=1)
    logits_B = torch.where(ok_B, -mean_B / temperature, -torch.inf)
    if bool(ok_B.any()):
        lam_B = ok_B.sum() * torch.softmax(logits_B, dim=0)
    else:
        lam_B = torch.zeros_like(mean_B)
    keep_BG = valid_BG & ok_B[:, None]
    return torch.where(keep_BG, lam_B[:, None] * adv_BG, 0.0).to(out_dtype)


# ---------------------------------------------------------------------------------------
# The catalog (ALGORITHMS.md §1). Shared helpers first.


def _f64_BG(rewards_BG: Tensor, who: str) -> Tensor:
    if not isinstance(rewards_BG, Tensor) or rewards_BG.dim() != 2:
        shape = tuple(rewards_BG.shape) if isinstance(rewards_BG, Tensor) else type(rewards_BG)
        raise ValueError(f"{who}: rewards must have shape [B, G], got {shape}")
    return _scorable(rewards_BG)


def _same_shape(x: Tensor, like_BG: Tensor, name: str, who: str) -> Tensor:
    if not isinstance(x, Tensor) or x.shape != like_BG.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f"{who}: {name} must have shape {tuple(like_BG.shape)}, got {shape}")
    return x.to(torch.float64)


def _check_positive(value: float, name: str, who: str, allow_zero: bool = False) -> None:
    bad = not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{who}: {name} must be a finite number {bound}, got {value}")


def _keep_mask(rewards_BG: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """valid_BG, n_B, centered_BG and the mask of entries that may carry a non-zero advantage."""
    valid_BG, n_B, centered_BG = _centered(rewards_BG)
    keep_BG = valid_BG & ~_no_signal(rewards_BG, valid_BG, n_B)[:, None]
    return valid_BG, n_B, centered_BG, keep_BG


def _mean_token_logp(seq_logp_BG: Tensor, lengths_BG: Tensor) -> Tensor:
    """Length-normalized sequence log-likelihood: Σ_t log π / max(L, 1)."""
    return seq_logp_BG / lengths_BG.clamp(min=1.0)


# Group-relative: the leave-one-out baseline needs another completion of the prompt.
@ADVANTAGES.register("rloo", min_group_size=2)
def rloo(rewards_BG: Tensor) -> Tensor:
    """REINFORCE leave-one-out baseline.

    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (arXiv 2402.14740):

        A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean_G r)

    over the n valid rewards of the group; no std division (verl
    `compute_rloo_outcome_advantage`). NaN rewards are left out of the baseline and get
    A = 0; groups with < 2 valid rewards or all-equal valid rewards get A = 0 exactly.
    """
    r_BG = _f64_BG(rewards_BG, "rloo")
    _, n_B, centered_BG, keep_BG = _keep_mask(r_BG)
    scale_B = n_B / (n_B - 1).clamp(min=1)
    adv_BG = centered_BG * scale_B[:, None]
    return torch.where(keep_BG, adv_BG, 0.0).float()


# Not group-relative: the baseline is a separate greedy completion, so G = 1 (the paper's
# setting) still carries signal.
@ADVANTAGES.register("remax")
def remax(rewards_BG: Tensor, baseline_B: Tensor) -> Tensor:
    """Greedy-decoding baseline of ReMax.

    "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
    Large Language Models" (arXiv 2310.10505):

        A_i = r(x, y_i) − r(x, ȳ),   ȳ = the greedy completion of x

    `baseline_B` is the reward of one greedy completion per prompt. A NaN reward, or a NaN
    baseline (greedy completion unscorable: the whole group), gives A = 0. Unlike the group
    estimators, an all-equal group is NOT zeroed: the baseline does not come from the
    group, so r_i = r_j ≠ r(ȳ) still carries signal (and G = 1 is the paper's setting).
    """
    r_BG = _f64_BG(rewards_BG, "remax")
    if not isinstance(baseline_B, Tensor) or baseline_B.shape != (r_BG.shape[0],):
        shape = tuple(baseline_B.shape) if isinstance(baseline_B, Tensor) else type(baseline_B)
        raise ValueError(f"remax: baseline must have shape [B] = ({r_BG.shape[0]},), got {shape}")
    b_B = _scorable(baseline_B)
    valid_BG = ~torch.isnan(r_BG) & ~torch.isnan(b_B)[:, None]
    return torch.where(valid_BG, r_BG - b_B[:, None], 0.0).float()


def _beta_log_pdf(p: Tensor, a: float, b: float) -> Tensor:
    """log BetaPDF(p; a, b), with 0·log 0 = 0 at the boundary."""
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (
        torch.xlogy(torch.tensor(a - 1.0, dtype=p.dtype), p)
        + torch.xlogy(torch.tensor(b - 1.0, dtype=p.dtype), 1.0 - p)
        - log_norm
    )


def bnpo_beta_params(p_B: Tensor) -> tuple[float, float]:
    """BNPO's normalizer parameters (α, β) from the group mean rewards p (in [0, 1]).

    Method of moments over the groups: m = mean p, v = var p (unbiased), c = m(1−m)/v − 1,
    a = c·m, b = c·(1−m); α = max(1, 1 + a/3), β = max(1, 1 + b/3). With fewer than two
    groups or v = 0 the fit is undefined and Beta(1, 1) (uniform, pdf = 1) is used; the
    authors' code falls back to the same (α, β) = (1, 1) for a single group.
    """
    p_B = p_B.to(torch.float64)
    if p_B.numel() < 2:
        return 1.0, 1.0
    m = float(p_B.mean())
    v = float(p_B.var())
    if not v > 0:
        return 1.0, 1.0
    c = m * (1.0 - m) / v - 1.0
    return max(1.0, 1.0 + c * m / 3.0), max(1.0, 1.0 + c * (1.0 - m) / 3.0)


# Group-relative: centered on the group's mean reward p, so G = 1 gives A = 0 always.
@ADVANTAGES.register("bnpo", min_group_size=2)
def bnpo(
    rewards_BG: Tensor,
    *,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_weight: float = 1e6,
) -> Tensor:
    """Beta-normalized advantage of BNPO.

    "BNPO: Beta Normalization Policy Optimization" (arXiv 2506.02864), as in the authors'
    `compute_bnpo_outcome_advantage` (github.com/changyi7231/BNPO):

        r' = (r − reward_min)/(reward_max − reward_min) ∈ [0, 1];  p = mean_G r'
        (α, β) = Beta method-of-moments fit over the batch's p (see `bnpo_beta_params`)
        A_i = (r'_i − p) · clamp(1 / BetaPDF(p; α, β), 0, max_weight)

    The advantage is in the rescaled [0, 1] reward units, with no std division. Rewards
    outside [reward_min, reward_max] raise ValueError (the code asserts p ∈ [0, 1]).
    The fit uses every group with ≥ 2 valid rewards, all-equal groups included (as in the
    code, which fits over all groups); NaN rewards are left out of p and get A = 0; groups
    with < 2 valid rewards or all-equal valid rewards get A = 0 exactly.
    """
    if not (math.isfinite(reward_min) and math.isfinite(reward_max)) or reward_max <= reward_min:
        raise ValueError(
            f"bnpo: need finite reward_min < reward_max, got {reward_min} and {reward_max}"
        )
    _check_positive(max_weight, "max_weight", "bnpo")
    r_BG = _f64_BG(rewards_BG, "bnpo")
    x_BG = (r_BG - reward_min) / (reward_max - reward_min)
    valid_BG = ~torch.isnan(x_BG)
    if ((x_BG < 0) | (x_BG > 1))[valid_BG].any():
        raise ValueError(
            f"bnpo: rewards must lie in [reward_min, reward_max] = [{reward_min}, {reward_max}]; "
            f"got values in [{float(r_BG[valid_BG].min())}, {float(r_BG[valid_BG].max())}]"
        )
    _, n_B, centered_BG = _centered(x_BG)
    keep_BG = valid_BG & ~_no_signal(r_BG, valid_BG, n_B)[:, None]  # exact, on raw rewards
    p_B = torch.where(valid_BG, x_BG, 0.0).sum(dim=-1) / n_B.clamp(min=1)
    a, b = bnpo_beta_params(p_B[n_B >= 2])
    weight_B = torch.exp(-_beta_log_pdf(p_B, a, b)).clamp(min=0.0, max=max_weight)
    return torch.where(keep_BG, centered_BG * weight_B[:, None], 0.0).float()


# Group-relative: the virtual r_max joins the group's own rewards, and a group with fewer
# than two valid rewards gets A = 0 (as in the authors' code).
@ADVANTAGES.register("ngrpo", min_group_size=2)
def ngrpo(
    rewards_BG: Tensor, *, r_max: float = 1.0, num_virtual: int = 1, eps: float = 1e-6
) -> Tensor:
    """GRPO with virtual maximum rewards (advantage calibration of NGRPO).

    "NGRPO: Negative-enhanced Group Relative Policy Optimization" (arXiv 2509.18851), as in
    the authors' `compute_ngrpo_outcome_advantage` (github.com/nangongrui-ngr/NGRPO):

        μ' = mean(r_1..r_n, r_max × k),  σ' = std(same, unbiased)
        A_i = (r_i − μ') / (σ' + eps)

    k = `num_virtual`. Pair it with asymmetric clipping ε_low = 0.16, ε_high = 0.24 (in the
    loss). The method's point: a group whose rewards are all equal but below r_max (e.g.
    all wrong) gets a non-zero, negative advantage. Only a group whose valid rewards all
    equal r_max gets A = 0 (exactly). NaN rewards are left out and get A = 0; groups with
    < 2 valid rewards get A = 0. Rewards above r_max raise ValueError (r_max must be the
    task's best reward).
    """
    if not math.isfinite(r_max):
        raise ValueError(f"ngrpo: r_max must be finite, got {r_max}")
    if isinstance(num_virtual, bool) or not isinstance(num_virtual, int) or num_virtual < 1:
        raise ValueError(f"ngrpo: num_virtual must be an int >= 1, got {num_virtual!r}")
    _check_positive(eps, "eps", "ngrpo", allow_zero=True)
    r_BG = _f64_BG(rewards_BG, "ngrpo")
    valid_BG = ~torch.isnan(r_BG)
    if (r_BG > r_max)[valid_BG].any():
        raise ValueError(
            f"ngrpo: rewards must be <= r_max = {r_max}, got max {float(r_BG[valid_BG].max())}"
        )
    n_B = valid_BG.sum(dim=-1)
    k = num_virtual
    total_B = n_B + k
    mean_B = (torch.where(valid_BG, r_BG, 0.0).sum(dim=-1) + k * r_max) / total_B
    dev_BG = torch.where(valid_BG, r_BG - mean_B[:, None], 0.0)
    ss_B = (dev_BG**2).sum(dim=-1) + k * (r_max - mean_B) ** 2
    std_B = torch.sqrt(ss_B / (total_B - 1))
    adv_BG = dev_BG / (std_B[:, None] + eps)
    all_max_B = torch.where(valid_BG, r_BG == r_max, True).all(dim=-1)
    keep_BG = valid_BG & ((n_B >= 2) & ~all_max_B)[:, None]
    return torch.where(keep_BG, adv_BG, 0.0).float()


# Group-relative: each reward is normalized within its group first.
@ADVANTAGES.register("gdpo", min_group_size=2)
def gdpo(rewards_BGK: Tensor, weights_K: Tensor | None = None, *, eps: float = 1e-4) -> Tensor:
    """Group reward-decoupled normalization (normalize, then sum, then batch-normalize).

    "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
    Optimization" (arXiv 2601.05242), as in the authors' TRL code (github.com/NVlabs/GDPO):

        A_k,i = (r_k,i − mean_G r_k) / (std_G r_k + eps)     (each reward k in its group)
        S_i = Σ_k w_k A_k,i
        A_i = (S_i − mean_batch S) / (std_batch S + eps)

    stds unbiased, eps = 1e-4; w_k = 1 when `weights_K` is None. A sample is unscorable,
    as in `combine_rewards`, when a reward with nonzero weight is NaN: it gets A = 0 and
    is left out of every statistic (weight-0 rewards are ignored). A reward that is
    all-equal within a group contributes A_k = 0 exactly. The batch statistics run over
    all valid samples, zero-signal groups included (as in the code); a group whose
    weighted rewards are each all-equal (or that has < 2 valid samples) gets A = 0 exactly.
    """
    _check_positive(eps, "eps", "gdpo", allow_zero=True)
    if not isinstance(rewards_BGK, Tensor) or rewards_BGK.dim() != 3:
        shape = tuple(rewards_BGK.shape) if isinstance(rewards_BGK, Tensor) else type(rewards_BGK)
        raise ValueError(f"gdpo: rewards must have shape [B, G, K], got {shape}")
    r_BGK = _scorable(rewards_BGK)
    K = r_BGK.shape[-1]
    if weights_K is None:
        w_K = torch.ones(K, dtype=torch.float64)
    else:
        w_K = torch.as_tensor(weights_K).to(torch.float64)
        if w_K.shape != (K,) or not torch.isfinite(w_K).all():
            raise ValueError(f"gdpo: weights must be {K} finite numbers, got {w_K.tolist()}")
    used_K = w_K != 0
    if not used_K.any():
        raise ValueError("gdpo: at least one reward weight must be nonzero")
    valid_BG = ~(torch.isnan(r_BGK) & used_K).any(dim=-1)
    in_BGK = valid_BG[..., None] & used_K
    rk_BGK = torch.where(in_BGK, r_BGK, 0.0)
    n_B = valid_BG.sum(dim=-1)
    mean_BK = rk_BGK.sum(dim=1) / n_B.clamp(min=1)[:, None]
    cent_BGK = torch.where(valid_BG[..., None], rk_BGK - mean_BK[:, None, :], 0.0)
    std_BK = torch.sqrt((cent_BGK**2).sum(dim=1) / (n_B - 1).clamp(min=1)[:, None])
    hi_BK = torch.where(valid_BG[..., None], rk_BGK, -torch.inf).amax(dim=1)
    lo_BK = torch.where(valid_BG[..., None], rk_BGK, torch.inf).amin(dim=1)
    flat_BK = (hi_BK == lo_BK) | (n_B < 2)[:, None]  # unused rewards are all 0: flat
    z_BGK = torch.where(flat_BK[:, None, :], 0.0, cent_BGK / (std_BK[:, None, :] + eps))
    s_BG = (z_BGK * w_K).sum(dim=-1)
    s_N = s_BG[valid_BG]
    n = s_N.numel()
    s_mean = s_N.sum() / max(n, 1)
    s_std = torch.sqrt(((s_N - s_mean) ** 2).sum() / max(n - 1, 1))
    adv_BG = (s_BG - s_mean) / (s_std + eps)
    keep_BG = valid_BG & ~flat_BK.all(dim=-1)[:, None]
    return torch.where(keep_BG, adv_BG, 0.0).float()


RISKPO_QUANTILE_MODES = ("batch", "mix", "track")
RISKPO_CREDITS = ("uniform", "sum_mean")


# Group-relative over "papers" (the j-th completions of a bundle's prompts): with G = 1 a
# bundle has one paper, fewer than the two its quantiles need, so A = 0 always.
@ADVANTAGES.register("riskpo", min_group_size=2)
class RiskPO:
    """Mixed Value-at-Risk advantage over bundles of prompts (RiskPO).

    "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training"
    (arXiv 2510.00911), as in the authors'
    `compute_grpo_bundle_rvar_outcome_advantage_quantile_tracking` (github.com/RTkenny/RiskPO):

    Consecutive prompts form bundles of `bundle_size` (the last one may be smaller). Paper j
    of a bundle is the j-th completion of each of its prompts; its score S_j is the sum of
    their rewards. With q_α, q_β quantiles of S (linear interpolation):

        A_R = [(S − q_α)_+ − (S − q_β)_+ + (q_α − q_β)] / (β − α + eps)
        A_C = −(q_α − S)_+ / (α + eps)
        A   = (w·A_C + A_R) / (w + 1),   then ÷ (std_bundle S + eps) if norm_by_std

    and every completion of paper j gets A_j (`credit="uniform"`). `natural_baseline=False`
    drops the (q_α − q_β) term; `credit="sum_mean"` splits A_j over the paper's completions
    ∝ (r_i − mean of prompt i's rewards), or evenly when that sum is ≈ 0 (|Σ| ≤ 1e-6).

    `quantile_mode`: "batch" uses each bundle's own quantiles (stateless); "track" uses an
    online quantile tracker over all papers of the run, "mix" the mean of the two. The
    tracker starts at the first batch's pooled quantiles (that batch uses batch quantiles)
    and then, after each batch's advantages, takes one SGD step q ← q + lr_q·(τ − P̂(S < q)).
    Defaults follow ALGORITHMS.md (B=5, α=0.2, β=0.8, w=1.5, batch quantiles, uniform
    credit); the authors' MVaR script runs quantile_mode="track", natural_baseline=False,
    credit="sum_mean".

    A paper with a NaN reward is left out of every statistic and its completions get
    A = 0. A bundle with < 2 valid papers, or whose valid paper scores are all equal, gets
    A = 0 exactly (also under the tracker, where the code would divide by a zero std).
    The bundle, not the prompt, is the group: with uniform credit a prompt whose own
    rewards are all equal still gets its papers' advantages.
    """

    def __init__(
        self,
        *,
        bundle_size: int = 5,
        alpha: float = 0.2,
        beta: float = 0.8,
        w_mix: float = 1.5,
        norm_by_std: bool = True,
        quantile_mode: str = "batch",
        lr_q: float = 0.1,
        natural_baseline: bool = True,
        credit: str = "uniform",
        eps: float = 1e-6,
    ) -> None:
        if isinstance(bundle_size, bool) or not isinstance(bundle_size, int) or bundle_size < 1:
            raise ValueError(f"riskpo: bundle_size must be an int >= 1, got {bundle_size!r}")
        if not 0.0 < alpha < beta < 1.0:
            raise ValueError(f"riskpo: need 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}")
        _check_positive(w_mix, "w_mix", "riskpo", allow_zero=True)
        _check_positive(lr_q, "lr_q", "riskpo")
        _check_positive(eps, "eps", "riskpo", allow_zero=True)
        if quantile_mode not in RISKPO_QUANTILE_MODES:
            raise ValueError(
                f"riskpo: quantile_mode must be one of {', '.join(RISKPO_QUANTILE_MODES)}; "
                f"got {quantile_mode!r}"
            )
        if credit not in RISKPO_CREDITS:
            raise ValueError(
                f"riskpo: credit must be one of {', '.join(RISKPO_CREDITS)}; got {credit!r}"
            )
        self.bundle_size = bundle_size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.w_mix = float(w_mix)
        self.norm_by_std = bool(norm_by_std)
        self.quantile_mode = quantile_mode
        self.lr_q = float(lr_q)
        self.natural_baseline = bool(natural_baseline)
        self.credit = credit
        self.eps = float(eps)
        self.q_low: float | None = None  # tracked α-quantile of paper scores
        self.q_high: float | None = None  # tracked β-quantile

    def __call__(self, rewards_BG: Tensor) -> Tensor:
        r_BG = _f64_BG(rewards_BG, "riskpo")
        B, G = r_BG.shape
        adv_BG = torch.zeros(B, G, dtype=torch.float64)
        pooled: list[Tensor] = []
        levels = torch.tensor([self.alpha, self.beta], dtype=torch.float64)
        tracked = self.q_low is not None and self.q_high is not None
        for start in range(0, B, self.bundle_size):
            rows = r_BG[start : start + self.bundle_size]  # [b, G]
            s_G = rows.sum(dim=0)  # NaN when any reward of the paper is NaN
            valid_G = ~torch.isnan(s_G)
            s_V = s_G[valid_G]
            pooled.append(s_V)
            if s_V.numel() < 2 or bool(s_V.max() == s_V.min()):
                continue
            q_lo, q_hi = (float(q) for q in torch.quantile(s_V, levels))
            if tracked and self.quantile_mode == "track":
                q_lo, q_hi = self.q_low, self.q_high
            elif tracked and self.quantile_mode == "mix":
                q_lo, q_hi = (q_lo + self.q_low) / 2, (q_hi + self.q_high) / 2
            a_V = (s_V - q_lo).clamp(min=0) - (s_V - q_hi).clamp(min=0)
            if self.natural_baseline:
                a_V = a_V + (q_lo - q_hi)
            a_V = a_V / (self.beta - self.alpha + self.eps)
            cvar_V = -(q_lo - s_V).clamp(min=0) / (self.alpha + self.eps)
            a_V = (self.w_mix * cvar_V + a_V) / (self.w_mix + 1.0)
            if self.norm_by_std:
                a_V = a_V / (s_V.std() + self.eps)
            paper_G = torch.zeros(G, dtype=torch.float64)
            paper_G[valid_G] = a_V
            if self.credit == "uniform":
                block_bG = paper_G.expand_as(rows)
            else:
                block_bG = self._sum_mean_credit(rows, valid_G, paper_G)
            adv_BG[start : start + self.bundle_size] = torch.where(valid_G, block_bG, 0.0)
        if self.quantile_mode != "batch":
            self._update_tracker(torch.cat(pooled) if pooled else torch.zeros(0))
        return adv_BG.float()

    @staticmethod
    def _sum_mean_credit(rows_bG: Tensor, valid_G: Tensor, paper_G: Tensor) -> Tensor:
        """Split each paper's advantage ∝ r_i − mean_i (the code's credit_assign_mode='sum-mean')."""
        in_bG = valid_G.expand_as(rows_bG)
        mean_b = torch.where(in_bG, rows_bG, 0.0).sum(dim=-1) / valid_G.sum().clamp(min=1)
        ratio_bG = torch.where(in_bG, rows_bG - mean_b[:, None], 0.0)
        total_G = ratio_bG.sum(dim=0)
        even_G = paper_G / rows_bG.shape[0]
        share_bG = paper_G * ratio_bG / torch.where(total_G.abs() > 1e-6, total_G, 1.0)
        return torch.where(total_G.abs() > 1e-6, share_bG, even_G.expand_as(rows_bG))

    def _update_tracker(self, s_N: Tensor) -> None:
        if s_N.numel() == 0:
            return
        if self.q_low is None or self.q_high is None:
            levels = torch.tensor([self.alpha, self.beta], dtype=torch.float64)
            self.q_low, self.q_high = (float(q) for q in torch.quantile(s_N, levels))
            return
        below_lo = float((s_N < self.q_low).double().mean())
        below_hi = float((s_N < self.q_high).double().mean())
        self.q_low += self.lr_q * (self.alpha - below_lo)
        self.q_high += self.lr_q * (self.beta - below_hi)

    def state_dict(self) -> dict[str, Any]:
        return {"q_low": self.q_low, "q_high": self.q_high}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("q_low", "q_high"):
            if key not in state:
                raise ValueError(f"riskpo: state is missing {key!r}")
        q_low, q_high = state["q_low"], state["q_high"]
        self.q_low = None if q_low is None else float(q_low)
        self.q_high = None if q_high is None else float(q_high)


RHO_MODES = ("constant", "logprob_drift")


def drift_rho(drift: float, d_half: float, rho_min: float, rho_max: float) -> float:
    """SPO's adaptive forgetting factor: ρ = 2^(−D / D_half), clipped to [rho_min, rho_max]."""
    return min(max(2.0 ** (-drift / d_half), rho_min), rho_max)


def logprob_drift(stored_T: list[float], now_T: list[float], mask_T: list[float]) -> float:
    """D = masked mean_t |log π_stored(y_t) − log π_now(y_t)| (0 with no masked token)."""
    num = sum(abs(a - b) * m for a, b, m in zip(stored_T, now_T, mask_T, strict=True))
    den = sum(mask_T)
    return num / den if den > 0 else 0.0


def offline_prior(successes: float, n: float, rho_min: float) -> tuple[float, float]:
    """SPO's tracker start from n offline samples with `successes` among them:
    N_init = 1/(1 − rho_min); α₀ = N_init·(s + 0.5)/(n + 1), β₀ = N_init·(n − s + 0.5)/(n + 1)."""
    n_init = 1.0 / (1.0 - rho_min)
    return n_init * (successes + 0.5) / (n + 1.0), n_init * (n - successes + 0.5) / (n + 1.0)


@ADVANTAGES.register("single_stream", max_group_size=1, offline_probe=True)
class SingleStream:
    """Per-prompt value tracker baseline of Single-stream Policy Optimization.

    "Single-stream Policy Optimization" (arXiv 2509.13232). The tracker, its update order,
    the batch normalization, the adaptive forgetting factor and the offline start match the
    authors' code (verl `recipe/spo`: `fit`, `_get_spo_rho`; catalog2.md §6.5):

        v̂(x) = α_x / (α_x + β_x)                 (before this batch's update)
        A = R − v̂(x),  then  A ← (A − mean_batch A) / (std_batch A + eps) if normalize
        α_x ← ρ_x·α_x + R,  β_x ← ρ_x·β_x + (1 − R)  (after computing A)

    ρ_x: `rho` (rho_mode "constant"), or with rho_mode "logprob_drift"
        D_x = masked mean_t |log π_stored(y′_t) − log π_now(y′_t)|
        ρ_x = 2^(−D_x / d_half) clipped to [rho_min, rho_max]      (d_half 0.06, max 0.96)
    where y′ is the completion of x's last visit and π_stored its log-probs then (first
    visit: D = 0, so ρ = rho_max). The drift costs one no-grad forward over the batch's
    prompts' stored and new completions per step, and the stored completions ride in the
    checkpoint (prompts seen × completion length numbers). rho_min is the code's run-script
    `clip_lower` (not read; 0.5 here).

    Unseen prompts start from Beta(prior_alpha, prior_beta) = Beta(0.5, 0.5) (the code's
    value with no offline samples), or, with `offline_init: K`, from K samples of the
    initial policy per training prompt drawn before the first step (the trainer's probe
    pass; not on resume): α₀ = N_init·(s + 0.5)/(K + 1), β₀ = N_init·(K − s + 0.5)/(K + 1),
    N_init = 1/(1 − rho_min), s = successes (reward > 0, binarized as the code). The paper
    samples one completion per prompt (G = 1); with G > 1 every completion uses the
    prompt's pre-batch v̂, the tracker takes one step with the row's summed R and
    Σ(1 − R), and the drift uses the group's first scored row. A prompt key repeated
    within a batch is updated row by row. Rewards must lie in [0, 1]. NaN rewards get
    A = 0, are left out of the batch statistics and do not update the tracker. An
    all-equal batch of raw advantages normalizes to 0.
    """

    def __init__(
        self,
        *,
        rho: float = 0.9,
        prior_alpha: float = 0.5,
        prior_beta: float = 0.5,
        normalize: bool = True,
        eps: float = 1e-6,
        rho_mode: str = "constant",
        d_half: float = 0.06,
        rho_min: float = 0.5,
        rho_max: float = 0.96,
        offline_init: int = 0,
    ) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"single_stream: rho must be in (0, 1], got {rho}")
        _check_positive(prior_alpha, "prior_alpha", "single_stream")
        _check_positive(prior_beta, "prior_beta", "single_stream")
        _check_positive(eps, "eps", "single_stream", allow_zero=True)
        if rho_mode not in RHO_MODES:
            raise ValueError(
                f"single_stream: rho_mode must be one of {RHO_MODES}, got {rho_mode!r}"
            )
        _check_positive(d_half, "d_half", "single_stream")
        if not 0.0 < rho_min <= rho_max <= 1.0 or rho_min >= 1.0:
            raise ValueError(
                f"single_stream: need 0 < rho_min <= rho_max <= 1 and rho_min < 1, got "
                f"{rho_min}, {rho_max}"
            )
        if isinstance(offline_init, bool) or not isinstance(offline_init, int) or offline_init < 0:
            raise ValueError(
                f"single_stream: offline_init must be an integer >= 0, got {offline_init!r}"
            )
        self.rho = float(rho)
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.rho_mode, self.d_half = rho_mode, float(d_half)
        self.rho_min, self.rho_max = float(rho_min), float(rho_max)
        self.offline_samples = offline_init  # read by the trainer's probe pass
        self.alpha: dict[str, float] = {}
        self.beta: dict[str, float] = {}
        # prompt key -> (prompt ids, completion ids, loss mask, log-probs at that visit)
        self.stored: dict[str, list[list[Any]]] = {}

    def value(self, key: str) -> float:
        """Current v̂ of a prompt (the prior mean for an unseen one)."""
        a = self.alpha.get(key, self.prior_alpha)
        b = self.beta.get(key, self.prior_beta)
        return a / (a + b)

    def init_offline(self, keys: list[str], successes: list[float], n: int) -> None:
        """Start the trackers of `keys` from n offline samples each (`successes` of them)."""
        for key, s_k in zip(keys, successes, strict=True):
            self.alpha[str(key)], self.beta[str(key)] = offline_prior(float(s_k), n, self.rho_min)

    def _rhos(
        self,
        keys: list[str],
        firsts: list[int | None],
        row_tokens_N: list[Any] | None,
        token_scorer: Callable[[list[tuple[list[int], list[int]]]], list[list[float]]] | None,
    ) -> list[float]:
        """ρ of each group, and (drift mode) the group's first row stored for its next visit."""
        if self.rho_mode == "constant":
            return [self.rho] * len(keys)
        if row_tokens_N is None or token_scorer is None:
            raise ValueError(
                "single_stream: rho_mode logprob_drift needs row_tokens_N and token_scorer"
            )
        old = [k for k in keys if k in self.stored]
        new = [(k, n) for k, n in zip(keys, firsts, strict=True) if n is not None]
        pairs = [(self.stored[k][0], self.stored[k][1]) for k in old]
        pairs += [(row_tokens_N[n][0], row_tokens_N[n][1]) for _, n in new]
        scored = token_scorer(pairs)
        drift = {
            k: logprob_drift(self.stored[k][3], now, self.stored[k][2])
            for k, now in zip(old, scored[: len(old)], strict=True)
        }
        for (k, n), logp in zip(new, scored[len(old) :], strict=True):
            p_ids, c_ids, mask = row_tokens_N[n]
            self.stored[k] = [list(p_ids), list(c_ids), list(mask), list(logp)]
        return [drift_rho(drift.get(k, 0.0), self.d_half, self.rho_min, self.rho_max) for k in keys]

    def __call__(
        self,
        rewards_BG: Tensor,
        prompt_keys_B: list[str],
        row_tokens_N: list[Any] | None = None,
        token_scorer: Any = None,
    ) -> Tensor:
        r_BG = _f64_BG(rewards_BG, "single_stream")
        B, G = r_BG.shape
        if len(prompt_keys_B) != B:
            raise ValueError(f"single_stream: got {len(prompt_keys_B)} prompt keys for {B} prompts")
        valid_BG = ~torch.isnan(r_BG)
        r_valid = r_BG[valid_BG]
        if ((r_valid < 0) | (r_valid > 1)).any():
            raise ValueError(
                "single_stream: rewards must lie in [0, 1] for the Beta tracker, got values in "
                f"[{float(r_valid.min())}, {float(r_valid.max())}]"
            )
        v_B = torch.tensor([self.value(str(k)) for k in prompt_keys_B], dtype=torch.float64)
        raw_BG = torch.where(valid_BG, r_BG - v_B[:, None], 0.0)
        if self.normalize:
            a_N = raw_BG[valid_BG]
            n = a_N.numel()
            mean = a_N.sum() / max(n, 1)
            std = torch.sqrt(((a_N - mean) ** 2).sum() / max(n - 1, 1))
            if n >= 2 and bool(a_N.max() != a_N.min()):
                adv_BG = torch.where(valid_BG, (raw_BG - mean) / (std + self.eps), 0.0)
            else:
                adv_BG = torch.zeros_like(raw_BG)
        else:
            adv_BG = raw_BG
        keys = [str(k) for k in prompt_keys_B]
        firsts = [
            b * G + int(ok_G.nonzero()[0]) if bool(ok_G.any()) else None
            for b, ok_G in enumerate(valid_BG)
        ]
        rhos = self._rhos(keys, firsts, row_tokens_N, token_scorer)
        for key, r_G, ok_G, rho in zip(keys, r_BG, valid_BG, rhos, strict=True):
            if not ok_G.any():
                continue
            wins = float(r_G[ok_G].sum())
            losses = float((1.0 - r_G[ok_G]).sum())
            self.alpha[key] = rho * self.alpha.get(key, self.prior_alpha) + wins
            self.beta[key] = rho * self.beta.get(key, self.prior_beta) + losses
        return adv_BG.float()

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "stored": dict(self.stored)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("alpha", "beta"):
            if not isinstance(state.get(key), dict):
                raise ValueError(f"single_stream: state[{key!r}] must be a dict of floats")
        if set(state["alpha"]) != set(state["beta"]):
            raise ValueError("single_stream: state alpha and beta must have the same prompt keys")
        self.alpha = {str(k): float(v) for k, v in state["alpha"].items()}
        self.beta = {str(k): float(v) for k, v in state["beta"].items()}
        stored = state.get("stored", {})
        if not isinstance(stored, dict):
            raise ValueError("single_stream: state['stored'] must be a dict")
        self.stored = {str(k): [list(x) for x in v] for k, v in stored.items()}


# ---------------------------------------------------------------------------------------
# Modifiers: applied to an advantage already computed by an estimator.


def _check_answers(answers_BG: list[list[str | None]], B: int, G: int, who: str) -> None:
    if len(answers_BG) != B or any(len(row) != G for row in answers_BG):
        raise ValueError(f"{who}: answers must be {B} lists of {G} answers (str or None)")


def semantic_entropy_B(
    answers_BG: list[list[str | None]], seq_logp_BG: Tensor, lengths_BG: Tensor
) -> Tensor:
    """Semantic entropy of each group over answer clusters (SEED-GRPO).

    Completions with the same answer string form a cluster; each None answer is its own
    cluster. ℓ_i = seq_logp_i / max(L_i, 1); cluster log-weight = logsumexp of its ℓ_i;
    p_k = softmax over clusters; SE = −Σ_k p_k log p_k.
    """
    ell_BG = _mean_token_logp(seq_logp_BG.to(torch.float64), lengths_BG.to(torch.float64))
    out: list[float] = []
    for answers_G, ell_G in zip(answers_BG, ell_BG, strict=True):
        members: dict[object, list[int]] = {}
        for i, ans in enumerate(answers_G):
            members.setdefault(("none", i) if ans is None else ("ans", ans), []).append(i)
        lse_C = torch.stack([torch.logsumexp(ell_G[idx], dim=0) for idx in members.values()])
        logp_C = torch.log_softmax(lse_C, dim=0)
        out.append(float(-(logp_C.exp() * logp_C).sum()))
    return torch.tensor(out, dtype=torch.float64)


@ADVANTAGE_MODIFIERS.register("seed")
def seed(
    adv_BG: Tensor,
    answers_BG: list[list[str | None]],
    seq_logp_BG: Tensor,
    lengths_BG: Tensor,
    *,
    alpha: float = 0.0417,
) -> Tensor:
    """Scale advantages down on prompts with high semantic entropy (SEED-GRPO).

    "SEED-GRPO: Semantic Entropy Enhanced GRPO for Uncertainty-Aware Policy Optimization"
    (arXiv 2505.12346), in the form of a third-party reimplementation (notes: [code, third
    party]; the paper's own f and α are unconfirmed):

        A_i ← A_i / (1 + α · SE(q) / log G)

    with SE from `semantic_entropy_B` (answer clusters, probabilities from length-normalized
    sequence log-likelihoods under the sampling policy). Answers are compared as exact
    strings, so normalize them beforehand. G = 1 (log G = 0) leaves A unchanged. Zero
    advantages (NaN rewards, all-equal groups) stay exactly zero.
    """
    _check_positive(alpha, "alpha", "seed", allow_zero=True)
    if not isinstance(adv_BG, Tensor) or adv_BG.dim() != 2:
        raise ValueError("seed: advantages must have shape [B, G]")
    B, G = adv_BG.shape
    seq_logp_BG = _same_shape(seq_logp_BG, adv_BG, "seq_logp", "seed")
    lengths_BG = _same_shape(lengths_BG, adv_BG, "lengths", "seed")
    _check_answers(answers_BG, B, G, "seed")
    if G < 2:
        return adv_BG.float()
    se_B = semantic_entropy_B(answers_BG, seq_logp_BG, lengths_BG)
    scale_B = 1.0 / (1.0 + alpha * se_B / math.log(G))
    return (adv_BG.to(torch.float64) * scale_B[:, None]).float()


@ADVANTAGE_MODIFIERS.register("xrpo_novelty")
def xrpo_novelty(
    adv_BG: Tensor,
    rewards_BG: Tensor,
    seq_logp_BG: Tensor,
    lengths_BG: Tensor,
    *,
    lam: float = 2.5,
    kappa: float = 0.5,
    correct_threshold: float | None = None,
) -> Tensor:
    """Novelty bonus for unlikely correct completions (XRPO advantage sharpening, reading).

    "XRPO: Pushing the limits of GRPO with Targeted Exploration and Exploitation"
    (arXiv 2510.06672), Eq. 6 as a review quotes it (η_i = e^{s(y_i) − s̄}, λ = 2.5,
    κ = 0.5; catalog2.md §6.4):

        s_i = seq_logp_i / max(L_i, 1),   s̄ = mean of s over the group's valid completions
        A_i ← A_i + min(max(λ·(1 − e^{s_i − s̄}), 0), κ·A_i)   for eligible completions

    so the bonus is at most κ·A_i. Eligible: valid reward, A_i > 0 (better than its group)
    and, if `correct_threshold` is set, r_i ≥ correct_threshold. Zero advantages (NaN
    rewards, all-equal groups) therefore stay exactly zero.
    Changed: the first build had λ = 0.1 and no κ cap (kappa = inf restores it).
    """
    _check_positive(lam, "lam", "xrpo_novelty", allow_zero=True)
    if not kappa >= 0:  # NaN fails too; inf is allowed (no cap)
        raise ValueError(f"xrpo_novelty: kappa must be >= 0, got {kappa}")
    if correct_threshold is not None and not math.isfinite(correct_threshold):
        raise ValueError(f"xrpo_novelty: correct_threshold must be finite, got {correct_threshold}")
    if not isinstance(adv_BG, Tensor) or adv_BG.dim() != 2:
        raise ValueError("xrpo_novelty: advantages must have shape [B, G]")
    a_BG = adv_BG.to(torch.float64)
    r_BG = _scorable(_same_shape(rewards_BG, adv_BG, "rewards", "xrpo_novelty"))
    logp_BG = _same_shape(seq_logp_BG, adv_BG, "seq_logp", "xrpo_novelty")
    len_BG = _same_shape(lengths_BG, adv_BG, "lengths", "xrpo_novelty")
    valid_BG = ~torch.isnan(r_BG)
    ell_BG = _mean_token_logp(logp_BG, len_BG)
    n_B = valid_BG.sum(dim=-1).clamp(min=1)
    mean_B = torch.where(valid_BG, ell_BG, 0.0).sum(dim=-1) / n_B
    novelty_BG = (1.0 - torch.exp(ell_BG - mean_B[:, None])).clamp(min=0.0)
    eligible_BG = valid_BG & (a_BG > 0)
    if correct_threshold is not None:
        eligible_BG &= r_BG >= correct_threshold
    bonus_BG = torch.minimum(lam * novelty_BG, kappa * a_BG.clamp(min=0.0))
    return torch.where(eligible_BG, a_BG + bonus_BG, a_BG).float()


@ADVANTAGES.register("dcpo", min_group_size=2, token_level=True)
def dcpo(
    rewards_BG: Tensor,
    entropy_NT: Tensor,
    old_logp_NT: Tensor,
    rescore_NT: Callable[[float], Tensor],
    mask_NT: Tensor,
    *,
    target_entropy: float = 0.5,
    cap: float = 0.1,
    correct_at: float = 0.05,
    eps: float = 1e-6,
) -> Tensor:
    """DCPO: GRPO's advantage mixed with a temperature-reweighting term that steers the
    entropy toward a target (per-token advantages [N, T]).

    "Distribution-Centric Policy Optimization Dominates Exploration-Exploitation Trade-off"
    (DCPO), arXiv 2601.12730; the form of the
    authors' code (597358816/DCPO `ray_trainer.py`, read for the project's notes):

        H  = mean token entropy of the batch (sampling temperature, mask)
        T' = 1.2 (hot) if H <= H* else 0.8 (cold), times the sampling temperature
        w_t = π_T'(o_t) / π(o_t)            the sampled token re-scored at T' (no grad)
        a  = min(|H* − H|, cap) / p_correct,  p_correct = share of rows with R > correct_at
        α  = a / (1 + a)
        A'_{i,t} = (1 − α)·A_i + α·1[R_i > correct_at]·w_t,   A_i = GRPO's z-score

    Defaults H* = 0.5, cap 0.1, threshold 0.05 (the code's). At H = H*, A' = A. No batch
    row correct: α = 0. `rescore_NT(scale)` re-scores the sampled tokens at scale × the
    sampling temperature: one extra no-grad forward, at the one T' the entropy picks.
    """
    if cap < 0 or target_entropy < 0:
        raise ValueError(f"dcpo: cap and target_entropy must be >= 0, got {cap}, {target_entropy}")
    adv_BG = grpo(rewards_BG, eps=eps).double()
    B, G = adv_BG.shape
    mask = mask_NT.double()
    if mask.shape[0] != B * G:
        raise ValueError(f"dcpo: {mask.shape[0]} rows for {B}x{G} rewards")
    H = float((entropy_NT.double() * mask).sum() / mask.sum().clamp(min=1.0))
    logp_alt = rescore_NT(1.2 if H <= target_entropy else 0.8)
    w_NT = (logp_alt.double() - old_logp_NT.double()).clamp(max=20.0).exp() * mask
    r_N = rewards_BG.double().reshape(-1)
    correct_N = (r_N > correct_at).double()  # NaN compares False
    p_correct = (
        float(correct_N[~torch.isnan(r_N)].mean()) if bool((~torch.isnan(r_N)).any()) else 0.0
    )
    a = min(abs(target_entropy - H), cap) / p_correct if p_correct > 0 else 0.0
    alpha = a / (1.0 + a)
    adv_NT = (1.0 - alpha) * adv_BG.reshape(-1, 1) * mask + alpha * correct_N[:, None] * w_NT
    return adv_NT.float()
