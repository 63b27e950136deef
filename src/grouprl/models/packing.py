"""Shared-prefix packing: rows that share a prompt become one row `[prompt; c_1; ...; c_G]`.

"Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward" (arXiv 2506.05433).
The repeated layout feeds G rows `[prompt; c_j]`. Here consecutive rows that share a prompt
become ONE packed row of their real tokens only (attention mask 1; no padding inside) with
split attention, one rule (`allowed`) for both the dense SDPA mask and the FlexAttention
`mask_mod`:

- a prompt token attends causally to the prompt;
- a token of completion j attends to the whole prompt and causally to completion j only;
- positions count real tokens and restart at the prompt length for every completion, as in
  the repeated layout (cumsum of the attention mask, as HF generate computes them).

The prompt's keys/values exist once per packed row (never G copies); gradients that reach
them are the sum over the G completions, exactly as the repeated layout's sum over its G
prompt copies. A completion's first real token is predicted by the last prompt token, every
later real token by the real token before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask

from grouprl.models.two_part import TwoPartPlan


def allowed(
    seg_q: Tensor,
    seg_k: Tensor,
    q: Tensor,
    k: Tensor,
    pos_q: Tensor,
    pos_k: Tensor,
    window: int | None,
) -> Tensor:
    """May query q attend to key k? The split-causal rule, elementwise on broadcastable tensors.

    Segments: -1 padding, 0 prompt, j >= 1 completion j. Allowed when k is real, k <= q
    (causal in packing order) and k is in the prompt or in q's own completion; with a sliding
    window w (Mistral-style) also pos_q - pos_k < w, positions being the repeated layout's.
    Prompt tokens come first, so a prompt query only ever sees prompt keys. A real query sees
    at least itself and a padding query (position 0) the prompt, so no softmax row is empty
    (no NaN).
    """
    ok = (k <= q) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    if window is not None:
        ok = ok & (pos_q - pos_k < window)
    return ok


def build_packed_mask(
    segment_RL: Tensor, position_ids_RL: Tensor, sliding_window: int | None = None
) -> Tensor:
    """The `allowed` rule as a dense boolean [R, 1, L, L] mask (True = may attend)."""
    idx_L = torch.arange(segment_RL.shape[1], device=segment_RL.device)
    mask_RLL = allowed(
        segment_RL[:, :, None],
        segment_RL[:, None, :],
        idx_L[:, None],
        idx_L[None, :],
        position_ids_RL[:, :, None],
        position_ids_RL[:, None, :],
        sliding_window,
    )
    return mask_RLL[:, None]


@dataclass
class PackedLayout:
    """Where every token of a packed micro-batch sits.

    R packed rows of length L. segment_RL: -1 padding, 0 prompt, j >= 1 completion j of the row.
    For completion n (a row of the repeated layout) and a real token t of it
    (attention_mask_NT[n, t] = 1), the target completion_ids_NT[n, t] is predicted by the
    hidden state at (row_N[n], src_col_NT[n, t]). length_N: real tokens per completion.
    """

    input_ids_RL: Tensor
    position_ids_RL: Tensor
    segment_RL: Tensor
    row_N: Tensor
    src_col_NT: Tensor
    length_N: Tensor
    # "two_part" (models/two_part.py), "sdpa" (dense boolean mask) or "flex" (block-sparse)
    backend: str = "two_part"
    _masks: dict[Any, Any] = field(default_factory=dict)

    def attention_mask(self, sliding_window: int | None = None) -> Tensor:
        """Boolean [R, 1, L, L] mask (True = may attend), cached per sliding window."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = build_packed_mask(
                self.segment_RL, self.position_ids_RL, sliding_window
            )
        return self._masks[sliding_window]

    def two_part_plan(self, sliding_window: int | None = None) -> TwoPartPlan:
        """Where the prompt and each completion sit, with the `allowed` rule as the mask of
        each completion slot over [prompt; its completion] (cached per sliding window)."""
        plan = self._masks.get("two_part")
        if plan is None:
            plan = self._masks["two_part"] = TwoPartPlan.of(self.segment_RL)
        if sliding_window not in plan.mask_B1CK:
            plan.mask_B1CK[sliding_window] = _two_part_mask(self, plan, sliding_window)
        return plan

    def block_mask(self, sliding_window: int | None = None) -> Any:
        """FlexAttention BlockMask of the same rule, built from segment ids (never [L, L] dense)."""
        key = ("flex", sliding_window)
        if key not in self._masks:
            seg, pos = self.segment_RL, self.position_ids_RL

            def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return allowed(seg[b, q], seg[b, k], q, k, pos[b, q], pos[b, k], sliding_window)

            R, L = seg.shape
            self._masks[key] = create_block_mask(
                mask_mod, B=R, H=None, Q_LEN=L, KV_LEN=L, device=seg.device
            )
        return self._masks[key]


def _two_part_mask(layout: PackedLayout, plan: TwoPartPlan, window: int | None) -> Tensor:
    """`allowed` for the completion slots of `plan` (queries) over [prompt columns; the slots
    of the same completion] (keys): [R*Gm, 1, Cm, Pm+Cm]. Prompt keys are only the prompt's
    own columns (a shorter prompt's later columns are completion tokens, keyed in part 2);
    an empty slot is segment -1 (as a query it sees the first prompt token only)."""
    seg_RL, pos_RL = layout.segment_RL, layout.position_ids_RL
    R = seg_RL.shape[0]
    Gm, Cm, Pm = plan.Gm, plan.Cm, plan.Pm
    col_RM = plan.comp_col_RM
    seg_RM = torch.where(plan.comp_real_RM, seg_RL.gather(1, col_RM), -1)
    pos_RM = pos_RL.gather(1, col_RM)

    def grid(x_RM: Tensor) -> Tensor:  # [R, Gm*Cm] -> [R*Gm, Cm]
        return x_RM.view(R * Gm, Cm)

    seg_q, col_q, pos_q = grid(seg_RM), grid(col_RM), grid(pos_RM)
    p_P = torch.arange(Pm, device=seg_RL.device)
    seg_p = seg_RL[:, :Pm].repeat_interleave(Gm, 0)  # [R*Gm, Pm]
    seg_p = torch.where(seg_p == 0, 0, -1)  # completion tokens there are keyed in part 2
    pos_p = pos_RL[:, :Pm].repeat_interleave(Gm, 0)
    to_prompt = allowed(
        seg_q[:, :, None],
        seg_p[:, None, :],
        col_q[:, :, None],
        p_P[None, None, :],
        pos_q[:, :, None],
        pos_p[:, None, :],
        window,
    )
    to_own = allowed(
        seg_q[:, :, None],
        seg_q[:, None, :],
        col_q[:, :, None],
        col_q[:, None, :],
        pos_q[:, :, None],
        pos_q[:, None, :],
        window,
    )
    return torch.cat([to_prompt, to_own], dim=2)[:, None]


def group_spans(prompt_ids_NP: Tensor, prompt_mask_NP: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive rows with the same prompt (one packed row each)."""
    N = prompt_ids_NP.shape[0]
    spans, start = [], 0
    for n in range(1, N + 1):
        if n == N or not (
            torch.equal(prompt_ids_NP[n], prompt_ids_NP[start])
            and torch.equal(prompt_mask_NP[n], prompt_mask_NP[start])
        ):
            spans.append((start, n))
            start = n
    return spans


def pack_groups(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    attention_mask_NT: Tensor,
    *,
    pad_token_id: int = 0,
) -> PackedLayout:
    """Pack rows that share a prompt into `[prompt; c_1; ...; c_G]` rows of real tokens.

    Prompts may be left- or right-padded and a completion's attention mask may have holes
    (padding between real tokens): the masks say which tokens are real, and only those are
    packed. Groups may have any size.
    """
    device = completion_ids_NT.device
    N, T = completion_ids_NT.shape
    real_NT = attention_mask_NT.bool()
    length_N = real_NT.sum(dim=1).long()
    spans = group_spans(prompt_ids_NP, prompt_mask_NP)
    prompts = [prompt_ids_NP[s][prompt_mask_NP[s].bool()] for s, _ in spans]
    row_len = [len(p) + int(length_N[s:e].sum()) for p, (s, e) in zip(prompts, spans, strict=True)]
    R, L = len(spans), max(row_len)
    ids = torch.full((R, L), pad_token_id, dtype=completion_ids_NT.dtype, device=device)
    pos = torch.zeros((R, L), dtype=torch.long, device=device)
    seg = torch.full((R, L), -1, dtype=torch.long, device=device)
    row_N = torch.empty(N, dtype=torch.long, device=device)
    src_col_NT = torch.zeros((N, T), dtype=torch.long, device=device)  # 0 where not real
    for r, ((s, e), p) in enumerate(zip(spans, prompts, strict=True)):
        P = len(p)
        if P == 0 and bool(length_N[s:e].any()):
            raise ValueError(
                "cannot pack an empty prompt: the first completion token has no predictor"
            )
        ids[r, :P] = p
        pos[r, :P] = torch.arange(P, device=device)
        seg[r, :P] = 0
        col = P
        for j, n in enumerate(range(s, e), start=1):
            t_real = real_NT[n].nonzero().squeeze(1)
            ln = len(t_real)
            ids[r, col : col + ln] = completion_ids_NT[n, t_real]
            pos[r, col : col + ln] = torch.arange(P, P + ln, device=device)
            seg[r, col : col + ln] = j
            # real token 0 is predicted by the last prompt token, real token i by real token i-1
            src = torch.arange(col - 1, col + ln - 1, device=device)
            src[:1] = P - 1
            src_col_NT[n, t_real] = src
            row_N[n] = r
            col += ln
    return PackedLayout(ids, pos, seg, row_N, src_col_NT, length_N)
