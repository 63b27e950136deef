"""Selection: token masks (which tokens the policy term trains on) and sample filters.

Both run ONCE per optimizer batch, on the whole batch, before micro-batching, so that a
quantile or a top-k is taken over the batch and splitting it never changes the result.

Token masks (`TOKEN_MASKS`, config `token_mask`) return a `SelectionOutput`: a weight per
token for the policy term (0 drop, 1 keep, 2 upweight; padding 0), optionally a modified
advantage, which normalizer the policy loss should use, and scalar stats. Regularizers
(KL, entropy terms) ignore the weights: they still see every completion token.

Sample filters (`SAMPLE_FILTERS`, config `sample_filters`) return a `FilterOutput`: which
completions keep their loss weight, which whole prompt groups are dropped, and stats. A
filter registered with `refills=True` has the collector sample replacement prompts for
dropped groups (`FilterOutput.max_tries` bounds the extra sampling rounds).

Calling convention. A component is a function, or a class when it keeps state.
  * Inputs are chosen BY PARAMETER NAME: the positional-or-keyword parameters (of the
    function, or of the class's `__call__`) name tensors the trainer has. A parameter
    with a default is optional (the trainer passes it when it has it). The names a
    component may use are declared in `grouprl.inputs.INPUTS` (name, shape, stage).
  * Keyword-only parameters (after `*`; of the function, or of the class's `__init__`)
    are config parameters, with the paper's defaults.
  * `BoundComponent.build(registry, name, params)` checks both and gives a callable that
    takes a dict of the available inputs; `input_names` / `required_inputs` say what to
    compute (e.g. entropy only when a mask asks for `entropy_NT`).

Shapes: N completions (rows of a group contiguous), T completion tokens (right-padded),
B prompts, G completions per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from grouprl.registry import Registry

TOKEN_MASKS: Registry = Registry("token mask")
SAMPLE_FILTERS: Registry = Registry("sample filter")

DENOMINATORS = ("selected", "all")
FORKING_MODES = ("quantile", "top_k")


@dataclass
class SelectionOutput:
    """What a token mask gives the trainer.

    token_weight_NT: weight of each token in the policy term (0 drop, 1 keep, 2 upweight;
                     0 on padding). Goes to `PolicyInputs.token_weight_NT`.
    adv_N:           a modified advantage per completion when the method changes it (GTPO's
                     entropy shaping), else None (keep the estimator's advantage).
    denominator:     "selected": the policy loss normalizer counts Σ mask·weight (only the
                     selected tokens, weighted); "all": it counts every completion token.
    stats:           scalar metrics, keys prefixed with the component name.
    """

    token_weight_NT: Tensor
    adv_N: Tensor | None = None
    denominator: str = "all"
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class FilterOutput:
    """What a sample filter gives the trainer.

    keep_BG:       per completion, bool keep (or a float loss weight). Completions of a
                   dropped group are already False here, so reading keep_BG alone is safe.
    drop_groups_B: bool, whole prompt groups to remove from the batch (and, when the
                   filter's `refill` is True, to replace with newly sampled prompts).
    max_tries:     the most extra sampling rounds the trainer should spend refilling dropped
                   groups in one step (0 for filters that do not refill); after that it
                   trains on what it has.
    stats:         scalar metrics, keys prefixed with the component name.
    """

    keep_BG: Tensor
    drop_groups_B: Tensor
    max_tries: int = 0
    stats: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Calling convention
# ---------------------------------------------------------------------------------------


# The by-name calling convention lives in the registry (shared with advantage estimators).


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _weights_like(mask_NT: Tensor) -> Tensor:
    """The mask as a float tensor (0/1), the base that weights are built on."""
    dtype = mask_NT.dtype if mask_NT.is_floating_point() else torch.get_default_dtype()
    return (mask_NT != 0).to(dtype)


def _ceil_count(n: int, ratio: float) -> int:
    """⌈ratio·n⌉, robust to float error (0.07·100 = 7.000000000000001 gives 7, not 8)."""
    return min(n, math.ceil(round(ratio * n, 9)))


def _check_ratio(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not ((0.0 <= value) if allow_zero else (0.0 < value)) or value > 1.0:
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def quantile_linear(values: Tensor, q: float) -> Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation, as `torch.quantile`.

    With v sorted ascending and position p = q·(n − 1): v[⌊p⌋] + (p − ⌊p⌋)·(v[⌊p⌋+1] − v[⌊p⌋]).
    Uses two `kthvalue` calls, so it has no input-size limit (torch.quantile refuses more
    than 2^24 elements, fewer than one large batch's completion tokens).
    """
    n = values.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = round(q * (n - 1), 9)  # guard float error in q·(n−1)
    lo = math.floor(pos)
    frac = pos - lo
    v_lo = torch.kthvalue(values, lo + 1).values
    if frac == 0.0 or lo + 1 >= n:
        return v_lo
    v_hi = torch.kthvalue(values, lo + 2).values
    return v_lo + frac * (v_hi - v_lo)


def row_quantiles(values_NT: Tensor, sel_NT: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """The q-quantile (linear interpolation, as torch.quantile) of each row's selected values.

    values_NT [N, T] (detached), sel_NT bool [N, T] -> (quantile_N, has_N): rows without a
    selected value have has_N False and quantile 0.
    """
    k_N = sel_NT.sum(dim=1)
    big = torch.finfo(values_NT.dtype).max
    sorted_NT = values_NT.where(sel_NT, big).sort(dim=1).values
    pos_N = q * (k_N - 1).clamp(min=0).to(values_NT.dtype)
    lo_N = pos_N.floor().long()
    hi_N = (lo_N + 1).minimum((k_N - 1).clamp(min=0))
    v_lo = sorted_NT.gather(1, lo_N[:, None])[:, 0]
    v_hi = sorted_NT.gather(1, hi_N[:, None])[:, 0]
    out_N = v_lo + (pos_N - lo_N.to(values_NT.dtype)) * (v_hi - v_lo)
    has_N = k_N > 0
    return out_N.where(has_N, torch.zeros_like(out_N)), has_N


def _top_k_flat(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest values; ties go to the lower index (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def _select_top_k(score_NT: Tensor, valid_NT: Tensor, k: int) -> Tensor:
    """Bool [N, T]: the k highest-scoring valid positions (ties: lower flat index first)."""
    flat_valid = valid_NT.flatten().nonzero().squeeze(-1)
    keep = torch.zeros(valid_NT.numel(), dtype=torch.bool, device=valid_NT.device)
    if k > 0:
        keep[flat_valid[_top_k_flat(score_NT.flatten()[flat_valid], k)]] = True
    return keep.view_as(valid_NT)


# ---------------------------------------------------------------------------------------
# Token masks
# ---------------------------------------------------------------------------------------


@TOKEN_MASKS.register("forking_tokens")
def forking_tokens(
    entropy_NT: Tensor,
    mask_NT: Tensor,
    *,
    rho: float = 0.2,
    mode: str = "quantile",
    denominator: str = "selected",
) -> SelectionOutput:
    """Train the policy term only on high-entropy "forking" tokens.

    "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
    Learning for LLM Reasoning" (arXiv 2506.01939), eq. 6: keep token (i, t) iff

        H_{i,t} ≥ τ_ρ,   τ_ρ = the (1 − ρ) quantile of H over the batch's completion tokens

    with ρ = 0.2. Also the token selection of SPINE (arXiv 2511.17938), whose "forking
    tokens" are high-entropy branch points (the `spine` recipe adds `entropy_band`).

    mode="quantile" (the paper's threshold, and TRL's `top_entropy_quantile`): τ is the
        linear-interpolation quantile (torch.quantile's default, as TRL computes it) of the
        entropies at mask_NT = 1 only; every token with H ≥ τ is kept, so tokens tied at τ
        are all kept and the kept fraction can exceed ρ (all-equal entropies keep all).
    mode="top_k" (the authors' code, `get_global_entropy_top_mask`): exactly k = ⌈ρ·n⌉ of
        the n completion tokens (at least one when n > 0); ties broken by the lower flat
        index (stable sort), where the official torch.topk breaks them arbitrarily.
    denominator="selected" (official repo: loss mask = response_mask · top-mask, so the
        token-mean counts only the kept tokens) or "all" (TRL: the normalizer still counts
        every completion token, so dropped tokens dilute the mean).

    The official code selects per micro-batch on one GPU; here the trainer calls this on the
    whole optimizer batch (TRL gathers across processes, which is the same idea). KL and
    other regularizers still see every token. No completion tokens: nothing selected.

    Stats: forking_tokens/threshold (τ; in top_k mode the smallest kept entropy),
    forking_tokens/kept_frac, forking_tokens/kept_entropy_mean.
    """
    rho = _check_ratio("forking_tokens.rho", rho)
    _check_choice("forking_tokens.mode", mode, FORKING_MODES)
    _check_choice("forking_tokens.denominator", denominator, DENOMINATORS)
    valid_NT = mask_NT != 0
    entropy_NT = entropy_NT.detach().float()
    n = int(valid_NT.sum())
    weights_NT = _weights_like(mask_NT)
    if n == 0:
        stats = {"threshold": 0.0, "kept_frac": 0.0, "kept_entropy_mean": 0.0}
        return SelectionOutput(
            torch.zeros_like(weights_NT), None, denominator, _prefixed("forking_tokens", stats)
        )
    if mode == "quantile":
        threshold = quantile_linear(entropy_NT[valid_NT], 1.0 - rho)
        keep_NT = valid_NT & (entropy_NT >= threshold)
    else:
        keep_NT = _select_top_k(entropy_NT, valid_NT, _ceil_count(n, rho))
        threshold = entropy_NT[keep_NT].min()
    kept = int(keep_NT.sum())
    stats = {
        "threshold": float(threshold),
        "kept_frac": kept / n,
        "kept_entropy_mean": float(entropy_NT[keep_NT].mean()) if kept else 0.0,
    }
    return SelectionOutput(
        weights_NT * keep_NT, None, denominator, _prefixed("forking_tokens", stats)
    )


def _prefixed(name: str, stats: dict[str, float]) -> dict[str, float]:
    return {f"{name}/{k}": v for k, v in stats.items()}


@TOKEN_MASKS.register("d3s_tokens")
def d3s_tokens(
    entropy_NT: Tensor,
    mask_NT: Tensor,
    step: int,
    max_steps: int,
    adv_N: Tensor | None = None,
    adv_NT: Tensor | None = None,
    *,
    start_ratio: float = 0.2,
    end_ratio: float = 1.0,
    denominator: str = "selected",
) -> SelectionOutput:
    """D³S token down-sampling with a curriculum (reading: the formula is not confirmed).

    "D³S" (arXiv 2509.22115), token level, as its abstract states: keep the tokens with the
    largest |A_{i,t}|·H_{i,t}; a curriculum starts with aggressive down-sampling and relaxes
    toward full data. The exact ratios and schedule were not found, so this is our reading:

        score_{i,t} = |A_{i,t}| · H_{i,t}    (A_{i,t} = adv_NT, or adv_N broadcast over t)
        r(step)     = start_ratio + (end_ratio − start_ratio) · min(1, step / (max_steps − 1))
        keep the ⌈r·n⌉ highest-scoring of the n completion tokens (ties: lower flat index)

    so r = start_ratio at step 0 and end_ratio at the last step (linear; max_steps ≤ 1
    gives end_ratio). Defaults start_ratio = 0.2 (the 80/20 forking-token fraction) and
    end_ratio = 1.0 ("toward full data") are ours. denominator as in forking_tokens,
    "selected" by default (our choice; unknown in the paper).

    Stats: d3s_tokens/keep_ratio (r), d3s_tokens/kept_frac, d3s_tokens/threshold (the
    smallest kept score).
    """
    start_ratio = _check_ratio("d3s_tokens.start_ratio", start_ratio)
    end_ratio = _check_ratio("d3s_tokens.end_ratio", end_ratio)
    _check_choice("d3s_tokens.denominator", denominator, DENOMINATORS)
    if adv_NT is None and adv_N is None:
        raise ValueError("d3s_tokens needs adv_N or adv_NT")
    adv = adv_NT if adv_NT is not None else adv_N[:, None]  # type: ignore[index]
    valid_NT = mask_NT != 0
    score_NT = (adv.detach().float().abs() * entropy_NT.detach().float()).expand_as(valid_NT)
    progress = 1.0 if max_steps <= 1 else min(1.0, max(0.0, step / (max_steps - 1)))
    ratio = start_ratio + (end_ratio - start_ratio) * progress
    n = int(valid_NT.sum())
    keep_NT = _select_top_k(score_NT, valid_NT, _ceil_count(n, ratio))
    kept = int(keep_NT.sum())
    stats = {
        "keep_ratio": ratio,
        "kept_frac": kept / n if n else 0.0,
        "threshold": float(score_NT[keep_NT].min()) if kept else 0.0,
    }
    return SelectionOutput(
        _weights_like(mask_NT) * keep_NT, None, denominator, _prefixed("d3s_tokens", stats)
    )


def _rank_keys(valid_NT: Tensor) -> tuple[Tensor, Tensor]:
    """Index of each valid token counted from the start and from the end of its row."""
    v = valid_NT.long()
    from_start_NT = v.cumsum(dim=1) - 1
    from_end_NT = v.flip(1).cumsum(dim=1).flip(1) - 1
    return from_start_NT, from_end_NT


def _run_from_start(flag_NT: Tensor, valid_NT: Tensor) -> Tensor:
    """The leading run of `flag` over each row's valid tokens (padding is skipped)."""
    return torch.cumprod((flag_NT | ~valid_NT).long(), dim=1).bool() & valid_NT


@TOKEN_MASKS.register("gtpo_conflict")
def gtpo_conflict(
    completion_ids_NT: Tensor,
    mask_NT: Tensor,
    adv_N: Tensor,
    group_N: Tensor,
    entropy_NT: Tensor,
    *,
    conflict_weight: float = 2.0,
    entropy_threshold: float = 0.7,
    entropy_scale: float = 0.1,
    divide_by_conflicts: bool = False,
) -> SelectionOutput:
    """GTPO conflict-token weights and entropy-shaped advantages.

    "GTPO: Trajectory-Based Policy Optimization in Large Language Models" (Simoni et al.,
    arXiv 2508.03772); follows the authors' code (gtpo/gtpo_training.py,
    `build_conflict_mask` and the entropy shaping in `UnslothEfficientGTPO.forward`).

    Conflict tokens. Within a group, completion i is positive if A_i > 0, negative if
    A_i < 0 (A = the incoming adv_N). Token (t, o_{i,t}) is a raw conflict when the same
    token id sits at the same position in at least one positive and one negative completion
    of the group. Only each completion's LEADING run of raw conflicts counts (positions
    aligned from the start; a cumprod over t) plus its TRAILING run (positions aligned from
    each completion's own end). Weight δ_{i,t}:

        δ = conflict_weight (2.0) on conflict tokens of positive completions,
            0 on conflict tokens of negative completions (the push-down is skipped),
            1 elsewhere; 0 on padding; completions with A_i = 0 keep all-ones.

    The official code multiplies the forward and backward masks, so a positive token in both
    runs (e.g. a positive and a negative completion with identical text) gets 2·2 = 4; we
    give it 2, the weight the method states. Positions count valid tokens only, which equals
    the code's raw positions for right-padded completions.

    Entropy shaping (ENT_THRESHOLD = 0.7, ENT_SCALE = 0.1 in the code), with H̄_i the mean
    entropy over completion i's tokens, for EVERY completion (positive, negative and zero):

        A_i ← 0                      if H̄_i > entropy_threshold
        A_i ← A_i − entropy_scale·H̄_i  otherwise

    The conflict masks use the signs of A before shaping, as in the code.

    divide_by_conflicts=True reproduces the code's extra normalization: each completion's
    loss is divided by its number of conflict tokens (at least 1); here folded into the
    weights. Off by default (not part of the stated method; changes the loss scale).
    The code's loss is the on-policy REINFORCE −A·δ·logπ (`reinforce`), no KL, token mean
    within each completion over all its tokens: denominator "all".

    Stats: gtpo/conflict_fraction (conflict tokens / completion tokens),
    gtpo/zeroed_frac (completions with H̄ > threshold), gtpo/mean_entropy (mean of H̄_i).
    """
    if entropy_scale < 0 or entropy_threshold < 0 or conflict_weight < 0:
        raise ValueError("gtpo_conflict: weights, threshold and scale must be >= 0")
    valid_NT = mask_NT != 0
    N, T = valid_NT.shape
    adv_N = adv_N.detach()
    pos_N, neg_N = adv_N > 0, adv_N < 0
    ids_NT = completion_ids_NT.long()
    # Group ids mapped to 0..B-1, then one int64 key per (group, position, token id).
    _, gid_N = torch.unique(group_N, return_inverse=True)
    vocab = int(ids_NT.max()) + 1 if ids_NT.numel() else 1
    from_start_NT, from_end_NT = _rank_keys(valid_NT)
    conflict_NT = torch.zeros_like(valid_NT)
    for pos_index_NT in (from_start_NT, from_end_NT):
        key_NT = (gid_N[:, None] * T + pos_index_NT.clamp(min=0)) * vocab + ids_NT
        in_pos_NT = torch.isin(key_NT, key_NT[valid_NT & pos_N[:, None]])
        in_neg_NT = torch.isin(key_NT, key_NT[valid_NT & neg_N[:, None]])
        raw_NT = in_pos_NT & in_neg_NT & valid_NT
        if pos_index_NT is from_start_NT:
            conflict_NT |= _run_from_start(raw_NT, valid_NT)
        else:
            conflict_NT |= _run_from_start(raw_NT.flip(1), valid_NT.flip(1)).flip(1)
    conflict_NT &= (pos_N | neg_N)[:, None]  # rows with A = 0 have no opposite partner

    weights_NT = _weights_like(mask_NT)
    on_conflict_N = torch.where(pos_N, conflict_weight, 0.0).to(weights_NT.dtype)
    weights_NT = torch.where(conflict_NT, on_conflict_N[:, None], weights_NT) * valid_NT
    if divide_by_conflicts:
        n_conflict_N = conflict_NT.sum(dim=1).clamp(min=1).to(weights_NT.dtype)
        weights_NT = weights_NT / n_conflict_N[:, None]

    valid_f = valid_NT.to(torch.float32)
    n_tok_N = valid_f.sum(dim=1)
    mean_H_N = (entropy_NT.detach().float() * valid_f).sum(dim=1) / n_tok_N.clamp(min=1.0)
    high_N = mean_H_N > entropy_threshold
    adv_f = adv_N.to(torch.promote_types(adv_N.dtype, torch.float32))
    shaped_N = torch.where(high_N, 0.0, adv_f - entropy_scale * mean_H_N).to(adv_f.dtype)

    n_tok = float(n_tok_N.sum())
    stats = {
        "conflict_fraction": float(conflict_NT.sum()) / n_tok if n_tok else 0.0,
        "zeroed_frac": float(high_N.float().mean()) if N else 0.0,
        "mean_entropy": float(mean_H_N.mean()) if N else 0.0,
    }
    return SelectionOutput(weights_NT, shaped_N, "all", _prefixed("gtpo", stats))


# ---------------------------------------------------------------------------------------
# Sample filters
# ---------------------------------------------------------------------------------------


def _check_BG(name: str, x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, G], got {tuple(x.shape)}")
    return x


@SAMPLE_FILTERS.register("dynamic_sampling", refills=True)
def dynamic_sampling(rewards_BG: Tensor, *, max_tries: int = 3) -> FilterOutput:
    """Drop prompt groups that carry no learning signal and refill the batch.

    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476),
    dynamic sampling: over-sample and filter out prompts whose accuracy is 1 or 0, i.e.
    keep only groups with 0 < |{o_i : correct}| < G. As in verl's `filter_groups`
    (keep iff std of the group's rewards > 0, or the group has one sample), generalized to
    NaN (unscorable) rewards: a group is dropped when its valid rewards are all equal,
    including when it has only one valid reward (G ≥ 2) or none. A group of size G = 1
    with a valid reward is kept (verl's `len == 1` rule: no group to compare with).

    refill = True: the trainer samples replacement prompts for the dropped groups, at most
    `max_tries` extra rounds per step (returned as FilterOutput.max_tries; DAPO's
    max_num_gen_batches), then trains on what it has.

    Stats: dynamic_sampling/dropped_groups (count), dynamic_sampling/dropped_frac.
    """
    if not isinstance(max_tries, int) or max_tries < 0:
        raise ValueError(f"dynamic_sampling.max_tries must be an int >= 0, got {max_tries!r}")
    rewards_BG = _check_BG("rewards_BG", rewards_BG)
    rewards_BG = rewards_BG if rewards_BG.is_floating_point() else rewards_BG.float()
    B, G = rewards_BG.shape
    valid_BG = ~torch.isnan(rewards_BG)
    n_B = valid_BG.sum(dim=1)
    if G <= 1:
        drop_B = n_B == 0
    else:
        hi_B = torch.where(valid_BG, rewards_BG, -torch.inf).amax(dim=1)
        lo_B = torch.where(valid_BG, rewards_BG, torch.inf).amin(dim=1)
        drop_B = (n_B < 2) | (hi_B == lo_B)
    keep_BG = ~drop_B[:, None].expand(B, G)
    dropped = int(drop_B.sum())
    stats = {"dropped_groups": float(dropped), "dropped_frac": dropped / B if B else 0.0}
    return FilterOutput(keep_BG, drop_B, max_tries, _prefixed("dynamic_sampling", stats))


def max_variance_subset(values: Tensor, m: int) -> Tensor:
    """Indices of the size-m subset of a 1-D tensor with the largest variance.

    A variance-maximizing subset of fixed size is made of extremes: for some k it is the k
    largest and the m − k smallest values. Sort descending and try every k = 0..m:
        Var_k = mean(x²) − mean(x)²  over {top k} ∪ {bottom m − k}
    keep the k with the largest Var_k (first, i.e. smallest k, on ties). O(n log n + m).
    """
    n = values.numel()
    if m >= n:
        return torch.arange(n, device=values.device)
    order = torch.sort(values, descending=True, stable=True).indices
    x = values[order].double()
    best_k, best_var = 0, -math.inf
    for k in range(m + 1):
        chosen = torch.cat([x[:k], x[n - (m - k) :]])
        var = float((chosen**2).mean() - chosen.mean() ** 2)
        if var > best_var + 1e-12:
            best_k, best_var = k, var
    return torch.cat([order[:best_k], order[n - (m - best_k) :]])


@SAMPLE_FILTERS.register("d3s_samples")
def d3s_samples(
    adv_BG: Tensor,
    rewards_BG: Tensor | None = None,
    *,
    m: int | None = None,
    keep_frac: float = 0.5,
) -> FilterOutput:
    """D³S intra-group sample down-sampling (reading: the formula is not confirmed).

    "D³S" (arXiv 2509.22115), sample level (D3S-I), as its abstract states: choose the
    subset of each group's rollouts that maximizes Var(A), tied to an upper bound on the
    gradient norm. Our reading: keep, per group, the size-m subset of completions with the
    largest variance of A (population variance), found exactly by `max_variance_subset`
    (the k highest and m − k lowest advantages, best k). Candidates are the completions
    with a valid (non-NaN) reward when rewards_BG is given; a group with ≤ m candidates
    keeps them all. Advantages are not recomputed on the subset.

    m: subset size per group; None → ⌈keep_frac·G⌉, at least min(2, G). Defaults
    (keep half) are ours. D³S's curriculum (keep ratio rising over training) and its
    cross-group variant are not implemented here. refill = False.

    Stats: d3s_samples/kept_frac, d3s_samples/adv_var_kept (mean over groups of the kept
    subset's Var(A)).
    """
    adv_BG = _check_BG("adv_BG", adv_BG).detach()
    B, G = adv_BG.shape
    keep_frac = _check_ratio("d3s_samples.keep_frac", keep_frac)
    if m is None:
        m = max(min(2, G), _ceil_count(G, keep_frac))
    elif not isinstance(m, int) or m < 1:
        raise ValueError(f"d3s_samples.m must be an int >= 1, got {m!r}")
    valid_BG = torch.ones_like(adv_BG, dtype=torch.bool)
    if rewards_BG is not None:
        valid_BG = ~torch.isnan(_check_BG("rewards_BG", rewards_BG))
    valid_BG &= ~torch.isnan(adv_BG)
    keep_BG = torch.zeros_like(valid_BG)
    variances = []
    for b in range(B):
        cand = valid_BG[b].nonzero().squeeze(-1)
        chosen = cand[max_variance_subset(adv_BG[b, cand], m)]
        keep_BG[b, chosen] = True
        if chosen.numel():
            a = adv_BG[b, chosen].double()
            variances.append(float((a**2).mean() - a.mean() ** 2))
    stats = {
        "kept_frac": float(keep_BG.float().mean()) if keep_BG.numel() else 0.0,
        "adv_var_kept": sum(variances) / len(variances) if variances else 0.0,
    }
    drop_B = torch.zeros(B, dtype=torch.bool, device=adv_BG.device)
    return FilterOutput(keep_BG, drop_B, 0, _prefixed("d3s_samples", stats))


@SAMPLE_FILTERS.register("valid_groups")
def valid_groups(rewards_BG: Tensor) -> FilterOutput:
    """Give the completions of groups without signal zero loss weight.

    A group whose scorable rewards are all equal (or that has fewer than 2) has advantage 0;
    its tokens still count in a token-mean's denominator unless they leave the loss mask.
    DGPO (MathForge, arXiv 2601.20614, Eq. 3) averages over the valid prompts' tokens only.
    keep_BG = the group has ≥ 2 scorable rewards, not all equal. Stats: valid_groups/kept_frac.
    """
    r_BG = _check_BG("rewards_BG", rewards_BG).to(torch.float64)
    r_BG = torch.where(torch.isinf(r_BG), torch.nan, r_BG)
    valid_BG = ~torch.isnan(r_BG)
    hi_B = torch.where(valid_BG, r_BG, -torch.inf).amax(dim=-1)
    lo_B = torch.where(valid_BG, r_BG, torch.inf).amin(dim=-1)
    ok_B = (valid_BG.sum(dim=-1) >= 2) & (hi_B > lo_B)
    keep_BG = ok_B[:, None].expand_as(valid_BG).clone()
    stats = {"kept_frac": float(keep_BG.float().mean()) if keep_BG.numel() else 1.0}
    drop_B = torch.zeros(r_BG.shape[0], dtype=torch.bool, device=r_BG.device)
    return FilterOutput(keep_BG, drop_B, 0, _prefixed("valid_groups", stats))


@SAMPLE_FILTERS.register("mask_truncated")
def mask_truncated(truncated_BG: Tensor) -> FilterOutput:
    """Give completions cut at the max completion length zero loss weight.

    DAPO (arXiv 2503.14476) overlong filtering, as TRL's `mask_truncated_completions`: a
    truncated completion's reward is unreliable, so it leaves the loss (its reward still
    counts in its group's advantage baseline, as in TRL). keep_BG = ¬truncated_BG.

    Stats: mask_truncated/kept_frac.
    """
    truncated_BG = _check_BG("truncated_BG", truncated_BG).bool()
    keep_BG = ~truncated_BG
    B = truncated_BG.shape[0]
    stats = {"kept_frac": float(keep_BG.float().mean()) if keep_BG.numel() else 1.0}
    drop_B = torch.zeros(B, dtype=torch.bool, device=truncated_BG.device)
    return FilterOutput(keep_BG, drop_B, 0, _prefixed("mask_truncated", stats))


@TOKEN_MASKS.register("capo")
def capo(
    capo_curvature_NT: Tensor,
    adv_NT: Tensor,
    mask_NT: Tensor,
    *,
    reject_frac: float = 0.08,
    delta: float | None = None,
    lr: float = 1.0,
) -> SelectionOutput:
    """CAPO: drop the tokens whose update the LM head's curvature predicts to be too large.

    "Stabilizing Policy Gradients for Sample-Efficient Reinforcement Learning in LLM
    Reasoning" (CAPO), arXiv 2510.00819 (abstract only: the form is the catalog's reading).
    With h_t the final hidden state and g_t = (onehot(o_t) − π(·))·A_t the logit gradient,
    a Gauss-Newton step on the head alone changes the policy by about

        KL_t ≈ ½·lr²·‖g_t‖²·‖h_t‖² = ½·lr²·A_t²·capo_curvature_NT

    and tokens whose KL_t is above the (1 − reject_frac) quantile of the batch's completion
    tokens (or above `delta` when given) are dropped from the policy term (the paper
    reports < 8% rejected). The normalizer still counts every token (denominator "all").
    Stats: capo/rejected_frac, capo/threshold.
    """
    reject_frac = _check_ratio("capo.reject_frac", reject_frac)
    if delta is not None and not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"capo.delta must be a number >= 0 or null, got {delta}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"capo.lr must be a number > 0, got {lr}")
    valid_NT = mask_NT != 0
    kl_NT = 0.5 * lr**2 * adv_NT.double().pow(2) * capo_curvature_NT.double()
    values = kl_NT[valid_NT]
    if values.numel() == 0:
        return SelectionOutput(token_weight_NT=mask_NT.clone(), denominator="all")
    if delta is not None:
        threshold = float(delta)
    else:
        threshold = float(quantile_linear(values, 1.0 - reject_frac))
    keep_NT = valid_NT & ~(kl_NT > threshold)
    rejected = float((valid_NT & ~keep_NT).sum()) / float(valid_NT.sum())
    return SelectionOutput(
        token_weight_NT=keep_NT.to(mask_NT.dtype),
        denominator="all",
        stats={"capo/rejected_frac": rejected, "capo/threshold": threshold},
    )
