"""Rollout strategies: the registry, the base class and the helpers they share.

Rollout strategies (`rollout.strategy`): what the collector does with a scored batch before
planning, such as sampling again, with a hint, the groups that no rollout solved.

A strategy is called once per sampling round with the scored groups and a
`StrategyContext` that can sample and score more: `ctx.sample(examples, texts, n)` draws n
completions per text (a prompt written by the strategy, e.g. the problem plus a hint) and
scores them against the *plain* examples (gold answers, reward columns), so rewards never
see the hint. Rows may carry prompts of their own: a hinted row keeps the hint in its
prompt ids and the learner trains it with that prompt (the shared-prefix forward packs
rows by identical prompts, so a group whose rows differ is still exact). Each row's hint
level goes to the batch's `extra["hint_level"]` (0: no hint) and `hint/*` metrics.

The prompt sampler (`data.sampler`) is updated before a strategy runs: it learns each
prompt's plain pass rate, not the hinted one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import replace

import torch

from grouprl.registry import Registry
from grouprl.training.collect import ScoredBatch, StrategyContext, concat_rollouts

ROLLOUT_STRATEGIES: Registry = Registry("rollout strategy")


def append_to_prompt(prompt: str | list[dict], text: str) -> str | list[dict]:
    """The prompt with `text` appended to its (last) user message (a copy)."""
    if isinstance(prompt, str):
        return prompt + text
    messages = [dict(m) for m in prompt]
    for m in reversed(messages):
        if m.get("role") == "user":
            m["content"] = f"{m.get('content', '')}{text}"
            return messages
    return [*messages, {"role": "user", "content": text}]


def with_hint(prompt: str | list[dict], hint: str, template: str) -> str | list[dict]:
    """The prompt with `template.format(hint=hint)` appended to its (last) user message."""
    return append_to_prompt(prompt, template.format(hint=hint))


def failed_groups(rewards_BG: torch.Tensor, success_at: float) -> list[int]:
    """Groups where no scored rollout reaches `success_at` (NaN never does)."""
    ok_BG = rewards_BG >= success_at  # NaN compares False
    return [g for g in range(rewards_BG.shape[0]) if not bool(ok_BG[g].any())]


def replace_rows(
    batch: ScoredBatch, new: ScoredBatch, rows: list[int], new_rows: list[int], pad: int
) -> ScoredBatch:
    """`batch` with its rows `rows` replaced by `new`'s rows `new_rows` (same order); the
    group structure and the examples stay `batch`'s."""
    N = batch.rollouts.num_rollouts
    both = concat_rollouts([batch.rollouts, new.rollouts], pad)
    order = list(range(N))
    for r, k in zip(rows, new_rows, strict=True):
        order[r] = N + k
    idx = torch.tensor(order, dtype=torch.long)
    rewards_NK = torch.cat([batch.rewards_NK, new.rewards_NK.to(batch.rewards_NK.device)])
    rewards_N = torch.cat([batch.rewards_N, new.rewards_N.to(batch.rewards_N.device)])
    extra = {}
    for key in dict.fromkeys([*batch.extra, *new.extra]):
        mine = batch.extra.get(key, [None] * N)
        theirs = new.extra.get(key, [None] * new.rollouts.num_rollouts)
        joined = list(mine) + list(theirs)
        extra[key] = [joined[i] for i in order]
    ro = both.select(idx)
    return replace(
        batch,
        rollouts=replace(ro, group_size=batch.rollouts.group_size),
        rewards_NK=rewards_NK[idx],
        rewards_N=rewards_N[idx],
        extra=extra,
    )


def replace_solved_groups(
    batch: ScoredBatch,
    new: ScoredBatch,
    groups: list[int],
    levels: list[int],
    level: int,
    success_at: float,
    pad: int,
) -> tuple[ScoredBatch, list[int]]:
    """Replace whole groups: `new` holds G rows for each of `groups` (in order); a group
    whose new rows hold a success replaces its old rows, and those rows get `level` in
    `levels` (updated in place). Returns the batch and the groups replaced."""
    G = batch.rollouts.group_size
    ok_BG = new.rewards_N.view(len(groups), G) >= success_at
    rows, new_rows, solved = [], [], []
    for j, g in enumerate(groups):
        if bool(ok_BG[j].any()):
            solved.append(g)
            rows += list(range(g * G, (g + 1) * G))
            new_rows += list(range(j * G, (j + 1) * G))
    if rows:
        batch = replace_rows(batch, new, rows, new_rows, pad)
        for r in rows:
            levels[r] = level
    return batch, solved


def _hint_levels(batch: ScoredBatch) -> list[int]:
    return list(batch.extra.get("hint_level") or [0] * batch.rollouts.num_rollouts)


def _level_metrics(levels: list[int], failed: int, rescued: int, calls: int) -> dict[str, float]:
    n = max(len(levels), 1)
    out = {
        "hint/failed_groups": float(failed),
        "hint/rescued_groups": float(rescued),
        "hint/sampling_calls": float(calls),
        "hint/hinted_rows_frac": sum(lv > 0 for lv in levels) / n,
    }
    for lv in sorted({lv for lv in levels if lv > 0}):
        out[f"hint/used_level_{lv}"] = sum(x == lv for x in levels) / n
    return out


class Strategy:
    """Base of the rollout strategies: what they declare."""

    needs_continuation = False  # continues rollouts from token ids (engines with sample_token_ids)
    samples_per_prompt: int | None = None  # first sampling per prompt, when not G
    makes_sft_rows = False  # adds rows trained by likelihood only (Rollouts.sft_N; ExPO)
    refill_safe = True  # may run once per round of a refilling sample filter (DAPO)

    def observe(self, update_metrics: dict[str, float]) -> None:
        """The metrics of the update that just ran (a strategy may steer by them)."""

    def begin(self) -> None:
        """Called in the training thread right before a collection starts: what `observe`
        recorded becomes what the collection reads, so a collection running in the
        background (train.async one_step) never sees an update that finished after it began."""


@ROLLOUT_STRATEGIES.register("plain")
class Plain(Strategy):
    """Sample once, train on what was sampled (the default)."""

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        return batch, {}


def thinking_length(ids: list[int], decode: Callable[[list[int]], str], think_end: str) -> int:
    """Tokens of `ids` before the one where `think_end` starts (all of them without it), EOS
    excluded. A marker may span several tokens ("</think>" over "<", "/", "think", ">"):
    the count stops at the token holding its first character."""
    if not think_end:
        return len(ids)
    text, starts = "", []  # starts[k]: the character where token k begins
    for tid in ids:
        piece = decode([tid])
        starts.append(len(text))
        text += piece
        # only the tail can hold a new match: linear in the completion's length
        tail = max(len(text) - len(piece) - len(think_end) + 1, 0)
        at = text.find(think_end, tail)
        if at >= 0:
            return bisect_right(starts, at) - 1
    return len(ids)


def require_continuation(ctx: StrategyContext, name: str) -> None:
    """Refuse a run whose engine cannot continue token ids (the strategy `name` needs it)."""
    if ctx.continue_ids is None or ctx.tokenizer is None or ctx.score is None:
        raise ValueError(
            f"rollout.strategy: {name} continues from token ids; use an engine that declares "
            "it (rollout.engine hf or vllm)"
        )
