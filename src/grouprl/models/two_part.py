"""Two-part attention for the packed layout: each prompt once, each completion on its own.

Prefix Grouper (arXiv 2506.05433) splits the attention of a group `[prompt; c_1; ...; c_G]`
into two parts instead of one dense mask over the whole packed row:

- the prompt attends causally to itself, once (a plain causal attention, no mask tensor);
- completion j's queries attend to the prompt's keys and causally to completion j's own
  keys. Completions are gathered into a [G, C] grid so each is a short row of its own whose
  keys are `[prompt; c_j]`: the prompt's keys are shared (broadcast to the G rows, their
  gradients summed back, as the repeated layout sums over its G prompt copies).

A packed row may hold several groups one after another, so the unit of the plan is a group
of a row (a "unit"): its prompt slots and its completion grid are gathered per unit, and the
outputs scattered back to their columns. Cost per group: P^2 + G*C*(P + C) scores instead
of (P + G*C)^2, and a boolean mask of G*C*(P + C) instead of (P + G*C)^2; nothing is
quadratic in the row. When completions are longer than the (equal-length, no sliding
window) prompts, each completion row runs as plain causal attention over [prompt; c_j]
instead, which skips the masked half of c_j x c_j. The rule is `packing.allowed` (tests
check every backend against the repeated layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TwoPartPlan:
    """Where the parts of each unit (a group of a packed row) are: U units, prompts of up to Pm
    tokens, up to Gm completions of up to Cm tokens.

    row_U:          packed row of each unit.
    prompt_col_UP:  packed column of prompt token i of unit u (absent: the unit's first column).
    prompt_real_UP: whether that prompt slot holds a real token.
    comp_col_UM:    packed column of completion g's token i at M index g*Cm + i (absent: the
                    unit's first column, its first prompt token).
    comp_real_UM:   whether that slot holds a real token.
    mask_B1CK:      per sliding window, may completion slot (row U*Gm, query c) attend to key
                    k of [its prompt's slots; its completion's slots]: `packing.allowed`,
                    filled in by the layout (`PackedLayout.two_part_plan`).
    """

    row_U: Tensor
    prompt_col_UP: Tensor
    prompt_real_UP: Tensor
    comp_col_UM: Tensor
    comp_real_UM: Tensor
    Gm: int
    Cm: int
    mask_B1CK: dict[int | None, Tensor] = field(default_factory=dict)
    _float_masks: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    @property
    def Pm(self) -> int:
        return self.prompt_col_UP.shape[1]

    def additive_mask(self, sliding_window: int | None, dtype: torch.dtype) -> Tensor:
        """`mask_B1CK[sliding_window]` as SDPA's additive form (0 allowed, -inf not), built
        once per plan and dtype. SDPA would convert a boolean mask itself on every call, and
        autograd would keep each layer's converted copy for the backward: one copy shared
        by all layers instead (the values are SDPA's own conversion, so outputs are equal)."""
        key = ("completion", sliding_window, dtype)
        if key not in self._float_masks:
            self._float_masks[key] = _additive(self.mask_B1CK[sliding_window], dtype)
        return self._float_masks[key]

    def prompt_band(self, sliding_window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The prompts' sliding-window causal band [Pm, Pm], additive, built once per plan."""
        key = ("band", sliding_window, dtype)
        if key not in self._float_masks:
            i = torch.arange(self.Pm, device=device)
            diff = i[:, None] - i[None, :]
            self._float_masks[key] = _additive((diff >= 0) & (diff < sliding_window), dtype)
        return self._float_masks[key]

    @classmethod
    def of(cls, unit_RL: Tensor, part_RL: Tensor) -> TwoPartPlan:
        """The plan of a packed layout from each token's unit (-1 padding, else 0..U-1) and part
        (0 prompt, j completion j). A unit's tokens are contiguous: its prompt, then its
        completions in order."""
        R, L = unit_RL.shape
        dev = unit_RL.device
        real_RL = unit_RL >= 0
        u_T, p_T = unit_RL[real_RL], part_RL[real_RL]
        col_T = torch.arange(L, device=dev).expand(R, L)[real_RL]
        row_T = torch.arange(R, device=dev)[:, None].expand(R, L)[real_RL]
        U = int(u_T.max()) + 1 if len(u_T) else 0
        Gm = max(int(p_T.max()) if len(p_T) else 0, 1)
        count_UG = torch.zeros(U, Gm + 1, dtype=torch.long, device=dev)
        count_UG.index_put_((u_T, p_T), torch.ones_like(u_T), accumulate=True)
        start_U = torch.full((U,), L, dtype=torch.long, device=dev)
        start_U = start_U.scatter_reduce(0, u_T, col_T, "amin")
        row_U = torch.zeros(U, dtype=torch.long, device=dev).scatter(0, u_T, row_T)
        prompt_len_U, len_UG = count_UG[:, 0], count_UG[:, 1:]
        Pm = int(prompt_len_U.max()) if U else 0
        Cm = max(int(len_UG.max()) if len_UG.numel() else 0, 1)

        def slots(first_UG: Tensor, len_UG: Tensor, width: int) -> tuple[Tensor, Tensor]:
            """Columns [U, G, width] of runs starting at first_UG (absent: the unit's start)."""
            i_W = torch.arange(width, device=dev)
            real_UGW = i_W < len_UG[:, :, None]
            col_UGW = torch.where(real_UGW, first_UG[:, :, None] + i_W, start_U[:, None, None])
            return col_UGW, real_UGW

        prompt_col, prompt_real = slots(start_U[:, None], prompt_len_U[:, None], Pm)
        first_UG = (start_U + prompt_len_U)[:, None] + len_UG.cumsum(1) - len_UG
        comp_col, comp_real = slots(first_UG, len_UG, Cm)
        return cls(
            row_U=row_U,
            prompt_col_UP=prompt_col[:, 0],
            prompt_real_UP=prompt_real[:, 0],
            comp_col_UM=comp_col.reshape(U, Gm * Cm),
            comp_real_UM=comp_real.reshape(U, Gm * Cm),
            Gm=Gm,
            Cm=Cm,
        )


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may attend) as 0 / -inf of `dtype`, as SDPA converts one."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def _take(x_RHLd: Tensor, row_U: Tensor, col_UK: Tensor) -> Tensor:
    """x at the slots of each unit: [R, H, L, d] -> [U, H, K, d]."""
    return x_RHLd[row_U[:, None], :, col_UK].transpose(1, 2)


def _grid(x_UHMd: Tensor, Gm: int, Cm: int) -> Tensor:
    """[U, H, Gm*Cm, d] -> [U*Gm, H, Cm, d]: each completion a row of its own."""
    U, H, _, d = x_UHMd.shape
    return x_UHMd.reshape(U, H, Gm, Cm, d).transpose(1, 2).reshape(U * Gm, H, Cm, d)


def two_part_attention(
    query_RHLd: Tensor,
    key_RHLd: Tensor,
    value_RHLd: Tensor,
    plan: TwoPartPlan,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention output [R, H, L, d] of a packed micro-batch, computed in two parts per unit.

    query [R, H, L, d], key/value [R, Hkv, L, d] (grouped-query heads allowed); `plan` holds
    the mask for `sliding_window`. Columns that are padding get an output nothing reads.
    """
    R, H, L, d = query_RHLd.shape
    Hkv = key_RHLd.shape[1]
    gqa = Hkv != H
    Pm, Gm, Cm = plan.Pm, plan.Gm, plan.Cm
    U = len(plan.row_U)
    dev = query_RHLd.device
    row_U = plan.row_U

    # 1. each prompt: causal over its slots (absent slots come last, so no real query sees them)
    q_p, k_p, v_p = (
        _take(x, row_U, plan.prompt_col_UP) for x in (query_RHLd, key_RHLd, value_RHLd)
    )
    if sliding_window is None:
        out_p = F.scaled_dot_product_attention(
            q_p, k_p, v_p, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    else:
        band = plan.prompt_band(sliding_window, query_RHLd.dtype, dev)
        out_p = F.scaled_dot_product_attention(
            q_p, k_p, v_p, attn_mask=band, scale=scaling, enable_gqa=gqa
        )

    # 2. the completions: each a row whose keys are [its prompt; its own tokens]
    col_UM = plan.comp_col_UM
    q_c, k_c, v_c = (
        _grid(_take(x, row_U, col_UM), Gm, Cm) for x in (query_RHLd, key_RHLd, value_RHLd)
    )

    def shared(x_UHPd: Tensor) -> Tensor:  # the prompt's keys for each of the Gm rows
        return x_UHPd[:, None].expand(U, Gm, Hkv, Pm, d).reshape(U * Gm, Hkv, Pm, d)

    keys = torch.cat([shared(k_p), k_c], dim=2)
    values = torch.cat([shared(v_p), v_c], dim=2)
    equal_prompts = bool(plan.prompt_real_UP.all())
    if sliding_window is None and Cm > Pm and equal_prompts:
        # long completions: the rows [prompt; c_j] with plain causal attention, which skips
        # the masked half of c_j x c_j (the prompt's queries are recomputed, their outputs
        # dropped: P*(P+C)/2 extra against C*C/2 saved)
        q_rows = torch.cat([q_p[:, None].expand(U, Gm, H, Pm, d).reshape(U * Gm, H, Pm, d), q_c], 2)
        out_c = F.scaled_dot_product_attention(
            q_rows, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa
        )[:, :, Pm:]
    else:
        mask = plan.additive_mask(sliding_window, query_RHLd.dtype)  # [U*Gm, 1, Cm, Pm+Cm]
        out_c = F.scaled_dot_product_attention(
            q_c, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
    out_c = out_c.reshape(U, Gm, H, Cm, d).transpose(1, 2).reshape(U, H, Gm * Cm, d)

    # 3. one output: every real prompt and completion slot written at its column (absent
    #    slots go to a spare column L, dropped)
    dest_UP = torch.where(plan.prompt_real_UP, plan.prompt_col_UP, L)
    dest_UM = torch.where(plan.comp_real_UM, col_UM, L)
    rows = row_U[:, None].expand(U, Pm + Gm * Cm)
    cols = torch.cat([dest_UP, dest_UM], dim=1)
    vals_UKHd = torch.cat([out_p, out_c], dim=2).transpose(1, 2)
    out_RLHd = query_RHLd.new_zeros(R, L + 1, H, d).index_put((rows, cols), vals_UKHd)
    return out_RLHd[:, :L].transpose(1, 2)
