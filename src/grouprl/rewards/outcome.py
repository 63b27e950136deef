"""One call of one reward function, caught: its checked values, or how it failed.

`call_reward` runs the same way in-process and inside the reward worker, so both paths
check outputs alike; an `Outcome` holds only plain values, so it crosses a pipe pickled.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Status = Literal["ok", "bad_output", "error", "timeout", "crash"]


@dataclass
class Outcome:
    """What one call of a reward function gave.

    status: ok; bad_output (not N numbers or Nones); error (it raised); timeout (killed at
            its deadline); crash (its worker died, or it ran out of memory).
    values: N floats, NaN where the function said None or gave a non-finite number (ok only).
    error:  one line saying what went wrong; detail: the traceback text of an exception.
    """

    status: Status
    values: list[float] | None = None
    n_none: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status != "ok"


class BadOutput(Exception):
    """A reward function returned something that is not N numbers or Nones."""


def call_reward(fn: Callable[..., Any], kwargs: dict[str, Any], n: int) -> Outcome:
    """Run `fn(**kwargs)` on a batch of `n` and check what it returns; never raises an
    Exception (SystemExit and KeyboardInterrupt pass through)."""
    try:
        values, n_none = to_floats(fn(**kwargs), n)
        metrics = reported_metrics(fn)
    except BadOutput as e:
        return Outcome("bad_output", error=str(e))
    except MemoryError as e:  # its worker is replaced, which frees what it held
        return Outcome("crash", error=f"MemoryError: {e}", detail=traceback.format_exc())
    except Exception as e:
        return Outcome("error", error=f"{type(e).__name__}: {e}", detail=traceback.format_exc())
    return Outcome("ok", values=values, n_none=n_none, metrics=metrics)


def reported_metrics(fn: Callable[..., Any]) -> dict[str, float]:
    """The diagnostics a function reports about its last call (its `last_metrics` dict, e.g.
    TTRL's majority ratio), looked up through a functools.partial."""
    extra = getattr(getattr(fn, "func", fn), "last_metrics", None)
    if not isinstance(extra, dict):
        return {}
    try:
        return {str(key): float(val) for key, val in extra.items()}
    except (TypeError, ValueError) as e:
        raise BadOutput(f"last_metrics holds a value that is not a number: {e}") from None


def to_floats(out: Any, n: int) -> tuple[list[float], int]:
    """Check a function's output: n entries, each a number or None; None/non-finite -> NaN."""
    if isinstance(out, torch.Tensor):
        out = out.detach().reshape(-1).tolist() if out.dim() == 1 else out
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise BadOutput(f"expected a list of {n} numbers, got {type(out).__name__}")
    if len(out) != n:
        raise BadOutput(f"returned {len(out)} values for {n} completions")
    values: list[float] = []
    n_none = 0
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            values.append(math.nan)
            n_none += 1
        elif isinstance(v, (str, bytes, complex)) or not hasattr(v, "__float__"):
            raise BadOutput(f"entry {i} is {type(v).__name__} {v!r:.40}, not a number or None")
        else:  # bool, int, float, numpy scalars
            f = float(v)
            if not math.isfinite(f):
                n_none += 1
                f = math.nan
            values.append(f)
    return values, n_none
