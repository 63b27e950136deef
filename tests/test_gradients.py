"""Gradient-level checks on a toy policy: micro-batch invariance, on-policy ratio, gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from grouprl.algorithms import AGGREGATIONS
from grouprl.algorithms.losses import ppo_clip, reinforce
from grouprl.algorithms.regularizers import KL
from grouprl.algorithms.types import BatchNorm, PolicyInputs, masked_mean

N, T, D, V = 6, 5, 4, 7
MAX_LEN = 8
LENGTHS = [5, 1, 3, 0, 4, 2]  # uneven, with an empty row
SPLITS = {
    "size1": [1] * 6,
    "size2": [2, 2, 2],
    "size3": [3, 3],
    "uneven": [1, 5],
    "whole": [6],
}


class ToyPolicy:
    """logits = features @ W: one weight matrix shared by every row, so micro-batch
    gradients of W must add up across rows exactly like the whole-batch gradient."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.feats_NTD = torch.randn(N, T, D, generator=g, dtype=dtype)
        self.tokens_NT = torch.randint(0, V, (N, T), generator=g)
        self.W = torch.randn(D, V, generator=g, dtype=dtype, requires_grad=True)
        self.mask_NT = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(dtype)
        self.adv_N = torch.randn(N, generator=g, dtype=dtype)
        with torch.no_grad():
            base_NT = self.logp(self.W)
            # π_old and π_ref differ from π_θ by ±0.4 so that tokens land on both sides of
            # the clip range (and some inside), exercising every branch of ppo_clip.
            self.old_logp_NT = base_NT + 0.4 * torch.randn(N, T, generator=g, dtype=dtype)
            self.ref_logp_NT = base_NT + 0.4 * torch.randn(N, T, generator=g, dtype=dtype)

    def logp(self, W: Tensor, rows: slice = slice(None)) -> Tensor:
        logits_NTV = self.feats_NTD[rows] @ W
        logp_NTV = torch.log_softmax(logits_NTV, dim=-1)
        return logp_NTV.gather(-1, self.tokens_NT[rows, :, None]).squeeze(-1)

    def inputs(self, W: Tensor, rows: slice = slice(None)) -> PolicyInputs:
        return PolicyInputs(
            logp_NT=self.logp(W, rows),
            old_logp_NT=self.old_logp_NT[rows],
            mask_NT=self.mask_NT[rows],
            adv_N=self.adv_N[rows],
            ref_logp_NT=self.ref_logp_NT[rows],
        )


def full_loss(policy: ToyPolicy, W: Tensor, rows: slice, aggregation: str, norm: BatchNorm):
    """ppo_clip + β·KL(k3), summed per token, then aggregated once with the whole-batch norm."""
    inp = policy.inputs(W, rows)
    per_token_NT = ppo_clip(inp).per_token_NT + KL(beta=0.1, estimator="k3")(inp).per_token_NT
    return AGGREGATIONS.get(aggregation)(per_token_NT, inp.mask_NT, norm)


def micro_batch_grad(policy: ToyPolicy, sizes: list[int], loss_fn) -> Tensor:
    policy.W.grad = None
    start = 0
    for size in sizes:
        loss_fn(slice(start, start + size)).backward()  # gradients accumulate, as in training
        start += size
    assert start == N
    return policy.W.grad.clone()


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_micro_batch_invariance(aggregation: str, split: str) -> None:
    torch.manual_seed(0)
    policy = ToyPolicy(torch.float32)
    norm = BatchNorm.of(policy.mask_NT, MAX_LEN)
    clip_frac = ppo_clip(policy.inputs(policy.W)).stats_NT["clip_ratio/region_mean"]
    assert 0 < masked_mean(clip_frac, policy.mask_NT) < 1  # both clipped and unclipped tokens

    (whole,) = torch.autograd.grad(
        full_loss(policy, policy.W, slice(None), aggregation, norm), policy.W
    )
    summed = micro_batch_grad(
        policy, SPLITS[split], lambda rows: full_loss(policy, policy.W, rows, aggregation, norm)
    )
    assert whole.abs().max() > 1e-3  # a real gradient, not a trivially zero one
    torch.testing.assert_close(summed, whole, atol=1e-6, rtol=0)


def test_local_normalizer_would_break_invariance() -> None:
    # Control: normalizing each micro-batch by its own token count (a common bug) gives a
    # different gradient for the same splits, so the test above can tell the two apart.
    policy = ToyPolicy(torch.float32)
    norm = BatchNorm.of(policy.mask_NT, MAX_LEN)
    (whole,) = torch.autograd.grad(
        full_loss(policy, policy.W, slice(None), "token_mean", norm), policy.W
    )

    def local(rows: slice) -> Tensor:
        mask_NT = policy.mask_NT[rows]
        return full_loss(policy, policy.W, rows, "token_mean", BatchNorm.of(mask_NT, MAX_LEN))

    summed = micro_batch_grad(policy, SPLITS["size2"], local)
    assert (summed - whole).abs().max() > 1e-3


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_on_policy_ratio_gives_reinforce_gradient(aggregation: str) -> None:
    # With π_old = π_θ (a detached copy), ρ = 1 exactly: the clipped objective's gradient is
    # A·ρ·∇logπ = A·∇logπ, the REINFORCE gradient, and no token counts as clipped.
    policy = ToyPolicy(torch.float32, seed=1)
    norm = BatchNorm.of(policy.mask_NT, MAX_LEN)
    agg = AGGREGATIONS.get(aggregation)
    logp_NT = policy.logp(policy.W)
    inp = PolicyInputs(logp_NT, logp_NT.detach(), policy.mask_NT, policy.adv_N)

    out = ppo_clip(inp)
    loss_ppo = agg(out.per_token_NT, inp.mask_NT, norm)
    (g_ppo,) = torch.autograd.grad(loss_ppo, policy.W, retain_graph=True)
    (g_pg,) = torch.autograd.grad(agg(reinforce(inp).per_token_NT, inp.mask_NT, norm), policy.W)
    assert g_pg.abs().max() > 1e-3
    torch.testing.assert_close(g_ppo, g_pg, atol=1e-6, rtol=1e-6)
    for name, stat_NT in out.stats_NT.items():
        assert torch.equal(stat_NT, torch.zeros_like(stat_NT)), name


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_full_loss_gradcheck(aggregation: str) -> None:
    # Finite differences of ppo_clip + KL + aggregation vs autograd, in float64. Random
    # π_old keeps every ratio away from the clip kinks 0.8 and 1.2 by far more than the step.
    policy = ToyPolicy(torch.float64, seed=2)
    norm = BatchNorm.of(policy.mask_NT, MAX_LEN)
    with torch.no_grad():
        ratio = (policy.logp(policy.W) - policy.old_logp_NT).exp()
    assert ((ratio - 0.8).abs().min() > 1e-3) and ((ratio - 1.2).abs().min() > 1e-3)

    def loss(W: Tensor) -> Tensor:
        return full_loss(policy, W, slice(None), aggregation, norm)

    W = policy.W.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (W,), eps=1e-6, atol=1e-7, rtol=1e-5)
