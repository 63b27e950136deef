"""Micro-batch slices of an optimizer batch (whole groups when a loss couples a group's rows)."""

from __future__ import annotations


def micro_batches(n: int, size: int, group_size: int = 1) -> list[slice]:
    """Slices of `size` rows over n rows; with `group_size` > 1 the size is rounded down to
    whole groups (at least one group), so no group is split across micro-batches."""
    if group_size > 1:
        size = max(group_size, size - size % group_size)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
