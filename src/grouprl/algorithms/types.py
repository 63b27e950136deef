"""Tensors that flow between the trainer and the pure algorithm functions.

Shapes use the letters of DESIGN.md: N rollouts in a (micro-)batch, T completion tokens
(right-padded), B prompts, G completions per prompt, K reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PolicyInputs:
    """What a policy loss or regularizer sees for one micro-batch.

    logp_NT:      log π_θ of each completion token at the sampling temperature (has grad).
    old_logp_NT:  log π_old of the same tokens, computed at rollout time (no grad).
    mask_NT:      1.0 on completion tokens that count for the loss, 0.0 on padding.
    adv_N:        advantage per completion; a loss may also accept [N, T] advantages.
    entropy_NT:   entropy H of the policy at each position (with grad) or None.
    ref_logp_NT:  log π_ref of each token, or None when no reference model is loaded.
    rewards_N:    combined scalar reward of each completion (NaN = unscorable), or None.
    group_N:      index of each row's prompt group (long); rows of a group are contiguous
                  and a loss registered with `whole_groups` gets whole groups only.
    token_weight_NT: weights of a token mask / selection for the policy term (1 = keep,
                  0 = drop, 2 = upweight), or None for "all ones". Regularizers ignore it.
    norm:         the whole optimizer batch's normalizers (for terms that aggregate themselves).
    step:         the optimizer step index (0-based), for schedules inside a component.
    item_index_NT: the item (line) of the completion each token belongs to, −1 for none,
                  for a loss registered with `needs_items` (Rank-GRPO); else None.
    sft_N:        True on rows trained by likelihood only (a rollout strategy's
                  demonstrations: ExPO's self-explanations), bool [N]; None when none.
                  The policy term never sees them (they are off its mask).
    offpolicy_N:  True on rows the policy did not sample from their training prompt (a
                  strategy's hinted rows, expert anchors), bool [N]; None when none.
    """

    logp_NT: Tensor
    old_logp_NT: Tensor
    mask_NT: Tensor
    adv_N: Tensor
    entropy_NT: Tensor | None = None
    ref_logp_NT: Tensor | None = None
    rewards_N: Tensor | None = None
    group_N: Tensor | None = None
    token_weight_NT: Tensor | None = None
    norm: BatchNorm | None = None
    step: int = 0
    item_index_NT: Tensor | None = None
    sft_N: Tensor | None = None
    offpolicy_N: Tensor | None = None


@dataclass
class TermOutput:
    """A loss or regularizer term, per token, before aggregation.

    per_token_NT: the term's contribution to the loss (to minimize) at each token.
    stats_NT:     per-token values whose masked mean becomes a metric, keyed by metric
                  name (e.g. "clip_ratio/low_mean" -> 0/1 indicator per token).
    """

    per_token_NT: Tensor
    stats_NT: dict[str, Tensor] = field(default_factory=dict)
    # A term that is not a sum over tokens (e.g. DisCO's per-group log-mean-exp) returns its
    # micro-batch loss here, already normalized with `PolicyInputs.norm` so that summing
    # over micro-batches gives the whole-batch value; the trainer then skips aggregation.
    aggregated: Tensor | None = None
    stats: dict[str, float] = field(
        default_factory=dict
    )  # scalar metrics (e.g. "disco/kl_penalty")


@dataclass(frozen=True)
class BatchNorm:
    """Normalizers of the whole optimizer batch, so micro-batch splits give the same gradient.

    num_tokens:  Σ mask over every completion of the optimizer batch.
    num_seqs:    number of completions N in the optimizer batch.
    max_len:     constant length normalizer (the configured max completion length; Dr.GRPO).
    num_groups:  number of prompt groups B in the optimizer batch.
    """

    num_tokens: float
    num_seqs: float
    max_len: float
    num_groups: float = 0.0  # prompt groups B in the optimizer batch (0 = unknown)

    @staticmethod
    def of(
        mask_NT: Tensor, max_len: int, num_groups: int = 0, num_seqs: int | None = None
    ) -> BatchNorm:
        """`num_seqs` defaults to the rows of mask_NT (give the real rows when some are
        padding: groups filled up to one size)."""
        n = mask_NT.shape[0] if num_seqs is None else num_seqs
        return BatchNorm(float(mask_NT.sum().item()), float(n), float(max_len), float(num_groups))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ(values·mask)/Σmask, 0 when the mask is empty."""
    total = mask.sum()
    return (values * mask).sum() / total.clamp(min=1.0) if total.numel() else torch.zeros(())
