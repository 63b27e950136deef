"""Micro-batch slices of an optimizer batch (whole groups when a loss couples a group's rows),
by a row count or by a token budget."""

from __future__ import annotations

from collections.abc import Sequence


def micro_batches(n: int, size: int, group_size: int = 1) -> list[slice]:
    """Slices of `size` rows over n rows; with `group_size` > 1 the size is rounded down to
    whole groups (at least one group), so no group is split across micro-batches."""
    if group_size > 1:
        size = max(group_size, size - size % group_size)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def token_micro_batches(
    length_U: Sequence[int], rows_per_unit: int, unit_rows: int, budget: int
) -> list[slice]:
    """Slices of rows, whole units of `unit_rows` rows each (a group, or one row), packed in
    order while the micro-batch's padded size fits `budget` tokens.

    length_U: each unit's length in the forward (its packed row, or its longest row);
    rows_per_unit: forward rows a unit takes (1 packed row, or `unit_rows` repeated rows).
    A micro-batch of units u..v costs (v-u+1) * rows_per_unit * max(length) tokens (rows
    are padded to the longest). A unit over the budget alone gets a micro-batch of its own.
    """
    out: list[slice] = []
    start, longest = 0, 0
    for u, length in enumerate(length_U):
        longest_with = max(longest, int(length))
        if u > start and (u - start + 1) * rows_per_unit * longest_with > budget:
            out.append(slice(start * unit_rows, u * unit_rows))
            start, longest_with = u, int(length)
        longest = longest_with
    if len(length_U) > start:
        out.append(slice(start * unit_rows, len(length_U) * unit_rows))
    return out
