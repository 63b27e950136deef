"""Regularizers: per-token terms added to the policy loss before aggregation.

A regularizer is a `Regularizer` subclass built from keyword-only parameters. It declares
at registration what the learner must compute for it (`needs_ref`: reference-model
log-probs, `needs_entropy_grad`: per-token entropy with gradient, `calibrates`: a whole-batch
calibration before the update) and returns per-token values already multiplied by its
coefficient. One whose coefficient is zero says so (`active` False): it is then left out,
and what it would need is not computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.losses import broadcast_adv
from grouprl.algorithms.types import PolicyInputs, TermOutput
from grouprl.registry import Registry

REGULARIZERS: Registry = Registry("regularizer")


class Regularizer:
    """Base of every registered regularizer: `__call__(PolicyInputs) -> TermOutput`."""

    @property
    def active(self) -> bool:
        """False when the term is identically zero (its coefficient is 0)."""
        return True

    @property
    def needs_calibration(self) -> bool:
        """For a regularizer registered with `calibrates`: whether `calibrate` still has
        work to do (the planning stage then computes the batch's entropy for it)."""
        return False

    def calibrate(
        self, entropy_NT: Tensor, mask_NT: Tensor, token_weight_NT: Tensor | None = None
    ) -> Any:
        """Whole-batch calibration before the update (registered with `calibrates`)."""
        raise NotImplementedError(f"{type(self).__name__} does not calibrate")

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        raise NotImplementedError


KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_estimate(logp_NT: Tensor, ref_logp_NT: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled from π_θ.

    John Schulman, "Approximating KL Divergence" (blog, 2020), with x = logπ_θ − logπ_ref
    (so the ratio π_ref/π_θ = e^{−x}):
        k1 = x                  unbiased, high variance, can be negative
        k2 = x²/2               biased, low variance
        k3 = e^{−x} + x − 1     unbiased, low variance, >= 0 (GRPO, arXiv 2402.03300, eq. 4)
        low_var_kl = clamp(k3(clamp(x, −20, 20)), −10, 10)   (verl's guarded k3)
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}"
        )
    x_NT = logp_NT - ref_logp_NT
    if estimator == "k1":
        return x_NT
    if estimator == "k2":
        return 0.5 * x_NT**2
    if estimator == "k3":
        return torch.exp(-x_NT) + x_NT - 1.0
    x_NT = x_NT.clamp(-20.0, 20.0)
    return (torch.exp(-x_NT) + x_NT - 1.0).clamp(-10.0, 10.0)


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@REGULARIZERS.register("kl", needs_ref=True)
class KL(Regularizer):
    """β · KL(π_θ ‖ π_ref) per token, with one of Schulman's estimators (see kl_estimate).

    GRPO ("DeepSeekMath", arXiv 2402.03300) adds β·k3 to the loss with β = 0.04; verl uses
    β = 0.001 with low_var_kl. With β = 0 the term is zero and inactive: no reference model
    is loaded. stats_NT: {"kl": unscaled estimate} when β > 0.

    scope "selected": the term only on tokens a token mask keeps (token weight > 0; every
    completion token when no mask is configured): SPINE's KL anchor on forking tokens
    (arXiv 2511.17938). The normalizer stays the regularizers' (all completion tokens).
    """

    def __init__(self, *, beta: float = 0.04, estimator: str = "k3", scope: str = "all") -> None:
        if scope not in ("all", "selected"):
            raise ValueError(f"kl.scope must be 'all' or 'selected'; got {scope!r}")
        self.scope = scope
        self.beta = _check_finite("kl.beta", beta)
        if self.beta < 0:
            raise ValueError(f"kl.beta must be >= 0, got {beta}")
        if estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl.estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}"
            )
        self.estimator = estimator

    @property
    def active(self) -> bool:
        return self.beta > 0

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if not self.active:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        if inp.ref_logp_NT is None:
            raise ValueError("kl: beta > 0 needs ref_logp_NT (reference log-probs), got None")
        # The reference is frozen: gradient flows only through logπ_θ.
        kl_NT = kl_estimate(inp.logp_NT, inp.ref_logp_NT.detach(), self.estimator)
        term_NT = self.beta * kl_NT
        if self.scope == "selected" and inp.token_weight_NT is not None:
            term_NT = term_NT * (inp.token_weight_NT.detach() > 0).to(term_NT.dtype)
        return TermOutput(per_token_NT=term_NT, stats_NT={"kl": kl_NT.detach()})

    def __repr__(self) -> str:
        return f"KL(beta={self.beta}, estimator={self.estimator!r}, scope={self.scope!r})"


@REGULARIZERS.register("entropy_bonus", needs_entropy_grad=True)
class EntropyBonus(Regularizer):
    """Entropy bonus −c·H per token (maximizes entropy for c > 0).

    The exploration bonus of "Asynchronous Methods for Deep Reinforcement Learning"
    (A3C, arXiv 1602.01783) and PPO (arXiv 1707.06347), with H the per-token entropy of π_θ
    at the sampling temperature. c = 0 (default) needs no entropy and gives a zero term.
    """

    def __init__(self, *, coef: float = 0.0) -> None:
        self.coef = _check_finite("entropy_bonus.coef", coef)

    @property
    def active(self) -> bool:
        return self.coef != 0

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if not self.active:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        if inp.entropy_NT is None:
            raise ValueError("entropy_bonus: coef != 0 needs entropy_NT, got None")
        return TermOutput(per_token_NT=-self.coef * inp.entropy_NT)

    def __repr__(self) -> str:
        return f"EntropyBonus(coef={self.coef})"


@REGULARIZERS.register("sft_rows", trains_sft_rows=True)
class SftRows(Regularizer):
    """Likelihood of a rollout strategy's demonstration rows: −β·log π_θ(token) on rows
    with `sft_N` (0 elsewhere); aggregated like every regularizer, over the loss mask.

    ExPO's self-explanation term, "ExPO: Unlocking Hard Reasoning with Self-Explanation-
    Guided Reinforcement Learning", arXiv 2507.02834: J = GRPO + β·log π_θ(c̃ | q), where c̃
    was sampled with the gold answer in the prompt (`rollout.strategy: expo`) and is trained
    without it; c̃ is in no group and gets no advantage. β = 0.04 (the paper's; 0.5 was
    worse than GRPO). The paper sums over c̃'s tokens; here the sum is normalized like the
    other terms (the aggregation's normalizer): a reading.
    """

    def __init__(self, *, beta: float = 0.04) -> None:
        self.beta = _check_finite("sft_rows.beta", beta)

    @property
    def active(self) -> bool:
        return self.beta != 0

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if inp.sft_N is None:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        rows_N1 = inp.sft_N.to(inp.logp_NT.device, inp.logp_NT.dtype)[:, None]
        nll_NT = -inp.logp_NT * rows_N1
        on_NT = rows_N1 * inp.mask_NT
        stats = {}
        if bool(on_NT.sum() > 0):  # per-token NLL of the demonstration tokens
            stats["sft_rows/nll"] = float((nll_NT.detach() * on_NT).sum() / on_NT.sum())
        return TermOutput(per_token_NT=self.beta * nll_NT, stats=stats)

    def __repr__(self) -> str:
        return f"SftRows(beta={self.beta})"


# ---------------------------------------------------------------------------------------
# Likelihood-displacement and covariance-based regularizers.
# ---------------------------------------------------------------------------------------

LLDS_GATES = ("response", "chunk")


def _valid_NT(inp: PolicyInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(valid, logπ_θ, logπ_old) with padding zeroed in both (see losses._valid_logps)."""
    valid_NT = inp.mask_NT != 0
    logp_NT = inp.logp_NT.where(valid_NT, 0.0)
    old_NT = inp.old_logp_NT.detach().to(logp_NT.dtype).where(valid_NT, 0.0)
    return valid_NT, logp_NT, old_NT


def _runs_NT(on_NT: Tensor) -> Tensor:
    """Id of each maximal run of True along T (1, 2, ... per row), 0 where False."""
    prev_NT = torch.nn.functional.pad(on_NT[:, :-1], (1, 0), value=False)
    starts_NT = on_NT & ~prev_NT
    return starts_NT.long().cumsum(dim=-1) * on_NT.long()


@REGULARIZERS.register("llds")
class LLDS(Regularizer):
    """Likelihood-displacement penalty on non-negative-advantage tokens whose log-prob fell.

    LLDS (Deng et al., "On GRPO Collapse in Search-R1", arXiv 2512.04220); as the authors'
    verl/workers/actor/dp_actor.py (vengdeng/LLDS-On-Group-Relative-Policy-Optimization-
    Collapse-in-Search-R1):

        per_token = λ · g · max(0, logπ_old − logπ_θ) · 1[A ≥ 0]

    gradient through logπ_θ only. Gate g (detached), among the tokens with A ≥ 0:
      "response" (R-gate): 1 for the whole row iff Σ_t (logπ_old − logπ_θ) > 0, i.e. the
        response's likelihood fell;
      "chunk" (A-gate, ISCHUNK): per maximal run of consecutive loss tokens with A ≥ 0 (an
        action between tool observations, which the mask zeroes), 1 iff that run's summed
        log-prob drop is > 0. Without masked gaps a row is one chunk and both gates agree.
    λ = 0.2 (NO_REDUCE_LAMBDA in train_grpo_nqhot.sh). The authors take the token mean over
    all response tokens: use the token_mean aggregation for their normalization.
    stats_NT: llds/penalized_mean = 1 on tokens with a nonzero penalty.
    """

    def __init__(self, *, coef: float = 0.2, gate: str = "response") -> None:
        self.coef = _check_finite("llds.coef", coef)
        if self.coef < 0:
            raise ValueError(f"llds.coef must be >= 0, got {coef}")
        if gate not in LLDS_GATES:
            raise ValueError(f"llds.gate must be one of {', '.join(LLDS_GATES)}; got {gate!r}")
        self.gate = gate

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if self.coef == 0:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        valid_NT, logp_NT, old_NT = _valid_NT(inp)
        adv_NT = broadcast_adv(inp.adv_N, logp_NT)
        on_NT = valid_NT & (adv_NT >= 0)
        drop_NT = (old_NT - logp_NT).detach().where(on_NT, 0.0)
        if self.gate == "response":
            gate_NT = (drop_NT.sum(dim=-1) > 0)[:, None] & on_NT
        else:
            run_NT = _runs_NT(on_NT)
            sums_NR = drop_NT.new_zeros(run_NT.shape[0], run_NT.shape[1] + 1)
            sums_NR = sums_NR.scatter_add(1, run_NT, drop_NT)
            gate_NT = (sums_NR.gather(1, run_NT) > 0) & on_NT
        penalty_NT = (old_NT - logp_NT).clamp(min=0.0) * gate_NT.to(logp_NT.dtype)
        return TermOutput(
            per_token_NT=self.coef * penalty_NT,
            stats_NT={"llds/penalized_mean": (penalty_NT.detach() > 0).to(logp_NT.dtype)},
        )

    def __repr__(self) -> str:
        return f"LLDS(coef={self.coef}, gate={self.gate!r})"


def token_covariance(adv_NT: Tensor, logp_NT: Tensor, valid_NT: Tensor) -> Tensor:
    """Cov_t = (A_t − mean A)·(logπ_t − mean logπ), means over the valid tokens seen; −inf
    on invalid tokens; detached.

    "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
    (arXiv 2505.22617), the per-token centered cross-product of KL-Cov / Clip-Cov (authors'
    code: plain means over the micro-batch's response tokens).
    """
    adv_NT = adv_NT.detach()
    logp_NT = logp_NT.detach()
    n = valid_NT.sum().clamp(min=1)
    adv_mean = adv_NT.where(valid_NT, 0.0).sum() / n
    logp_mean = logp_NT.where(valid_NT, 0.0).sum() / n
    cov_NT = (adv_NT - adv_mean) * (logp_NT - logp_mean)
    return cov_NT.where(valid_NT, -math.inf)


def kl_cov_select(adv_NT: Tensor, logp_NT: Tensor, valid_NT: Tensor, k: float) -> Tensor:
    """KL-Cov's selection: the top max(1, ⌊k·n⌋) valid tokens by Cov_t (n valid tokens;
    none if n = 0 or k = 0), as a bool [N, T] mask."""
    n = int(valid_NT.sum())
    selected_NT = torch.zeros_like(valid_NT)
    if n == 0 or k == 0:
        return selected_NT
    count = max(1, int(n * k))
    cov_N = token_covariance(adv_NT, logp_NT, valid_NT).flatten()
    top = torch.topk(cov_N, count, largest=True).indices
    return selected_NT.flatten().index_fill(0, top, True).view_as(valid_NT)


def clip_cov_select(candidate_NT: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Clip-Cov's draw: `count` (or all, if fewer) of the candidate tokens, uniformly at
    random without replacement using `generator` (a CPU generator), as a bool [N, T] mask."""
    idx = candidate_NT.flatten().nonzero().squeeze(-1)
    selected = candidate_NT.new_zeros(candidate_NT.numel())
    if idx.numel() == 0 or count <= 0:
        return selected.view_as(candidate_NT)
    perm = torch.randperm(idx.numel(), generator=generator)[: min(count, idx.numel())]
    return selected.index_fill(0, idx[perm.to(idx.device)], True).view_as(candidate_NT)


@REGULARIZERS.register("kl_cov")
class KLCov(Regularizer):
    """KL-Cov: a |log-ratio| penalty on the tokens with the largest advantage-logπ covariance.

    "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
    (Cui et al., arXiv 2505.22617); authors' compute_policy_loss_kl_cov (PRIME-RL/Entropy-
    Mechanism-of-RL, ported to verl). The authors replace the loss of the top max(1, ⌊k·n⌋)
    tokens by Cov_t (see `token_covariance`) with −A·ρ + β·|logπ_θ − logπ_old|; as an
    additive term this is

        per_token = β·|logπ_θ − logπ_old| on the selected tokens, 0 elsewhere

    added to the policy loss. Note their base loss is the unclipped −A·ρ (no PPO clip on
    any token): ppo_clip with eps_low = 1 and a huge eps_high reproduces it exactly; with
    the default ppo_clip the selected tokens keep their clipping. Defaults k = 2e-4 (verl's
    kl_cov_ratio; the authors' 7B script uses k_percent = 0.2, i.e. k = 2e-3), β = 1.

    Selection is over the rows this call sees, as in the authors' code where the loss runs
    per micro-batch: the trainer must call it on the whole optimizer batch for a selection
    over the batch. Token weights are ignored (a regularizer).
    stats: kl_cov/selected_frac (selected / valid tokens seen); stats_NT:
    kl_cov/abs_log_ratio (|logπ_θ − logπ_old| on every token, the authors' ppo_kl metric).
    """

    def __init__(self, *, k: float = 2e-4, beta: float = 1.0) -> None:
        self.k = _check_finite("kl_cov.k", k)
        if not 0.0 <= self.k <= 1.0:
            raise ValueError(f"kl_cov.k must be in [0, 1], got {k}")
        self.beta = _check_finite("kl_cov.beta", beta)
        if self.beta < 0:
            raise ValueError(f"kl_cov.beta must be >= 0, got {beta}")

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        valid_NT, logp_NT, old_NT = _valid_NT(inp)
        adv_NT = broadcast_adv(inp.adv_N, logp_NT)
        selected_NT = kl_cov_select(adv_NT, logp_NT, valid_NT, self.k)
        abs_NT = (logp_NT - old_NT).abs()
        n = int(valid_NT.sum())
        return TermOutput(
            per_token_NT=self.beta * abs_NT * selected_NT.to(logp_NT.dtype),
            stats_NT={"kl_cov/abs_log_ratio": abs_NT.detach()},
            stats={"kl_cov/selected_frac": float(selected_NT.sum()) / n if n else 0.0},
        )

    def __repr__(self) -> str:
        return f"KLCov(k={self.k}, beta={self.beta})"


@REGULARIZERS.register("clip_cov")
class ClipCov(Regularizer):
    """Clip-Cov: cancel the policy gradient of a few random high-covariance tokens.

    "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
    (Cui et al., arXiv 2505.22617); authors' compute_policy_loss_clip_cov. Candidates are
    the valid tokens with lb < Cov_t < ub (see `token_covariance`) that PPO did not already
    clip (−A·clip(ρ, 1 − eps_low, 1 + eps_high) > −A·ρ); max(1, ⌊r·Σm⌋) of them (the code
    truncates; ALGORITHMS.md says round) are drawn at random and their loss is multiplied
    by 0. On an unclipped token the PPO loss is −A·ρ, so the same change as an additive term
    is

        per_token = token_weight · A·ρ on the selected tokens, 0 elsewhere

    (ρ = exp(logπ_θ − logπ_old) with gradient), which cancels ppo_clip's value and gradient
    there exactly. Pair it with ppo_clip using the same eps_low/eps_high and no dual clip
    (the authors' loss); with another loss the term still removes −A·ρ, not that loss. It
    carries the token weights (unlike other regularizers) because it cancels a weighted
    policy term; tokens of weight 0 are not candidates. Defaults r = 2e-4, lb = 1, ub = 5;
    r = 0 selects nothing (the authors' code would still take 1).

    Selection is over the rows this call sees (per micro-batch, as in the authors' code):
    the trainer must call it on the whole optimizer batch for a selection over the batch.
    The draw uses a torch.Generator seeded from (seed, inp.step, first group id of the
    rows), so a run is reproducible. stats: clip_cov/selected_frac, clip_cov/candidate_frac
    (of the valid tokens seen).
    """

    def __init__(
        self,
        *,
        r: float = 2e-4,
        lb: float = 1.0,
        ub: float = 5.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.r = _check_finite("clip_cov.r", r)
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"clip_cov.r must be in [0, 1], got {r}")
        self.lb = _check_finite("clip_cov.lb", lb)
        self.ub = _check_finite("clip_cov.ub", ub)
        if not self.lb < self.ub:
            raise ValueError(f"clip_cov: need lb < ub, got lb={lb}, ub={ub}")
        self.eps_low = _check_finite("clip_cov.eps_low", eps_low)
        self.eps_high = _check_finite("clip_cov.eps_high", eps_high)
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(
                f"clip_cov: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}"
            )
        self.seed = int(seed)

    def generator(self, inp: PolicyInputs) -> torch.Generator:
        """CPU generator seeded from (seed, step, first group id) for this call's draw."""
        first_group = int(inp.group_N[0]) if inp.group_N is not None and inp.group_N.numel() else 0
        mixed = ((self.seed * 1_000_003 + int(inp.step)) * 1_000_003 + first_group) % (2**63)
        return torch.Generator().manual_seed(mixed)

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        valid_NT, logp_NT, old_NT = _valid_NT(inp)
        dtype = logp_NT.dtype
        adv_NT = broadcast_adv(inp.adv_N, logp_NT)
        ratio_NT = (logp_NT - old_NT).exp()
        ratio = ratio_NT.detach()
        clipped_NT = -adv_NT * ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high) > (
            -adv_NT * ratio
        )
        cov_NT = token_covariance(adv_NT, logp_NT, valid_NT)
        candidate_NT = valid_NT & ~clipped_NT & (cov_NT > self.lb) & (cov_NT < self.ub)
        weight_NT = None
        if inp.token_weight_NT is not None:
            weight_NT = inp.token_weight_NT.detach().to(dtype)
            candidate_NT = candidate_NT & (weight_NT != 0)
        total = float(inp.mask_NT.sum())
        count = max(int(self.r * total), 1) if self.r > 0 else 0  # r = 0: off
        selected_NT = clip_cov_select(candidate_NT, count, self.generator(inp))
        term_NT = (adv_NT * ratio_NT).where(selected_NT, 0.0)
        if weight_NT is not None:
            term_NT = term_NT * weight_NT
        n = int(valid_NT.sum())
        return TermOutput(
            per_token_NT=term_NT,
            stats={
                "clip_cov/selected_frac": float(selected_NT.sum()) / n if n else 0.0,
                "clip_cov/candidate_frac": float(candidate_NT.sum()) / n if n else 0.0,
            },
        )

    def __repr__(self) -> str:
        return (
            f"ClipCov(r={self.r}, lb={self.lb}, ub={self.ub}, eps_low={self.eps_low}, "
            f"eps_high={self.eps_high}, seed={self.seed})"
        )
