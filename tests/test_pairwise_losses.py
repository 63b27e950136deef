"""Pairwise losses (algorithms/pairwise.py): TRPA, P3O, ETR, DaGRPO's pair mask.

Every expected number is worked out by hand in the comments (scalar math only), never by
calling the formula under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import arith_rows, base_config
from torch import Tensor

from grouprl.algorithms import LOSSES
from grouprl.algorithms.advantages import grpo, rloo
from grouprl.algorithms.aggregation import token_mean, token_sum
from grouprl.algorithms.losses import ppo_clip, reinforce
from grouprl.algorithms.pairwise import dagrpo_pairs, etr, p3o, trpa
from grouprl.algorithms.types import BatchNorm, PolicyInputs, TermOutput


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make(
    logp: list[list[float]] | Tensor,
    *,
    old: list[list[float]] | Tensor | None = None,
    ref: list[list[float]] | Tensor | None = None,
    mask: list[list[float]] | Tensor | None = None,
    rewards: list[float] | Tensor,
    groups: list[int] | Tensor,
    adv: list[float] | Tensor | None = None,
    num_groups: int | None = None,
    num_tokens: float | None = None,
) -> PolicyInputs:
    logp_NT = torch.as_tensor(logp, dtype=torch.float64).clone().requires_grad_(True)
    mask_NT = (
        torch.ones_like(logp_NT) if mask is None else torch.as_tensor(mask, dtype=torch.float64)
    )
    group_N = torch.as_tensor(groups, dtype=torch.long)
    B = int(torch.unique(group_N).numel()) if num_groups is None else num_groups
    norm = BatchNorm.of(mask_NT, logp_NT.shape[1], B)
    if num_tokens is not None:
        norm = BatchNorm(num_tokens, norm.num_seqs, norm.max_len, norm.num_groups)
    return PolicyInputs(
        logp_NT=logp_NT,
        old_logp_NT=logp_NT.detach().clone()
        if old is None
        else torch.as_tensor(old, dtype=torch.float64),
        mask_NT=mask_NT,
        adv_N=torch.zeros(logp_NT.shape[0], dtype=torch.float64)
        if adv is None
        else torch.as_tensor(adv, dtype=torch.float64),
        ref_logp_NT=None if ref is None else torch.as_tensor(ref, dtype=torch.float64),
        rewards_N=torch.as_tensor(rewards, dtype=torch.float64),
        group_N=group_N,
        norm=norm,
    )


def total(out: TermOutput, inp: PolicyInputs) -> Tensor:
    """The loss the learner backpropagates for a policy term aggregated with token_mean."""
    if out.aggregated is not None:
        return out.aggregated
    assert inp.norm is not None
    return token_mean(out.per_token_NT, inp.mask_NT, inp.norm)


def grad_of(loss: Tensor, inp: PolicyInputs) -> Tensor:
    (g,) = torch.autograd.grad(loss, inp.logp_NT)
    return g


def test_registered_with_capabilities() -> None:
    assert LOSSES.get("trpa") is trpa and LOSSES.get("p3o") is p3o
    assert LOSSES.get("etr") is etr and LOSSES.get("dagrpo_pairs") is dagrpo_pairs
    for name in ("trpa", "p3o", "etr", "dagrpo_pairs"):
        assert LOSSES.capabilities(name).whole_groups, name
    assert LOSSES.capabilities("trpa").needs_ref
    assert not LOSSES.capabilities("p3o").needs_ref
    assert LOSSES.capabilities("trpa").min_group_size == 2
    LOSSES.check_params("trpa", {"beta": 0.2, "fallback": "none", "top_reward": 0.9})
    LOSSES.check_params("etr", {"kappa": 0.0, "adv_min": 1.0, "adv_max": 1.0})
    LOSSES.check_params("dagrpo_pairs", {"tau": 0.0, "pair_norm": "kept"})


# ---------------------------------------------------------------------------------------
# TRPA
# ---------------------------------------------------------------------------------------


def trpa_pair_inputs(rewards: list[float]) -> PolicyInputs:
    # row 0: logp [−1, −2] -> mean −1.5; ref [−1, −1] -> −1.0; s_0 = −0.5
    # row 1: logp [−3, −1] -> mean −2.0; ref [−2, −2] -> −2.0; s_1 =  0.0
    return make(
        [[-1.0, -2.0], [-3.0, -1.0]],
        ref=[[-1.0, -1.0], [-2.0, -2.0]],
        rewards=rewards,
        groups=[0, 0],
    )


def test_trpa_one_pair_value_and_gradient() -> None:
    # r = (1, 0): pair (0 better), level 1 -> a = 2.5; h = 0.1·2.5·(−0.5 − 0) = −0.125
    # loss = −log σ(−0.125) = log(1 + e^0.125); π_old = π_θ -> trust region 0
    inp = trpa_pair_inputs([1.0, 0.0])
    out = trpa(inp)
    assert out.aggregated is not None
    assert out.aggregated.item() == pytest.approx(softplus(0.125), abs=1e-12)
    assert torch.count_nonzero(out.per_token_NT) == 0
    # d loss/d s_0 = −σ(−h)·β·a = −σ(0.125)·0.25, spread over 2 tokens (mean): per token
    # −0.125·σ(0.125) for row 0 and +0.125·σ(0.125) for row 1: the better row goes up.
    g = grad_of(out.aggregated, inp)
    per_token = 0.125 * sigmoid(0.125)
    assert torch.allclose(g, torch.tensor([[-per_token] * 2, [per_token] * 2]).double())
    assert out.stats["trpa/margin"] == pytest.approx(-0.5)
    assert out.stats["trpa/pair_frac"] == 1.0


def test_trpa_anisotropy_only_when_the_better_one_is_top_level() -> None:
    # r = (0.5, 0): the better reward is below top_reward 1.0 -> a = 1, h = 0.1·(−0.5)
    plain = trpa(trpa_pair_inputs([0.5, 0.0])).aggregated
    assert plain.item() == pytest.approx(softplus(0.05), abs=1e-12)
    # top_reward 0.5 makes 0.5 "level 1": h = 0.25·(−0.5) = −0.125, 2.5× the logit above
    top = trpa(trpa_pair_inputs([0.5, 0.0]), top_reward=0.5).aggregated
    assert top.item() == pytest.approx(softplus(0.125), abs=1e-12)
    # the order follows the rewards: r = (0, 1) -> row 1 better, h = 0.25·(0 − (−0.5))
    flipped = trpa(trpa_pair_inputs([0.0, 1.0])).aggregated
    assert flipped.item() == pytest.approx(softplus(-0.125), abs=1e-12)


def test_trpa_levels_from_rewards_ties_and_nan() -> None:
    # one token per row, ref 0, so s = logp: s = (−1, −2, −4, 5, −3)
    # rewards (1, 0.5, 0, NaN, 0): the NaN row joins no pair, rows 2 and 4 tie (no pair)
    # pairs: (0,1) a 2.5: h = 0.25·1 = 0.25     (0,2) a 2.5: h = 0.25·3 = 0.75
    #        (0,4) a 2.5: h = 0.25·2 = 0.5      (1,2) a 1:   h = 0.1·2 = 0.2
    #        (1,4) a 1:   h = 0.1·1 = 0.1
    inp = make(
        [[-1.0], [-2.0], [-4.0], [5.0], [-3.0]],
        ref=[[0.0]] * 5,
        rewards=[1.0, 0.5, 0.0, float("nan"), 0.0],
        groups=[0] * 5,
    )
    expected = sum(softplus(-h) for h in (0.25, 0.75, 0.5, 0.2, 0.1)) / 5
    out = trpa(inp)
    assert out.aggregated.item() == pytest.approx(expected, abs=1e-12)
    g = grad_of(out.aggregated, inp)
    assert g[3, 0] == 0.0  # the NaN row gets no gradient
    assert g[0, 0] < 0 < g[2, 0]  # best up, worst down


def test_trpa_fallback_per_group_and_normalization() -> None:
    # group 0: pair r (1, 0), s = (−0.5, 0) as above -> L_0 = log(1 + e^0.125)
    # group 1: all correct, s = (0.5, 1.0) (T = 2, ref 0, logp constant per row)
    #          fallback m = +1: L_1 = mean(−log σ(0.5), −log σ(1.0))
    # group 2: all wrong, s = (0.5, 1.0), m = −1: L_2 = mean(−log σ(−0.5), −log σ(−1.0))
    logp = [[-1.0, -2.0], [-3.0, -1.0], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5], [1.0, 1.0]]
    ref = [[-1.0, -1.0], [-2.0, -2.0]] + [[0.0, 0.0]] * 4
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    groups = [0, 0, 1, 1, 2, 2]
    L0 = softplus(0.125)
    L1 = (softplus(-0.5) + softplus(-1.0)) / 2
    L2 = (softplus(0.5) + softplus(1.0)) / 2
    out = trpa(make(logp, ref=ref, rewards=rewards, groups=groups))
    assert out.aggregated.item() == pytest.approx((L0 + L1 + L2) / 3, abs=1e-12)
    assert out.stats["trpa/pair_frac"] == pytest.approx(1 / 3)
    # the optimizer batch has 6 groups (others in other micro-batches): divide by 6
    wide = trpa(make(logp, ref=ref, rewards=rewards, groups=groups, num_groups=6))
    assert wide.aggregated.item() == pytest.approx((L0 + L1 + L2) / 6, abs=1e-12)
    # fallback "none": pairless groups contribute 0
    none = trpa(make(logp, ref=ref, rewards=rewards, groups=groups), fallback="none")
    assert none.aggregated.item() == pytest.approx(L0 / 3, abs=1e-12)
    # gradient direction of the fallback: correct rows up, wrong rows down
    inp = make(logp, ref=ref, rewards=rewards, groups=groups)
    g = grad_of(trpa(inp).aggregated, inp)
    assert (g[2:4] < 0).all() and (g[4:6] > 0).all()


def test_trpa_trust_region_k3_to_old() -> None:
    # rows tie (r = 0.5, 0.5) and fallback "none", so only the trust region remains.
    # row 0: old = (−1, −1), logp = (−1.5, −0.5): x = old − logp = (0.5, −0.5)
    #        k3 = e^x − x − 1 = (e^0.5 − 1.5, e^−0.5 − 0.5) = (0.1487213, 0.1065307)
    # row 1: old = logp -> 0.  num_tokens = 4, tr_coef = 1: loss = (k3_0 + k3_1)/4
    inp = make(
        [[-1.5, -0.5], [-2.0, -2.0]],
        old=[[-1.0, -1.0], [-2.0, -2.0]],
        ref=[[0.0, 0.0]] * 2,
        rewards=[0.5, 0.5],
        groups=[0, 0],
    )
    out = trpa(inp, tr_coef=1.0, fallback="none")
    k3 = (math.exp(0.5) - 1.5) + (math.exp(-0.5) - 0.5)
    assert out.aggregated.item() == pytest.approx(k3 / 4, abs=1e-12)
    assert out.stats["trpa/tr_kl"] == pytest.approx(k3 / 4, abs=1e-12)
    # d k3 / d logp = 1 − e^x: (1 − e^0.5)/4 < 0 pulls token 0 back up toward π_old,
    # (1 − e^−0.5)/4 > 0 pulls token 1 back down.
    g = grad_of(out.aggregated, inp)
    expected = torch.tensor(
        [[(1 - math.exp(0.5)) / 4, (1 - math.exp(-0.5)) / 4], [0.0, 0.0]], dtype=torch.float64
    )
    assert torch.allclose(g, expected, atol=1e-12)


def random_batch(
    seed: int, B: int = 3, G: int = 3, T: int = 4, levels: tuple[float, ...] = (0.0, 0.5, 1.0)
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    N = B * G
    logp = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 2
    old = logp + (torch.rand(N, T, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    ref = logp + (torch.rand(N, T, generator=gen, dtype=torch.float64) - 0.5)
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[1, 2:] = 0
    mask[4, 1:] = 0
    idx = torch.randint(len(levels), (N,), generator=gen)
    rewards = torch.tensor(levels, dtype=torch.float64)[idx]
    rewards[G : 2 * G] = 1.0  # one group without a pair (fallback)
    adv = grpo(rewards.view(B, G).float()).double().flatten()
    return {
        "logp": logp,
        "old": old,
        "ref": ref,
        "mask": mask,
        "rewards": rewards,
        "groups": torch.arange(N) // G,
        "adv": adv,
    }


def split_equals_whole(loss_fn, batch: dict, cut: int, **params) -> None:
    """Σ over micro-batches [0, cut), [cut, N) with the whole batch's norm == the whole."""
    B = int(batch["groups"].max()) + 1
    tokens = float(batch["mask"].sum())

    def run(s: slice) -> tuple[Tensor, Tensor]:
        part = {k: v[s] for k, v in batch.items()}
        inp = make(**part, num_groups=B, num_tokens=tokens)
        loss = total(loss_fn(inp, **params), inp)
        return loss, grad_of(loss, inp)

    whole_loss, whole_grad = run(slice(0, None))
    l1, g1 = run(slice(0, cut))
    l2, g2 = run(slice(cut, None))
    assert whole_loss.item() != 0.0
    assert torch.allclose(l1 + l2, whole_loss, atol=1e-12)
    assert torch.allclose(torch.cat([g1, g2]), whole_grad, atol=1e-12)


def test_trpa_micro_batch_split_keeps_loss_and_gradient() -> None:
    split_equals_whole(trpa, random_batch(0), cut=3, tr_coef=0.5)
    split_equals_whole(trpa, random_batch(1), cut=6)


def test_trpa_refuses_bad_parameters_and_missing_inputs() -> None:
    inp = trpa_pair_inputs([1.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        trpa(inp, beta=0.0)
    with pytest.raises(ValueError, match="fallback"):
        trpa(inp, fallback="batch")
    with pytest.raises(ValueError, match="tr_coef"):
        trpa(inp, tr_coef=-1.0)
    with pytest.raises(ValueError, match="top_reward"):
        trpa(inp, top_reward=math.nan)
    inp.ref_logp_NT = None
    with pytest.raises(ValueError, match="ref_logp_NT"):
        trpa(inp)
    inp = trpa_pair_inputs([1.0, 0.0])
    inp.norm = None
    with pytest.raises(ValueError, match="num_groups"):
        trpa(inp)
    inp = trpa_pair_inputs([1.0, 0.0])
    inp.rewards_N = None
    with pytest.raises(ValueError, match="rewards_N"):
        trpa(inp)


# ---------------------------------------------------------------------------------------
# P3O
# ---------------------------------------------------------------------------------------


def p3o_pair_inputs() -> PolicyInputs:
    # row 0: log S = 0.1 + 0.2 = 0.3 -> S_0 = e^0.3 = 1.3498588
    # row 1: log S = −0.05 − 0.05 = −0.1 -> S_1 = e^−0.1 = 0.9048374
    return make(
        [[-1.0, -1.0], [-2.0, -2.0]],
        old=[[-1.1, -1.2], [-1.95, -1.95]],
        rewards=[1.0, 0.0],
        groups=[0, 0],
    )


def test_p3o_one_pair_clipped_value_and_gradient() -> None:
    # R_01 = +0.5, R_10 = −0.5, P = 1 pair, B = 1.
    # row 0 (R > 0): min(S_0, 1.2)·0.5 = 0.6 (clipped, no gradient)
    # row 1 (R < 0): max(S_1, 0.8)·(−0.5) = −0.5·e^−0.1 (unclipped)
    # loss = −(0.6 − 0.5·e^−0.1) = −0.1475813
    inp = p3o_pair_inputs()
    out = p3o(inp)
    assert out.aggregated.item() == pytest.approx(-(0.6 - 0.5 * math.exp(-0.1)), abs=1e-12)
    # ∂loss/∂logp_1t = +0.5·S_1 on both tokens (log S sums them): the worse row goes down
    g = grad_of(out.aggregated, inp)
    expected = torch.tensor([[0.0, 0.0], [0.5 * math.exp(-0.1)] * 2], dtype=torch.float64)
    assert torch.allclose(g, expected, atol=1e-12)
    assert out.stats["p3o/clip_frac"] == pytest.approx(0.5)
    assert out.stats["p3o/log_ratio"] == pytest.approx((0.3 - 0.1) / 2)


def test_p3o_unclipped_with_wide_range() -> None:
    # ε huge: loss = −(0.5·S_0 − 0.5·S_1); ∂/∂logp_0t = −0.5·S_0, ∂/∂logp_1t = +0.5·S_1
    inp = p3o_pair_inputs()
    out = p3o(inp, eps_low=1e6, eps_high=1e6)
    s0, s1 = math.exp(0.3), math.exp(-0.1)
    assert out.aggregated.item() == pytest.approx(-(0.5 * s0 - 0.5 * s1), abs=1e-12)
    g = grad_of(out.aggregated, inp)
    expected = torch.tensor([[-0.5 * s0] * 2, [0.5 * s1] * 2], dtype=torch.float64)
    assert torch.allclose(g, expected, atol=1e-12)


def test_p3o_three_rows_on_policy_gradient_is_rloo_by_hand() -> None:
    # r = (1, 0, 0), S = 1: Σ_{ordered pairs} R_ij = 0, so the loss is 0, but the
    # coefficient of ∇S_i is Σ_{j≠i} (r_i − r_j)/2 / P, P = 3:
    #   row 0: (0.5 + 0.5)/3 = 1/3;  rows 1, 2: (−0.5 + 0)/3 = −1/6
    # = A_i^RLOO / G with A^RLOO = (1, −0.5, −0.5). Loss gradient per token = −coef.
    inp = make([[-1.0, -2.0]] * 3, rewards=[1.0, 0.0, 0.0], groups=[0, 0, 0])
    out = p3o(inp)
    assert out.aggregated.item() == pytest.approx(0.0, abs=1e-12)
    g = grad_of(out.aggregated, inp)
    expected = torch.tensor([[-1 / 3] * 2, [1 / 6] * 2, [1 / 6] * 2], dtype=torch.float64)
    assert torch.allclose(g, expected, atol=1e-12)


def test_p3o_unclipped_gradient_equals_rloo_estimator() -> None:
    # On-policy (S = 1, the clip inactive): ∇p3o = ∇[−(1/N) Σ_i A_i^RLOO Σ_t logπ] with
    # A^RLOO from the registered `rloo` and the loss from `reinforce` + token_sum:
    # (1/G)·A^RLOO = (r_i − mean r)/(G − 1) per group, B groups.
    # (The spec's "×(G − 1)/G": Σ_i (r_i − mean r)∇logπ_i = (G − 1)/G · Σ_i A_i^RLOO ∇logπ_i.)
    batch = random_batch(3, B=2, G=4)
    batch["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    N = 8
    inp = make(batch["logp"], mask=batch["mask"], rewards=batch["rewards"], groups=batch["groups"])
    g_p3o = grad_of(p3o(inp).aggregated, inp)
    adv = rloo(batch["rewards"].view(2, 4)).double().flatten()
    ref_inp = make(
        batch["logp"], mask=batch["mask"], rewards=batch["rewards"], groups=batch["groups"], adv=adv
    )
    rl = token_sum(reinforce(ref_inp).per_token_NT, ref_inp.mask_NT, ref_inp.norm) / N
    g_rloo = grad_of(rl, ref_inp)
    assert g_rloo.abs().sum() > 0
    assert torch.allclose(g_p3o, g_rloo, atol=1e-6)
    # and the spec's relation, with the group-mean baseline instead of leave-one-out
    r = batch["rewards"].view(2, 4)
    centered = (r - r.mean(dim=1, keepdim=True)).flatten()
    assert torch.allclose(centered, (3 / 4) * adv, atol=1e-6)


def test_p3o_is_invariant_to_a_reward_shift() -> None:
    batch = random_batch(4)
    shifted = {**batch, "rewards": batch["rewards"] + 3.7}
    a = make(**batch)
    b = make(**shifted)
    la, lb = p3o(a).aggregated, p3o(b).aggregated
    assert la.item() != 0.0
    assert torch.allclose(la, lb, atol=1e-12)
    assert torch.allclose(grad_of(la, a), grad_of(lb, b), atol=1e-12)


def test_p3o_nan_reward_row_is_left_out() -> None:
    # Group (r = 1, 0, NaN): the NaN row joins no pair and n_q = 2, P = 1, so the loss is
    # that of the two-row group above.
    two = p3o(p3o_pair_inputs()).aggregated
    inp = make(
        [[-1.0, -1.0], [-2.0, -2.0], [-0.5, -0.5]],
        old=[[-1.1, -1.2], [-1.95, -1.95], [-3.0, -3.0]],
        rewards=[1.0, 0.0, float("nan")],
        groups=[0, 0, 0],
    )
    out = p3o(inp)
    assert out.aggregated.item() == pytest.approx(two.item(), abs=1e-12)
    assert grad_of(out.aggregated, inp)[2].abs().sum() == 0


def test_p3o_micro_batch_split_keeps_loss_and_gradient() -> None:
    split_equals_whole(p3o, random_batch(5), cut=3)
    split_equals_whole(p3o, random_batch(6), cut=6, eps_low=0.05, eps_high=0.05)


def test_p3o_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="eps_low"):
        p3o(p3o_pair_inputs(), eps_low=-0.1)
    with pytest.raises(ValueError, match="eps_high"):
        p3o(p3o_pair_inputs(), eps_high=math.inf)
    inp = p3o_pair_inputs()
    inp.group_N = None
    with pytest.raises(ValueError, match="group_N"):
        p3o(inp)


# ---------------------------------------------------------------------------------------
# ETR
# ---------------------------------------------------------------------------------------


def test_etr_hand_computed_clip_ranges() -> None:
    # One group, rewards (1, 0): σ² = 1/4, u = 4σ² = 1 -> g = 1 + 0.5·(2·1 − 1) = 1.5.
    # row 0, A = 1.5: f = 1.5; ε_low = 0.3, ε_high = 0.2·1.5·1.5 = 0.45
    #   token 0: ρ = e^0.4 = 1.4918 > 1.45 -> clipped: J = 1.45·1.5 = 2.175 (ppo_clip: 1.8)
    #   token 1: ρ = e^0.3 = 1.3499 < 1.45 -> unclipped: J = 1.5·e^0.3, ∂(−J)/∂logp = −1.5·e^0.3
    # row 1, A = −0.3: f = 0.5; ε_low = 0.1, ε_high = 0.15
    #   token 0: ρ = e^−0.15 = 0.8607 < 0.9 -> clipped: J = 0.9·(−0.3) = −0.27
    #   token 1: padding
    inp = make(
        [[0.4, 0.3], [-0.15, 0.0]],
        old=[[0.0, 0.0], [0.0, 0.0]],
        mask=[[1.0, 1.0], [1.0, 0.0]],
        rewards=[1.0, 0.0],
        groups=[0, 0],
        adv=[1.5, -0.3],
    )
    out = etr(inp)
    valid = inp.mask_NT.bool()
    expected = torch.tensor([[-2.175, -1.5 * math.exp(0.3)], [0.27, 0.0]], dtype=torch.float64)
    assert torch.allclose(out.per_token_NT[valid], expected[valid], atol=1e-12)
    g = torch.autograd.grad((out.per_token_NT * inp.mask_NT).sum(), inp.logp_NT)[0]
    expected_g = torch.tensor([[0.0, -1.5 * math.exp(0.3)], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(g, expected_g, atol=1e-12)
    eps_high = out.stats_NT["etr/eps_high_mean"]
    assert eps_high[0, 0] == pytest.approx(0.45) and eps_high[1, 0] == pytest.approx(0.15)
    assert out.stats_NT["etr/eps_low_mean"][1, 0] == pytest.approx(0.1)
    assert out.stats_NT["clip_ratio/high_mean"][0].tolist() == [1.0, 0.0]
    assert out.stats_NT["clip_ratio/low_mean"][1, 0] == 1.0
    # ppo_clip on the same inputs clips token (0, 1) too: no gradient there
    g_ppo = torch.autograd.grad((ppo_clip(inp).per_token_NT * inp.mask_NT).sum(), inp.logp_NT)[0]
    assert g_ppo[0, 1] == 0.0


def test_etr_range_grows_with_abs_advantage_and_group_variance() -> None:
    # f = clamp(|A|, 0.5, 2): |A| = 0.2, 1, 3 -> ε_low = 0.1, 0.2, 0.4
    inp = make([[0.0]] * 3, rewards=[1.0, 0.0, 1.0], groups=[0, 1, 2], adv=[0.2, -1.0, 3.0])
    assert etr(inp).stats_NT["etr/eps_low_mean"][:, 0].tolist() == pytest.approx([0.1, 0.2, 0.4])
    # A = 1 everywhere (f = 1); g = 1 + 0.5·(2u − 1), u = 4σ² = 4p(1 − p):
    #   p = 1/2: u = 1, g = 1.5 -> ε_high 0.3;  p = 1/4: u = 3/4, g = 1.25 -> 0.25;
    #   p = 1: u = 0, g = 0.5 -> 0.1.   ε_low stays 0.2.
    rewards = [1.0, 0.0, 1.0, 0.0] + [1.0, 0.0, 0.0, 0.0] + [1.0] * 4
    inp = make([[0.0]] * 12, rewards=rewards, groups=[0] * 4 + [1] * 4 + [2] * 4, adv=[1.0] * 12)
    out = etr(inp)
    highs = out.stats_NT["etr/eps_high_mean"][::4, 0].tolist()
    assert highs == pytest.approx([0.3, 0.25, 0.1])
    assert out.stats_NT["etr/eps_low_mean"].unique().tolist() == pytest.approx([0.2])


def test_etr_with_unit_f_and_g_is_ppo_clip_exactly() -> None:
    gen = torch.Generator().manual_seed(7)
    logp = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = logp + (torch.rand(6, 5, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    kwargs = {
        "old": old,
        "mask": mask,
        "rewards": [1.0, 0.0, 1.0, 0.5, 0.0, 0.0],
        "groups": [0, 0, 0, 1, 1, 1],
        "adv": [1.3, -0.4, 0.9, 2.5, -1.0, -1.5],
    }
    for eps in ({"eps_low": 0.2, "eps_high": 0.28}, {"eps_low": 0.1, "eps_high": 0.1}):
        a, b = make(logp, **kwargs), make(logp, **kwargs)
        out_e = etr(a, adv_min=1.0, adv_max=1.0, kappa=0.0, **eps)
        out_p = ppo_clip(b, **eps)
        valid = mask.bool()
        assert torch.equal(out_e.per_token_NT[valid], out_p.per_token_NT[valid])
        ge = grad_of(token_mean(out_e.per_token_NT, a.mask_NT, a.norm), a)
        gp = grad_of(token_mean(out_p.per_token_NT, b.mask_NT, b.norm), b)
        assert torch.equal(ge, gp) and ge.abs().sum() > 0
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert torch.equal(out_e.stats_NT[key][valid], out_p.stats_NT[key][valid]), key
        assert out_p.stats_NT["clip_ratio/region_mean"][valid].sum() > 0  # some clipping


def test_etr_refuses_bad_parameters() -> None:
    inp = make([[0.0]] * 2, rewards=[1.0, 0.0], groups=[0, 0], adv=[1.0, -1.0])
    with pytest.raises(ValueError, match="kappa"):
        etr(inp, kappa=1.5)
    with pytest.raises(ValueError, match="adv_min"):
        etr(inp, adv_min=2.0, adv_max=1.0)
    with pytest.raises(ValueError, match="adv_min"):
        etr(inp, adv_min=0.0)
    with pytest.raises(ValueError, match="eps_low"):
        etr(inp, eps_low=-0.2)
    inp.rewards_N = None
    with pytest.raises(ValueError, match="rewards_N"):
        etr(inp)


# ---------------------------------------------------------------------------------------
# DaGRPO pair mask
# ---------------------------------------------------------------------------------------


def test_dagrpo_pairs_hand_computed_mask() -> None:
    # rewards (1.0, 0.95, 0.0), A = (1, 0.5, −1.5) (centered), τ = 0.1: pair (0, 1) masked.
    #   Ã_0 = [(1 − (−1.5))]/3 = 2.5/3;   Ã_1 = [(0.5 − (−1.5))]/3 = 2/3
    #   Ã_2 = [(−1.5 − 1) + (−1.5 − 0.5)]/3 = −4.5/3 = −1.5
    # ρ = 1 -> per_token = −Ã
    inp = make([[-1.0]] * 3, rewards=[1.0, 0.95, 0.0], groups=[0, 0, 0], adv=[1.0, 0.5, -1.5])
    out = dagrpo_pairs(inp)
    assert out.per_token_NT[:, 0].tolist() == pytest.approx([-2.5 / 3, -2 / 3, 1.5])
    assert out.stats["dagrpo/masked_pair_frac"] == pytest.approx(2 / 6)
    # pair_norm "kept": row 0 and 1 keep one partner, row 2 two -> Ã = (2.5, 2, −2.25)
    kept = dagrpo_pairs(inp, pair_norm="kept")
    assert kept.per_token_NT[:, 0].tolist() == pytest.approx([-2.5, -2.0, 2.25])
    # τ = 0: nothing masked -> Ã = A − mean A = A
    plain = dagrpo_pairs(inp, tau=0.0)
    assert plain.per_token_NT[:, 0].tolist() == pytest.approx([-1.0, -0.5, 1.5])
    assert plain.stats["dagrpo/masked_pair_frac"] == 0.0
    # gradient direction: better rows up (negative loss gradient), the worst down
    g = grad_of(out.per_token_NT.sum(), inp)
    assert g[0, 0] < 0 and g[1, 0] < 0 and g[2, 0] > 0


def test_dagrpo_pairs_with_distinct_pairs_is_grpo() -> None:
    # Distinct rewards (gaps > τ) and the registered grpo advantage: exactly ppo_clip with
    # A; with pair_norm "kept" every row keeps its G − 1 partners, so Ã = G/(G − 1)·A and
    # the loss is ppo_clip's × G/(G − 1) (the clip only depends on A's sign).
    gen = torch.Generator().manual_seed(11)
    logp = -torch.rand(8, 3, generator=gen, dtype=torch.float64)
    old = logp + (torch.rand(8, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    rewards = torch.tensor([0.0, 0.3, 0.7, 1.0, 0.2, 0.9, 0.5, 0.0], dtype=torch.float64)
    rewards[4:] = torch.tensor([0.2, 0.9, 0.5, 0.65], dtype=torch.float64)
    adv = grpo(rewards.view(2, 4)).flatten()
    kwargs = {"old": old, "rewards": rewards, "groups": [0] * 4 + [1] * 4, "adv": adv}
    ref = ppo_clip(make(logp, **kwargs)).per_token_NT
    out = dagrpo_pairs(make(logp, **kwargs), tau=0.1)
    assert out.stats["dagrpo/masked_pair_frac"] == 0.0
    assert torch.allclose(out.per_token_NT, ref, atol=1e-12)
    kept = dagrpo_pairs(make(logp, **kwargs), tau=0.1, pair_norm="kept")
    assert torch.allclose(kept.per_token_NT, ref * 4 / 3, atol=1e-12)


def test_dagrpo_pairs_identical_completions_mutual_pair_is_zero() -> None:
    # rows 0 and 1 are the same completion (same log-probs, reward 1), row 2 is wrong.
    # τ = 0.5 masks exactly their mutual pair; it contributed (A_0 − A_1) = 0, so the
    # loss and gradient are those of τ = 0.
    logp = [[-1.0, -0.5], [-1.0, -0.5], [-2.0, -1.0]]
    old = [[-1.1, -0.4], [-1.1, -0.4], [-1.8, -1.2]]
    rewards = [1.0, 1.0, 0.0]
    adv = grpo(torch.tensor([rewards])).flatten()
    a = make(logp, old=old, rewards=rewards, groups=[0, 0, 0], adv=adv)
    b = make(logp, old=old, rewards=rewards, groups=[0, 0, 0], adv=adv)
    masked, unmasked = dagrpo_pairs(a, tau=0.5), dagrpo_pairs(b, tau=0.0)
    # the stat counts only pairs that carry a term (A_i ≠ A_j): the tie is not one
    assert masked.stats["dagrpo/masked_pair_frac"] == 0.0
    assert torch.allclose(masked.per_token_NT, unmasked.per_token_NT, atol=1e-12)
    la, lb = total(masked, a), total(unmasked, b)
    assert torch.allclose(grad_of(la, a), grad_of(lb, b), atol=1e-12)


def test_dagrpo_pairs_nan_reward_never_masks() -> None:
    # row 2 is unscorable (A = 0 from grpo): its pairs stay, so with τ large enough to mask
    # every scored pair, Ã_0 = (A_0 − A_2)/3 = A_0/3.
    inp = make([[-1.0]] * 3, rewards=[1.0, 0.0, float("nan")], groups=[0] * 3, adv=[0.7, -0.7, 0])
    out = dagrpo_pairs(inp, tau=5.0)
    assert out.per_token_NT[:, 0].tolist() == pytest.approx([-0.7 / 3, 0.7 / 3, 0.0])


def test_dagrpo_pairs_micro_batch_split_keeps_loss_and_gradient() -> None:
    split_equals_whole(dagrpo_pairs, random_batch(8), cut=3)
    split_equals_whole(dagrpo_pairs, random_batch(9), cut=6, tau=0.6, pair_norm="kept")


def test_dagrpo_pairs_refuses_bad_parameters() -> None:
    inp = make([[0.0]] * 2, rewards=[1.0, 0.0], groups=[0, 0], adv=[1.0, -1.0])
    with pytest.raises(ValueError, match="tau"):
        dagrpo_pairs(inp, tau=-1.0)
    with pytest.raises(ValueError, match="pair_norm"):
        dagrpo_pairs(inp, pair_norm="batch")
    inp.adv_N = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="per completion"):
        dagrpo_pairs(inp)


# ---------------------------------------------------------------------------------------
# Recipes: each trains 2 steps on the tiny model.
# ---------------------------------------------------------------------------------------


def graded(prompts, completions, **kw):
    """1 for a leading digit, 0.5 for any digit later, else 0: three reward levels."""
    out = []
    for c in completions:
        out.append(1.0 if c[:1].isdigit() else 0.5 if any(ch.isdigit() for ch in c) else 0.0)
    return out


@pytest.mark.parametrize("name", ["trpa", "p3o", "etr", "dagrpo_pairs"])
def test_recipe_trains(tmp_path, tiny_model_dir, name) -> None:
    from grouprl.training.trainer import Trainer

    cfg = base_config(tmp_path / name, tiny_model_dir, max_steps=2, micro_batch_size=4)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)  # let the recipe decide
    cfg["recipe"] = name
    cfg["train"]["num_iterations"] = 2  # π_old ≠ π_θ on the second pass (trust regions)
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[graded])
    res = tr.train()
    assert res.steps == 2
    last = res.history[-1]
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    assert last.get("train/skipped_updates", 0) == 0
