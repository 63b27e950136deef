"""Rank-GRPO: rank-level advantages and the per-item (segment) importance ratio.

"Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement
Learning" (arXiv 2510.20150); follows the authors' code (yaochenzhu/Rank-GRPO,
`libs/reward_funcs.py`, `libs/metrics_align.py::_discounts` and
`libs/trl/rank_grpo_trainer.py`: `_segment_items_from_tokens`, the per-item advantages of
`_generate_and_score_completions`, `importance_sampling_level == "item"` in
`compute_loss`). Confidence: code.

A completion is a list of items, one per line; item k of completion i has a relevance
rel_{i,k} in {0, 1} (or any number; NaN = not scored). Each rank k is an action:

    exp_inf:    r_{i,k} = rel_{i,k}
    log_decay:  r_{i,k} = Σ_{j ≥ k} rel_{i,j} / log2(j + 1)          (ranks j from 1)
    A_{i,k}   = (r_{i,k} − mean_g r_{g,k}) / (std_g r_{g,k} + 1e-4)   (unbiased std)
    w_{i,k}   = exp(mean_{t ∈ item k} log ρ_{i,t}),   ρ = π_θ / π_old
    J_{i,t}   = min(w_{i,k(t)} A_{i,k(t)}, clip(w_{i,k(t)}, 1 − ε_low, 1 + ε_high) A_{i,k(t)})

Pure functions, by stage: `newline_counts` and `item_index_from_tokens` (tokens -> items),
`rank_rewards` (relevance -> per-rank rewards), `rank_grpo_advantages` (-> per-token
advantages), `segment_log_ratio` and `segment_ratio_objective` (the loss). Only the loss
is the `segment_ratio` loss; `rank_grpo` is the advantage estimator (registered in
advantages.py with `token_level`: it returns [N, T]); the per-item relevance comes from a
reward that logs it (`item_rel`, e.g. `rank_relevance`) and the items of each token from
the planning stage (`item_index_NT`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from grouprl.algorithms.advantages import ADVANTAGES
from grouprl.algorithms.losses import (
    LOSSES,
    _check_eps,
    _clip_stats,
    _token_weighted,
    _valid_logps,
    broadcast_adv,
)
from grouprl.algorithms.types import PolicyInputs, TermOutput

__all__ = [
    "RANK_REWARDS",
    "item_index_from_tokens",
    "newline_counts",
    "rank_grpo",
    "rank_grpo_advantages",
    "rank_rewards",
    "segment_log_ratio",
    "segment_ratio",
    "segment_ratio_objective",
]

RANK_REWARDS = ("exp_inf", "log_decay")
# log of a segment ratio is capped here before exp (as verl's GSPO caps log s at 10)
MAX_LOG_RATIO = 10.0


# ---------------------------------------------------------------------------------------
# Tokens -> items
# ---------------------------------------------------------------------------------------


def newline_counts(pieces: Sequence[str]) -> dict[int, int]:
    """{token id: number of newlines in its text} for the ids whose text has any;
    `pieces[i]` is the decoded text of token i (e.g. `tokenizer.decode([i])`)."""
    return {i: p.count("\n") for i, p in enumerate(pieces) if "\n" in p}


def item_index_from_tokens(
    completion_ids_NT: Tensor,
    valid_NT: Tensor,
    newline_ids: Mapping[int, int] | Collection[int],
    *,
    max_items: int | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """The item (line) of each completion token: [N, T] long, −1 for none.

    As the authors' `_segment_items_from_tokens`: items count from 0; a newline token
    belongs to the item it ends, and the count goes up by its number of newlines after it
    (a "\\n\\n" token skips an index: an empty line is an item). `newline_ids`: token id ->
    newlines in it (`newline_counts`), or a collection of ids that hold one each.
    −1 on positions where `valid_NT` is 0 (padding), on items ≥ `max_items` (the list's
    overflow; no advantage there) and, with `eos_id`, on that token (the authors give EOS no
    item advantage).
    """
    if completion_ids_NT.dim() != 2:
        raise ValueError(
            f"completion_ids_NT must have shape [N, T], got {tuple(completion_ids_NT.shape)}"
        )
    if valid_NT.shape != completion_ids_NT.shape:
        raise ValueError(
            f"valid_NT must have shape {tuple(completion_ids_NT.shape)}, "
            f"got {tuple(valid_NT.shape)}"
        )
    if max_items is not None and (isinstance(max_items, bool) or max_items < 1):
        raise ValueError(f"max_items must be an integer >= 1 (or None), got {max_items!r}")
    counts = (
        dict(newline_ids) if isinstance(newline_ids, Mapping) else dict.fromkeys(newline_ids, 1)
    )
    if any(int(c) < 0 for c in counts.values()):
        raise ValueError("newline_ids: newline counts must be >= 0")
    ids_NT = completion_ids_NT.long()
    valid = valid_NT != 0
    nl_NT = torch.zeros(ids_NT.shape, dtype=torch.long, device=ids_NT.device)
    for c in set(counts.values()):
        with_c = torch.tensor(
            [int(i) for i, n in counts.items() if n == c], dtype=torch.long, device=ids_NT.device
        )
        nl_NT = torch.where(torch.isin(ids_NT, with_c), int(c), nl_NT)
    nl_NT = nl_NT * valid
    item_NT = nl_NT.cumsum(dim=1) - nl_NT  # newlines strictly before t
    keep = valid.clone()
    if max_items is not None:
        keep &= item_NT < max_items
    if eos_id is not None:
        keep &= ids_NT != eos_id
    return torch.where(keep, item_NT, -1)


# ---------------------------------------------------------------------------------------
# Per-rank rewards and advantages
# ---------------------------------------------------------------------------------------


def _check_BGK(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f"{name} must have shape [B, G, K], got {shape}")
    x = x.to(torch.float64)
    return torch.where(torch.isinf(x), torch.nan, x)


def rank_rewards(item_rel_BGK: Tensor, *, reward: str = "exp_inf") -> Tensor:
    """Per-rank rewards r_{i,k} from per-item relevance (float64, [B, G, K]).

    exp_inf (`reward_func_exp_inf`): r_{i,k} = rel_{i,k}.
    log_decay (`reward_func_log_decay`): r_{i,k} = Σ_{j ≥ k} rel_{i,j} / log2(j + 1) with
    ranks j from 1 (the DCG of the list from rank k on; discount 1 at rank 1).
    A NaN relevance (not scored) gives a NaN reward at its rank and counts 0 in the sums
    of the ranks above it. The authors' reward functions score every rank of a list of K
    (0 for a missing or unparsable item), so a faithful reward pads with 0, not NaN.
    """
    if reward not in RANK_REWARDS:
        raise ValueError(f"reward must be one of {', '.join(RANK_REWARDS)}; got {reward!r}")
    rel = _check_BGK(item_rel_BGK, "item_rel_BGK")
    if reward == "exp_inf":
        return rel
    K = rel.shape[-1]
    disc_K = 1.0 / torch.log2(torch.arange(2, K + 2, dtype=torch.float64))
    gains = torch.nan_to_num(rel, nan=0.0) * disc_K
    suffix = gains.flip(-1).cumsum(-1).flip(-1)
    return torch.where(rel.isnan(), torch.nan, suffix)


def rank_grpo_advantages(
    item_rewards_BGK: Tensor,
    item_index_NT: Tensor,
    *,
    eps: float = 1e-4,
    scale: bool = True,
) -> Tensor:
    """Rank-GRPO's per-token advantages: [N, T], N = B·G rows in group order.

        A_{i,k} = (r_{i,k} − mean_g r_{g,k}) / (std_g r_{g,k} + eps)    (scale=True)
        A_{i,k} =  r_{i,k} − mean_g r_{g,k}                             (scale=False)
        adv_{i,t} = A_{i, item(t)};  0 where item(t) is −1 or ≥ K

    std is the unbiased (n − 1) std over the group's scorable rewards at rank k, as the
    authors' `.std(dim=1)`; eps = 1e-4 as theirs. NaN rewards are left out of the rank's
    statistics and get A = 0; a rank with < 2 scorable rewards or with all of them equal
    gets A = 0 exactly (the authors' z-score gives ±1e-13-sized values from rounding
    there). Computed in float64, returned as float32.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    r = _check_BGK(item_rewards_BGK, "item_rewards_BGK")
    B, G, K = r.shape
    if item_index_NT.dim() != 2 or item_index_NT.shape[0] != B * G:
        raise ValueError(
            f"item_index_NT must have shape [B·G, T] = [{B * G}, T], "
            f"got {tuple(item_index_NT.shape)}"
        )
    valid = ~r.isnan()
    n = valid.sum(dim=1, keepdim=True)  # [B, 1, K]
    r0 = torch.where(valid, r, 0.0)
    mean = r0.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centered = torch.where(valid, r - mean, 0.0)
    lo = torch.where(valid, r, torch.inf).amin(dim=1, keepdim=True)
    hi = torch.where(valid, r, -torch.inf).amax(dim=1, keepdim=True)
    signal = (n >= 2) & (hi > lo)
    if scale:
        std = ((centered**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = centered / (std + eps)
    else:
        adv = centered
    adv_NK = torch.where(valid & signal, adv, 0.0).reshape(B * G, K)
    idx_NT = item_index_NT.long().to(adv_NK.device)
    if K == 0:
        return torch.zeros(idx_NT.shape, dtype=torch.float32, device=idx_NT.device)
    inside = (idx_NT >= 0) & (idx_NT < K)
    picked = adv_NK.gather(1, idx_NT.clamp(0, K - 1))
    return torch.where(inside, picked, 0.0).float()


@ADVANTAGES.register("rank_grpo", min_group_size=2, token_level=True)
def rank_grpo(
    item_rel_BGK: Tensor,
    item_index_NT: Tensor,
    *,
    reward: str = "exp_inf",
    eps: float = 1e-4,
    scale: bool = True,
) -> Tensor:
    """The `rank_grpo` estimator: `rank_rewards` then `rank_grpo_advantages` -> [N, T].

    Defaults as the authors' `train_rank_grpo.py`: reward exp_inf (the CLI default;
    log_decay is the other choice), eps 1e-4, scaled by the std.
    """
    return rank_grpo_advantages(
        rank_rewards(item_rel_BGK, reward=reward), item_index_NT, eps=eps, scale=scale
    )


# ---------------------------------------------------------------------------------------
# The segment (per-item) ratio and its clipped objective
# ---------------------------------------------------------------------------------------


def segment_log_ratio(
    logp_NT: Tensor, old_logp_NT: Tensor, mask_NT: Tensor, item_index_NT: Tensor
) -> Tensor:
    """log w at every token: the mean of log ρ = logπ_θ − logπ_old over the masked tokens of
    the same row and item, [N, T] (with the gradient of that mean, as the authors').

    Masked tokens with item −1 (a list's overflow, EOS) form one more segment per row, as
    the authors' overflow bin. 0 (w = 1) where the mask is 0. Padding values of the
    log-probs are never read (set to 0 first).
    """
    if not (logp_NT.shape == old_logp_NT.shape == mask_NT.shape == item_index_NT.shape):
        raise ValueError(
            "segment_log_ratio: logp_NT, old_logp_NT, mask_NT and item_index_NT must have one "
            f"shape, got {tuple(logp_NT.shape)}, {tuple(old_logp_NT.shape)}, "
            f"{tuple(mask_NT.shape)}, {tuple(item_index_NT.shape)}"
        )
    valid = mask_NT != 0
    m = valid.to(logp_NT.dtype)
    log_rho = torch.where(valid, logp_NT, 0.0) - torch.where(valid, old_logp_NT.detach(), 0.0)
    idx = item_index_NT.long()
    S = int(idx.max()) + 1 if idx.numel() else 0
    seg = torch.where(idx >= 0, idx, S)  # −1 -> the row's extra segment S
    seg = torch.where(valid, seg, 0)
    zeros = torch.zeros(idx.shape[0], S + 1, dtype=logp_NT.dtype, device=logp_NT.device)
    sums = zeros.scatter_add(1, seg, log_rho * m)
    counts = zeros.detach().scatter_add(1, seg, m)
    means = sums / counts.clamp(min=1.0)
    return torch.where(valid, means.gather(1, seg), 0.0)


def segment_ratio_objective(
    logp_NT: Tensor,
    old_logp_NT: Tensor,
    mask_NT: Tensor,
    adv_NT: Tensor,
    item_index_NT: Tensor,
    *,
    eps_low: float = 0.06,
    eps_high: float = 0.08,
) -> tuple[Tensor, Tensor, Tensor]:
    """(J_NT, w_NT, clipped_NT): the clipped per-item surrogate at every token.

        w = exp(min(log w, 10)),  J = min(w·A, clip(w, 1 − eps_low, 1 + eps_high)·A)

    log w from `segment_log_ratio`; the cap at 10 is verl's GSPO guard (the authors have
    none; it only matters for w > e^10). Defaults 0.06 / 0.08: the authors'
    `train_rank_grpo.py` (epsilon, epsilon_high).
    """
    _check_eps("segment_ratio", eps_low=eps_low, eps_high=eps_high)
    if adv_NT.shape != logp_NT.shape:
        raise ValueError(
            f"adv_NT must have shape {tuple(logp_NT.shape)}, got {tuple(adv_NT.shape)}"
        )
    log_w = segment_log_ratio(logp_NT, old_logp_NT, mask_NT, item_index_NT)
    w_NT = log_w.clamp(max=MAX_LOG_RATIO).exp()
    clipped_NT = w_NT.clamp(1.0 - eps_low, 1.0 + eps_high)
    adv = adv_NT.detach().to(logp_NT.dtype)
    return (w_NT * adv).minimum(clipped_NT * adv), w_NT, clipped_NT


@LOSSES.register("segment_ratio", needs_items=True)
def segment_ratio(
    inp: PolicyInputs, *, eps_low: float = 0.06, eps_high: float = 0.08
) -> TermOutput:
    """Rank-GRPO's item-level importance ratio (`importance_sampling_level="item"`).

    "Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement
    Learning" (arXiv 2510.20150), authors' `rank_grpo_trainer.py::compute_loss`: the ratio
    of item k is w = exp(mean_{t ∈ k} log ρ_t) (a geometric mean), PPO-clipped,
    J = min(w·A, clip(w, 1 − eps_low, 1 + eps_high)·A) at each token of the item, with A
    the per-token advantage ([N, T], `rank_grpo_advantages`) or a per-row one ([N]).
    Defaults 0.06 / 0.08 as the authors' run. Confidence: code.

    Needs the item of each token in `PolicyInputs.item_index_NT` ([N, T] long, −1 none;
    `item_index_from_tokens`), which the trainer fills for a loss registered with
    `needs_items`. per_token = −J · token_weight; stats_NT: clip_ratio/{low,high,
    region}_mean (TRL names) from the item ratio.
    """
    item_index_NT = inp.item_index_NT
    if item_index_NT is None:
        raise ValueError(
            "segment_ratio: needs PolicyInputs.item_index_NT (the item of each completion "
            "token), got None"
        )
    _check_eps("segment_ratio", eps_low=eps_low, eps_high=eps_high)
    mask_NT, _, logp_NT, old_NT = _valid_logps(inp)
    adv_NT = broadcast_adv(inp.adv_N, logp_NT)
    J_NT, w_NT, clipped_NT = segment_ratio_objective(
        logp_NT, old_NT, mask_NT, adv_NT, item_index_NT, eps_low=eps_low, eps_high=eps_high
    )
    return TermOutput(
        per_token_NT=-_token_weighted(J_NT, inp),
        stats_NT=_clip_stats(w_NT.detach(), clipped_NT.detach(), adv_NT, logp_NT.dtype),
    )


# ---------------------------------------------------------------------------------------
# Segment Policy Optimization (SPO-chain): segment advantages from Monte-Carlo values
# ---------------------------------------------------------------------------------------


def segment_advantages(
    segment_values_N: list[list[list[float]]],
    mask_NT: Tensor,
    old_logp_NT: Tensor | None = None,
    *,
    prob_mask: float | None = 0.9,
) -> Tensor:
    """SPO-chain's token advantages [N, T] from the values at each row's cut points.

    "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large
    Language Models", arXiv 2505.23564 (authors' code: AIFrameResearch/SPO). Row i's values
    [[0, V_0], [c_1, V_1], ..., [n, V_n]] (positions in its completion's real tokens, V_n
    its reward): the tokens t in [c_{k−1}, c_k) get A_t = V_k − V_{k−1}, so the advantages
    of a row's segments add up to V_n − V_0. With `prob_mask` p: A_t = 0 where the sampling
    policy's probability of the token is > p (`old_logp_NT`; the code's `use_prob_mask`).
    A NaN value (no scorable continuation) takes the previous value.
    """
    N, T = mask_NT.shape
    if len(segment_values_N) != N:
        raise ValueError(f"segment: {len(segment_values_N)} rows of values for {N} rows")
    out = torch.zeros(N, T, dtype=torch.float64)
    real_NT = mask_NT != 0
    for i, row in enumerate(segment_values_N):
        cols = real_NT[i].nonzero().squeeze(-1)
        pts = sorted((int(pos), float(v)) for pos, v in row)
        prev_pos, prev_v = pts[0][0], pts[0][1] if math.isfinite(pts[0][1]) else 0.0
        for pos, v in pts[1:]:
            v = v if math.isfinite(v) else prev_v
            lo, hi = max(prev_pos, 0), min(pos, cols.numel())
            if hi > lo:
                out[i, cols[lo:hi]] = v - prev_v
            prev_pos, prev_v = pos, v
    if prob_mask is not None and old_logp_NT is not None:
        out = torch.where(old_logp_NT.double().exp() > prob_mask, 0.0, out)
    return (out * real_NT).float()


@ADVANTAGES.register("segment", token_level=True)
def segment(
    segment_values_N: list[list[list[float]]],
    mask_NT: Tensor,
    old_logp_NT: Tensor,
    *,
    prob_mask: float | None = 0.9,
) -> Tensor:
    """Segment PO's advantage (arXiv 2505.23564): `segment_advantages` on the values the
    `segment_mc` rollout strategy logged; per-token [N, T]."""
    if prob_mask is not None and not 0.0 < prob_mask <= 1.0:
        raise ValueError(f"segment: prob_mask must be in (0, 1] or null, got {prob_mask}")
    return segment_advantages(segment_values_N, mask_NT, old_logp_NT, prob_mask=prob_mask)
