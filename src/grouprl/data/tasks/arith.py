"""`arith`: integer addition (or subtraction) problems with exact answers.

The prompt is "a+b=" and the completion is the plain answer ("46"). All operand pairs
are enumerated and split once with a fixed seed, so the train and held-out problems never
overlap whatever the run's seed.
"""

from __future__ import annotations

import random
from typing import Any

from grouprl.data.tasks.base import TASKS, Task

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


@TASKS.register("arith")
def arith(
    *, digits: int = 2, ops: str = "+", eval_fraction: float = 0.2, split_seed: int = 1234
) -> Task:
    """Every pair of `digits`-digit operands for each op in `ops`; `eval_fraction` held out."""
    if digits < 1 or digits > 4:
        raise ValueError(f"arith: digits must be in 1..4, got {digits}")
    bad = [o for o in ops if o not in _OPS]
    if bad or not ops:
        raise ValueError(f"arith: ops must be made of {''.join(_OPS)}, got {ops!r}")
    lo, hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits
    rows: list[dict[str, Any]] = []
    for op in ops:
        for a in range(lo, hi):
            for b in range(lo, hi):
                rows.append({"prompt": f"{a}{op}{b}=", "answer": str(_OPS[op](a, b))})
    rng = random.Random(split_seed)
    rng.shuffle(rows)
    n_eval = max(1, int(len(rows) * eval_fraction))
    return Task(
        name="arith",
        train_rows=rows[n_eval:],
        eval_rows=rows[:n_eval],
        rewards=[{"name": "exact_match", "weight": 1.0}],
        correct_reward="exact_match",
        chars="0123456789+-=",
    )
