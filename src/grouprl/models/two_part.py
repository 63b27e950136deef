"""Two-part attention for the packed layout: the prompt once, each completion on its own.

Prefix Grouper (arXiv 2506.05433) splits the attention of a group `[prompt; c_1; ...; c_G]`
into two parts instead of one dense mask over the whole packed row:

- the prompt attends causally to itself, once (a plain causal attention, no mask tensor);
- completion j's queries attend to the prompt's keys and causally to completion j's own
  keys. Completions are gathered into a [G, C] grid so each is a short row of its own whose
  keys are `[prompt; c_j]`: the prompt's keys are shared (broadcast to the G rows, their
  gradients summed back, as the repeated layout sums over its G prompt copies).

Cost per packed row: P^2 + G*C*(P + C) scores instead of (P + G*C)^2, and a boolean mask of
G*C*(P + C) instead of (P + G*C)^2. When completions are longer than the (equal-length,
no sliding window) prompts, each completion row runs as plain causal attention over
[prompt; c_j] instead, which skips the masked half of c_j x c_j. The rule is `packing.allowed` (tests check both
backends against the repeated layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TwoPartPlan:
    """Where the parts of each packed row are: R rows, prompts of up to Pm tokens, up to Gm
    completions of up to Cm tokens.

    prompt_len_R:  real prompt tokens of each row (columns 0..P_r-1).
    comp_col_RM:   packed column of completion g's token i at M index g*Cm + i (0 if absent).
    comp_real_RM:  whether that slot holds a real token.
    mask_B1CK:     per sliding window, may completion slot (row R*Gm, query c) attend to key
                   k of [prompt columns 0..Pm-1; its completion's slots]: `packing.allowed`,
                   filled in by the layout (`PackedLayout.two_part_plan`).
    """

    prompt_len_R: Tensor
    comp_col_RM: Tensor
    comp_real_RM: Tensor
    Gm: int
    Cm: int
    mask_B1CK: dict[int | None, Tensor] = field(default_factory=dict)

    @property
    def Pm(self) -> int:
        return int(self.prompt_len_R.max()) if len(self.prompt_len_R) else 0

    @classmethod
    def of(cls, segment_RL: Tensor) -> TwoPartPlan:
        """The plan of a packed layout from its segment ids (-1 pad, 0 prompt, j completion j)."""
        R, L = segment_RL.shape
        dev = segment_RL.device
        prompt_len_R = (segment_RL == 0).sum(1)
        Gm = max(int(segment_RL.max()) if segment_RL.numel() else 0, 1)
        is_comp = segment_RL >= 1
        # per (row, completion): its length and first column (completions are contiguous)
        seg_RL = segment_RL.clamp(min=0)
        len_RG = torch.zeros(R, Gm + 1, dtype=torch.long, device=dev)
        len_RG.scatter_add_(1, seg_RL, is_comp.long())
        len_RG = len_RG[:, 1:]
        Cm = max(int(len_RG.max()) if len_RG.numel() else 0, 1)
        start_RG = prompt_len_R[:, None] + len_RG.cumsum(1) - len_RG
        i_C = torch.arange(Cm, device=dev)
        real_RGC = i_C[None, None, :] < len_RG[:, :, None]
        col_RGC = torch.where(real_RGC, start_RG[:, :, None] + i_C, 0)
        return cls(
            prompt_len_R=prompt_len_R,
            comp_col_RM=col_RGC.reshape(R, Gm * Cm),
            comp_real_RM=real_RGC.reshape(R, Gm * Cm),
            Gm=Gm,
            Cm=Cm,
        )


def _gather_M(x_RHLd: Tensor, col_RM: Tensor) -> Tensor:
    """x at the completion slots: [R, H, L, d] -> [R, H, M, d]."""
    R, H, _, d = x_RHLd.shape
    idx = col_RM[:, None, :, None].expand(R, H, col_RM.shape[1], d)
    return x_RHLd.gather(2, idx)


def _grid(x_RHMd: Tensor, Gm: int, Cm: int) -> Tensor:
    """[R, H, Gm*Cm, d] -> [R*Gm, H, Cm, d]: each completion a row of its own."""
    R, H, _, d = x_RHMd.shape
    return x_RHMd.view(R, H, Gm, Cm, d).transpose(1, 2).reshape(R * Gm, H, Cm, d)


def two_part_attention(
    query_RHLd: Tensor,
    key_RHLd: Tensor,
    value_RHLd: Tensor,
    plan: TwoPartPlan,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention output [R, H, L, d] of a packed micro-batch, computed in two parts.

    query [R, H, L, d], key/value [R, Hkv, L, d] (grouped-query heads allowed); `plan` holds
    the mask for `sliding_window`. Columns that are padding get an output nothing reads.
    """
    R, H, L, d = query_RHLd.shape
    Hkv = key_RHLd.shape[1]
    gqa = Hkv != H
    Pm, Gm, Cm = plan.Pm, plan.Gm, plan.Cm
    dev = query_RHLd.device

    # 1. the prompt: causal over its first Pm columns (a shorter prompt's extra columns are
    #    completion tokens whose outputs part 2 overwrites)
    q_p, k_p, v_p = query_RHLd[:, :, :Pm], key_RHLd[:, :, :Pm], value_RHLd[:, :, :Pm]
    if sliding_window is None:
        out_p = F.scaled_dot_product_attention(
            q_p, k_p, v_p, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    else:
        i = torch.arange(Pm, device=dev)
        diff = i[:, None] - i[None, :]
        band = (diff >= 0) & (diff < sliding_window)
        out_p = F.scaled_dot_product_attention(
            q_p, k_p, v_p, attn_mask=band, scale=scaling, enable_gqa=gqa
        )

    # 2. the completions: each a row whose keys are [its prompt; its own tokens]
    col_RM = plan.comp_col_RM
    q_c = _grid(_gather_M(query_RHLd, col_RM), Gm, Cm)  # [R*Gm, H, Cm, d]
    k_c = _grid(_gather_M(key_RHLd, col_RM), Gm, Cm)
    v_c = _grid(_gather_M(value_RHLd, col_RM), Gm, Cm)

    def shared(x_RHPd: Tensor) -> Tensor:  # the prompt's keys for each of the Gm rows
        return x_RHPd[:, None].expand(R, Gm, Hkv, Pm, d).reshape(R * Gm, Hkv, Pm, d)

    keys = torch.cat([shared(k_p), k_c], dim=2)
    values = torch.cat([shared(v_p), v_c], dim=2)
    equal_prompts = bool((plan.prompt_len_R == Pm).all())
    if sliding_window is None and Cm > Pm and equal_prompts:
        # long completions: the rows [prompt; c_j] with plain causal attention, which skips
        # the masked half of c_j x c_j (the prompt's queries are recomputed, their outputs
        # dropped: P*(P+C)/2 extra against C*C/2 saved)
        q_rows = torch.cat([q_p[:, None].expand(R, Gm, H, Pm, d).reshape(R * Gm, H, Pm, d), q_c], 2)
        out_c = F.scaled_dot_product_attention(
            q_rows, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa
        )[:, :, Pm:]
    else:
        mask = plan.mask_B1CK[sliding_window]  # [R*Gm, 1, Cm, Pm+Cm]
        out_c = F.scaled_dot_product_attention(
            q_c, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
    out_c = out_c.view(R, Gm, H, Cm, d).transpose(1, 2).reshape(R, H, Gm * Cm, d)

    # 3. one output: the prompt part, then every real completion slot written at its column
    #    (absent slots go to a spare column L, dropped)
    out = torch.cat([out_p, query_RHLd.new_zeros(R, H, L + 1 - Pm, d)], dim=2)
    dest_RM = torch.where(plan.comp_real_RM, col_RM, L)
    out = out.scatter(2, dest_RM[:, None, :, None].expand(R, H, Gm * Cm, d), out_c)
    return out[:, :, :L]
