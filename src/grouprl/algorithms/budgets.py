"""BRPO: budget-relative advantages for anytime reasoning (AnytimeReasoner).

The `anytime_budget` rollout strategy cuts each sampled chain of thought at S budgets and
has the policy write a summary answer at each cut; its rewards r[g, s] are dense scores of
the thinking so far. This module turns them into per-token advantages: one per thinking
segment, one per summary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.advantages import ADVANTAGES

BUDGET_PRIORS = ("uniform", "linear", "base")


def budget_prior(budgets: list[int], prior: str) -> list[float]:
    """p over the S budgets: uniform, ∝ the budget (linear), or all mass on the last (base)."""
    if prior not in BUDGET_PRIORS:
        raise ValueError(f"prior must be one of {BUDGET_PRIORS}, got {prior!r}")
    S = len(budgets)
    if prior == "uniform":
        return [1.0 / S] * S
    if prior == "linear":
        total = float(sum(budgets))
        return [b / total for b in budgets]
    return [0.0] * (S - 1) + [1.0]


def brpo_advantages(
    scores_GS: Tensor, p_S: Tensor, *, discount: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Per-segment thinking advantages and per-summary advantages of one group.

    scores_GS: r[g, s] in [0, 1], the summary score of chain g at budget s (S budgets,
    0-indexed); p_S: the budget prior (normalized here). With R[g, s] = Σ_{j≥s} p_j r[g, j]:

        V2[s]    = mean_g R[g, s]                       (0 when G = 1)
        V1[g, s] = (Σ_{k<s} d^k r[g, k] / Σ_{k<s} d^k) · Σ_{j≥s} p_j     (0 at s = 0)
        A_think[g, s]   = R[g, s] − (s·V1[g, s] + (S − s)·V2[s]) / S
        A_summary[g, s] = r[g, s] − mean_g r[·, s]

    Returns (A_think [G, S], A_summary [G, S]); as the authors' `compute_cot_advantage` and
    `compute_summary_advantage` (sail-sg/AnytimeReasoner, `verl/trainer/ppo/brpo.py`).
    """
    r = scores_GS.double()
    G, S = r.shape
    p = p_S.double() / p_S.double().sum()
    tail_S = p.flip(0).cumsum(0).flip(0)  # Σ_{j≥s} p_j
    R_GS = (r * p).flip(1).cumsum(1).flip(1)
    V2_S = R_GS.mean(dim=0) if G > 1 else torch.zeros(S, dtype=r.dtype)
    d_S = discount ** torch.arange(S, dtype=r.dtype)
    V1_GS = torch.zeros_like(r)
    for s in range(1, S):
        prev = (r[:, :s] * d_S[:s]).sum(dim=1) / d_S[:s].sum()
        V1_GS[:, s] = prev * tail_S[s]
    s_S = torch.arange(S, dtype=r.dtype)
    think = R_GS - (s_S * V1_GS + (S - s_S) * V2_S) / S
    summary = r - r.mean(dim=0, keepdim=True)
    return think.float(), summary.float()


@ADVANTAGES.register("brpo", token_level=True)
def brpo(
    rewards_BG: Tensor,
    budget_rows_N: list[Any],
    mask_NT: Tensor,
    *,
    discount: float = 2.0,
) -> Tensor:
    """BRPO's advantage (AnytimeReasoner, "Optimizing Anytime Reasoning via Budget Relative
    Policy Optimization", arXiv 2505.13438; authors' code sail-sg/AnytimeReasoner): per
    token [N, T], on the rows the `anytime_budget` rollout strategy built.

    Each group holds G thinking rows and G·S summary rows (`budget_rows_N`, the `budget`
    column: a thinking row's cuts c_1 < ... < c_S in its completion and the prior p; a
    summary row's (g, s)). The summary rows' rewards are r[g, s] (NaN counts as 0);
    `brpo_advantages` gives A_think[g, s] to the thinking tokens [c_{s−1}, c_s) (c_0 = 0;
    tokens past c_S get 0) and A_summary[g, s] to every token of summary (g, s). No std.
    """
    if not discount > 0:
        raise ValueError(f"brpo: discount must be > 0, got {discount}")
    B, W = rewards_BG.shape
    N, T = mask_NT.shape
    if len(budget_rows_N) != N or N != B * W:
        raise ValueError(f"brpo: {len(budget_rows_N)} budget rows for {N} rows ({B} groups of {W})")
    out = torch.zeros(N, T)
    r_N = torch.nan_to_num(rewards_BG.reshape(-1).float(), nan=0.0)
    for b in range(B):
        rows = range(b * W, (b + 1) * W)
        think = [n for n in rows if (budget_rows_N[n] or {}).get("role") == "think"]
        summ = [n for n in rows if (budget_rows_N[n] or {}).get("role") == "summary"]
        if not think:
            continue
        S = len(budget_rows_N[think[0]]["cuts"])
        G = len(think)
        scores = torch.zeros(G, S)
        for n in summ:
            info = budget_rows_N[n]
            scores[int(info["g"]), int(info["s"])] = r_N[n]
        p = torch.tensor(budget_rows_N[think[0]]["p"], dtype=torch.float64)
        a_think, a_summary = brpo_advantages(scores, p, discount=discount)
        for n in think:
            info = budget_rows_N[n]
            g, start = int(info["g"]), 0
            for s, cut in enumerate(info["cuts"]):
                out[n, start : int(cut)] = a_think[g, s]
                start = int(cut)
        for n in summ:
            info = budget_rows_N[n]
            out[n] = a_summary[int(info["g"]), int(info["s"])]
    return out * mask_NT.float()
