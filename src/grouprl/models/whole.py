"""A tensor whole: a DTensor (a shard under train.strategy fsdp2) is gathered, anything else
is returned as it is. The gather is collective: every process calls it, in the same order."""

from __future__ import annotations

from typing import Any


def whole(t: Any) -> Any:
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t
