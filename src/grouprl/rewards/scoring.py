"""Score rollouts: the prompts, completions and columns reward functions expect (TRL layout)."""

from __future__ import annotations

from typing import Any

from grouprl.data.datasets import PromptExample
from grouprl.rewards.base import RewardResult, RewardSet, last_assistant_text
from grouprl.rollout.base import Rollouts


def reward_inputs(
    examples: list[PromptExample],
    completions: list[str],
    group_size: int,
    meta: list[dict[str, Any]] | None = None,
) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """prompts_N, completions_N, columns (each a list of N), with each prompt repeated G times.

    Conversational prompts get conversational completions ([{"role": "assistant", ...}]),
    as TRL passes them, so a TRL reward file works unchanged. A multi-turn trajectory
    (`meta` with its messages, rollout/multiturn.py) gives its messages (assistant and
    tool) to conversational prompts, and its final model message to string prompts (the
    answer; the whole trajectory is the `trajectory` column).
    """
    prompts = [ex.prompt for ex in examples for _ in range(group_size)]
    if meta is not None and all("messages" in m for m in meta):
        comps: list[Any] = [
            m["messages"] if isinstance(p, list) else last_assistant_text(m["messages"])
            for p, m in zip(prompts, meta, strict=True)
        ]
    else:
        comps = [
            [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(prompts, completions, strict=True)
        ]
    keys: dict[str, None] = {}
    for ex in examples:
        keys.update(dict.fromkeys(ex.columns))
    columns = {k: [ex.columns.get(k) for ex in examples for _ in range(group_size)] for k in keys}
    return prompts, comps, columns


def rollout_columns(ro: Rollouts, max_new_tokens: int) -> dict[str, list[Any]]:
    """Extra reward kwargs from the rollouts: token ids (as TRL passes `completion_ids`) and
    the max completion length (for length shaping such as DAPO's overlong penalty), each
    row's prompt group in this call (`group_index`: 0..B−1, for batch-aware rewards such as
    GRPO-λ); for multi-turn rollouts also `trajectory` (each row's `Rollouts.meta`: messages,
    turns, tool calls and errors, the environment's reward pieces, its group)."""
    extra: dict[str, list[Any]] = {}
    if ro.meta is not None and all("turns" in m for m in ro.meta):
        extra["trajectory"] = list(ro.meta)
    return extra | {
        "completion_ids": [
            row[mask.bool()].tolist()
            for row, mask in zip(ro.completion_ids_NT, ro.attention_mask_NT, strict=True)
        ],
        "max_completion_length": [max_new_tokens] * ro.num_rollouts,
        "group_index": [i // ro.group_size for i in range(ro.num_rollouts)],
    }


def score_rollouts(
    rewards: RewardSet,
    examples: list[PromptExample],
    ro: Rollouts,
    max_new_tokens: int,
    extra_columns: dict[str, list[Any]] | None = None,
) -> RewardResult:
    """Run every reward function on the B*G completions of `examples` (rows of a group
    contiguous); dataset columns first, rollout columns where no dataset column has the name."""
    prompts, comps, columns = reward_inputs(examples, ro.completions, ro.group_size, ro.meta)
    for key, values in {**rollout_columns(ro, max_new_tokens), **(extra_columns or {})}.items():
        columns.setdefault(key, values)
    return rewards(prompts, comps, columns)
