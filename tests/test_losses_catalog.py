"""Hand-computed checks of the catalog losses: GSPO, CISPO, REC, OPMD, DHPO, DisCO, DRPO,
Reg-GRPO (values, gradients, stats, edge cases, micro-batch invariance)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from grouprl.algorithms import AGGREGATIONS, LOSSES
from grouprl.algorithms.losses import (
    cispo,
    dhpo,
    disco,
    drpo,
    gspo,
    opmd,
    ppo_clip,
    rec,
    reg_grpo,
    reinforce,
)
from grouprl.algorithms.types import BatchNorm, PolicyInputs

F64 = torch.float64
NAN = math.nan


def t(values, dtype=F64) -> Tensor:
    return torch.tensor(values, dtype=dtype)


def rows(ratios: list[float], advs: list[float]) -> tuple[PolicyInputs, Tensor]:
    """One token per row with old logp 0, so ρ = exp(logp) is the given ratio."""
    logp = t([[math.log(r)] for r in ratios]).requires_grad_(True)
    inp = PolicyInputs(logp, torch.zeros_like(logp), torch.ones_like(logp), t(advs))
    return inp, logp


def grad_of(value: Tensor, logp: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value, logp)
    return grad


def norm(num_tokens=1.0, num_seqs=1.0, max_len=1.0, num_groups=1.0) -> BatchNorm:
    return BatchNorm(float(num_tokens), float(num_seqs), float(max_len), float(num_groups))


def test_registered_with_attributes() -> None:
    for name, fn in {
        "gspo": gspo,
        "cispo": cispo,
        "rec": rec,
        "opmd": opmd,
        "dhpo": dhpo,
        "disco": disco,
        "drpo": drpo,
        "reg_grpo": reg_grpo,
    }.items():
        assert LOSSES.get(name) is fn
    caps = {name: LOSSES.capabilities(name) for name in LOSSES}
    assert [n for n, c in caps.items() if c.whole_groups] == [
        "dagrpo_pairs",
        "disco",
        "drpo",
        "etr",
        "p3o",
        "reg_grpo",
        "trpa",
    ]
    # reg_grpo's ratio is to pi_old by default; ratio_to="ref" uses a reference a kl loads;
    # TRPA's scores are relative to the reference policy
    assert [n for n, c in caps.items() if c.needs_ref] == ["trpa"]
    LOSSES.check_params("disco", {"tau": 5.0, "score": "Lratio", "kl_scope": "group"})
    LOSSES.check_params("dhpo", {"w": 0.3, "seq_eps_high": 1e-3})


# ---------------------------------------------------------------------------------------
# GSPO
# ---------------------------------------------------------------------------------------


def gspo_inputs() -> tuple[PolicyInputs, Tensor]:
    # row 0: log ρ = [0.1, 0.3] -> mean 0.2, s = e^0.2 = 1.2214028; A = +1
    # row 1: log ρ = [-0.1, (pad)] -> one valid token, s = e^-0.1 = 0.9048374; A = -2
    # The padded slot holds NaN: it must not reach values or gradients.
    logp = t([[0.1, 0.3], [-0.1, NAN]]).requires_grad_(True)
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    return PolicyInputs(logp, torch.zeros(2, 2, dtype=F64), mask, t([1.0, -2.0])), logp


def test_gspo_sequence_ratio_values_gradients_stats() -> None:
    inp, logp = gspo_inputs()
    out = gspo(inp, eps_low=0.2, eps_high=0.2)
    # row 0: s = 1.2214 > 1.2 and A > 0 -> J = 1.2 at each token, clipped, gradient 0
    # row 1: s = 0.9048 inside [0.8, 1.2] -> J = s·A = -1.8096748 at the valid token;
    #        d(-J)/dlogp_t = -A·s = 1.8096748
    s1 = math.exp(-0.1)
    per = out.per_token_NT
    torch.testing.assert_close(per[0], t([-1.2, -1.2]))
    assert per[1, 0].item() == pytest.approx(2 * s1)
    grad = grad_of((per * inp.mask_NT).sum(), logp)
    torch.testing.assert_close(grad, t([[0.0, 0.0], [2 * s1, 0.0]]))
    assert out.stats_NT["clip_ratio/high_mean"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert out.stats_NT["clip_ratio/low_mean"].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert out.stats_NT["clip_ratio/region_mean"].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_gspo_default_tiny_clip_range() -> None:
    # Defaults ε = 3e-4 / 4e-4: s = 1.2214 (A>0) clipped high; s = 0.9048 (A<0) clipped
    # low: J = min(s·A, 0.9997·A) = min(-1.8097, -1.9994) = -1.9994, constant.
    inp, logp = gspo_inputs()
    out = gspo(inp)
    assert out.per_token_NT[1, 0].item() == pytest.approx(2 * 0.9997)
    torch.testing.assert_close(
        grad_of((out.per_token_NT * inp.mask_NT).sum(), logp), t([[0.0, 0.0], [0.0, 0.0]])
    )
    # (stats are per token; padding is removed by the trainer's masked mean)
    low = out.stats_NT["clip_ratio/low_mean"] * inp.mask_NT
    assert low.tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_gspo_token_gradient_is_sequence_gradient() -> None:
    # Summing the per-token GSPO loss of a row over its L tokens with weight 1/L (the
    # seq-mean) gives -∇J_i = -A·s·mean_t ∇logπ_t: with s = e^0.2 (ε large, no clip) and
    # A = 1, d/dlogp_t of (1/2)Σ_t per_token = -s/2 = -0.6107014 for both tokens.
    logp = t([[0.1, 0.3]]).requires_grad_(True)
    inp = PolicyInputs(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), t([1.0]))
    per = gspo(inp, eps_low=1.0, eps_high=1.0).per_token_NT
    grad = grad_of(per.mean(), logp)
    torch.testing.assert_close(grad, t([[-math.exp(0.2) / 2] * 2]))


# ---------------------------------------------------------------------------------------
# A toy policy for gradient identities.
# ---------------------------------------------------------------------------------------


class Toy:
    """logits = features @ W for N rows of T tokens; B = N / G groups of G contiguous rows."""

    def __init__(self, dtype=torch.float32, seed=0, B=4, G=3, T=5, lengths=None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.N, self.T, self.G, self.B = B * G, T, G, B
        D, V = 4, 7
        self.feats = torch.randn(self.N, T, D, generator=g, dtype=dtype)
        self.tokens = torch.randint(0, V, (self.N, T), generator=g)
        self.W = torch.randn(D, V, generator=g, dtype=dtype, requires_grad=True)
        lengths = lengths or [5, 1, 3, 0, 4, 2, 5, 3, 2, 4, 1, 5][: self.N]
        self.mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)
        self.group = torch.arange(B).repeat_interleave(G)
        self.adv = torch.randn(self.N, generator=g, dtype=dtype)
        # groups: mixed (1, 0, 1), all wrong, mixed (1, 0, 0), all right but one NaN
        self.rewards = torch.tensor(
            [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, NAN][: self.N], dtype=dtype
        )
        with torch.no_grad():
            base = self.logp(self.W)
            self.old = base + 0.4 * torch.randn(self.N, T, generator=g, dtype=dtype)
            self.ref = base + 0.4 * torch.randn(self.N, T, generator=g, dtype=dtype)

    def logp(self, W: Tensor, rows: slice = slice(None)) -> Tensor:
        logits = self.feats[rows] @ W
        return torch.log_softmax(logits, -1).gather(-1, self.tokens[rows, :, None]).squeeze(-1)

    def norm(self, max_len: int = 8) -> BatchNorm:
        return BatchNorm.of(self.mask, max_len, num_groups=self.B)

    def inputs(self, rows: slice = slice(None), on_policy: bool = False, **kw) -> PolicyInputs:
        logp = self.logp(self.W, rows)
        return PolicyInputs(
            logp_NT=logp,
            old_logp_NT=logp.detach() if on_policy else self.old[rows],
            mask_NT=self.mask[rows],
            adv_N=self.adv[rows],
            ref_logp_NT=self.ref[rows],
            rewards_N=self.rewards[rows],
            group_N=self.group[rows],
            norm=self.norm(),
            **kw,
        )


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_gspo_on_policy_equals_sequence_mean_reinforce(aggregation: str) -> None:
    # π_old = π_θ: every s_i = 1 and the GSPO gradient is Σ_i A_i·mean_t ∇logπ_{i,t} (seq
    # mean) — REINFORCE's gradient under the same aggregation; no sequence counts as clipped.
    toy = Toy(seed=1)
    agg = AGGREGATIONS.get(aggregation)
    inp = toy.inputs(on_policy=True)
    out = gspo(inp)
    (g_gspo,) = torch.autograd.grad(agg(out.per_token_NT, inp.mask_NT, toy.norm()), toy.W)
    inp = toy.inputs(on_policy=True)
    (g_pg,) = torch.autograd.grad(agg(reinforce(inp).per_token_NT, inp.mask_NT, toy.norm()), toy.W)
    assert g_pg.abs().max() > 1e-3
    torch.testing.assert_close(g_gspo, g_pg, atol=1e-6, rtol=1e-6)
    assert all(v.sum() == 0 for v in out.stats_NT.values())


# ---------------------------------------------------------------------------------------
# CISPO
# ---------------------------------------------------------------------------------------


def test_cispo_detached_truncated_weight() -> None:
    # ε_low = 10 (no lower bound), ε_high = 0.2: w = sg(min(ρ, 1.2))
    # row 0: ρ = 1.5, A = +1: w = 1.2 -> loss grad -w·A = -1.2 (PPO would give 0 here)
    # row 1: ρ = 0.5, A = -1: w = 0.5 -> grad +0.5 (PPO: 0, clipped low)
    # row 2: ρ = 1.1, A = +2: w = 1.1 -> grad -2.2
    inp, logp = rows([1.5, 0.5, 1.1], [1.0, -1.0, 2.0])
    out = cispo(inp)
    # per_token = -w·A·logp = [-1.2·log1.5, 0.5·log0.5, -2.2·log1.1]
    expected = t([[-1.2 * math.log(1.5)], [0.5 * math.log(0.5)], [-2.2 * math.log(1.1)]])
    torch.testing.assert_close(out.per_token_NT, expected)
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), t([[-1.2], [0.5], [-2.2]]))
    assert out.stats_NT["clip_ratio/high_mean"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert out.stats_NT["clip_ratio/low_mean"][:, 0].tolist() == [0.0, 0.0, 0.0]
    # with ε_low = 0.2 the ρ = 0.5 weight is raised to 0.8 -> grad +0.8, low stat set
    low = cispo(inp, eps_low=0.2)
    assert grad_of(low.per_token_NT.sum(), logp)[1, 0].item() == pytest.approx(0.8)
    assert low.stats_NT["clip_ratio/low_mean"][:, 0].tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------
# REC and OPMD
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ratios", "advs", "in_range"),
    [
        # two-side: in range iff 0.8 <= ρ <= 1.2, whatever A
        ("two-side", [1.5, 0.5, 1.1, 0.7], [1.0, 1.0, -1.0, -1.0], [0, 0, 1, 0]),
        # one-side: out iff (A>0, ρ>1.2) or (A<0, ρ<0.8): ρ=0.5 with A>0 stays in
        ("one-side", [1.5, 0.5, 1.1, 0.7], [1.0, 1.0, -1.0, -1.0], [0, 1, 1, 0]),
        # A = 0 is in range on both sides (its term is 0 anyway; only the stats see it)
        ("one-side", [1.5, 0.5], [0.0, 0.0], [1, 1]),
        # ring (ε' = 0.6, 2): also in if (A>=0, ρ<=0.4) or (A<=0, ρ>=3)
        ("ring", [0.3, 0.5, 3.5, 1.5], [1.0, 1.0, -1.0, -1.0], [1, 0, 1, 0]),
        ("none", [0.3, 0.5, 3.5, 1.5], [1.0, 1.0, -1.0, -1.0], [1, 1, 1, 1]),
    ],
)
def test_rec_masks_gradient_outside_range(mode, ratios, advs, in_range) -> None:
    inp, logp = rows(ratios, advs)
    out = rec(inp, clip_mode=mode)
    keep = t([[float(k)] for k in in_range])
    a = t([[x] for x in advs])
    # per_token = -A·logp·1[in]; its gradient -A·1[in] (the ratio is only a mask)
    torch.testing.assert_close(out.per_token_NT, -a * logp.detach() * keep)
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), -a * keep)
    region = out.stats_NT["clip_ratio/region_mean"][:, 0].tolist()
    assert region == [1.0 - k for k in in_range]
    high = out.stats_NT["clip_ratio/high_mean"][:, 0].tolist()
    assert high == [float(k == 0 and r > 1) for k, r in zip(in_range, ratios, strict=True)]


def test_rec_asymmetric_range() -> None:
    # eps_low = 0.4, eps_high = 0.1: range [0.6, 1.1]; ρ = [0.7, 1.15], A = [1, 1]
    # two-side: ρ = 0.7 in, 1.15 out -> grads [-1, 0]
    inp, logp = rows([0.7, 1.15], [1.0, 1.0])
    out = rec(inp, eps_low=0.4, eps_high=0.1)
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), t([[-1.0], [0.0]]))
    # ring with ε′_low = 0.25: ρ = 0.7 <= 0.75 with A >= 0 is also in; ρ = 1.15 stays out
    inp, logp = rows([0.7, 1.15], [1.0, -1.0])
    out = rec(inp, eps_low=0.1, eps_high=0.1, clip_mode="ring", eps_low_prime=0.25)
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), t([[-1.0], [0.0]]))


def test_opmd() -> None:
    # per_token = -A·logp/(1+τ), τ = 1: A = [2, -1], logp = [-0.5, -2] -> [0.5, -1];
    # gradient -A/2 = [-1, 0.5]
    logp = t([[-0.5], [-2.0]]).requires_grad_(True)
    inp = PolicyInputs(logp, logp.detach(), torch.ones(2, 1, dtype=F64), t([2.0, -1.0]))
    out = opmd(inp)
    torch.testing.assert_close(out.per_token_NT, t([[0.5], [-1.0]]))
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), t([[-1.0], [0.5]]))
    # τ = 3 -> a quarter of the REINFORCE gradient
    torch.testing.assert_close(
        grad_of(opmd(inp, tau=3.0).per_token_NT.sum(), logp), t([[-0.5], [0.25]])
    )


# ---------------------------------------------------------------------------------------
# DHPO
# ---------------------------------------------------------------------------------------


def test_dhpo_mixed_ratio_hand_computed() -> None:
    # log ρ = [0.1, 0.3]: ρ = [1.1051709, 1.3498588], s = e^0.2 = 1.2214028, w = 0.5, A = +1
    # clipped mix: 0.5·clip(ρ, .8, 1.2) + 0.5·clip(s, 0.9997, 1.0004)
    #   = [0.5·1.1051709 + 0.5·1.0004, 0.5·1.2 + 0.5·1.0004] = [1.0527855, 1.1002]
    # unclipped mix [1.1632868, 1.2856308] is larger: the min takes the clipped mix.
    # dJ/dlogp: token 0 = 0.5·ρ_0 = 0.5525855 (its ρ is inside; s is clipped -> 0);
    #           token 1 = 0 (both ratios clipped).
    logp = t([[0.1, 0.3]]).requires_grad_(True)
    inp = PolicyInputs(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), t([1.0]))
    out = dhpo(inp, mix="ratio")
    torch.testing.assert_close(out.per_token_NT, t([[-1.0527854590378238, -1.1002]]))
    torch.testing.assert_close(
        grad_of(out.per_token_NT.sum(), logp), t([[-0.5525854590378239, 0.0]])
    )
    assert out.stats_NT["clip_ratio/high_mean"].tolist() == [[1.0, 1.0]]


def test_dhpo_objective_mix_differs_from_the_ratio_mix() -> None:
    # log ρ = [−0.3, 0.5]: ρ = [0.7408182, 1.6487213]; s = e^0.1 = 1.1051709; A = +1, w = 0.5
    # J_tok = min(ρ, clip(ρ, .8, 1.2)) = [0.7408182, 1.2]; J_seq = min(s, 1.0004) = 1.0004
    # objective mix: 0.5·J_tok + 0.5·J_seq = [0.8706091, 1.1002]
    # ratio mix (the old build) takes min(ρ̄, ρ̂) = [0.9002, 1.1002] at token 0: they differ
    # gradient (objective): token 0 = 0.5·ρ_0 = 0.3704091 (s clipped -> 0); token 1 = 0
    logp = t([[-0.3, 0.5]]).requires_grad_(True)
    inp = PolicyInputs(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), t([1.0]))
    out = dhpo(inp, mix="objective")
    rho0 = math.exp(-0.3)
    torch.testing.assert_close(out.per_token_NT, t([[-(0.5 * rho0 + 0.5 * 1.0004), -1.1002]]))
    torch.testing.assert_close(grad_of(out.per_token_NT.sum(), logp), t([[-0.5 * rho0, 0.0]]))
    default = dhpo(inp)  # mix: ratio, the abstract's single clipped surrogate
    torch.testing.assert_close(default.per_token_NT.detach(), t([[-0.9002, -1.1002]]))
    assert out.stats_NT["dhpo/seq_clipped"].tolist() == [[1.0, 1.0]]


def test_dhpo_entropy_weight_is_row_local() -> None:
    # row entropies [0.5, 1, 2]: 80th percentile 1 + 0.6·(2 − 1) = 1.6, w_t = H/1.6 capped
    # at 1 = [0.3125, 0.625, 1]. log ρ = [0.5, 0, 0], A = 1: J_tok = [min(1.6487, 1.2), 1, 1]
    # = [1.2, 1, 1]; s = e^(0.5/3) = 1.18 -> J_seq = 1.0004 (clipped) at every token
    # J = w·J_tok + (1 − w)·J_seq = [0.375 + 0.687775, 0.625 + 0.37515, 1]
    logp = t([[0.5, 0.0, 0.0]]).requires_grad_(True)
    H = t([[0.5, 1.0, 2.0]])
    inp = PolicyInputs(
        logp, torch.zeros(1, 3, dtype=F64), torch.ones(1, 3, dtype=F64), t([1.0]), entropy_NT=H
    )
    out = dhpo(inp, w_mode="entropy", mix="objective")
    torch.testing.assert_close(out.per_token_NT, t([[-1.062775, -1.00015, -1.0]]))
    # rows are independent: the same row beside another gives the same term
    two = PolicyInputs(
        torch.cat([logp.detach(), torch.zeros(1, 3, dtype=F64)]),
        torch.zeros(2, 3, dtype=F64),
        torch.ones(2, 3, dtype=F64),
        t([1.0, 1.0]),
        entropy_NT=torch.cat([H, t([[9.0, 0.1, 0.2]])]),
    )
    torch.testing.assert_close(
        dhpo(two, w_mode="entropy", mix="objective").per_token_NT[0], out.per_token_NT[0].detach()
    )
    with pytest.raises(ValueError, match="needs entropy_NT"):
        dhpo(
            PolicyInputs(logp, logp.detach(), torch.ones(1, 3, dtype=F64), t([1.0])),
            w_mode="entropy",
        )
    with pytest.raises(ValueError, match="mix must be"):
        dhpo(inp, mix="both")


@pytest.mark.parametrize("mix", ["objective", "ratio"])
@pytest.mark.parametrize("w", [0.0, 1.0])
def test_dhpo_end_points_are_gspo_and_ppo(w: float, mix: str) -> None:
    toy = Toy(dtype=F64, seed=3)
    inp = toy.inputs()
    mixed = dhpo(inp, w=w, eps_low=0.1, eps_high=0.3, seq_eps_low=0.05, seq_eps_high=0.02, mix=mix)
    if w == 1.0:
        ref = ppo_clip(inp, eps_low=0.1, eps_high=0.3)
    else:
        ref = gspo(inp, eps_low=0.05, eps_high=0.02)
    m = inp.mask_NT
    torch.testing.assert_close(mixed.per_token_NT * m, ref.per_token_NT * m)
    (g_mixed,) = torch.autograd.grad((mixed.per_token_NT * m).sum(), toy.W, retain_graph=True)
    (g_ref,) = torch.autograd.grad((ref.per_token_NT * m).sum(), toy.W)
    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g_mixed, g_ref)
    if mix == "ratio" or w == 1.0:  # objective mode reports the token branch's clipping
        for key in ref.stats_NT:
            torch.testing.assert_close(mixed.stats_NT[key] * m, ref.stats_NT[key] * m)


# ---------------------------------------------------------------------------------------
# Shared per-token checks: token weights, zero advantages, empty masks.
# ---------------------------------------------------------------------------------------

PER_TOKEN = {
    "gspo": lambda inp: gspo(inp, eps_low=0.5, eps_high=0.5),
    "cispo": cispo,
    "rec": lambda inp: rec(inp, clip_mode="none"),
    "opmd": opmd,
    "dhpo": lambda inp: dhpo(inp, eps_low=0.5, eps_high=0.5, seq_eps_low=0.5, seq_eps_high=0.5),
}


@pytest.mark.parametrize("name", sorted(PER_TOKEN))
def test_token_weights_multiply_the_objective(name: str) -> None:
    toy = Toy(dtype=F64, seed=4)
    weights = torch.ones(toy.N, toy.T, dtype=F64)
    weights[:, 0] = 0.0  # dropped tokens
    weights[:, 1] = 2.0  # upweighted tokens
    plain = PER_TOKEN[name](toy.inputs())
    weighted = PER_TOKEN[name](toy.inputs(token_weight_NT=weights))
    torch.testing.assert_close(weighted.per_token_NT, plain.per_token_NT * weights)
    # a token of weight 0 gets no gradient from its own term
    logp = toy.logp(toy.W).detach().requires_grad_(True)
    inp = PolicyInputs(logp, toy.old, toy.mask, toy.adv, token_weight_NT=weights)
    grad = grad_of((PER_TOKEN[name](inp).per_token_NT * toy.mask).sum(), logp)
    assert torch.equal(grad[:, 0], torch.zeros(toy.N, dtype=F64))
    assert grad[:, 1].abs().max() > 0


@pytest.mark.parametrize("name", sorted(PER_TOKEN))
def test_zero_advantages_and_empty_masks(name: str) -> None:
    logp = t([[-0.5, NAN], [-1.0, -2.0]]).requires_grad_(True)
    mask = t([[0.0, 0.0], [1.0, 1.0]])  # row 0 empty, with NaN padding
    old = t([[NAN, NAN], [-1.1, -1.5]])
    inp = PolicyInputs(logp, old, mask, torch.zeros(2, dtype=F64))
    out = PER_TOKEN[name](inp)
    assert torch.isfinite(out.per_token_NT).all()
    agg = AGGREGATIONS.get("token_mean")(out.per_token_NT, mask, norm(num_tokens=2))
    assert agg.item() == 0.0
    assert torch.equal(grad_of(agg, logp), torch.zeros(2, 2, dtype=F64))


# ---------------------------------------------------------------------------------------
# DisCO
# ---------------------------------------------------------------------------------------


def disco_group(logps, rewards, old=None, groups=None, **norm_kw):
    """One token per row (unless lists of lists are given)."""
    lp = [[x] for x in logps] if not isinstance(logps[0], list) else logps
    logp = t(lp).requires_grad_(True)
    old_t = logp.detach().clone() if old is None else t(old)
    group = torch.zeros(len(lp), dtype=torch.long) if groups is None else torch.tensor(groups)
    inp = PolicyInputs(
        logp,
        old_t,
        torch.ones_like(logp),
        torch.zeros(len(lp), dtype=F64),
        rewards_N=t(rewards),
        group_N=group,
        norm=norm(**{"num_tokens": logp.numel(), "num_seqs": len(lp), **norm_kw}),
    )
    return inp, logp


def test_disco_hand_computed() -> None:
    # One group, s = logp (one token each) = [-1, -2, -0.5, -3], rewards [1, 0, 1, 0].
    # pos mean = -0.75; τ = 10: τ·log mean(e^{-0.2}, e^{-0.3}) = 10·log(0.7797745) = -2.4875052
    # J = -0.75 + 2.4875052 = 1.7375052; on-policy KL = 0 -> no penalty; loss = -J / B.
    # d(-J)/ds: positives -1/2 each; negatives softmax(s/τ) = [0.5249792, 0.4750208]
    inp, logp = disco_group([-1.0, -2.0, -0.5, -3.0], [1.0, 0.0, 1.0, 0.0])
    out = disco(inp)
    assert out.aggregated.item() == pytest.approx(-1.7375052048637443)
    assert torch.equal(out.per_token_NT, torch.zeros(4, 1, dtype=F64))
    torch.testing.assert_close(
        grad_of(out.aggregated, logp), t([[-0.5], [0.52497918747894], [-0.5], [0.47502081252106]])
    )
    assert out.stats["disco/kl"] == 0.0 and out.stats["disco/kl_penalty"] == 0.0
    assert out.stats["disco/valid_group_frac"] == 1.0
    # the whole batch has B = 4 prompt groups: everything is divided by 4
    inp4, logp4 = disco_group([-1.0, -2.0, -0.5, -3.0], [1.0, 0.0, 1.0, 0.0], num_groups=4)
    out4 = disco(inp4)
    assert out4.aggregated.item() == pytest.approx(-1.7375052048637443 / 4)
    assert grad_of(out4.aggregated, logp4)[0, 0].item() == pytest.approx(-0.125)


def test_disco_two_completions_and_lratio() -> None:
    # G = 2, one positive one negative: τ·log mean exp(s_neg/τ) = s_neg, J = s+ − s− = 1
    inp, logp = disco_group([-1.0, -2.0], [1.0, 0.0])
    out = disco(inp)
    assert out.aggregated.item() == pytest.approx(-1.0)
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[-1.0], [1.0]]))
    # Lratio: s = ρ (one token, old = 0): ρ = [1.5, 1.0, 0.8, 1.2], rewards [1, 0, 1, 0]
    # J = (1.5 + 0.8)/2 − 10·log((e^0.1 + e^0.12)/2); ds/dlogp = ρ.
    # k1 KL = mean(−log ρ) = −0.0911608 < δ -> no penalty.
    ratios = [1.5, 1.0, 0.8, 1.2]
    inp, logp = disco_group([math.log(r) for r in ratios], [1.0, 0.0, 1.0, 0.0], old=[[0.0]] * 4)
    out = disco(inp, score="Lratio")
    e1, e2 = math.exp(0.1), math.exp(0.12)
    assert out.aggregated.item() == pytest.approx(-(1.15 - 10 * math.log((e1 + e2) / 2)))
    expected = [-0.5 * 1.5, e1 / (e1 + e2) * 1.0, -0.5 * 0.8, e2 / (e1 + e2) * 1.2]
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[g] for g in expected]))


def test_disco_groups_without_both_kinds_contribute_zero() -> None:
    # group 0 all correct, group 1 all wrong, group 2 = (NaN, 1, 0.5 -> negative at
    # threshold 0.5): only group 2 counts; G = 2 there: J = s(row 4) − s(row 5) = -1 - -3 = 2
    inp, logp = disco_group(
        [-1.0, -2.0, -0.5, -3.0, -1.0, -3.0, -2.0],
        [1.0, 1.0, 0.0, 0.0, 1.0, 0.5, NAN],
        groups=[0, 0, 1, 1, 2, 2, 2],
        num_groups=3,
    )
    out = disco(inp)
    assert out.aggregated.item() == pytest.approx(-2.0 / 3)
    grad = grad_of(out.aggregated, logp)
    torch.testing.assert_close(grad, t([[0.0], [0.0], [0.0], [0.0], [-1 / 3], [1 / 3], [0.0]]))
    assert out.stats["disco/valid_group_frac"] == pytest.approx(1 / 3)
    # all-equal rewards: 0 and no gradient, no NaN
    inp, logp = disco_group([-1.0, -2.0], [1.0, 1.0])
    out = disco(inp)
    assert out.aggregated.item() == 0.0
    assert torch.equal(grad_of(out.aggregated, logp), torch.zeros(2, 1, dtype=F64))
    # a lower threshold turns the 0.5 reward positive: group 2 = (1, 0.5) has no negative
    inp, _ = disco_group([-1.0, -3.0], [1.0, 0.5])
    assert disco(inp, threshold=0.2).aggregated.item() == 0.0


def test_disco_empty_completion_is_finite() -> None:
    # an empty completion (mask all 0, NaN log-probs) scores s = 0
    logp = t([[-1.0, -1.0], [NAN, NAN]]).requires_grad_(True)
    inp = PolicyInputs(
        logp,
        t([[-1.0, -1.0], [NAN, NAN]]),
        t([[1.0, 1.0], [0.0, 0.0]]),
        torch.zeros(2, dtype=F64),
        rewards_N=t([0.0, 1.0]),
        group_N=torch.tensor([0, 0]),
        norm=norm(num_tokens=2, num_seqs=2),
    )
    out = disco(inp)
    # J = s+ − s− = 0 − (−1) = 1; grad on the negative's tokens: +1/2 each
    assert out.aggregated.item() == pytest.approx(-1.0)
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[0.5, 0.5], [0.0, 0.0]]))


def test_disco_kl_penalty_hand_computed() -> None:
    # no valid group (all correct): only the penalty. x = logπ − logπ_old = [-0.01, -0.03]
    # k1: KL = mean(-x) = 0.02; w = 1e3·(0.02 − 1e-4) = 19.9; penalty = w·KL = 0.398
    #     gradient w·dKL/dlogp = 19.9·(−1/2) = −9.95 per token
    inp, logp = disco_group([[-0.01, -0.03]], [1.0], old=[[0.0, 0.0]])
    out = disco(inp)
    assert out.aggregated.item() == pytest.approx(0.398)
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[-9.95, -9.95]]))
    assert out.stats["disco/kl"] == pytest.approx(0.02)
    assert out.stats["disco/kl_weight"] == pytest.approx(19.9)
    assert out.stats["disco/kl_penalty"] == pytest.approx(0.398)
    # k3: k = e^x − 1 − x = [4.98337e-5, 4.455335e-4], KL = 2.476836e-4,
    #     w = 1e3·(KL − 1e-4) = 0.1476836, penalty = 3.657883e-5, grad w·(e^x − 1)/2
    out = disco(inp, kl_estimator="k3")
    assert out.aggregated.item() == pytest.approx(3.657882501795718e-05)
    w = 0.1476836488381302
    expected = t([[w * (math.exp(-0.01) - 1) / 2, w * (math.exp(-0.03) - 1) / 2]])
    torch.testing.assert_close(grad_of(out.aggregated, logp), expected)
    # KL below δ: no penalty at all
    inp, _ = disco_group([[-0.00001, -0.00001]], [1.0], old=[[0.0, 0.0]])
    assert disco(inp).aggregated.item() == 0.0


def test_disco_kl_scopes() -> None:
    # group 0: x = -0.02 -> k1 KL 0.02; group 1: x = +0.01 -> KL -0.01 (one token each)
    # "group": w0 = 1e3·(0.02 − 1e-4) = 19.9, w1 = max(0, 1e3·(−0.0101)) = 0
    #          penalty = (19.9·0.02 + 0)/B = 0.398/2 = 0.199
    # "micro_batch": KL = (0.02 − 0.01)/2 = 0.005, w = 4.9, penalty = 4.9·0.01/2 = 0.0245
    inp, _ = disco_group([-0.02, 0.01], [1.0, 1.0], old=[[0.0], [0.0]], groups=[0, 1], num_groups=2)
    assert disco(inp, kl_scope="group").aggregated.item() == pytest.approx(0.199)
    assert disco(inp, kl_scope="micro_batch").aggregated.item() == pytest.approx(0.0245)
    # micro_batch scope divides the seen tokens' KL sum by the whole batch's token count
    inp.norm = norm(num_tokens=8, num_groups=2)
    assert disco(inp).aggregated.item() == pytest.approx(4.9 * 0.01 / 8)


def test_disco_validation() -> None:
    inp, _ = disco_group([-1.0, -2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="score"):
        disco(inp, score="logl")
    with pytest.raises(ValueError, match="kl_scope"):
        disco(inp, kl_scope="batch")
    with pytest.raises(ValueError, match="tau"):
        disco(inp, tau=0.0)
    with pytest.raises(ValueError, match="num_groups"):
        disco(replace(inp, norm=None))
    with pytest.raises(ValueError, match="rewards_N"):
        disco(replace(inp, rewards_N=None))
    with pytest.raises(ValueError, match="group_N"):
        disco(replace(inp, group_N=None))


# ---------------------------------------------------------------------------------------
# DRPO
# ---------------------------------------------------------------------------------------


def test_drpo_length_weights_hand_computed() -> None:
    # L_max = 8. Positives: row 0 (L=2), row 1 (L=4); negative: row 2 (L=1).
    # w ∝ exp((1 − L/8)/0.1) = [e^7.5, e^5] -> w̄ = [1/(1+e^-2.5), 1/(1+e^2.5)]
    #   = [0.9241418, 0.0758582]; one negative: τ·log mean exp = s_neg.
    # s = mean logp = [-1, -2, -3]: J = 0.9241418·(−1) + 0.0758582·(−2) + 3 = 1.9241418
    # d(−J)/dlogp_t = −w̄_i/L_i: row 0 −0.4620709, row 1 −0.0189645; negative +1/1
    logp = t([[-1.0, -1.0, 0, 0], [-2.0, -2.0, -2.0, -2.0], [-3.0, 0, 0, 0]]).requires_grad_(True)
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    inp = PolicyInputs(
        logp,
        logp.detach(),
        mask,
        torch.zeros(3, dtype=F64),
        rewards_N=t([1.0, 1.0, 0.0]),
        group_N=torch.tensor([7, 7, 7]),
        norm=norm(num_tokens=7, num_seqs=3, max_len=8, num_groups=1),
    )
    w0, w1 = 0.9241418199787566, 0.07585818002124355
    out = drpo(inp)
    assert out.aggregated.item() == pytest.approx(-(w0 * -1 + w1 * -2 + 3))
    expected = t([[-w0 / 2] * 2 + [0, 0], [-w1 / 4] * 4, [1.0, 0, 0, 0]])
    torch.testing.assert_close(grad_of(out.aggregated, logp), expected)
    assert "drpo/kl_penalty" in out.stats


def test_drpo_equal_lengths_is_disco() -> None:
    toy = Toy(dtype=F64, seed=5, lengths=[3] * 12)
    d = drpo(toy.inputs(), kl_scope="group")
    c = disco(toy.inputs(), kl_scope="group")
    torch.testing.assert_close(d.aggregated, c.aggregated)


# ---------------------------------------------------------------------------------------
# Reg-GRPO
# ---------------------------------------------------------------------------------------


def reg_inputs(scale_rewards=None):
    # one group of 3 one-token rows: x = logπ − logπ_ref = [0, 1, 2]; A = [1, −1, 0]
    logp = t([[-2.0], [-1.0], [0.0]]).requires_grad_(True)
    inp = PolicyInputs(
        logp,
        logp.detach(),
        torch.ones(3, 1, dtype=F64),
        t([1.0, -1.0, 0.0]),
        ref_logp_NT=t([[-2.0], [-2.0], [-2.0]]),
        rewards_N=scale_rewards,
        group_N=torch.tensor([0, 0, 0]),
        norm=norm(num_tokens=3, num_seqs=3),
    )
    return inp, logp


def test_reg_grpo_hand_computed() -> None:
    # to pi_old at step start: rho = 0 for every row, z = 0, loss = sum A^2 / 3 = 2/3, and
    # the gradient is the unclipped policy gradient -2*beta/N * A_i (no collapse, no 1/eps)
    inp, logp = reg_inputs()
    out = reg_grpo(inp)
    assert out.aggregated.item() == pytest.approx(2 / 3)
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[-2 / 3], [2 / 3], [0.0]]))
    inp, logp = reg_inputs()
    torch.testing.assert_close(
        grad_of(reg_grpo(inp, beta=0.5).aggregated, logp), t([[-1 / 3], [1 / 3], [0.0]])
    )
    # to pi_ref, beta 0.04, scale none: x = [0, 1, 2], z = 0.04*(x - 1) = [-0.04, 0, 0.04];
    # loss = (1.04^2 + 1^2 + 0.04^2)/3 = 2.0832/3; dL/dx = (2*0.04/3)*[-(A - z) + mean(A - z)]
    inp, logp = reg_inputs()
    out = reg_grpo(inp, beta=0.04, ratio_to="ref")
    assert out.aggregated.item() == pytest.approx(0.6944)
    torch.testing.assert_close(
        grad_of(out.aggregated, logp), t([[-0.0832 / 3], [0.08 / 3], [0.0032 / 3]])
    )
    assert out.stats["reg_grpo/log_ratio"] == pytest.approx(1.0)  # mean of x = [0, 1, 2]
    # scale group (to pi_ref): std of x = 1 (detached) -> z = [-1, 0, 1]; loss = (4 + 1 + 1)/3;
    # dL/dx = (2/3)*[(z - A) - mean(z - A)] = (2/3)*[-2, 1, 1]
    inp, logp = reg_inputs()
    out = reg_grpo(inp, scale="group", ratio_to="ref")
    assert out.aggregated.item() == pytest.approx(2.0)
    torch.testing.assert_close(grad_of(out.aggregated, logp), t([[-4 / 3], [2 / 3], [2 / 3]]))
    # scale group at step start (to pi_old): std 0 < sigma_min -> z = 0, a finite zero gradient
    inp, logp = reg_inputs()
    g = grad_of(reg_grpo(inp, scale="group").aggregated, logp)
    assert torch.equal(g, torch.zeros(3, 1, dtype=F64))


def test_reg_grpo_edge_cases() -> None:
    # a NaN reward drops row 2 from the statistics and the loss: group = rows 0, 1,
    # x = [0, 1] to pi_ref -> centered [-0.5, 0.5], beta 1: z = [-0.5, 0.5]
    inp, _ = reg_inputs(scale_rewards=t([1.0, 0.0, NAN]))
    assert reg_grpo(inp, ratio_to="ref").aggregated.item() == pytest.approx(
        ((1 + 0.5) ** 2 + (-1 - 0.5) ** 2) / 3
    )
    # singleton groups: z = 0, loss = sum A^2 / N = 2/3, no gradient and no NaN
    inp, logp = reg_inputs()
    inp.group_N = torch.tensor([0, 1, 2])
    out = reg_grpo(inp, ratio_to="ref")
    assert out.aggregated.item() == pytest.approx(2 / 3)
    assert torch.equal(grad_of(out.aggregated, logp), torch.zeros(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="ratio_to='ref' needs ref_logp_NT"):
        reg_grpo(replace(inp, ref_logp_NT=None, rewards_N=None), ratio_to="ref")
    for bad in ({"scale": "z"}, {"ratio_to": "new"}, {"beta": 0.0}, {"sigma_min": 0.0}):
        with pytest.raises(ValueError, match="reg_grpo"):
            reg_grpo(inp, **bad)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        inp.adv_N = torch.zeros(3, 1, dtype=F64)
        reg_grpo(inp)


def test_reg_grpo_gradcheck() -> None:
    toy = Toy(dtype=F64, seed=6)

    def loss(W: Tensor) -> Tensor:
        logp = toy.logp(W)
        inp = PolicyInputs(
            logp,
            toy.old,
            toy.mask,
            toy.adv,
            ref_logp_NT=toy.ref,
            group_N=toy.group,
            norm=toy.norm(),
        )
        return reg_grpo(inp).aggregated

    W = toy.W.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (W,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Micro-batch invariance of the self-aggregating losses (whole groups per micro-batch).
# ---------------------------------------------------------------------------------------

GROUP_SPLITS = {"whole": [4], "1+3": [1, 3], "2+2": [2, 2], "1+1+1+1": [1, 1, 1, 1], "3+1": [3, 1]}

SELF_AGGREGATING = {
    # micro_batch-scoped KL with δ large: the penalty is off, the objective is exact
    "disco_logL": lambda inp: disco(inp, delta=10.0),
    "disco_Lratio": lambda inp: disco(inp, score="Lratio", delta=10.0),
    # group-scoped KL penalty, active (k3, β = 10, δ = 1e-3)
    "disco_group_kl": lambda inp: disco(
        inp, kl_scope="group", kl_estimator="k3", beta=10.0, delta=1e-3
    ),
    "drpo": lambda inp: drpo(inp, kl_scope="group", beta=10.0, delta=0.0),
    "reg_grpo": reg_grpo,
}


@pytest.mark.parametrize("split", sorted(GROUP_SPLITS))
@pytest.mark.parametrize("name", sorted(SELF_AGGREGATING))
def test_micro_batch_invariance(name: str, split: str) -> None:
    toy = Toy(seed=2)
    fn = SELF_AGGREGATING[name]
    whole_out = fn(toy.inputs())
    if name in ("disco_group_kl", "drpo"):
        assert whole_out.stats[f"{name.split('_')[0]}/kl_penalty"] > 1e-3  # penalty is active
    (whole_grad,) = torch.autograd.grad(whole_out.aggregated, toy.W)
    assert whole_grad.abs().max() > 1e-3
    total, start = 0.0, 0
    toy.W.grad = None
    for groups in GROUP_SPLITS[split]:
        rows = slice(start, start + groups * toy.G)
        part = fn(toy.inputs(rows)).aggregated
        part.backward()
        total += part.item()
        start += groups * toy.G
    assert start == toy.N
    assert total == pytest.approx(whole_out.aggregated.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(toy.W.grad, whole_grad, atol=1e-6, rtol=1e-6)


def test_disco_micro_batch_kl_scope_is_per_call() -> None:
    # The documented limit: with the penalty active, the "micro_batch" weight comes from
    # each call's own KL, so a split gives Σ_mb w_mb·KL_sum_mb/num_tokens, not w·KL.
    toy = Toy(dtype=F64, seed=2)
    fn = lambda inp: disco(inp, kl_estimator="k3", beta=10.0, delta=0.0)  # noqa: E731
    whole = fn(toy.inputs()).aggregated.item()
    parts = [fn(toy.inputs(slice(0, 3))), fn(toy.inputs(slice(3, 12)))]
    split = sum(p.aggregated.item() for p in parts)
    k3 = [
        (lambda x, m: ((x.exp() - 1 - x) * m).sum())(
            toy.logp(toy.W)[r].detach() - toy.old[r], toy.mask[r]
        )
        for r in (slice(0, 3), slice(3, 12))
    ]
    tokens = [toy.mask[:3].sum(), toy.mask[3:].sum()]
    objective = whole - 10.0 * (sum(k3) / sum(tokens)) * sum(k3) / sum(tokens)
    expected = objective + sum(
        10.0 * (k / n) * k / sum(tokens) for k, n in zip(k3, tokens, strict=True)
    )
    assert split == pytest.approx(float(expected), rel=1e-9)
    assert abs(split - whole) > 1e-4
