"""Regularizers: per-token terms added to the policy loss before aggregation.

A regularizer is a class built from keyword-only parameters. It declares what the trainer
must compute for it (`needs_ref`: reference-model log-probs, `needs_entropy`: per-token
entropy) and returns per-token values already multiplied by its coefficient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grouprl.algorithms.types import PolicyInputs, TermOutput
from grouprl.registry import Registry

REGULARIZERS: Registry = Registry("regularizer")

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


@REGULARIZERS.register("kl")
class KL:
    """β · KL(π_θ ‖ π_ref) per token, with one of Schulman's estimators (see kl_estimate).

    GRPO ("DeepSeekMath", arXiv 2402.03300) adds β·k3 to the loss with β = 0.04; verl uses
    β = 0.001 with low_var_kl. With β = 0 no reference model is needed (needs_ref False) and
    the term is zero. stats_NT: {"kl": unscaled estimate} when β > 0.
    """

    needs_ref: bool = False
    needs_entropy: bool = False

    def __init__(self, *, beta: float = 0.04, estimator: str = "k3") -> None:
        self.beta = _check_finite("kl.beta", beta)
        if self.beta < 0:
            raise ValueError(f"kl.beta must be >= 0, got {beta}")
        if estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl.estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}"
            )
        self.estimator = estimator
        self.needs_ref = self.beta > 0

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if not self.needs_ref:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        if inp.ref_logp_NT is None:
            raise ValueError("kl: beta > 0 needs ref_logp_NT (reference log-probs), got None")
        # The reference is frozen: gradient flows only through logπ_θ.
        kl_NT = kl_estimate(inp.logp_NT, inp.ref_logp_NT.detach(), self.estimator)
        return TermOutput(per_token_NT=self.beta * kl_NT, stats_NT={"kl": kl_NT.detach()})

    def __repr__(self) -> str:
        return f"KL(beta={self.beta}, estimator={self.estimator!r})"


@REGULARIZERS.register("entropy_bonus")
class EntropyBonus:
    """Entropy bonus −c·H per token (maximizes entropy for c > 0).

    The exploration bonus of "Asynchronous Methods for Deep Reinforcement Learning"
    (A3C, arXiv 1602.01783) and PPO (arXiv 1707.06347), with H the per-token entropy of π_θ
    at the sampling temperature. c = 0 (default) needs no entropy and gives a zero term.
    """

    needs_ref: bool = False
    needs_entropy: bool = False

    def __init__(self, *, coef: float = 0.0) -> None:
        self.coef = _check_finite("entropy_bonus.coef", coef)
        self.needs_entropy = self.coef != 0

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if not self.needs_entropy:
            return TermOutput(per_token_NT=torch.zeros_like(inp.logp_NT))
        if inp.entropy_NT is None:
            raise ValueError("entropy_bonus: coef != 0 needs entropy_NT, got None")
        return TermOutput(per_token_NT=-self.coef * inp.entropy_NT)

    def __repr__(self) -> str:
        return f"EntropyBonus(coef={self.coef})"
