"""The `Rollouts` batch and the rollout-engine interface.

A rollout engine turns B prompt strings into B*G sampled completions. Groups are
contiguous: rows g*G .. g*G+G-1 are the completions of prompt g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from grouprl.registry import Registry


@dataclass
class SamplingParams:
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256


@dataclass
class Rollouts:
    """B prompts x G completions, as token ids ready for the policy forward.

    prompt_ids_NP / prompt_mask_NP:          left-padded prompt tokens, repeated per completion.
    completion_ids_NT / completion_mask_NT:  right-padded sampled tokens; the mask covers the
                                             tokens up to and including the first EOS.
    truncated_N:                              True where no EOS came within max_new_tokens.
    completions:                              decoded completion texts (no special tokens).
    """

    prompt_ids_NP: Tensor
    prompt_mask_NP: Tensor
    completion_ids_NT: Tensor
    completion_mask_NT: Tensor
    truncated_N: Tensor
    completions: list[str]
    group_size: int

    @property
    def num_rollouts(self) -> int:
        return int(self.completion_ids_NT.shape[0])

    @property
    def lengths_N(self) -> Tensor:
        return self.completion_mask_NT.sum(dim=1)

    def select(self, idx: Tensor | slice) -> Rollouts:
        """Rows `idx` (used for micro-batches); keeps the group size for bookkeeping."""
        if isinstance(idx, slice):
            comps = self.completions[idx]
        else:
            comps = [self.completions[i] for i in idx.tolist()]
        return Rollouts(
            self.prompt_ids_NP[idx],
            self.prompt_mask_NP[idx],
            self.completion_ids_NT[idx],
            self.completion_mask_NT[idx],
            self.truncated_N[idx],
            comps,
            self.group_size,
        )


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts: ...


ROLLOUT_ENGINES: Registry = Registry("rollout engine")


def completion_mask_from_eos(
    completion_ids_NT: Tensor, eos_ids: list[int]
) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first EOS; truncated where no EOS appears.

    Returns (mask_NT float32, truncated_N bool).
    """
    is_eos = torch.zeros_like(completion_ids_NT, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids_NT == e
    T = completion_ids_NT.shape[1]
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long)
    )
    pos = torch.arange(T, device=completion_ids_NT.device).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)) & (pos < T)
    return mask.float(), ~has_eos
