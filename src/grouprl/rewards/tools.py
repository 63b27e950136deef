"""Rewards of multi-turn, tool-using trajectories (registered in `REWARDS`).

They read the `trajectory` column (each row's `Rollouts.meta`, rollout/multiturn.py): its
messages, tool calls, tool errors and group. Without that column (a single-turn run) they
return None for every row, so a misplaced reward is reported, not silently zero.
"""

from __future__ import annotations

import math
from typing import Any

from grouprl.rewards.base import REWARDS, last_assistant_text


def _correct(traj: dict[str, Any], gold: Any) -> bool:
    if gold is None:
        return False
    norm = " ".join(last_assistant_text(traj.get("messages", [])).casefold().split())
    return norm == " ".join(str(gold).casefold().split())


def otc_tool_reward(m: int, n: int, c: float = 1.0) -> float:
    """OTC's tool-use reward for m calls when the fewest calls of a correct trajectory in the
    group is n (0 if none): f(m, n) = 0 if m = n = 0, m if n = 0, else 2nm / (m + n);
    r = 1 if f = n = 0, cos(m*pi / (2m + c)) if n = 0, else sin(f*pi / (2n))."""
    if n == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    f = 2 * n * m / (m + n)
    return math.sin(f * math.pi / (2 * n))


@REWARDS.register("tool_efficiency")
def tool_efficiency(
    prompts: list,
    completions: list,
    answer: list | None = None,
    trajectory: list | None = None,
    *,
    c: float = 1.0,
    alpha: float = 1.0,
    **kw: Any,
) -> list[float | None]:
    """OTC, "Acting Less is Reasoning More: Teaching Model to Act Efficiently" (Optimal Tool
    Calls, arXiv 2504.14870): r = alpha * r_tool(m, n) * r_correct, where m is the
    trajectory's tool calls, n the fewest calls among its group's correct trajectories
    (0 if none is correct), r_tool the sin/cos shaping of `otc_tool_reward`, and r_correct
    1 when the final model message equals the `answer` column (casefolded, whitespace
    collapsed), else 0: a wrong answer gets 0 however it used its tools. c = 1 and
    alpha = 1 as in a third-party reimplementation (the paper's values unread: `reading`)."""
    if trajectory is None:
        return [None] * len(completions)
    golds = answer if answer is not None else [None] * len(trajectory)
    ok = [_correct(t, g) for t, g in zip(trajectory, golds, strict=True)]
    fewest: dict[Any, int] = {}
    for t, good in zip(trajectory, ok, strict=True):
        if good:
            g = t.get("group")
            fewest[g] = min(fewest.get(g, t["tool_calls"]), t["tool_calls"])
    return [
        alpha * otc_tool_reward(int(t["tool_calls"]), fewest.get(t.get("group"), 0), c) * good
        for t, good in zip(trajectory, ok, strict=True)
    ]


@REWARDS.register("tool_call_format")
def tool_call_format(
    prompts: list, completions: list, trajectory: list | None = None, **kw: Any
) -> list[float | None]:
    """The share of the trajectory's attempted tool calls that were well-formed and ran
    without error (1.0 when it attempted none): malformed JSON, an unknown tool, bad
    arguments, an exception or a timeout each count against it (ours)."""
    if trajectory is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for t in trajectory:
        attempted = int(t.get("tool_calls", 0)) + int(t.get("tool_malformed", 0))
        out.append(1.0 - int(t.get("tool_errors", 0)) / attempted if attempted else 1.0)
    return out
