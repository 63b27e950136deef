"""Shared-prefix packing: rows that share a prompt become one group `[prompt; c_1; ...; c_G]`,
and groups that fit share a packed row.

"Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward" (arXiv 2506.05433).
The repeated layout feeds G rows `[prompt; c_j]`. Here consecutive rows that share a prompt
become ONE group of their real tokens only (attention mask 1; no padding inside), and the
groups of a micro-batch are packed into rows of up to the longest group's length (first-fit
decreasing, `assign_rows`), so a row may hold several short groups one after another. Split
attention, one rule (`allowed`) for the dense SDPA mask, the FlexAttention `mask_mod` and
the two-part form:

- a token attends only within its own group;
- a prompt token attends causally to its prompt;
- a token of completion j attends to the whole prompt and causally to completion j only;
- positions count real tokens from 0 at each group's prompt and restart at the prompt length
  for every completion, as in the repeated layout (cumsum of the attention mask, as HF
  generate computes them).

The prompt's keys/values exist once per group (never G copies); gradients that reach them
are the sum over the G completions, exactly as the repeated layout's sum over its G prompt
copies. A completion's first real token is predicted by the last prompt token, every later
real token by the real token before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask

from grouprl.models.two_part import TwoPartPlan

# A segment id says which group of its packed row a token belongs to and which part of it:
# group * SEG_STRIDE + part (part 0 the prompt, j >= 1 completion j); -1 is padding. A row
# holding one group has the ids 0 (prompt) and j (completion j).
SEG_STRIDE = 1 << 20


def segment_id(group: int, part: int) -> int:
    """The segment id of `part` (0 prompt, j completion j) of the row's `group`-th group."""
    return group * SEG_STRIDE + part


def group_of(seg: Tensor) -> Tensor:
    """Which group of its row a token belongs to (padding counts as group 0)."""
    return seg.clamp(min=0) // SEG_STRIDE


def part_of(seg: Tensor) -> Tensor:
    """0 for a prompt token, j for a token of completion j (meaningless for padding)."""
    return seg % SEG_STRIDE


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

    Segments (`segment_id`): -1 padding, else a group of the row and a part of it (0 prompt,
    j completion j). Allowed when k is real, k <= q (causal in packing order), k is in q's
    group, and k is in that group's prompt or in q's own completion; with a sliding window w
    (Mistral-style) also pos_q - pos_k < w, positions being the repeated layout's. A group's
    prompt comes first, so a prompt query only ever sees its own prompt's keys. A real query
    sees at least itself and a padding query (group 0, after every group) the row's first
    prompt, so no softmax row is empty (no NaN).
    """
    same_group = group_of(seg_k) == group_of(seg_q)
    ok = (k <= q) & (seg_k >= 0) & same_group & ((part_of(seg_k) == 0) | (seg_k == seg_q))
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


def unit_ids(segment_RL: Tensor) -> Tensor:
    """[R, L] -> [R, L]: each token's unit, a (row, group of the row) pair numbered row by row
    (0..U-1); -1 for padding. A row's groups are numbered 0.. without gaps."""
    if segment_RL.shape[1] == 0:
        return segment_RL.clone()
    real_RL = segment_RL >= 0
    grp_RL = group_of(segment_RL)
    groups_R = torch.where(real_RL, grp_RL + 1, 0).amax(1)
    first_R = groups_R.cumsum(0) - groups_R
    return torch.where(real_RL, first_R[:, None] + grp_RL, -1)


@dataclass
class PackedLayout:
    """Where every token of a packed micro-batch sits.

    R packed rows of length L, each holding one or more groups `[prompt; c_1; ...; c_G]`
    one after another. segment_RL: -1 padding, else `segment_id(group of the row, part)`.
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
        """Where each group's prompt and completions sit, with the `allowed` rule as the mask
        of each completion slot over [its prompt; its completion] (cached per sliding
        window)."""
        plan = self._masks.get("two_part")
        if plan is None:
            seg = self.segment_RL
            plan = self._masks["two_part"] = TwoPartPlan.of(unit_ids(seg), part_of(seg))
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
    """`allowed` for the completion slots of `plan` (queries) over [the slots of their
    group's prompt; the slots of the same completion] (keys): [U*Gm, 1, Cm, Pm+Cm].

    An absent key slot is segment -1. An absent query slot sits at its group's first prompt
    token (the plan's column there), so as a query it sees that one key: no empty row.
    """
    seg_RL, pos_RL = layout.segment_RL, layout.position_ids_RL
    Gm, Cm = plan.Gm, plan.Cm
    row_U1 = plan.row_U[:, None]

    def grid(x_UM: Tensor) -> Tensor:  # [U, Gm*Cm] -> [U*Gm, Cm]
        return x_UM.reshape(-1, Cm)

    def per_completion(x_UP: Tensor) -> Tensor:  # [U, Pm] -> [U*Gm, Pm]
        return x_UP.repeat_interleave(Gm, 0)

    col_q = plan.comp_col_UM
    seg_q, pos_q = seg_RL[row_U1, col_q], pos_RL[row_U1, col_q]
    seg_own = torch.where(plan.comp_real_UM, seg_q, -1)
    col_p = plan.prompt_col_UP
    seg_p = torch.where(plan.prompt_real_UP, seg_RL[row_U1, col_p], -1)
    pos_p = pos_RL[row_U1, col_p]
    seg_q, col_q, pos_q, seg_own = grid(seg_q), grid(col_q), grid(pos_q), grid(seg_own)
    seg_p, col_p, pos_p = per_completion(seg_p), per_completion(col_p), per_completion(pos_p)
    to_prompt = allowed(
        seg_q[:, :, None],
        seg_p[:, None, :],
        col_q[:, :, None],
        col_p[:, None, :],
        pos_q[:, :, None],
        pos_p[:, None, :],
        window,
    )
    to_own = allowed(
        seg_q[:, :, None],
        seg_own[:, None, :],
        col_q[:, :, None],
        col_q[:, None, :],
        pos_q[:, :, None],
        pos_q[:, None, :],
        window,
    )
    return torch.cat([to_prompt, to_own], dim=2)[:, None]


def group_spans(prompt_ids_NP: Tensor, prompt_mask_NP: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive rows with the same prompt (one group each)."""
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


def assign_rows(length_K: Sequence[int], row_len: int | None = None) -> list[list[int]]:
    """Which groups share each packed row: first-fit decreasing into rows of `row_len` tokens
    (default: the longest group, so no row is longer than it and rows x length never grows
    over one group per row).

    length_K: each group's packed length. Returns the groups of each row, in index order;
    rows in the order they were opened (the first holds the longest group). Ties go to the
    lower index, so the result depends on the lengths only. A group longer than `row_len`
    gets a row of its own.
    """
    cap = max(length_K, default=0) if row_len is None else row_len
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(length_K)), key=lambda k: (-length_K[k], k)):
        r = next((r for r, free in enumerate(room) if length_K[k] <= free), None)
        if r is None:
            rows.append([k])
            room.append(cap - length_K[k])
        else:
            rows[r].append(k)
            room[r] -= length_K[k]
    return [sorted(ks) for ks in rows]


def padded_tokens(length_K: Sequence[int], pack_rows: bool = True) -> int:
    """R x L of the packed layout of groups of these lengths (`pack_groups` lays them out so)."""
    rows = len(assign_rows(length_K)) if pack_rows else len(length_K)
    return rows * max(length_K, default=0)


def pack_groups(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    attention_mask_NT: Tensor,
    *,
    pad_token_id: int = 0,
    pack_rows: bool = True,
) -> PackedLayout:
    """Pack rows that share a prompt into groups `[prompt; c_1; ...; c_G]` of real tokens, and
    groups into packed rows: several to a row where they fit within the longest group's
    length (`assign_rows`), or one group per row with `pack_rows=False`.

    Prompts may be left- or right-padded and a completion's attention mask may have holes
    (padding between real tokens): the masks say which tokens are real, and only those are
    packed. Groups may have any size (under SEG_STRIDE completions).
    """
    device = completion_ids_NT.device
    N, T = completion_ids_NT.shape
    real_NT = attention_mask_NT.bool()
    length_N = real_NT.sum(dim=1).long()
    spans = group_spans(prompt_ids_NP, prompt_mask_NP)
    prompts = [prompt_ids_NP[s][prompt_mask_NP[s].bool()] for s, _ in spans]
    length_K = [len(p) + int(length_N[s:e].sum()) for p, (s, e) in zip(prompts, spans, strict=True)]
    rows = assign_rows(length_K) if pack_rows else [[k] for k in range(len(spans))]
    R, L = len(rows), max(length_K, default=0)
    ids = torch.full((R, L), pad_token_id, dtype=completion_ids_NT.dtype, device=device)
    pos = torch.zeros((R, L), dtype=torch.long, device=device)
    seg = torch.full((R, L), -1, dtype=torch.long, device=device)
    row_N = torch.zeros(N, dtype=torch.long, device=device)
    src_col_NT = torch.zeros((N, T), dtype=torch.long, device=device)  # 0 where not real
    for r, ks in enumerate(rows):
        col, g = 0, 0  # next free column; this row's next group number
        for k in ks:
            (s, e), p = spans[k], prompts[k]
            row_N[s:e] = r
            if length_K[k] == 0:  # no tokens: takes no columns and no group number
                continue
            P = len(p)
            if P == 0:
                raise ValueError(
                    "cannot pack an empty prompt: the first completion token has no predictor"
                )
            if e - s >= SEG_STRIDE:
                raise ValueError(f"a group of {e - s} completions: at most {SEG_STRIDE - 1}")
            ids[r, col : col + P] = p
            pos[r, col : col + P] = torch.arange(P, device=device)
            seg[r, col : col + P] = segment_id(g, 0)
            last_prompt = col + P - 1
            col += P
            for j, n in enumerate(range(s, e), start=1):
                t_real = real_NT[n].nonzero().squeeze(1)
                ln = len(t_real)
                ids[r, col : col + ln] = completion_ids_NT[n, t_real]
                pos[r, col : col + ln] = torch.arange(P, P + ln, device=device)
                seg[r, col : col + ln] = segment_id(g, j)
                # real token 0 is predicted by the last prompt token, real token i by i-1
                src = torch.arange(col - 1, col + ln - 1, device=device)
                src[:1] = last_prompt
                src_col_NT[n, t_real] = src
                col += ln
            g += 1
    return PackedLayout(ids, pos, seg, row_N, src_col_NT, length_N)
