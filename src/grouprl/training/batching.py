"""Micro-batch slices of an optimizer batch (whole groups when a loss couples a group's rows),
by a row count or by a token budget."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate

from torch import Tensor

from grouprl.models.packing import group_spans, padded_tokens


def micro_batches(n: int, size: int, group_size: int = 1) -> list[slice]:
    """Slices of `size` rows over n rows; with `group_size` > 1 the size is rounded down to
    whole groups (at least one group), so no group is split across micro-batches."""
    if group_size > 1:
        size = max(group_size, size - size % group_size)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def budget_micro_batches(
    cost: Callable[[int, int], int], num_units: int, unit_rows: int, budget: int
) -> list[slice]:
    """Slices of rows, whole units of `unit_rows` rows each, grown in order while the
    micro-batch's cost fits `budget`. cost(u, v): the padded tokens of units u..v-1 in one
    forward. A unit over the budget alone gets a micro-batch of its own."""
    out: list[slice] = []
    start = 0
    for u in range(1, num_units):
        if cost(start, u + 1) > budget:
            out.append(slice(start * unit_rows, u * unit_rows))
            start = u
    if num_units > start:
        out.append(slice(start * unit_rows, num_units * unit_rows))
    return out


def token_micro_batches(
    length_U: Sequence[int], rows_per_unit: int, unit_rows: int, budget: int
) -> list[slice]:
    """Slices of rows, whole units of `unit_rows` rows each (a group, or one row), packed in
    order while the micro-batch's padded size fits `budget` tokens.

    length_U: each unit's length in the forward (its longest row); rows_per_unit: forward
    rows a unit takes. A micro-batch of units u..v costs (v-u+1) * rows_per_unit *
    max(length) tokens (rows are padded to the longest).
    """

    def cost(u: int, v: int) -> int:
        return (v - u) * rows_per_unit * max(length_U[u:v])

    return budget_micro_batches(cost, len(length_U), unit_rows, budget)


def packed_micro_batches(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    comp_len_N: Sequence[int],
    unit_rows: int,
    budget: int,
    pack_rows: bool = True,
) -> list[slice]:
    """Token-budget slices for the packed layout, whole units of `unit_rows` rows: a
    micro-batch costs R x L after `pack_groups` packs its groups several to a row
    (`packing.padded_tokens`), so a short group adds its own length, not the longest one's.
    `pack_rows`: the forward's own setting (off: one group per row, each padded to the
    longest).

    comp_len_N: real completion tokens of each row. The groups of rows a..b-1 are the runs of
    rows that share a prompt (`group_spans`, found once on the whole batch) cut at a and b,
    as `pack_groups` finds them in that slice.
    """
    span_S = group_spans(prompt_ids_NP, prompt_mask_NP)
    prompt_len_S = [int(prompt_mask_NP[s].sum()) for s, _ in span_S]
    start_S = [s for s, _ in span_S]
    cum_N = [0, *accumulate(int(c) for c in comp_len_N)]

    def group_lengths(a: int, b: int) -> list[int]:
        out = []
        for i in range(max(bisect_right(start_S, a) - 1, 0), len(span_S)):
            s, e = span_S[i]
            if s >= b:
                break
            out.append(prompt_len_S[i] + cum_N[min(e, b)] - cum_N[max(s, a)])
        return out

    def cost(u: int, v: int) -> int:
        return padded_tokens(group_lengths(u * unit_rows, v * unit_rows), pack_rows)

    return budget_micro_batches(cost, len(comp_len_N) // unit_rows, unit_rows, budget)
