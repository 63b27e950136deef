"""Pairwise policy objectives: TRPA, P3O, ETR and DaGRPO's pair mask.

Three of the four compare the completions of one prompt in pairs (TRPA, P3O, DaGRPO), so
they are registered with `whole_groups` (micro-batches are cut at group boundaries) and
normalize every group by its own pair count, then the sum over groups by
`inp.norm.num_groups` (the whole optimizer batch's B): summing the micro-batch losses
gives the whole-batch loss and gradient whatever the split. ETR is a per-token PPO clip
whose clip range needs each group's reward variance, so it needs whole groups too.

Pairs are built with one [N, N] "same group, different row" matrix per micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from grouprl.algorithms.losses import (
    LOSSES,
    _batch_norm,
    _clip_stats,
    _group_index,
    _group_sum,
    _seq_mean,
    _token_weighted,
    _valid_logps,
    broadcast_adv,
    clip_stats,
)
from grouprl.algorithms.types import PolicyInputs, TermOutput

__all__ = ["dagrpo_pairs", "etr", "p3o", "trpa"]

# log of a trajectory ratio is capped here before exp (as verl's GSPO caps log s at 10).
MAX_LOG_RATIO = 10.0
TRPA_FALLBACKS = ("group", "none")
DAGRPO_PAIR_NORMS = ("group", "kept")


def _finite(name: str, **values: float) -> None:
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be a finite number, got {value}")


def _rewards(inp: PolicyInputs, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(rewards_N with unscorable entries set to 0, valid_N = finite reward), detached."""
    if inp.rewards_N is None:
        raise ValueError(f"{name}: needs rewards_N (the combined reward per completion), got None")
    if inp.rewards_N.shape != inp.logp_NT.shape[:1]:
        raise ValueError(
            f"{name}: rewards_N must have shape [N] = {inp.logp_NT.shape[0]}, "
            f"got {tuple(inp.rewards_N.shape)}"
        )
    r_N = inp.rewards_N.detach().to(device=inp.logp_NT.device, dtype=dtype)
    valid_N = r_N.isfinite()
    return r_N.where(valid_N, 0.0), valid_N


def _pair_matrix(gid_N: Tensor) -> Tensor:
    """[N, N] bool: rows i and j are different rows of the same group."""
    same_NN = gid_N[:, None] == gid_N[None, :]
    return same_NN & ~torch.eye(gid_N.shape[0], dtype=torch.bool, device=gid_N.device)


def _row_sum_by_group(x_NN: Tensor, gid_N: Tensor, num: int) -> Tensor:
    """Σ over pairs (i, j) of x_ij, per group of i."""
    return _group_sum(x_NN.sum(dim=1), gid_N, num)


# ---------------------------------------------------------------------------------------
# TRPA
# ---------------------------------------------------------------------------------------


@LOSSES.register("trpa", whole_groups=True, needs_ref=True, min_group_size=2)
def trpa(
    inp: PolicyInputs,
    *,
    beta: float = 0.1,
    anisotropy: float = 2.5,
    top_reward: float = 1.0,
    tr_coef: float = 1e-3,
    fallback: str = "group",
) -> TermOutput:
    """TRPA: Bradley-Terry on reference-relative scores of ordered pairs, plus a KL trust region.

    "Trust Region Preference Approximation: A simple and stable reinforcement learning
    algorithm for LLM reasoning" (arXiv 2504.04524); as the authors' code
    (XueruiSu/Trust-Region-Preference-Approximation, core_algos.py
    `compute_pairwise_policy_loss` and dp_actor.py). Confidence: code, with the levels and
    the normalization below ours.

        s_i  = mean_t logπ_θ(o_{i,t}) − mean_t logπ_ref(o_{i,t})          (masked means)
        pair (i, j) of one group with r_i > r_j  (i is better)
        h_ij = β·a_ij·(s_i − s_j),   a_ij = anisotropy if r_i ≥ top_reward else 1
        L_q  = mean_{pairs of q} −log σ(h_ij)
               a group without a pair (fallback="group"):
               mean_i −log σ(m_i·s_i),  m_i = +1 if r_i ≥ top_reward else −1  (no β)
        loss = Σ_q L_q / B  +  tr_coef · Σ_{i,t} m·k3_{i,t} / num_tokens
        k3   = e^x − x − 1,  x = logπ_old − logπ_θ  (verl low_var_kl of KL(π_θ‖π_old),
               clamped at 10)

    Levels: the code's integer levels (1 = correct, 2 = wrong answer, 3 = no answer,
    4 = bad format) are replaced by the combined reward rewards_N: each distinct reward
    value is a level, a higher reward a better one, and "level 1" is a reward ≥
    `top_reward` (default 1.0: a correct answer under 0/1 accuracy rewards). A reward
    that is NaN or infinite joins no pair and no fallback.

    Normalization (ours): the code averages −log σ over every pair of a micro-batch and
    takes the fallback only when a whole micro-batch has no pair; both depend on the
    split. Here each group is its own unit (its pair mean, or its fallback), groups are
    summed and divided by B = inp.norm.num_groups of the whole batch, and the trust
    region is a token sum over inp.norm.num_tokens: exactly micro-batch invariant.
    fallback="none" lets pairless groups contribute 0. The code's sqrt(KL + 0.25) variant
    is not offered (not a sum over rows). The trust region has a gradient only once π_θ
    has moved from π_old (train.num_iterations > 1); the reference KL is not added (the
    code drops it when the trust region is on).

    Shapes: logp/old/ref [N, T], rewards_N [N], group_N [N]. Returns `aggregated`
    (per_token_NT is zero). stats: trpa/pair_frac (groups seen with a pair), trpa/margin
    (mean s_i − s_j over pairs), trpa/score (mean s), trpa/tr_kl (token mean of k3 over the
    rows seen). Defaults β = 0.1, anisotropy 2.5, tr_coef 0.001 (main_TRPA.sh).
    """
    _finite("trpa", beta=beta, anisotropy=anisotropy, top_reward=top_reward, tr_coef=tr_coef)
    if beta <= 0 or anisotropy <= 0 or tr_coef < 0:
        raise ValueError(
            f"trpa: need beta > 0, anisotropy > 0 and tr_coef >= 0, got beta={beta}, "
            f"anisotropy={anisotropy}, tr_coef={tr_coef}"
        )
    if fallback not in TRPA_FALLBACKS:
        raise ValueError(
            f"trpa: fallback must be one of {', '.join(TRPA_FALLBACKS)}; got {fallback!r}"
        )
    if inp.ref_logp_NT is None:
        raise ValueError("trpa: needs ref_logp_NT (the reference policy's log-probs), got None")
    num_groups = _batch_norm(inp, "trpa", "num_groups")
    gid_N, B = _group_index(inp, "trpa")
    mask_NT, valid_NT, logp_NT, old_NT = _valid_logps(inp)
    dtype = logp_NT.dtype
    ref_NT = inp.ref_logp_NT.detach().to(dtype).where(valid_NT, 0.0)
    r_N, scored_N = _rewards(inp, "trpa", dtype)

    s_N = _seq_mean(_token_weighted(logp_NT, inp), mask_NT) - _seq_mean(ref_NT, mask_NT)
    top_N = scored_N & (r_N >= top_reward)
    pair_NN = (
        _pair_matrix(gid_N) & scored_N[:, None] & scored_N[None, :] & (r_N[:, None] > r_N[None, :])
    )
    scale_N = torch.where(top_N, anisotropy, 1.0).to(dtype)
    diff_NN = s_N[:, None] - s_N[None, :]
    h_NN = beta * scale_N[:, None] * diff_NN
    pair_f_NN = pair_NN.to(dtype)
    pair_loss_B = _row_sum_by_group(F.softplus(-h_NN) * pair_f_NN, gid_N, B)
    n_pairs_B = _row_sum_by_group(pair_f_NN, gid_N, B)
    has_pair_B = n_pairs_B > 0
    group_loss_B = pair_loss_B / n_pairs_B.clamp(min=1.0)
    if fallback == "group":
        sign_N = torch.where(top_N, 1.0, -1.0).to(dtype)
        fb_N = F.softplus(-sign_N * s_N).where(scored_N, 0.0)
        n_scored_B = _group_sum(scored_N.to(dtype), gid_N, B)
        fb_B = _group_sum(fb_N, gid_N, B) / n_scored_B.clamp(min=1.0)
        group_loss_B = group_loss_B.where(has_pair_B, fb_B)
    loss = group_loss_B.sum() / num_groups

    x_NT = old_NT - logp_NT
    k3_NT = (x_NT.exp() - x_NT - 1.0).clamp(max=10.0) * mask_NT
    num_tokens = max(float(inp.norm.num_tokens), 1.0)  # type: ignore[union-attr]
    trust = tr_coef * k3_NT.sum() / num_tokens

    n_pairs = float(pair_f_NN.sum())
    return TermOutput(
        per_token_NT=torch.zeros_like(logp_NT).detach(),
        aggregated=loss + trust,
        stats={
            "trpa/pair_frac": float(has_pair_B.to(dtype).mean()) if B else 0.0,
            "trpa/margin": float((diff_NN.detach() * pair_f_NN).sum()) / n_pairs
            if n_pairs
            else 0.0,
            "trpa/score": float(s_N.detach().mean()) if s_N.numel() else 0.0,
            "trpa/tr_kl": float(k3_NT.detach().sum() / mask_NT.sum().clamp(min=1.0)),
        },
    )


# ---------------------------------------------------------------------------------------
# P3O
# ---------------------------------------------------------------------------------------


@LOSSES.register("p3o", whole_groups=True, min_group_size=2)
def p3o(inp: PolicyInputs, *, eps_low: float = 0.2, eps_high: float = 0.2) -> TermOutput:
    """P3O (V1, separate clipping), reading: PPO on reward differences of all pairs of a group.

    "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment"
    (Wu et al., arXiv 2310.00212). Confidence: reading (abstract and notes, no code):

        S_i  = exp(Σ_t m·(logπ_θ − logπ_old))                (trajectory ratio; log ≤ 10)
        R_ij = (r_i − r_j)/2         for each ordered pair (i, j), i ≠ j, of one group
        J_q  = Σ_{(i,j)} min(S_i·R_ij, clip(S_i, 1 − eps_low, 1 + eps_high)·R_ij) / P_q
        loss = −Σ_q J_q / B,    P_q = n_q(n_q − 1)/2,  B = inp.norm.num_groups

    Each unordered pair appears twice, once per member, with opposite R: trajectory i is
    clipped with its own ratio (the paper's "separate" V1; the joint V2 is not
    implemented). Only reward differences enter, so adding a constant to a group's rewards
    changes nothing. Unclipped, ∇J_q = (1/n_q) Σ_i A_i^RLOO ∇S_i with A_i^RLOO = r_i − mean of
    the others: the RLOO estimator (our normalizer P_q makes it exact; the catalog's
    "×(G − 1)/G" compares with Σ_i (r_i − mean_G r)·∇S_i scaled differently). The KL
    penalty P3O puts in the reward is left to a `kl` regularizer. n_q counts the rows with
    a finite reward (the others join no pair). Token weights multiply each token's
    log-ratio. log S is capped at 10 (no gradient above e^10), as GSPO's sequence ratio.

    Shapes: logp/old [N, T], rewards_N [N], group_N [N]. Returns `aggregated`
    (per_token_NT is zero). stats: p3o/clip_frac (pair terms with R ≠ 0 on the clipped
    branch), p3o/log_ratio (mean log S). Defaults: PPO's ε = 0.2 (the paper's unknown).
    """
    _finite("p3o", eps_low=eps_low, eps_high=eps_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"p3o: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    num_groups = _batch_norm(inp, "p3o", "num_groups")
    gid_N, B = _group_index(inp, "p3o")
    mask_NT, _, logp_NT, old_NT = _valid_logps(inp)
    dtype = logp_NT.dtype
    r_N, scored_N = _rewards(inp, "p3o", dtype)

    log_s_N = (_token_weighted(logp_NT - old_NT, inp) * mask_NT).sum(dim=-1)
    s_N = log_s_N.clamp(max=MAX_LOG_RATIO).exp()
    pair_NN = _pair_matrix(gid_N) & scored_N[:, None] & scored_N[None, :]
    R_NN = ((r_N[:, None] - r_N[None, :]) / 2.0).where(pair_NN, 0.0)
    S_NN = s_N[:, None].expand_as(R_NN)
    clipped_NN = S_NN.clamp(1.0 - eps_low, 1.0 + eps_high)
    term_NN = (S_NN * R_NN).minimum(clipped_NN * R_NN)
    n_B = _group_sum(scored_N.to(dtype), gid_N, B)
    pairs_B = (n_B * (n_B - 1.0) / 2.0).clamp(min=1.0)
    objective_B = _row_sum_by_group(term_NN, gid_N, B) / pairs_B
    loss = -objective_B.sum() / num_groups

    active_NN = pair_NN & (R_NN != 0)
    taken_NN = (clipped_NN * R_NN < S_NN * R_NN).detach() & active_NN
    n_active = float(active_NN.sum())
    return TermOutput(
        per_token_NT=torch.zeros_like(logp_NT).detach(),
        aggregated=loss,
        stats={
            "p3o/clip_frac": float(taken_NN.sum()) / n_active if n_active else 0.0,
            "p3o/log_ratio": float(log_s_N.detach().mean()) if log_s_N.numel() else 0.0,
        },
    )


# ---------------------------------------------------------------------------------------
# ETR
# ---------------------------------------------------------------------------------------


@LOSSES.register("etr", whole_groups=True)
def etr(
    inp: PolicyInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    adv_min: float = 0.5,
    adv_max: float = 2.0,
    kappa: float = 0.5,
) -> TermOutput:
    """ETR, reading: PPO clip with a per-token range scaled by |A| and the group's variance.

    "Elastic Trust Regions" (arXiv 2601.03723). Confidence: reading (abstract only, no
    code); f and g follow catalog2.md §A4's proposal, not the paper's:

        f_{i,t} = clamp(|A_{i,t}|, adv_min, adv_max)                 (micro: confident tokens)
        g_q     = 1 + κ·(2·u_q − 1),   u_q = 4·min(σ²_q, 1/4) in [0, 1]  (macro: p near ½)
        σ²_q    = (1/n_q) Σ_i (r_i − mean_q r)²     (= p(1 − p) for 0/1 rewards)
        ε_low   = eps_low·f,    ε_high = eps_high·f·g
        J       = min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A),   per_token = −J

    g scales only the upper bound: a group at p = ½ gets (1 + κ)× it, p → 0 or 1 gets
    (1 − κ)×, as the catalog states (its written g = 1 + κ·(4σ² − 1) would give 1× at
    p = ½ and never widen; the stated values are kept). σ² is taken over the group's
    finite rewards (0 when none), capped at 1/4, the largest variance of rewards in
    [0, 1]. With adv_min = adv_max = 1 and κ = 0
    this is `ppo_clip` exactly. Needs whole groups for σ²_q (so it refuses token masks and
    mismatch weights at start-up); the aggregation is the configured one.

    Shapes: logp/old [N, T], adv [N] or [N, T], rewards_N [N], group_N [N]. stats_NT:
    clip_ratio/{low,high,region}_mean (TRL names), etr/eps_low_mean, etr/eps_high_mean.
    Defaults: ε = 0.2, f in [0.5, 2], κ = 0.5 (catalog proposal; the paper's unknown).
    """
    _finite("etr", eps_low=eps_low, eps_high=eps_high, adv_min=adv_min, adv_max=adv_max)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"etr: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if not 0 < adv_min <= adv_max:
        raise ValueError(f"etr: need 0 < adv_min <= adv_max, got {adv_min}, {adv_max}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"etr: kappa must be in [0, 1], got {kappa}")
    gid_N, B = _group_index(inp, "etr")
    _, _, logp_NT, old_NT = _valid_logps(inp)
    dtype = logp_NT.dtype
    r_N, scored_N = _rewards(inp, "etr", dtype)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)

    w_N = scored_N.to(dtype)
    n_B = _group_sum(w_N, gid_N, B).clamp(min=1.0)
    mean_B = _group_sum(r_N * w_N, gid_N, B) / n_B
    var_B = _group_sum((r_N - mean_B[gid_N]) ** 2 * w_N, gid_N, B) / n_B
    u_N = 4.0 * var_B.clamp(max=0.25)[gid_N]
    g_N = 1.0 + kappa * (2.0 * u_N - 1.0)
    f_NT = adv_NT.abs().clamp(adv_min, adv_max)
    eps_low_NT = eps_low * f_NT
    eps_high_NT = eps_high * f_NT * g_N[:, None]

    ratio_NT = (logp_NT - old_NT).exp()
    clipped_NT = ratio_NT.clamp(min=1.0 - eps_low_NT, max=1.0 + eps_high_NT)
    objective_NT = (ratio_NT * adv_NT).minimum(clipped_NT * adv_NT)
    ratio = ratio_NT.detach()
    low_NT = (ratio < 1.0 - eps_low_NT) & (adv_NT < 0)
    high_NT = (ratio > 1.0 + eps_high_NT) & (adv_NT > 0)
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        stats_NT={
            **clip_stats(low_NT, high_NT, dtype),
            "etr/eps_low_mean": eps_low_NT.detach(),
            "etr/eps_high_mean": eps_high_NT.detach(),
        },
    )


# ---------------------------------------------------------------------------------------
# DaGRPO pair mask
# ---------------------------------------------------------------------------------------


@LOSSES.register("dagrpo_pairs", whole_groups=True, min_group_size=2)
def dagrpo_pairs(
    inp: PolicyInputs,
    *,
    tau: float = 0.1,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    pair_norm: str = "group",
) -> TermOutput:
    """DaGRPO's pair mask, reading: the GRPO loss as pair terms, near-tied pairs dropped.

    "DaGRPO" (arXiv 2512.06337). Confidence: reading (abstract and page notes, no code;
    the threshold is unknown). For a group-centered advantage (Σ_q A = 0, e.g. `grpo`),
    A_i = (1/n_q) Σ_j (A_i − A_j), so the GRPO loss is a sum of pair terms; a pair whose
    scores (here rewards_N) differ by less than τ is masked:

        keep_ij = not |r_i − r_j| < τ                  (a NaN reward never masks a pair)
        Ã_i     = Σ_{j in q} keep_ij·(A_i − A_j) / D_i
                  D_i = n_q                 (pair_norm="group": with no pair masked,
                                             Ã = A and the loss is the configured one)
                  D_i = Σ_{j≠i} keep_ij      (pair_norm="kept": mean over kept pairs;
                                             with none masked Ã = n_q/(n_q − 1)·A)
        J       = min(ρ·Ã, clip(ρ, 1 − eps_low, 1 + eps_high)·Ã),   per_token = −J

    Two identical completions have equal scores and advantages, so their mutual pair adds
    0 whether masked or not. The PPO clip is applied to Ã_i (not to each pair term); with
    0/1 rewards every pair term of row i has Ã_i's sign, so the two agree. n_q counts all
    rows of the group in the micro-batch (whole groups). The aggregation is the configured
    one, which makes it micro-batch invariant.

    Shapes: logp/old [N, T], adv_N [N] (per completion), rewards_N [N], group_N [N].
    stats_NT: clip_ratio/* (TRL names), dagrpo/adv_abs_mean (|Ã|); stats:
    dagrpo/masked_pair_frac (among pairs with A_i ≠ A_j, those masked; exact ties add 0
    either way). Defaults: τ = 0.1 (ours, for rewards in [0, 1]), ε = 0.2.
    """
    _finite("dagrpo_pairs", tau=tau)
    if tau < 0:
        raise ValueError(f"dagrpo_pairs: tau must be >= 0, got {tau}")
    _finite("dagrpo_pairs", eps_low=eps_low, eps_high=eps_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(
            f"dagrpo_pairs: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}"
        )
    if pair_norm not in DAGRPO_PAIR_NORMS:
        raise ValueError(
            f"dagrpo_pairs: pair_norm must be one of {', '.join(DAGRPO_PAIR_NORMS)}; "
            f"got {pair_norm!r}"
        )
    if inp.adv_N.shape != inp.logp_NT.shape[:1]:
        raise ValueError(
            f"dagrpo_pairs: advantages must be per completion, shape [N] = "
            f"{inp.logp_NT.shape[0]}; got {tuple(inp.adv_N.shape)}"
        )
    gid_N, B = _group_index(inp, "dagrpo_pairs")
    _, _, logp_NT, old_NT = _valid_logps(inp)
    dtype = logp_NT.dtype
    r_N, scored_N = _rewards(inp, "dagrpo_pairs", dtype)
    adv_N = inp.adv_N.detach().to(device=logp_NT.device, dtype=dtype)

    pair_NN = _pair_matrix(gid_N)
    both_NN = scored_N[:, None] & scored_N[None, :]
    tied_NN = both_NN & ((r_N[:, None] - r_N[None, :]).abs() < tau)
    keep_NN = pair_NN & ~tied_NN
    diff_NN = (adv_N[:, None] - adv_N[None, :]) * keep_NN.to(dtype)
    if pair_norm == "group":
        denom_N = _group_sum(torch.ones_like(adv_N), gid_N, B)[gid_N]
    else:
        denom_N = keep_NN.to(dtype).sum(dim=1).clamp(min=1.0)
    pair_adv_N = diff_NN.sum(dim=1) / denom_N

    adv_NT = broadcast_adv(pair_adv_N, logp_NT)
    ratio_NT = (logp_NT - old_NT).exp()
    clipped_NT = ratio_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective_NT = (ratio_NT * adv_NT).minimum(clipped_NT * adv_NT)
    # pairs that carry a term (A_i ≠ A_j); exact ties are no-ops, masked or not
    active_NN = pair_NN & (adv_N[:, None] != adv_N[None, :])
    n_active = float(active_NN.sum())
    return TermOutput(
        per_token_NT=-_token_weighted(objective_NT, inp),
        stats_NT={
            **_clip_stats(ratio_NT.detach(), clipped_NT.detach(), adv_NT, dtype),
            "dagrpo/adv_abs_mean": adv_NT.abs(),
        },
        stats={
            "dagrpo/masked_pair_frac": float((active_NN & tied_NN).sum()) / n_active
            if n_active
            else 0.0
        },
    )
