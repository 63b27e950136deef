"""Turn sampled prompts and rollouts into the inputs reward functions expect (TRL layout)."""

from __future__ import annotations

from typing import Any

from grouprl.data.datasets import PromptExample


def reward_inputs(
    examples: list[PromptExample], completions: list[str], group_size: int
) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """prompts_N, completions_N, columns (each a list of N), with each prompt repeated G times.

    Conversational prompts get conversational completions ([{"role": "assistant", ...}]),
    as TRL passes them, so a TRL reward file works unchanged.
    """
    prompts = [ex.prompt for ex in examples for _ in range(group_size)]
    comps: list[Any] = [
        [{"role": "assistant", "content": c}] if isinstance(p, list) else c
        for p, c in zip(prompts, completions, strict=True)
    ]
    keys: dict[str, None] = {}
    for ex in examples:
        keys.update(dict.fromkeys(ex.columns))
    columns = {k: [ex.columns.get(k) for ex in examples for _ in range(group_size)] for k in keys}
    return prompts, comps, columns


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def rollout_columns(ro: Any, max_new_tokens: int) -> dict[str, list[Any]]:
    """Extra reward kwargs from the rollouts: token ids (as TRL passes `completion_ids`) and
    the max completion length (for length shaping such as DAPO's overlong penalty)."""
    return {
        "completion_ids": [
            row[: int(n)].tolist()
            for row, n in zip(ro.completion_ids_NT, ro.lengths_N, strict=True)
        ],
        "max_completion_length": [max_new_tokens] * ro.num_rollouts,
    }
