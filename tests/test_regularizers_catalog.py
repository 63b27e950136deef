"""Hand-computed checks of the catalog regularizers: LLDS, KL-Cov, Clip-Cov."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from grouprl.algorithms import REGULARIZERS
from grouprl.algorithms.losses import ppo_clip
from grouprl.algorithms.regularizers import (
    LLDS,
    ClipCov,
    KLCov,
    clip_cov_select,
    kl_cov_select,
    token_covariance,
)
from grouprl.algorithms.types import PolicyInputs
from grouprl.registry import RegistryError

F64 = torch.float64
NAN = math.nan


def t(values) -> Tensor:
    return torch.tensor(values, dtype=F64)


def grad_of(value: Tensor, logp: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value, logp)
    return grad


def test_registered_and_built() -> None:
    for name, cls in {"llds": LLDS, "kl_cov": KLCov, "clip_cov": ClipCov}.items():
        reg = REGULARIZERS.build(name)
        caps = REGULARIZERS.capabilities(name)
        assert isinstance(reg, cls) and reg.active and not caps.needs_ref
        assert not caps.needs_entropy_grad and not caps.calibrates
    assert repr(REGULARIZERS.build("kl_cov", k=0.1)) == "KLCov(k=0.1, beta=1.0)"
    with pytest.raises(RegistryError, match="gate"):
        REGULARIZERS.build("llds", gates="chunk")
    with pytest.raises(TypeError):
        LLDS(0.2)  # keyword-only


def test_validation() -> None:
    with pytest.raises(ValueError, match="coef"):
        LLDS(coef=-1.0)
    with pytest.raises(ValueError, match="gate"):
        LLDS(gate="action")
    with pytest.raises(ValueError, match=r"k must be in \[0, 1\]"):
        KLCov(k=2.0)
    with pytest.raises(ValueError, match="beta"):
        KLCov(beta=-1.0)
    with pytest.raises(ValueError, match="lb < ub"):
        ClipCov(lb=5.0, ub=1.0)
    with pytest.raises(ValueError, match="finite"):
        ClipCov(r=float("nan"))


# ---------------------------------------------------------------------------------------
# LLDS
# ---------------------------------------------------------------------------------------


def test_llds_response_gate_hand_computed() -> None:
    # drop = logπ_old − logπ_θ per token, λ = 0.2
    # row 0, A = +1: drop [0.2, -0.1, 0.3], Σ = 0.4 > 0 -> gate on:
    #   per_token = 0.2·max(0, drop) = [0.04, 0, 0.06]; grad -0.2 where drop > 0, else 0
    # row 1, A = -1: same drops, negative advantage -> 0
    # row 2, A = 0 (counts as >= 0): drop [0.1, -0.5, 0], Σ = -0.4 -> gate off -> 0
    old = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logp = t([[-1.2, -0.9, -1.3], [-1.2, -0.9, -1.3], [-1.1, -0.5, -1.0]]).requires_grad_(True)
    inp = PolicyInputs(logp, old, torch.ones(3, 3, dtype=F64), t([1.0, -1.0, 0.0]))
    out = LLDS()(inp)
    torch.testing.assert_close(
        out.per_token_NT, t([[0.04, 0.0, 0.06], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )
    grad = grad_of(out.per_token_NT.sum(), logp)
    torch.testing.assert_close(grad, t([[-0.2, 0.0, -0.2], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert out.stats_NT["llds/penalized_mean"].tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_llds_chunk_gate_and_token_advantages() -> None:
    # mask [1, 1, 0, 1, 1] (a tool observation at t=2, NaN there), A = +1
    # drop = [0.1, 0.1, -, -0.4, 0.1]
    #   response gate: Σ = -0.1 -> off everywhere
    #   chunk gate: chunk {0,1} Σ = 0.2 -> on: [0.02, 0.02]; chunk {3,4} Σ = -0.3 -> off
    #   (token 4 fell by 0.1 but its action did not)
    logp = t([[-1.1, -1.1, NAN, -0.6, -1.1]]).requires_grad_(True)
    old = t([[-1.0, -1.0, NAN, -1.0, -1.0]])
    mask = t([[1.0, 1.0, 0.0, 1.0, 1.0]])
    inp = PolicyInputs(logp, old, mask, t([1.0]))
    assert LLDS()(inp).per_token_NT.abs().sum().item() == 0.0
    out = LLDS(gate="chunk")(inp)
    torch.testing.assert_close(out.per_token_NT, t([[0.02, 0.02, 0.0, 0.0, 0.0]]))
    assert torch.isfinite(grad_of(out.per_token_NT.sum(), logp)).all()
    # token-level A = [1, -1, 0]: only tokens with A >= 0 count, for the gate as well.
    # drop = [0.2, 0.3, 0.1]: gate Σ over {0, 2} = 0.3 > 0 -> [0.04, 0, 0.02]
    logp = t([[-1.2, -1.3, -1.1]])
    inp = PolicyInputs(logp, t([[-1.0] * 3]), torch.ones(1, 3, dtype=F64), t([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(LLDS()(inp).per_token_NT, t([[0.04, 0.0, 0.02]]))
    # chunk gate with token advantages: runs {0} (0.2 > 0) and {2} (0.1 > 0): same result
    torch.testing.assert_close(LLDS(gate="chunk")(inp).per_token_NT, t([[0.04, 0.0, 0.02]]))


def test_llds_off_and_edge_cases() -> None:
    logp = t([[-1.2, NAN]])
    inp = PolicyInputs(logp, t([[-1.0, NAN]]), t([[1.0, 0.0]]), t([1.0]))
    assert torch.equal(LLDS(coef=0.0)(inp).per_token_NT, torch.zeros(1, 2, dtype=F64))
    # all advantages zero count as non-negative; an empty mask gives zeros
    out = LLDS()(PolicyInputs(logp, t([[-1.0, NAN]]), t([[0.0, 0.0]]), t([0.0])))
    assert torch.equal(out.per_token_NT, torch.zeros(1, 2, dtype=F64))


# ---------------------------------------------------------------------------------------
# KL-Cov
# ---------------------------------------------------------------------------------------


def kl_cov_inputs() -> tuple[PolicyInputs, Tensor]:
    # 5 valid tokens; A = [1, 1, 1, -1, -1] (per row), mean 0.2
    # logp = [-0.1, -1, -2, -0.5, -3], mean -1.32
    # Cov = (A − 0.2)(logp + 1.32) = [0.976, 0.256, -0.544, -0.984, 2.016]
    logp = t([[-0.1, -1.0, -2.0], [-0.5, -3.0, NAN]]).requires_grad_(True)
    # logπ_old − logπ_θ = [[0.3, -0.2, 0.1], [0.05, -0.4, -]]
    old = t([[0.2, -1.2, -1.9], [-0.45, -3.4, NAN]])
    inp = PolicyInputs(logp, old, t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), t([1.0, -1.0]))
    return inp, logp


def test_token_covariance() -> None:
    inp, logp = kl_cov_inputs()
    cov = token_covariance(inp.adv_N[:, None].expand(2, 3), logp, inp.mask_NT != 0)
    torch.testing.assert_close(cov, t([[0.976, 0.256, -0.544], [-0.984, 2.016, -math.inf]]))


def test_kl_cov_hand_computed() -> None:
    # k = 0.4: ⌊5·0.4⌋ = 2 tokens, the top-2 Cov: (1, 1) = 2.016 and (0, 0) = 0.976
    # per_token = β·|logπ − logπ_old| there: [0.3 at (0,0), 0.4 at (1,1)]
    # gradient sign(logπ − logπ_old): (0,0): -0.3 -> -1; (1,1): +0.4 -> +1
    inp, logp = kl_cov_inputs()
    out = KLCov(k=0.4)(inp)
    torch.testing.assert_close(out.per_token_NT, t([[0.3, 0.0, 0.0], [0.0, 0.4, 0.0]]))
    torch.testing.assert_close(
        grad_of(out.per_token_NT.sum(), logp), t([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    )
    assert out.stats["kl_cov/selected_frac"] == pytest.approx(0.4)
    torch.testing.assert_close(out.stats_NT["kl_cov/abs_log_ratio"][0], t([0.3, 0.2, 0.1]))
    # β = 2 doubles the term
    torch.testing.assert_close(KLCov(k=0.4, beta=2.0)(inp).per_token_NT, 2 * out.per_token_NT)
    # the default k = 2e-4 still selects max(1, ⌊5·2e-4⌋) = 1 token: the top one (1, 1)
    sel = kl_cov_select(inp.adv_N[:, None].expand(2, 3), logp, inp.mask_NT != 0, 2e-4)
    assert sel.tolist() == [[False, False, False], [False, True, False]]
    torch.testing.assert_close(KLCov()(inp).per_token_NT, t([[0.0, 0.0, 0.0], [0.0, 0.4, 0.0]]))


def test_kl_cov_empty_and_off() -> None:
    inp, _ = kl_cov_inputs()
    empty = PolicyInputs(inp.logp_NT, inp.old_logp_NT, torch.zeros(2, 3, dtype=F64), inp.adv_N)
    out = KLCov()(empty)
    assert torch.equal(out.per_token_NT, torch.zeros(2, 3, dtype=F64))
    assert out.stats["kl_cov/selected_frac"] == 0.0
    assert KLCov(k=0.0)(inp).per_token_NT.abs().sum().item() == 0.0


def authors_kl_cov(old, logp, adv, mask, k_frac, coef):
    """The authors' compute_policy_loss_kl_cov (k as a fraction), per-token loss matrix."""
    negative_approx_kl = logp - old
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses = -adv * ratio
    pg_losses_kl = -adv * ratio + coef * abs_kl
    all_valid = mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = adv[all_valid].detach().reshape(-1)
    all_valid_logp = logp[all_valid].detach().reshape(-1)
    cov = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
    count = max(1, int(len(cov) * k_frac))
    idx = all_valid_idx[torch.topk(cov, count, largest=True).indices]
    rows, cols = idx // adv.shape[1], idx % adv.shape[1]
    pg_losses = pg_losses.clone()
    pg_losses[rows, cols] = pg_losses_kl[rows, cols]
    return pg_losses


def test_kl_cov_plus_unclipped_loss_is_the_authors_loss() -> None:
    # ppo_clip with eps_low = 1, eps_high huge is the authors' unclipped −A·ρ base loss
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g, dtype=F64) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=F64)
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 5, 4])[:, None]).to(F64)
    adv = torch.randn(4, generator=g, dtype=F64)
    inp = PolicyInputs(logp, old, mask, adv)
    ours = ppo_clip(inp, eps_low=1.0, eps_high=1e9).per_token_NT + KLCov(k=0.2)(inp).per_token_NT
    ref = authors_kl_cov(old, logp, adv[:, None].expand(4, 6), mask, 0.2, 1.0)
    torch.testing.assert_close(ours * mask, ref * mask)
    torch.testing.assert_close(
        grad_of((ours * mask).sum(), logp), grad_of((ref * mask).sum(), logp)
    )


# ---------------------------------------------------------------------------------------
# Clip-Cov
# ---------------------------------------------------------------------------------------


def clip_cov_inputs(token_weight=None) -> tuple[PolicyInputs, Tensor]:
    # token advantages A = [2, 2, -2, -2] (mean 0); logp = [-0.5, -2.5, -2.5, -0.5]
    # (mean -1.5) -> Cov = A·(logp + 1.5) = [2, -2, 2, -2]; band (1, 5): tokens 0 and 2.
    # Token 0 has ρ = 1.5 with A > 0: already clipped by PPO -> not a candidate.
    # Candidates = {2}; count = max(⌊2e-4·4⌋, 1) = 1 -> token 2 is selected.
    logp = t([[-0.5, -2.5, -2.5, -0.5]]).requires_grad_(True)
    old = logp.detach() - t([[math.log(1.5), 0.0, 0.0, 0.0]])
    adv = t([[2.0, 2.0, -2.0, -2.0]])
    return PolicyInputs(
        logp, old, torch.ones(1, 4, dtype=F64), adv, token_weight_NT=token_weight
    ), logp


def test_clip_cov_hand_computed_cancels_ppo_gradient() -> None:
    inp, logp = clip_cov_inputs()
    out = ClipCov()(inp)
    # term = A·ρ on token 2 = -2·1 = -2; ppo_clip there is -A·ρ = +2: they cancel
    torch.testing.assert_close(out.per_token_NT, t([[0.0, 0.0, -2.0, 0.0]]))
    assert out.stats == {"clip_cov/selected_frac": 0.25, "clip_cov/candidate_frac": 0.25}
    ppo = ppo_clip(inp).per_token_NT
    # ppo gradient -A·ρ·1[unclipped] = [0 (clipped), -2, 2, 2]; token 2's is cancelled
    torch.testing.assert_close(grad_of(ppo.sum(), logp), t([[0.0, -2.0, 2.0, 2.0]]))
    # ppo per token -min(ρA, clip(ρ)A) = [-1.2·2, -2, 2, 2]; with the term: token 2 -> 0
    total = ppo_clip(inp).per_token_NT + out.per_token_NT
    torch.testing.assert_close(total, t([[-1.2 * 2, -2.0, 0.0, 2.0]]))
    torch.testing.assert_close(grad_of(total.sum(), logp), t([[0.0, -2.0, 0.0, 2.0]]))


def test_clip_cov_token_weights() -> None:
    # weight 2 on token 2 doubles the cancelling term (the weighted ppo term is doubled too)
    inp, _ = clip_cov_inputs(token_weight=t([[1.0, 1.0, 2.0, 1.0]]))
    torch.testing.assert_close(ClipCov()(inp).per_token_NT, t([[0.0, 0.0, -4.0, 0.0]]))
    # weight 0: no policy term to cancel, token 2 is not a candidate -> nothing selected
    inp, _ = clip_cov_inputs(token_weight=t([[1.0, 1.0, 0.0, 1.0]]))
    out = ClipCov()(inp)
    assert out.per_token_NT.abs().sum().item() == 0.0
    assert out.stats["clip_cov/candidate_frac"] == 0.0


def random_clip_cov_inputs(step: int, group0: int = 0) -> PolicyInputs:
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 8, generator=g, dtype=F64) * 4
    adv = torch.randn(3, 8, generator=g, dtype=F64) * 3
    old = logp + 0.05 * torch.randn(3, 8, generator=g, dtype=F64)
    mask = torch.ones(3, 8, dtype=F64)
    return PolicyInputs(logp, old, mask, adv, group_N=torch.tensor([group0] * 3), step=step)


def test_clip_cov_random_draw_is_reproducible() -> None:
    reg = ClipCov(r=0.1, lb=0.0, ub=100.0)  # ⌊0.1·24⌋ = 2 of the candidates
    selections = []
    for step in range(6):
        inp = random_clip_cov_inputs(step)
        sel = reg(inp).per_token_NT != 0
        again = reg(random_clip_cov_inputs(step)).per_token_NT != 0
        assert torch.equal(sel, again)  # same step -> same draw
        assert int(sel.sum()) == 2
        # the draw is among the candidates: positive covariance, not PPO-clipped
        cov = token_covariance(inp.adv_N, inp.logp_NT, inp.mask_NT != 0)
        assert (cov[sel] > 0).all()
        selections.append(sel)
    assert any(not torch.equal(selections[0], s) for s in selections[1:])  # steps differ
    other_seed = ClipCov(r=0.1, lb=0.0, ub=100.0, seed=7)
    draws = [other_seed(random_clip_cov_inputs(s)).per_token_NT != 0 for s in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(draws, selections, strict=True))


def test_clip_cov_count_truncates_with_at_least_one() -> None:
    # 24 valid tokens: r = 0.11 -> ⌊2.64⌋ = 2 (the authors truncate, not round);
    # r = 2e-4 -> max(⌊0.0048⌋, 1) = 1
    inp = random_clip_cov_inputs(step=0)
    assert int((ClipCov(r=0.11, lb=0.0, ub=100.0)(inp).per_token_NT != 0).sum()) == 2
    out = ClipCov(lb=0.0, ub=100.0)(inp)
    assert int((out.per_token_NT != 0).sum()) == 1
    assert out.stats["clip_cov/selected_frac"] == pytest.approx(1 / 24)
    assert out.stats["clip_cov/candidate_frac"] > 2 / 24


def test_clip_cov_select_takes_all_when_few() -> None:
    cand = torch.tensor([[True, False, True]])
    gen = torch.Generator().manual_seed(0)
    assert clip_cov_select(cand, 5, gen).tolist() == [[True, False, True]]
    assert clip_cov_select(cand, 0, gen).tolist() == [[False, False, False]]
    assert clip_cov_select(torch.zeros(1, 3, dtype=torch.bool), 2, gen).sum() == 0


def authors_clip_cov(old, logp, adv, mask, eps, clip_ratio, lb, ub, generator):
    """The authors' compute_policy_loss_clip_cov with the draw from `generator`."""
    ratio = torch.exp(logp - old)
    pg_losses1 = -adv * ratio
    corr = torch.ones_like(adv)
    pg_losses2 = -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    clip_by_origin = (pg_losses2 > pg_losses1) & (mask > 0)
    mean_adv = (adv * mask).sum() / mask.sum()
    mean_logp = (logp.detach() * mask).sum() / mask.sum()
    cov_all = (adv - mean_adv) * (logp - mean_logp)
    cov_all[mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_ratio * mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (mask > 0))
    perm = torch.randperm(len(top_k_idx), generator=generator)
    top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    return torch.maximum(pg_losses1, pg_losses2) * corr


def test_clip_cov_plus_ppo_clip_is_the_authors_loss() -> None:
    inp = random_clip_cov_inputs(step=3, group0=5)
    logp = inp.logp_NT.clone().requires_grad_(True)
    inp.logp_NT = logp
    inp.mask_NT[1, 5:] = 0.0
    reg = ClipCov(r=0.15, lb=0.5, ub=4.0)
    ours = ppo_clip(inp).per_token_NT + reg(inp).per_token_NT
    ref = authors_clip_cov(
        inp.old_logp_NT, logp, inp.adv_N, inp.mask_NT, 0.2, 0.15, 0.5, 4.0, reg.generator(inp)
    )
    assert (ref == 0).sum() >= 2  # some tokens were dropped
    m = inp.mask_NT
    torch.testing.assert_close(ours * m, ref * m)
    torch.testing.assert_close(grad_of((ours * m).sum(), logp), grad_of((ref * m).sum(), logp))


def test_clip_cov_empty_and_off() -> None:
    inp, _ = clip_cov_inputs()
    empty = PolicyInputs(inp.logp_NT, inp.old_logp_NT, torch.zeros(1, 4, dtype=F64), inp.adv_N)
    out = ClipCov()(empty)
    assert torch.equal(out.per_token_NT, torch.zeros(1, 4, dtype=F64))
    assert out.stats["clip_cov/selected_frac"] == 0.0
    assert ClipCov(r=0.0)(inp).per_token_NT.abs().sum().item() == 0.0
