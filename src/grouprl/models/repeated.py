"""The repeated layout: one row `[prompt; completion]` per completion.

Row n is its prompt (left- or right-padded) followed by its completion, whose attention mask
may have holes (padding between real tokens). Rows whose real tokens form one run (what
engines produce: left-padded prompt, right-padded completion) are used as they are, so the
forward is bit-for-bit the model's own. Otherwise each row is compacted: its real tokens
are moved together at the right end (left padding), so positions (cumsum of the mask, as HF
generate computes them) and column distances agree, and a sliding window counts real tokens
exactly as the packed layout does. A real completion token is predicted by the real token
before it (the last real prompt token for the first one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RepeatedLayout:
    """N compacted rows of length L; completion token (n, t) is predicted at (n, src_col_NT[n, t])."""

    input_ids_NL: Tensor
    attention_mask_NL: Tensor
    position_ids_NL: Tensor
    src_col_NT: Tensor  # 0 where the completion token is not real

    def model_inputs(self) -> dict[str, Tensor | bool]:
        """Keyword arguments of an HF causal LM (or its decoder) forward."""
        return {
            "input_ids": self.input_ids_NL,
            "attention_mask": self.attention_mask_NL,
            "position_ids": self.position_ids_NL,
            "use_cache": False,
        }


def repeated_layout(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    attention_mask_NT: Tensor,
    *,
    pad_token_id: int = 0,
) -> RepeatedLayout:
    """Rows `[prompt; completion]` of real tokens, left-padded to the longest.

    Raises when a real completion token has no real token before it (an empty prompt).
    """
    ids_NS = torch.cat([prompt_ids_NP, completion_ids_NT], dim=1)
    real_NS = torch.cat([prompt_mask_NP, attention_mask_NT], dim=1).bool()
    if _contiguous(real_NS):
        return _as_is(ids_NS, real_NS, prompt_ids_NP.shape[1], attention_mask_NT.bool())
    n_real_N = real_NS.sum(dim=1)
    N, L = len(ids_NS), max(1, int(n_real_N.max()))
    offset_N = L - n_real_N  # left padding of each compacted row
    dest_NS = offset_N[:, None] + real_NS.long().cumsum(dim=1) - 1  # column of a real token
    rows_NS = torch.arange(N, device=ids_NS.device)[:, None].expand_as(dest_NS)
    ids_NL = ids_NS.new_full((N, L), pad_token_id)
    ids_NL[rows_NS[real_NS], dest_NS[real_NS]] = ids_NS[real_NS]
    col_NL = torch.arange(L, device=ids_NS.device).expand(N, L) - offset_N[:, None]
    real_NT = attention_mask_NT.bool()
    src_NT = dest_NS[:, prompt_ids_NP.shape[1] :] - 1
    if bool((real_NT & (src_NT < offset_N[:, None])).any()):
        raise ValueError("a completion token has no real token before it (empty prompt)")
    return RepeatedLayout(
        input_ids_NL=ids_NL,
        attention_mask_NL=(col_NL >= 0).long(),
        position_ids_NL=col_NL.clamp(min=0),
        src_col_NT=torch.where(real_NT, src_NT, 0),
    )


def _contiguous(real_NS: Tensor) -> bool:
    """Whether every row's real tokens form one run (left-padded prompt, right-padded
    completion: what engines produce), so columns already count real tokens."""
    starts_N = real_NS[:, 0].long() + (real_NS[:, 1:] & ~real_NS[:, :-1]).sum(dim=1)
    return bool((starts_N <= 1).all())


def _as_is(ids_NS: Tensor, real_NS: Tensor, P: int, real_NT: Tensor) -> RepeatedLayout:
    """The rows unchanged: no gather, the same shapes and kernels as a plain forward, so
    values and gradients are bit-for-bit those of the model on `[prompt; completion]`."""
    if bool((real_NT[:, 0] & ~real_NS[:, P - 1]).any()) if P > 0 else bool(real_NT.any()):
        raise ValueError("a completion token has no real token before it (empty prompt)")
    T = real_NT.shape[1]
    src_NT = (P - 1 + torch.arange(T, device=ids_NS.device)).expand_as(real_NT)
    return RepeatedLayout(
        input_ids_NL=ids_NS,
        attention_mask_NL=real_NS.long(),
        position_ids_NL=(real_NS.long().cumsum(dim=1) - 1).clamp(min=0),
        src_col_NT=torch.where(real_NT, src_NT, 0),
    )
