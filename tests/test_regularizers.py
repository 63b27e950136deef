"""Hand-computed checks of the KL estimators and the KL / entropy regularizers."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms import REGULARIZERS
from grouprl.algorithms.regularizers import KL, EntropyBonus, kl_estimate
from grouprl.algorithms.types import PolicyInputs
from grouprl.registry import RegistryError

# x = logp - ref = [0.5, -1, 0, 2]
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -0.1]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5, -2.1]], dtype=torch.float64)

EXPECTED = {
    "k1": [0.5, -1.0, 0.0, 2.0],  # x
    "k2": [0.125, 0.5, 0.0, 2.0],  # x²/2
    # e^{-x} + x - 1: e^-.5 - .5 = 0.1065306597; e^1 - 2 = 0.7182818285; 0; e^-2 + 1 = 1.1353352832
    "k3": [0.1065306597, 0.7182818285, 0.0, 1.1353352832],
    "low_var_kl": [0.1065306597, 0.7182818285, 0.0, 1.1353352832],  # no clamp active here
}


def inputs(logp: torch.Tensor, ref: torch.Tensor | None = None, entropy=None) -> PolicyInputs:
    return PolicyInputs(
        logp_NT=logp,
        old_logp_NT=logp.detach(),
        mask_NT=torch.ones_like(logp),
        adv_N=torch.zeros(logp.shape[0], dtype=logp.dtype),
        entropy_NT=entropy,
        ref_logp_NT=ref,
    )


@pytest.mark.parametrize("estimator", sorted(EXPECTED))
def test_kl_estimators(estimator: str) -> None:
    out = kl_estimate(LOGP, REF, estimator)
    torch.testing.assert_close(out, torch.tensor([EXPECTED[estimator]], dtype=torch.float64))


def test_low_var_kl_clamps() -> None:
    # x = -3: k3 = e^3 - 4 = 16.0855 -> clamped to 10 (and its gradient is 0)
    # x = -inf (token impossible under π_θ): k3 = inf - inf = NaN; low_var_kl clamps x to -20
    #   first, e^20 - 21 -> 10
    # x = 1: e^-1 + 0 = 0.3678794412 (inside the range, equal to k3)
    logp = torch.tensor([[-3.0, -math.inf, 1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    k3 = kl_estimate(logp, ref, "k3")
    assert k3[0, 0].item() == pytest.approx(math.e**3 - 4) and math.isnan(k3[0, 1].item())
    low = kl_estimate(logp, ref, "low_var_kl")
    torch.testing.assert_close(low, torch.tensor([[10.0, 10.0, 0.3678794412]], dtype=torch.float64))
    low.sum().backward()
    # d/dx (e^-x + x - 1) = 1 - e^-x; at x = 1: 1 - 0.3678794 = 0.6321206; clamped entries: 0
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, 0.0, 1 - math.exp(-1)]], dtype=torch.float64)
    )


def test_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        kl_estimate(LOGP, REF, "k4")


def test_kl_regularizer() -> None:
    kl = REGULARIZERS.build("kl", beta=0.1, estimator="k3")
    assert isinstance(kl, KL) and kl.active and REGULARIZERS.capabilities("kl").needs_ref
    logp = LOGP.clone().requires_grad_(True)
    ref = REF.clone().requires_grad_(True)
    out = kl(inputs(logp, ref))
    # per_token = 0.1·k3, stat = unscaled k3
    k3 = torch.tensor([EXPECTED["k3"]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_NT, 0.1 * k3)
    torch.testing.assert_close(out.stats_NT["kl"], k3)
    out.per_token_NT.sum().backward()
    # d/dlogp = 0.1·(1 - e^{-x}), x = [.5, -1, 0, 2]; the reference gets no gradient
    x = torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, 0.1 * (1 - torch.exp(-x)))
    assert ref.grad is None


def test_kl_beta_zero_needs_no_reference() -> None:
    kl = KL(beta=0.0)
    assert not kl.active  # left out of the run: no reference model is loaded
    out = kl(inputs(LOGP))  # no ref_logp at all
    assert torch.equal(out.per_token_NT, torch.zeros_like(LOGP)) and "kl" not in out.stats_NT


def test_kl_validation() -> None:
    with pytest.raises(ValueError, match="beta must be >= 0"):
        KL(beta=-0.1)
    with pytest.raises(ValueError, match="finite"):
        KL(beta=float("nan"))
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        KL(estimator="kl3")
    with pytest.raises(ValueError, match="ref_logp_NT"):
        KL(beta=0.04)(inputs(LOGP))
    with pytest.raises(RegistryError, match="beta"):
        REGULARIZERS.build("kl", bta=0.1)
    with pytest.raises(TypeError):
        KL(0.1)  # keyword-only


def test_entropy_bonus() -> None:
    bonus = REGULARIZERS.build("entropy_bonus", coef=0.01)
    caps = REGULARIZERS.capabilities("entropy_bonus")
    assert isinstance(bonus, EntropyBonus) and bonus.active and caps.needs_entropy_grad
    assert not caps.needs_ref
    entropy = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = bonus(inputs(torch.zeros(1, 2), entropy=entropy))
    # per_token = -0.01·H = [-0.01, -0.02]; d/dH = -0.01
    torch.testing.assert_close(out.per_token_NT, torch.tensor([[-0.01, -0.02]]))
    out.per_token_NT.sum().backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.01, -0.01]]))


def test_entropy_bonus_off_and_validation() -> None:
    off = EntropyBonus()
    assert not off.active
    assert torch.equal(off(inputs(torch.zeros(1, 2))).per_token_NT, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="entropy_NT"):
        EntropyBonus(coef=0.1)(inputs(torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="finite"):
        EntropyBonus(coef=float("inf"))
