"""Policy objectives: per-token losses (to minimize) before aggregation.

Each loss takes a `PolicyInputs` for one micro-batch and returns a `TermOutput` whose
per_token_NT is the negative per-token objective; the trainer adds regularizer terms and
aggregates once (see aggregation.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grouprl.algorithms.selection import row_quantiles
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


def clip_stats(low_NT: Tensor, high_NT: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """TRL's clip metrics as 0/1 per token: low, high, and either (the clipped region)."""
    return {
        "clip_ratio/low_mean": low_NT.to(dtype),
        "clip_ratio/high_mean": high_NT.to(dtype),
        "clip_ratio/region_mean": (low_NT | high_NT).to(dtype),
    }


OFFPOLICY_MODES = ("clip", "shaped")
OFFPOLICY_RATIOS = ("old", "none")


@LOSSES.register("ppo_clip")
def ppo_clip(
    inp: PolicyInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    offpolicy: str = "clip",
    offpolicy_ratio: str = "old",
    offpolicy_gamma: float = 0.1,
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

    Off-policy rows (`offpolicy_N`: a rollout strategy's hinted or demonstration-steered
    rows, expert anchors) get the same clipped term with `offpolicy: clip`, or with
    `offpolicy: shaped` LUFFY's policy shaping ("Learning to Reason under Off-Policy
    Guidance", arXiv 2504.14945), unclipped:

        J = f(ρ')·A,   f(x) = x / (x + γ),   γ = offpolicy_gamma
        ρ' = ρ (offpolicy_ratio "old": against π_old in the row's sampling context, as
             Guide-GRPO's code) or π_θ(token) ("none": LUFFY's and ICPO's code)

    stats_NT (TRL names), 0/1 per token: clip_ratio/low_mean = [ρ < 1 − eps_low and A < 0],
    clip_ratio/high_mean = [ρ > 1 + eps_high and A > 0], clip_ratio/region_mean = either.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"ppo_clip: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"ppo_clip: dual_clip must be > 1 (or None), got {dual_clip}")
    if offpolicy not in OFFPOLICY_MODES:
        raise ValueError(f"ppo_clip: offpolicy must be one of {OFFPOLICY_MODES}, got {offpolicy!r}")
    if offpolicy_ratio not in OFFPOLICY_RATIOS:
        raise ValueError(
            f"ppo_clip: offpolicy_ratio must be one of {OFFPOLICY_RATIOS}, got {offpolicy_ratio!r}"
        )
    if not (math.isfinite(offpolicy_gamma) and offpolicy_gamma > 0):
        raise ValueError(f"ppo_clip: offpolicy_gamma must be > 0, got {offpolicy_gamma}")
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
    if offpolicy == "shaped" and inp.offpolicy_N is not None:
        x_NT = ratio_NT if offpolicy_ratio == "old" else logp_NT.clamp(-20.0, 20.0).exp()
        shaped_NT = x_NT / (x_NT + offpolicy_gamma) * adv_NT
        off_N1 = inp.offpolicy_N.to(logp_NT.device)[:, None]
        objective_NT = torch.where(off_N1, shaped_NT, objective_NT)
        low_NT, high_NT = low_NT & ~off_N1, high_NT & ~off_N1  # never clipped
    dtype = logp_NT.dtype
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        stats_NT=clip_stats(low_NT, high_NT, dtype),
    )


@LOSSES.register("reinforce")
def reinforce(inp: PolicyInputs) -> TermOutput:
    """Vanilla policy gradient with the ratio fixed to 1: J = A·logπ_θ, per_token = −A·logπ_θ.

    Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist
    Reinforcement Learning" (Machine Learning, 1992); used by GTPO (arXiv 2508.03772).
    Its gradient equals ppo_clip's when π_old = π_θ (on-policy, one update per batch).
    """
    adv_NT = broadcast_adv(inp.adv_N, inp.logp_NT)
    return TermOutput(per_token_NT=-_token_weighted(adv_NT * inp.logp_NT, inp))


# ---------------------------------------------------------------------------------------
# Helpers shared by the catalog losses below.
# ---------------------------------------------------------------------------------------


def _valid_logps(inp: PolicyInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask, valid, logπ_θ, logπ_old) with padded positions of both log-probs set to 0.

    Padding may hold garbage (−inf, NaN); zeroing it before any exp keeps values and
    gradients finite (a NaN that a later `where` discards would still poison the backward).
    π_old is a constant of the rollout: it is detached.
    """
    logp_NT = inp.logp_NT
    mask_NT = inp.mask_NT.to(logp_NT.dtype)
    valid_NT = mask_NT != 0
    logp_NT = logp_NT.where(valid_NT, 0.0)
    old_NT = inp.old_logp_NT.detach().to(logp_NT.dtype).where(valid_NT, 0.0)
    return mask_NT, valid_NT, logp_NT, old_NT


def _token_weighted(objective_NT: Tensor, inp: PolicyInputs) -> Tensor:
    """Objective × token weights (forking-token masks, ...); unchanged when there are none."""
    if inp.token_weight_NT is None:
        return objective_NT
    return objective_NT * inp.token_weight_NT.detach().to(objective_NT.dtype)


def _seq_mean(values_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """Σ_t m·v / max(Σ_t m, 1) per row (values at masked positions must be finite)."""
    return (values_NT * mask_NT).sum(dim=-1) / mask_NT.sum(dim=-1).clamp(min=1.0)


def _seq_ratio_NT(logp_NT: Tensor, old_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """GSPO-token ratio s_{i,t} = sg[s_i]·π_θ(o_t)/sg[π_θ(o_t)], s_i = exp(mean_t log ρ_{i,t}).

    Its value is the sequence ratio s_i at every token and its gradient s_i·∇logπ_θ(o_t),
    so that mean_t over the tokens of the row gives exactly ∇s_i (GSPO, arXiv 2507.18071,
    "GSPO-token"). Like verl's compute_policy_loss_gspo, log s is clamped at 10 for
    numerical safety (s ≤ e^10).
    """
    log_s_N = _seq_mean(logp_NT - old_NT, mask_NT).detach()
    log_s_NT = log_s_N[:, None] + logp_NT - logp_NT.detach()
    return log_s_NT.clamp(max=10.0).exp()


def _clip_stats(
    unclipped_NT: Tensor, clipped_NT: Tensor, adv_NT: Tensor, dtype: torch.dtype
) -> dict[str, Tensor]:
    """TRL-named 0/1 indicators of tokens where the pessimistic min took the clipped branch.

    For ppo_clip these are exactly [ρ < 1 − ε_low and A < 0] and [ρ > 1 + ε_high and A > 0].
    """
    taken_NT = (clipped_NT * adv_NT < unclipped_NT * adv_NT).detach()
    low_NT = taken_NT & (adv_NT < 0)
    high_NT = taken_NT & (adv_NT > 0)
    return clip_stats(low_NT, high_NT, dtype)


def _check_eps(name: str, **eps: float) -> None:
    for key, value in eps.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: {key} must be a finite number >= 0, got {value}")


# ---------------------------------------------------------------------------------------
# Ratio-level variants: GSPO, CISPO, DHPO.
# ---------------------------------------------------------------------------------------


@LOSSES.register("gspo")
def gspo(inp: PolicyInputs, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> TermOutput:
    """Sequence-level clipped surrogate of GSPO.

    "Group Sequence Policy Optimization" (Qwen, arXiv 2507.18071), eqs. for s_i and J_GSPO:

        s_i = (π_θ(o_i)/π_old(o_i))^{1/|o_i|} = exp(mean_t log ρ_{i,t})
        J_i = min(s_i·A_i, clip(s_i, 1 − eps_low, 1 + eps_high)·A_i)

    Written per token in the GSPO-token form (value s_i at every token, gradient
    s_i·∇logπ_θ(o_t); see `_seq_ratio_NT`) exactly as verl's compute_policy_loss_gspo, so
    that token-level advantages and token weights also work. With the
    `seq_mean_token_mean` aggregation (verl forces it for GSPO) the loss is GSPO's
    (1/G)Σ_i −J_i; with π_old = π_θ the gradient is the sequence-mean REINFORCE gradient.
    Defaults ε_low = 3e-4, ε_high = 4e-4: verl's GSPO example ("as recommended, Sec 5.1").

    per_token = −J · token_weight. stats_NT: clip_ratio/{low,high,region}_mean (TRL names),
    per token, from the sequence ratio.
    """
    _check_eps("gspo", eps_low=eps_low, eps_high=eps_high)
    mask_NT, _, logp_NT, old_NT = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    s_NT = _seq_ratio_NT(logp_NT, old_NT, mask_NT)
    clipped_NT = s_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective_NT = (s_NT * adv_NT).minimum(clipped_NT * adv_NT)
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        stats_NT=_clip_stats(s_NT.detach(), clipped_NT.detach(), adv_NT, logp_NT.dtype),
    )


@LOSSES.register("cispo")
def cispo(inp: PolicyInputs, *, eps_low: float = 10.0, eps_high: float = 0.2) -> TermOutput:
    """Clipped-IS-weight policy optimization: J = sg(clip(ρ, 1 − eps_low, 1 + eps_high))·A·logπ_θ.

    "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"
    (arXiv 2506.13585), CISPO objective. Unlike PPO no token loses its gradient: the
    importance weight is truncated and stop-gradiented, so ∇J = sg(w)·A·∇logπ_θ.
    Defaults from verl's CISPO example: eps_low = 10 (1 − 10 < 0: no lower bound, as
    MiniMax tunes only the upper one), eps_high = 0.2.

    per_token = −J · token_weight. stats_NT (TRL names, 0/1 per token, whatever the sign
    of A, since the weight is truncated for both): clip_ratio/low_mean = [ρ < 1 − eps_low],
    clip_ratio/high_mean = [ρ > 1 + eps_high], clip_ratio/region_mean = either.
    """
    _check_eps("cispo", eps_low=eps_low, eps_high=eps_high)
    _, _, logp_NT, old_NT = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    ratio_NT = (logp_NT - old_NT).exp().detach()
    weight_NT = ratio_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective_NT = weight_NT * adv_NT * logp_NT
    low_NT = ratio_NT < 1.0 - eps_low
    high_NT = ratio_NT > 1.0 + eps_high
    dtype = logp_NT.dtype
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        stats_NT=clip_stats(low_NT, high_NT, dtype),
    )


DHPO_MIX = ("objective", "ratio")
DHPO_W = ("const", "entropy")


@LOSSES.register("dhpo")
def dhpo(
    inp: PolicyInputs,
    *,
    w: float = 0.5,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    seq_eps_low: float = 3e-4,
    seq_eps_high: float = 4e-4,
    mix: str = "ratio",
    w_mode: str = "const",
    h_ref_pct: float = 80.0,
) -> TermOutput:
    """DHPO, reading: token and sequence ratios, each clipped to its own trust region, mixed.

    "Orchestrating Tokens and Sequences: Dynamic Hybrid Policy Optimization for RLVR" (Min
    et al., ACL Findings 2026, arXiv 2601.05607; abstract only, no code): the GRPO token
    ratio ρ_{i,t} and the GSPO sequence ratio s_i are "constrained within separate trust
    regions before mixing", "within a single clipped surrogate objective" (abstract):

        ρ̄ = w_t·ρ + (1 − w_t)·s                                          (unclipped mix)
        ρ̂ = w_t·clip(ρ, 1 − eps_low, 1 + eps_high)
             + (1 − w_t)·clip(s, 1 − seq_eps_low, 1 + seq_eps_high)       (clipped mix)
        J  = min(ρ̄·A, ρ̂·A)                                               (mix: ratio)

    `mix: objective` (a reader's note on the paper: each branch clipped, then mixed) mixes
    the two clipped objectives instead; the two differ whenever the branches disagree:

        J = w_t·min(ρA, clip(ρ)A) + (1 − w_t)·min(sA, clip(s)A)

    s_i is in GSPO-token form (`_seq_ratio_NT`); w = 1 gives ppo_clip, w = 0 gives gspo.
    w_t: `const` = w (the abstract's "averaged mixing"). `entropy` (its "entropy-guided
    mixing", form unknown; ours): w_t = clamp(sg(H_t)/H_ref,i, 0, 1) with H_ref,i the
    `h_ref_pct` percentile of row i's token entropies (row-local, so micro-batches do not
    change it): high-entropy tokens lean on token-level credit (direction not confirmed).
    The ε defaults are PPO's and GSPO's (the paper's are unknown).

    per_token = −J · token_weight; stats_NT: clip_ratio/* of the mix (ratio) or of the
    token branch (objective), dhpo/seq_clipped where the sequence branch was clipped.
    """
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"dhpo: w must be in [0, 1], got {w}")
    if mix not in DHPO_MIX:
        raise ValueError(f"dhpo: mix must be one of {', '.join(DHPO_MIX)}, got {mix!r}")
    if w_mode not in DHPO_W:
        raise ValueError(f"dhpo: w_mode must be one of {', '.join(DHPO_W)}, got {w_mode!r}")
    if not 0.0 < h_ref_pct <= 100.0:
        raise ValueError(f"dhpo: h_ref_pct must be in (0, 100], got {h_ref_pct}")
    _check_eps(
        "dhpo",
        eps_low=eps_low,
        eps_high=eps_high,
        seq_eps_low=seq_eps_low,
        seq_eps_high=seq_eps_high,
    )
    mask_NT, valid_NT, logp_NT, old_NT = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    ratio_NT = (logp_NT - old_NT).exp()
    s_NT = _seq_ratio_NT(logp_NT, old_NT, mask_NT)
    ratio_c_NT = ratio_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    s_c_NT = s_NT.clamp(1.0 - seq_eps_low, 1.0 + seq_eps_high)
    if w_mode == "entropy":
        if inp.entropy_NT is None:
            raise ValueError("dhpo: w_mode entropy needs entropy_NT, got None")
        H_NT = inp.entropy_NT.detach().to(logp_NT.dtype).where(valid_NT, 0.0)
        h_ref_N, _ = row_quantiles(H_NT, valid_NT, h_ref_pct / 100.0)
        w_NT = (H_NT / h_ref_N[:, None].clamp(min=1e-8)).clamp(0.0, 1.0)
    else:
        w_NT = torch.full_like(logp_NT, w)
    seq_clipped_NT = (s_c_NT * adv_NT < s_NT * adv_NT).detach().to(logp_NT.dtype)
    if mix == "objective":
        tok_NT = (ratio_NT * adv_NT).minimum(ratio_c_NT * adv_NT)
        seq_NT = (s_NT * adv_NT).minimum(s_c_NT * adv_NT)
        objective_NT = w_NT * tok_NT + (1.0 - w_NT) * seq_NT
        stats = _clip_stats(ratio_NT.detach(), ratio_c_NT.detach(), adv_NT, logp_NT.dtype)
    else:
        mix_NT = w_NT * ratio_NT + (1.0 - w_NT) * s_NT
        mix_c_NT = w_NT * ratio_c_NT + (1.0 - w_NT) * s_c_NT
        objective_NT = (mix_NT * adv_NT).minimum(mix_c_NT * adv_NT)
        stats = _clip_stats(mix_NT.detach(), mix_c_NT.detach(), adv_NT, logp_NT.dtype)
    stats["dhpo/seq_clipped"] = seq_clipped_NT
    return TermOutput(per_token_NT=-_token_weighted(objective_NT, inp), stats_NT=stats)


# ---------------------------------------------------------------------------------------
# REINFORCE-form variants: REC, OPMD ("Group-Relative REINFORCE Is Secretly an Off-Policy
# Algorithm", arXiv 2509.24203; Trinity-RFT rec_policy_loss.py / opmd_policy_loss.py).
# ---------------------------------------------------------------------------------------

REC_CLIP_MODES = ("two-side", "one-side", "ring", "none")


@LOSSES.register("rec")
def rec(
    inp: PolicyInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_mode: str = "two-side",
    eps_low_prime: float = 0.6,
    eps_high_prime: float = 2.0,
) -> TermOutput:
    """REC: REINFORCE with the ratio used only as a mask, J = A·logπ_θ·1[ρ in range].

    "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm" (Yao et al.,
    arXiv 2509.24203); as agentscope-ai/Trinity-RFT RECPolicyLossFn (clip_mode, with its
    weight = "none" and regularizer = "none"). ρ = exp(logπ_θ − logπ_old) is detached, so
    ∇J = A·∇logπ_θ on in-range tokens and 0 elsewhere. In range:

        two-side (default, ALGORITHMS.md): 1 − eps_low ≤ ρ ≤ 1 + eps_high
        one-side: (A ≥ 0 and ρ ≤ 1 + eps_high) or (A ≤ 0 and ρ ≥ 1 − eps_low)
                  (masks exactly the tokens whose PPO-clip gradient is 0)
        ring:     two-side, or (A ≥ 0 and ρ ≤ 1 − eps_low_prime)
                  or (A ≤ 0 and ρ ≥ 1 + eps_high_prime)      (ε′ defaults 0.6 and 2)
        none:     every token (plain REINFORCE)

    per_token = −J · token_weight. stats_NT: clip_ratio/low_mean = out of range with ρ < 1,
    clip_ratio/high_mean = out of range with ρ > 1, clip_ratio/region_mean = out of range.
    """
    if clip_mode not in REC_CLIP_MODES:
        raise ValueError(
            f"rec: clip_mode must be one of {', '.join(REC_CLIP_MODES)}; got {clip_mode!r}"
        )
    _check_eps("rec", eps_low=eps_low, eps_high=eps_high)
    if not 0.0 < eps_low_prime <= 1.0 or not 0.0 < eps_high_prime < math.inf:
        raise ValueError(
            f"rec: need 0 < eps_low_prime <= 1 and 0 < eps_high_prime, got "
            f"{eps_low_prime}, {eps_high_prime}"
        )
    _, _, logp_NT, old_NT = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    ratio_NT = (logp_NT - old_NT).exp().detach()
    inside_NT = (ratio_NT >= 1.0 - eps_low) & (ratio_NT <= 1.0 + eps_high)
    if clip_mode == "two-side":
        in_range_NT = inside_NT
    elif clip_mode == "one-side":
        in_range_NT = ((adv_NT >= 0) & (ratio_NT <= 1.0 + eps_high)) | (
            (adv_NT <= 0) & (ratio_NT >= 1.0 - eps_low)
        )
    elif clip_mode == "ring":
        in_range_NT = (
            inside_NT
            | ((adv_NT >= 0) & (ratio_NT <= 1.0 - eps_low_prime))
            | ((adv_NT <= 0) & (ratio_NT >= 1.0 + eps_high_prime))
        )
    else:
        in_range_NT = torch.ones_like(inside_NT)
    dtype = logp_NT.dtype
    objective_NT = adv_NT * logp_NT * in_range_NT.to(dtype)
    out_NT = ~in_range_NT
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        # an excluded token has ratio != 1, so low | high is exactly out_NT
        stats_NT=clip_stats(out_NT & (ratio_NT < 1.0), out_NT & (ratio_NT > 1.0), dtype),
    )


@LOSSES.register("opmd")
def opmd(inp: PolicyInputs, *, tau: float = 1.0) -> TermOutput:
    """Online policy mirror descent, gradient form: J = A·logπ_θ/(1 + τ).

    "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm" (arXiv 2509.24203), OPMD
    as in Trinity-RFT's OPMD loss (its −A·logπ/(1 + τ) is the gradient-equivalent of the
    Kimi k1.5 objective (R − R̄ − τ·log(π_θ/π_old))²; the k2 term is a separate
    regularizer, not included). τ = 1. per_token = −J · token_weight.
    """
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"opmd: tau must be a finite number >= 0, got {tau}")
    _, _, logp_NT, _ = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    return TermOutput(per_token_NT=-_token_weighted(adv_NT * logp_NT / (1.0 + tau), inp))


# ---------------------------------------------------------------------------------------
# Group-coupled, self-aggregating losses: DisCO, DRPO, Reg-GRPO.
# ---------------------------------------------------------------------------------------

DISCO_SCORES = ("logL", "Lratio")
DISCO_KL_ESTIMATORS = ("k1", "k3")
DISCO_KL_SCOPES = ("micro_batch", "group")


def _group_index(inp: PolicyInputs, name: str) -> tuple[Tensor, int]:
    """Each row's group as 0..B'−1 over the groups present, and B'."""
    if inp.group_N is None:
        raise ValueError(f"{name}: needs group_N (each row's prompt group), got None")
    if inp.group_N.shape != inp.logp_NT.shape[:1]:
        raise ValueError(
            f"{name}: group_N must have shape [N] = {inp.logp_NT.shape[0]}, "
            f"got {tuple(inp.group_N.shape)}"
        )
    uniq, gid_N = torch.unique(inp.group_N, return_inverse=True)
    return gid_N.to(inp.logp_NT.device), int(uniq.numel())


def _group_sum(x_N: Tensor, gid_N: Tensor, num: int) -> Tensor:
    return x_N.new_zeros(num).index_add(0, gid_N, x_N)


def _group_amax(x_N: Tensor, gid_N: Tensor, num: int) -> Tensor:
    """Per-group max (−inf for a group with no finite entry), no gradient."""
    return (
        x_N.detach()
        .new_full((num,), -math.inf)
        .scatter_reduce(0, gid_N, x_N.detach(), reduce="amax", include_self=True)
    )


def _batch_norm(inp: PolicyInputs, name: str, field: str) -> float:
    value = getattr(inp.norm, field, 0.0) if inp.norm is not None else 0.0
    if not value > 0:
        raise ValueError(
            f"{name}: aggregates itself and needs inp.norm.{field} > 0 (the whole optimizer "
            f"batch's normalizer, for micro-batch invariance); got norm={inp.norm}"
        )
    return float(value)


def _discriminative(
    inp: PolicyInputs,
    name: str,
    *,
    score: str,
    tau: float,
    delta: float,
    beta: float,
    threshold: float,
    kl_estimator: str,
    kl_scope: str,
    length_lambda: float | None,
) -> TermOutput:
    """DisCO's objective (DRPO's when length_lambda is set); see `disco` and `drpo`."""
    if score not in DISCO_SCORES:
        raise ValueError(f"{name}: score must be one of {', '.join(DISCO_SCORES)}; got {score!r}")
    if kl_estimator not in DISCO_KL_ESTIMATORS:
        raise ValueError(
            f"{name}: kl_estimator must be one of {', '.join(DISCO_KL_ESTIMATORS)}; "
            f"got {kl_estimator!r}"
        )
    if kl_scope not in DISCO_KL_SCOPES:
        raise ValueError(
            f"{name}: kl_scope must be one of {', '.join(DISCO_KL_SCOPES)}; got {kl_scope!r}"
        )
    for key, value in (("tau", tau), ("beta", beta), ("delta", delta)):
        if not math.isfinite(value) or value < 0 or (key == "tau" and value == 0):
            raise ValueError(
                f"{name}: {key} must be finite and {'> 0' if key == 'tau' else '>= 0'}, got {value}"
            )
    if inp.rewards_N is None:
        raise ValueError(f"{name}: needs rewards_N (positives: reward > threshold), got None")
    num_groups = _batch_norm(inp, name, "num_groups")
    gid_N, B = _group_index(inp, name)
    mask_NT, _, logp_NT, old_NT = _valid_logps(inp)
    dtype = logp_NT.dtype

    # Score per completion: length-averaged log-likelihood or likelihood ratio, with the
    # token weights multiplying each token's contribution (the length stays Σ_t m).
    x_NT = logp_NT if score == "logL" else (logp_NT - old_NT).exp()
    s_N = _seq_mean(_token_weighted(x_NT, inp), mask_NT)

    rewards_N = inp.rewards_N.detach().to(device=s_N.device, dtype=dtype)
    pos_N = rewards_N > threshold  # NaN compares False: neither positive nor negative
    neg_N = rewards_N <= threshold
    n_pos_B = _group_sum(pos_N.to(dtype), gid_N, B)
    n_neg_B = _group_sum(neg_N.to(dtype), gid_N, B)
    ok_B = (n_pos_B > 0) & (n_neg_B > 0)

    # Positives: plain mean (DisCO) or length-softmax weights among them (DRPO).
    if length_lambda is None:
        pos_w_N = pos_N.to(dtype)
    else:
        len_N = mask_NT.sum(dim=-1)
        max_len = _batch_norm(inp, name, "max_len")
        logit_N = ((1.0 - len_N / max_len) / length_lambda).where(pos_N, -math.inf)
        top_B = _group_amax(logit_N, gid_N, B)
        pos_w_N = (logit_N - top_B.where(top_B.isfinite(), 0.0)[gid_N]).exp()
    pos_w_B = _group_sum(pos_w_N, gid_N, B)
    pos_term_B = _group_sum(pos_w_N * s_N, gid_N, B) / pos_w_B.where(ok_B, 1.0)

    # Negatives: τ·log mean_{neg} exp(s/τ), stabilized by the (detached) group max.
    z_N = (s_N / tau).where(neg_N, -math.inf)
    top_B = _group_amax(z_N, gid_N, B)
    top_B = top_B.where(top_B.isfinite(), 0.0)
    sum_exp_B = _group_sum((z_N - top_B[gid_N]).exp(), gid_N, B)
    log_mean_exp_B = top_B + sum_exp_B.where(ok_B, 1.0).log() - n_neg_B.where(ok_B, 1.0).log()
    objective_B = (pos_term_B - tau * log_mean_exp_B).where(ok_B, 0.0)
    loss = -objective_B.sum() / num_groups

    # Constraint KL(π_old ‖ π_θ) ≤ δ as the penalty sg[max(0, β(KL − δ))]·KL.
    log_ratio_NT = logp_NT - old_NT
    if kl_estimator == "k1":
        kl_NT = -log_ratio_NT
    else:
        kl_NT = log_ratio_NT.exp() - 1.0 - log_ratio_NT
    kl_sum_N = (kl_NT * mask_NT).sum(dim=-1)
    tokens_N = mask_NT.sum(dim=-1)
    kl_seen = kl_sum_N.sum() / tokens_N.sum().clamp(min=1.0)
    if kl_scope == "micro_batch":
        weight = (beta * (kl_seen.detach() - delta)).clamp(min=0.0)
        # An optimizer batch without tokens gives 0 instead of 0/0 (as the aggregations do).
        num_tokens = max(float(inp.norm.num_tokens), 1.0)  # type: ignore[union-attr]
        penalty = weight * kl_sum_N.sum() / num_tokens
        mean_weight = float(weight)
    else:
        kl_B = _group_sum(kl_sum_N, gid_N, B) / _group_sum(tokens_N, gid_N, B).clamp(min=1.0)
        weight_B = (beta * (kl_B.detach() - delta)).clamp(min=0.0)
        penalty = (weight_B * kl_B).sum() / num_groups
        mean_weight = float(weight_B.mean()) if B else 0.0

    return TermOutput(
        per_token_NT=torch.zeros_like(logp_NT).detach(),
        aggregated=loss + penalty,
        stats={
            f"{name}/kl": float(kl_seen.detach()),
            f"{name}/kl_weight": mean_weight,
            f"{name}/kl_penalty": float(penalty.detach()),
            f"{name}/valid_group_frac": float(ok_B.to(dtype).mean()) if B else 0.0,
        },
    )


@LOSSES.register("disco", whole_groups=True)
def disco(
    inp: PolicyInputs,
    *,
    score: str = "logL",
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    threshold: float = 0.5,
    kl_estimator: str = "k1",
    kl_scope: str = "micro_batch",
) -> TermOutput:
    """DisCO: discriminative objective with a DRO negative term and a KL trust-region penalty.

    "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization"
    (arXiv 2505.12366); as Optimization-AI's compute_policy_loss_disco_logL. No advantage
    and no clipping. Per group q with positives S+ (reward > threshold; the authors' r = 1)
    and negatives S− (reward ≤ threshold; r = 0; NaN rewards are neither):

        s(o) = mean_t logπ_θ(o_t)   (score="logL")   or   mean_t ρ_t   (score="Lratio")
        J_q  = mean_{o∈S+} s(o) − τ·log mean_{o∈S−} exp(s(o)/τ)
        loss = −Σ_q J_q / B + sg[max(0, β(KL − δ))]·KL,   KL ≈ KL(π_old ‖ π_θ)

    A group lacking a positive or a negative contributes 0. B = inp.norm.num_groups, every
    prompt group of the optimizer batch (the authors divide by all questions too). The
    authors' code computes τ·log mean exp through the surrogate Σexp/sg(Σexp), which has the
    same gradient; the true value is used here. Token weights multiply each token's term in
    s (the length stays Σ_t m). KL estimator per token, x = logπ_θ − logπ_old: "k1": −x (the
    authors' scripts, ppo_kl_type=kl), "k3": e^x − 1 − x (their "low_var_kl" default).

    kl_scope: the KL in the penalty is a token mean over
      "micro_batch" (default, the authors' code: the rows the call sees, i.e. the whole
        batch when the trainer passes one micro-batch): penalty = w·Σ_seen m·k / num_tokens
        with w from this call's KL. Exact for one micro-batch; with several, Σ_mb w_mb·KL_mb
        (not micro-batch invariant unless every w_mb is equal, e.g. 0 while KL ≤ δ).
      "group": each prompt group's own KL_q, penalty = Σ_q w_q·KL_q / B: a per-question
        constraint (not the paper's) that is exactly micro-batch invariant.
    The objective part is exactly micro-batch invariant over whole groups.

    Returns `aggregated` (per_token_NT is zero). stats: disco/kl (KL over the rows seen),
    disco/kl_weight (the detached weight; mean over groups for "group"), disco/kl_penalty
    (the penalty this call adds), disco/valid_group_frac (groups seen with both kinds).
    Defaults τ = 10, δ = 1e-4, β = 1e3 (authors' scripts).
    """
    return _discriminative(
        inp,
        "disco",
        score=score,
        tau=tau,
        delta=delta,
        beta=beta,
        threshold=threshold,
        kl_estimator=kl_estimator,
        kl_scope=kl_scope,
        length_lambda=None,
    )


@LOSSES.register("drpo", whole_groups=True)
def drpo(
    inp: PolicyInputs,
    *,
    lam: float = 0.1,
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    threshold: float = 0.5,
    kl_estimator: str = "k1",
    kl_scope: str = "micro_batch",
) -> TermOutput:
    """DRPO: DisCO with length-preferring weights among the correct completions.

    "DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization" (arXiv 2510.04474);
    as Optimization-AI/DRPO compute_policy_loss_drpo. Like `disco` (score logL), but the
    positive mean becomes a weighted mean with weights normalized within S+ only

        w_i ∝ exp((1 − L_i/L_max)/λ),  L_i = Σ_t m_{i,t},  L_max = inp.norm.max_len
        J_q = Σ_{i∈S+} w̄_i s(o_i) − τ·log mean_{j∈S−} exp(s(o_j)/τ)

    (L_max is the configured max completion length: the authors pad to it and divide by
    the padded width). The length term never changes the sign of a correct answer's
    update. Defaults λ = 0.1, τ = 10, δ = 1e-4, β = 1e3, k1 KL (authors' script). Everything
    else (threshold, KL penalty and kl_scope, stats under "drpo/") as in `disco`.
    """
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"drpo: lam must be a finite number > 0, got {lam}")
    return _discriminative(
        inp,
        "drpo",
        score="logL",
        tau=tau,
        delta=delta,
        beta=beta,
        threshold=threshold,
        kl_estimator=kl_estimator,
        kl_scope=kl_scope,
        length_lambda=lam,
    )


REG_GRPO_SCALES = ("none", "group")
REG_GRPO_RATIOS = ("old", "ref")


@LOSSES.register("reg_grpo", whole_groups=True)
def reg_grpo(
    inp: PolicyInputs,
    *,
    beta: float = 1.0,
    scale: str = "none",
    ratio_to: str = "old",
    sigma_min: float = 1e-3,
) -> TermOutput:
    """Reg-GRPO, reading: regress the group-centered implied reward onto the GRPO advantage.

    "DeepVideo-R1: Video Reinforcement Fine-Tuning via Difficulty-aware Regressive GRPO"
    (arXiv 2506.07464, §3.2 and App. A): the KL in its derivation is to the OLD policy, so
    the implied reward is the sequence log-ratio to π_old, regressed onto the advantage by
    squared error, with no clip and no min:

        ρ_i  = Σ_t m_{i,t}·(logπ_θ − logπ_old)         (ratio_to="old"; "ref": to π_ref)
        z_i  = β·(ρ_i − mean_G ρ)                        (scale="none", the default)
               (ρ_i − mean_G ρ) / max(sg(std_G ρ), σ_min)  (scale="group"; a group whose
               std < σ_min gets z = 0: the paper's literal form, 0/0 when π_θ = π_old)
        loss = Σ_i (A_i − z_i)² / N_batch,   A_i = inp.adv_N (the configured advantage)

    Changed from the first build (which took ρ to π_ref, β = 0.04, scale group, and
    collapsed: at step start every ρ_i is equal, std 0, and the gradient ∝ 1/ε): with
    scale "none" at ρ = 0 the gradient is −2β/N·Σ_i A_i·∇ρ_i, an unclipped on-policy policy
    gradient, and later inner steps (num_iterations > 1) are braked by the regression (the
    OPMD/REBEL family). scale "none" and the std floor are ours (catalog2.md §6.1); the
    paper's norm of the regression is not decoded (squared error assumed). Rows with a NaN
    reward are left out of the group statistics and of the loss; a group with < 2 such rows
    gets z = 0. Token weights multiply each token's log-ratio. N_batch =
    inp.norm.num_seqs. Needs whole groups; ratio_to="ref" needs the reference log-probs
    (a `kl` regularizer loads the reference).

    Returns `aggregated` (per_token_NT is zero). stats: reg_grpo/mse (mean squared error
    over the rows seen), reg_grpo/log_ratio (mean ρ over the rows seen).
    """
    if scale not in REG_GRPO_SCALES:
        raise ValueError(
            f"reg_grpo: scale must be one of {', '.join(REG_GRPO_SCALES)}; got {scale!r}"
        )
    if ratio_to not in REG_GRPO_RATIOS:
        raise ValueError(
            f"reg_grpo: ratio_to must be one of {', '.join(REG_GRPO_RATIOS)}; got {ratio_to!r}"
        )
    if not math.isfinite(beta) or beta <= 0 or not math.isfinite(sigma_min) or sigma_min <= 0:
        raise ValueError(
            f"reg_grpo: need beta > 0 and sigma_min > 0, got beta={beta}, sigma_min={sigma_min}"
        )
    base = inp.old_logp_NT if ratio_to == "old" else inp.ref_logp_NT
    if base is None:
        raise ValueError(
            "reg_grpo: ratio_to='ref' needs ref_logp_NT (reference log-probs): add a kl "
            "regularizer, which loads the reference, or use ratio_to='old'"
        )
    if inp.adv_N.shape != inp.logp_NT.shape[:1]:
        raise ValueError(
            f"reg_grpo: advantages must be per completion, shape [N] = {inp.logp_NT.shape[0]}; "
            f"got {tuple(inp.adv_N.shape)}"
        )
    num_seqs = _batch_norm(inp, "reg_grpo", "num_seqs")
    gid_N, B = _group_index(inp, "reg_grpo")
    mask_NT, valid_NT, logp_NT, _ = _valid_logps(inp)
    dtype = logp_NT.dtype
    base_NT = base.detach().to(dtype).where(valid_NT, 0.0)
    log_ratio_N = (_token_weighted(logp_NT - base_NT, inp) * mask_NT).sum(dim=-1)

    if inp.rewards_N is None:
        used_N = torch.ones_like(log_ratio_N, dtype=torch.bool)
    else:
        used_N = ~torch.isnan(inp.rewards_N.to(log_ratio_N.device))
    used = used_N.to(dtype)
    n_B = _group_sum(used, gid_N, B)
    mean_B = _group_sum(log_ratio_N * used, gid_N, B) / n_B.clamp(min=1.0)
    centered_N = (log_ratio_N - mean_B[gid_N]) * used
    if scale == "group":
        var_B = _group_sum(centered_N.detach() ** 2, gid_N, B) / (n_B - 1.0).clamp(min=1.0)
        std_B = var_B.sqrt()
        z_N = (centered_N / std_B.clamp(min=sigma_min)[gid_N]).where(
            (std_B >= sigma_min)[gid_N], 0.0
        )
    else:
        z_N = beta * centered_N
    z_N = z_N.where(n_B[gid_N] >= 2, 0.0)
    adv_N = inp.adv_N.detach().to(dtype)
    sq_err_N = ((adv_N - z_N) ** 2).where(used_N, 0.0)
    seen = used.sum().clamp(min=1.0)
    return TermOutput(
        per_token_NT=torch.zeros_like(logp_NT).detach(),
        aggregated=sq_err_N.sum() / num_seqs,
        stats={
            "reg_grpo/mse": float(sq_err_N.detach().sum() / seen),
            "reg_grpo/log_ratio": float((log_ratio_N.detach() * used).sum() / seen),
        },
    )
