"""Hand-computed checks of the clipped PPO surrogate, its gradient and its clip statistics."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms import LOSSES
from grouprl.algorithms.losses import ppo_clip, reinforce
from grouprl.algorithms.types import PolicyInputs


def rows(ratios: list[float], advs: list[float]) -> tuple[PolicyInputs, torch.Tensor]:
    """One token per row with old logp 0, so ρ = exp(logp) is the given ratio."""
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=torch.float64, requires_grad=True)
    inp = PolicyInputs(
        logp_NT=logp,
        old_logp_NT=torch.zeros_like(logp),
        mask_NT=torch.ones_like(logp),
        adv_N=torch.tensor(advs, dtype=torch.float64),
    )
    return inp, logp


def loss_and_grad(out_per_token: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(out_per_token.sum(), logp)
    return grad[:, 0]


def test_registered() -> None:
    assert LOSSES.get("ppo_clip") is ppo_clip and LOSSES.get("reinforce") is reinforce


def test_ppo_clip_values_gradients_and_stats() -> None:
    # eps_low = eps_high = 0.2, so clip range [0.8, 1.2]; per_token = -J.
    # row 0: ρ=1.5, A=+1: J = min(1.5, 1.2) = 1.2, clipped -> dJ/dlogp = 0, high clip
    # row 1: ρ=0.5, A=-1: J = min(-0.5, -0.8) = -0.8, clipped -> 0, low clip
    # row 2: ρ=1.1, A=+2: inside, J = 2.2, dJ/dlogp = A·ρ = 2.2
    # row 3: ρ=0.5, A=+1: J = min(0.5, 0.8) = 0.5 (pessimistic, unclipped), grad A·ρ = 0.5
    # row 4: ρ=1.5, A=-1: J = min(-1.5, -1.2) = -1.5 (unclipped), grad A·ρ = -1.5
    inp, logp = rows([1.5, 0.5, 1.1, 0.5, 1.5], [1.0, -1.0, 2.0, 1.0, -1.0])
    out = ppo_clip(inp)
    torch.testing.assert_close(
        out.per_token_NT[:, 0], torch.tensor([-1.2, 0.8, -2.2, -0.5, 1.5], dtype=torch.float64)
    )
    # loss gradient = -dJ/dlogp
    torch.testing.assert_close(
        loss_and_grad(out.per_token_NT, logp),
        torch.tensor([0.0, 0.0, -2.2, -0.5, 1.5], dtype=torch.float64),
    )
    s = {k: v[:, 0].tolist() for k, v in out.stats_NT.items()}
    assert s["clip_ratio/low_mean"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert s["clip_ratio/high_mean"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert s["clip_ratio/region_mean"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(v.dtype == torch.float64 for v in out.stats_NT.values())


def test_clip_higher_is_asymmetric() -> None:
    # ρ = 1.25, A = +1: above 1.2 (clipped, grad 0) but below 1.28 (DAPO, grad A·ρ = 1.25).
    # ρ = 0.75, A = -1: below 0.8 -> clipped for both settings (eps_low stays 0.2).
    inp, logp = rows([1.25, 0.75], [1.0, -1.0])
    sym = loss_and_grad(ppo_clip(inp).per_token_NT, logp)
    dapo_out = ppo_clip(inp, eps_high=0.28)
    dapo = loss_and_grad(dapo_out.per_token_NT, logp)
    torch.testing.assert_close(sym, torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(dapo, torch.tensor([-1.25, 0.0], dtype=torch.float64))
    assert dapo_out.stats_NT["clip_ratio/high_mean"][:, 0].tolist() == [0.0, 0.0]
    assert dapo_out.stats_NT["clip_ratio/low_mean"][:, 0].tolist() == [0.0, 1.0]


def test_dual_clip() -> None:
    # c = 3.
    # row 0: ρ=4, A=-1: min(-4, -1.2) = -4; dual max(-4, -3) = -3 -> constant, grad 0
    # row 1: ρ=2, A=-1: min(-2, -1.2) = -2 > -3 -> unchanged, grad A·ρ = -2
    # row 2: ρ=4, A=+1: A > 0, dual clip not applied: min(4, 1.2) = 1.2, grad 0
    inp, logp = rows([4.0, 2.0, 4.0], [-1.0, -1.0, 1.0])
    out = ppo_clip(inp, dual_clip=3.0)
    torch.testing.assert_close(
        out.per_token_NT[:, 0], torch.tensor([3.0, 2.0, -1.2], dtype=torch.float64)
    )
    torch.testing.assert_close(
        loss_and_grad(out.per_token_NT, logp), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    )
    # Without the dual clip row 0 is unbounded: J = -4, grad A·ρ = -4
    plain = ppo_clip(inp)
    assert plain.per_token_NT[0, 0].item() == pytest.approx(4.0)
    assert loss_and_grad(plain.per_token_NT, logp)[0].item() == pytest.approx(4.0)


def test_token_level_advantages_and_shape_check() -> None:
    # adv [N, T] is used as is: ρ = 1 everywhere, J = A, per_token = -A
    logp = torch.zeros(2, 3)
    adv_NT = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    inp = PolicyInputs(logp, logp.clone(), torch.ones(2, 3), adv_NT)
    torch.testing.assert_close(ppo_clip(inp).per_token_NT, -adv_NT)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, T\]"):
        ppo_clip(PolicyInputs(logp, logp, torch.ones(2, 3), torch.zeros(3)))


def test_old_logp_gets_no_gradient() -> None:
    logp = torch.tensor([[0.1]], requires_grad=True)
    old = torch.tensor([[0.0]], requires_grad=True)
    ppo_clip(PolicyInputs(logp, old, torch.ones(1, 1), torch.ones(1))).per_token_NT.sum().backward()
    assert old.grad is None and logp.grad is not None


def test_ppo_clip_param_validation() -> None:
    inp, _ = rows([1.0], [1.0])
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(inp, dual_clip=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip(inp, eps_low=-0.1)


def test_reinforce() -> None:
    # per_token = -A·logp: A = [2, -1], logp = [-0.5, -2] -> [1, -2]; d/dlogp = -A
    logp = torch.tensor([[-0.5], [-2.0]], requires_grad=True)
    out = reinforce(PolicyInputs(logp, logp.detach(), torch.ones(2, 1), torch.tensor([2.0, -1.0])))
    torch.testing.assert_close(out.per_token_NT, torch.tensor([[1.0], [-2.0]]))
    out.per_token_NT.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0], [1.0]]))


def test_ppo_clip_and_reinforce_apply_token_weights():
    # weights 0 / 1 / 2 scale each token's objective: 0 -> no gradient, 2 -> twice the push
    from grouprl.algorithms.losses import reinforce

    logp = torch.zeros(1, 3, requires_grad=True)
    w = torch.tensor([[0.0, 1.0, 2.0]])
    for loss_fn in (ppo_clip, reinforce):
        logp.grad = None
        inp = PolicyInputs(
            logp, logp.detach(), torch.ones(1, 3), torch.tensor([1.5]), token_weight_NT=w
        )
        loss_fn(inp).per_token_NT.sum().backward()
        # d(-A·ρ·w)/dlogp at ρ = 1 is -A·w = -1.5·w
        assert logp.grad.tolist() == [[0.0, -1.5, -3.0]]
