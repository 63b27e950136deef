"""Loss aggregations: per-token values [N, T] -> one scalar.

Every normalizer comes from `BatchNorm`, computed once over the WHOLE optimizer batch, so
each aggregation is a sum of per-row terms with constant weights: aggregating each
micro-batch and summing the results gives the whole-batch value (and gradient) exactly,
whatever the split. Masks may hold weights other than 0/1; a token counts with its weight.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from grouprl.algorithms.types import BatchNorm
from grouprl.registry import Registry

Aggregation = Callable[[Tensor, Tensor, BatchNorm], Tensor]

AGGREGATIONS: Registry = Registry("aggregation")


def _masked_NT(values_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """values·mask, exactly 0 on masked-out tokens even if values there are NaN or inf."""
    mask_NT = mask_NT.to(values_NT.dtype)
    return (values_NT * mask_NT).where(mask_NT != 0, 0.0)


def _positive(x: float) -> float:
    # An empty whole batch (no tokens or rows) gives a 0 loss instead of NaN.
    return max(float(x), 1.0)


@AGGREGATIONS.register("token_mean")
def token_mean(values_NT: Tensor, mask_NT: Tensor, norm: BatchNorm) -> Tensor:
    """Σ_{i,t} v·m / (Σ m over the whole batch): every token weighs the same.

    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476),
    token-level policy gradient loss.
    """
    return _masked_NT(values_NT, mask_NT).sum() / _positive(norm.num_tokens)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(values_NT: Tensor, mask_NT: Tensor, norm: BatchNorm) -> Tensor:
    """Σ_i [Σ_t v·m / max(L_i, 1)] / N_batch with L_i = Σ_t m_{i,t}: mean per sequence, then mean.

    Original GRPO, "DeepSeekMath" (arXiv 2402.03300), eq. (3): (1/G) Σ_i (1/|o_i|) Σ_t.
    A row with an all-zero mask contributes 0.
    """
    masked_NT = _masked_NT(values_NT, mask_NT)
    len_N = mask_NT.to(masked_NT.dtype).sum(dim=-1).clamp(min=1.0)
    return (masked_NT.sum(dim=-1) / len_N).sum() / _positive(norm.num_seqs)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values_NT: Tensor, mask_NT: Tensor, norm: BatchNorm) -> Tensor:
    """Σ_{i,t} v·m / (L_max · N_batch), L_max the configured max completion length.

    Dr.GRPO, "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv 2503.20783):
    a constant normalizer removes GRPO's per-sequence 1/|o_i| length bias.
    """
    return _masked_NT(values_NT, mask_NT).sum() / (
        _positive(norm.max_len) * _positive(norm.num_seqs)
    )


@AGGREGATIONS.register("token_sum")
def token_sum(values_NT: Tensor, mask_NT: Tensor, norm: BatchNorm) -> Tensor:
    """Σ_{i,t} v·m, no normalizer (norm is unused)."""
    return _masked_NT(values_NT, mask_NT).sum()
