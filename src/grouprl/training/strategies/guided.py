"""Guided sampling: rows sampled with help in the prompt (a hint, demonstrations, the gold
answer) and trained *without* it, so the policy learns to act in the plain context.

Such rows keep the plain prompt as their training prompt and the helped one as their
sampling prompt (`Rollouts.trained_with`); the learner takes π_old of those rows in the
sampling context, so the ratio is π_θ(o | plain prompt) / π_old(o | helped prompt), and
the mismatch between the two contexts is what the clip sees.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from grouprl.data.datasets import PromptExample
from grouprl.rollout.base import Rollouts
from grouprl.training.collect import ScoredBatch, StrategyContext, concat_rollouts
from grouprl.training.strategies.base import (
    ROLLOUT_STRATEGIES,
    Strategy,
    _hint_levels,
    _level_metrics,
    append_to_prompt,
    failed_groups,
    replace_rows,
    with_hint,
)
from grouprl.training.strategies.hints import SageHints

TRAIN_PROMPTS = ("plain", "sampled")


def plain_prompts(batch: ScoredBatch, groups: list[int], per_group: int) -> tuple:
    """The training prompts (ids, mask) of `per_group` new rows for each of `groups`: each
    group's own prompt, as its first row holds it."""
    ro = batch.rollouts.behavior_view()  # a row's own sampling prompt is its plain prompt
    G, dev = ro.group_size, ro.prompt_ids_NP.device
    src = torch.tensor([g * G for g in groups for _ in range(per_group)], device=dev)
    return ro.prompt_ids_NP[src], ro.prompt_mask_NP[src]


def _check_train_prompt(train_prompt: str) -> None:
    if train_prompt not in TRAIN_PROMPTS:
        raise ValueError(
            f"rollout.strategy.train_prompt: one of {', '.join(TRAIN_PROMPTS)}, got {train_prompt!r}"
        )


@ROLLOUT_STRATEGIES.register("guide_hints")
class GuideHints(Strategy):
    """Guide-GRPO (Adaptive Guidance): a failed group is sampled again with a hint, and the
    hinted rollouts train as if sampled without it.

    "Adaptive Guidance Accelerates Reinforcement Learning of Reasoning Models", arXiv
    2506.13923 (authors' code vaskar-open-source-research/guide_rl, read through notes).

        after `warmup_steps`: for each group where no rollout succeeds and the row has a
        hint: sample `replace_num` rollouts (default G: the whole group, as the code)
        from prompt + hint_template.format(hint); they replace the group's last rows
        when they carry signal (the whole group: some but not all succeed, as the code's
        accuracy window; fewer rows: at least one success), else the group is kept;
        with train_prompt "plain" they train with the plain prompt and
            ρ = π_θ(o | q) / π_old(o | q, h)
        (the code's importance-weighted re-roll); "sampled" keeps the hint in their
        training prompt (as Scaf-GRPO does)

    The code shapes the hinted rows' ρ as ρ / (ρ + γ), unclipped, with γ the 0.9 quantile
    of a micro-batch's off-policy ratios: `loss: {name: ppo_clip, offpolicy: shaped}` gives
    the shaping with a fixed γ (a quantile per micro-batch would make the gradient depend
    on the split). The hint is the row's `hint_column` (a string, or a list: `level` picks
    one, 1-based); the code's hints are a dataset column too.
    """

    def __init__(
        self,
        *,
        hint_column: str = "hints",
        level: int = 1,
        replace_num: int | None = None,
        warmup_steps: int = 0,
        hint_template: str = "\n\nHint: {hint}\n",
        train_prompt: str = "plain",
        success_at: float = 1.0,
    ) -> None:
        if level < 1:
            raise ValueError(f"rollout.strategy.level: must be >= 1, got {level}")
        if replace_num is not None and replace_num < 1:
            raise ValueError(f"rollout.strategy.replace_num: must be >= 1, got {replace_num}")
        if "{hint}" not in hint_template:
            raise ValueError("rollout.strategy.hint_template: must contain {hint}")
        _check_train_prompt(train_prompt)
        self.hint_column, self.level, self.replace_num = hint_column, level, replace_num
        self.warmup_steps, self.hint_template = warmup_steps, hint_template
        self.train_prompt, self.success_at = train_prompt, success_at

    def hint_of(self, ex: PromptExample) -> str | None:
        value = ex.columns.get(self.hint_column)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if not all(isinstance(h, str) for h in value):
                raise ValueError(
                    f"rollout.strategy.hint_column: row {ex.row}'s {self.hint_column!r} must "
                    "be a string or a list of strings"
                )
            return value[min(self.level, len(value)) - 1]
        return None

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        failed = failed_groups(batch.rewards_N.view(B, G), self.success_at)
        todo = [g for g in failed if self.hint_of(batch.examples[g]) is not None]
        levels = _hint_levels(batch)
        if not todo:
            batch.extra["hint_level"] = levels
            return batch, _level_metrics(levels, len(failed), 0, 0)
        k = min(self.replace_num or G, G)
        examples = [batch.examples[g] for g in todo]
        texts = [
            ctx.render(with_hint(ex.prompt, self.hint_of(ex) or "", self.hint_template))
            for ex in examples
        ]
        new = ctx.sample(examples, texts, k)
        if self.train_prompt == "plain":
            new = replace(new, rollouts=new.rollouts.trained_with(*plain_prompts(batch, todo, k)))
        ok_BK = new.rewards_N.view(len(todo), k) >= self.success_at
        rows, new_rows, rescued = [], [], 0
        for j, g in enumerate(todo):
            wins = int(ok_BK[j].sum())
            signal = 0 < wins < k if k == G else wins > 0
            if not signal:
                continue
            rescued += 1
            rows += [g * G + G - 1 - i for i in range(k)]
            new_rows += [j * k + i for i in range(k)]
        if rows:
            batch = replace_rows(batch, new, rows, new_rows, ctx.pad_token_id)
            for r in rows:
                levels[r] = 1
        batch.extra["hint_level"] = levels
        metrics = _level_metrics(levels, len(failed), rescued, 1)
        metrics["guide/hinted_success_frac"] = float(ok_BK.float().mean())
        return batch, metrics


def demonstrations(
    examples: list[PromptExample], g: int, shots: int, solution_column: str
) -> list[tuple[str, str]]:
    """Up to `shots` (question, solution) pairs of the other examples of the batch that have
    a solution, the ones after g first (wrapping around): deterministic, never g's own."""
    out: list[tuple[str, str]] = []
    B = len(examples)
    for d in range(1, B):
        ex = examples[(g + d) % B]
        sol = ex.columns.get(solution_column)
        if isinstance(sol, str) and sol and ex.row != examples[g].row:
            out.append((SageHints.question(ex.prompt), sol))
            if len(out) == shots:
                break
    return out


def prepend_to_prompt(prompt: str | list[dict], text: str) -> str | list[dict]:
    """The prompt with `text` before its (first) user message (a copy)."""
    if isinstance(prompt, str):
        return text + prompt
    messages = [dict(m) for m in prompt]
    for m in messages:
        if m.get("role") == "user":
            m["content"] = text + str(m.get("content", ""))
            return messages
    return [{"role": "user", "content": text}, *messages]


@ROLLOUT_STRATEGIES.register("icpo")
class ICPO(Strategy):
    """ICPO: some rollouts of each group are sampled by the policy itself with dataset
    demonstrations in context, trained without them, with an expert bonus that anneals.

    "Think Outside the Policy: In-Context Steered Policy Optimization", arXiv 2510.26519
    (authors' code Celine-hxy/ICPO `verl/recipe/icpo`, read through notes). Mixed-policy
    GRPO with implicit expert forcing:

        for each group: sample `expert_num` rollouts (the code: 1 of G = 8) from
            demos + prompt,  demos = `shots` (question, solution) pairs (1) of other rows
            of the batch (`solution_column`; the code draws them at random from the train
            set), each as demo_template
        expert region reject sampling (`reject_wrong`): only those with reward >=
            success_at enter the group (the paper's rule; the released code keeps wrong
            ones with reward 0: reject_wrong false)
        they replace the group's last rollouts and share its GRPO statistics; with
            train_prompt "plain" they train with the plain prompt (the code's
            `_reorganize_batch`)
        annealed expert bonus: a correct one's reward += bonus · max(0, 1 − step /
            anneal_steps)  (the code: bonus 1, linear over the run's 400 steps)

    The code trains expert rows with LUFFY's shaping f(π) = π/(π + 0.1), unclipped, no
    π_old: `loss: {name: ppo_clip, offpolicy: shaped, offpolicy_ratio: none}` (the
    recipe's). With `only_failed` only groups with no success are steered.
    """

    def __init__(
        self,
        *,
        expert_num: int = 1,
        shots: int = 1,
        solution_column: str = "solution",
        demo_template: str = "{question}\n{solution}\n\n",
        bonus: float = 1.0,
        anneal_steps: int = 400,
        reject_wrong: bool = True,
        only_failed: bool = False,
        train_prompt: str = "plain",
        warmup_steps: int = 0,
        success_at: float = 1.0,
    ) -> None:
        if expert_num < 1:
            raise ValueError(f"rollout.strategy.expert_num: must be >= 1, got {expert_num}")
        if shots < 1:
            raise ValueError(f"rollout.strategy.shots: must be >= 1, got {shots}")
        if anneal_steps < 1:
            raise ValueError(f"rollout.strategy.anneal_steps: must be >= 1, got {anneal_steps}")
        missing = [f for f in ("{question}", "{solution}") if f not in demo_template]
        if missing:
            raise ValueError(f"rollout.strategy.demo_template: must contain {', '.join(missing)}")
        _check_train_prompt(train_prompt)
        self.expert_num, self.shots, self.solution_column = expert_num, shots, solution_column
        self.demo_template, self.bonus, self.anneal_steps = demo_template, bonus, anneal_steps
        self.reject_wrong, self.only_failed = reject_wrong, only_failed
        self.train_prompt, self.warmup_steps, self.success_at = (
            train_prompt,
            warmup_steps,
            success_at,
        )

    def bonus_at(self, step: int) -> float:
        """The annealed expert bonus: bonus · max(0, 1 − step / anneal_steps)."""
        return self.bonus * max(0.0, 1.0 - step / self.anneal_steps)

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        groups = (
            failed_groups(batch.rewards_N.view(B, G), self.success_at)
            if self.only_failed
            else list(range(B))
        )
        demos = {
            g: demonstrations(batch.examples, g, self.shots, self.solution_column) for g in groups
        }
        todo = [g for g in groups if demos[g]]
        levels = _hint_levels(batch)
        metrics = {"icpo/steered_groups": float(len(todo)), "icpo/bonus": self.bonus_at(ctx.step)}
        if not todo:
            batch.extra["hint_level"] = levels
            return batch, metrics
        k = min(self.expert_num, G)
        examples = [batch.examples[g] for g in todo]
        texts = []
        for g, ex in zip(todo, examples, strict=True):
            prefix = "".join(self.demo_template.format(question=q, solution=s) for q, s in demos[g])
            texts.append(ctx.render(prepend_to_prompt(ex.prompt, prefix)))
        new = ctx.sample(examples, texts, k)
        if self.train_prompt == "plain":
            new = replace(new, rollouts=new.rollouts.trained_with(*plain_prompts(batch, todo, k)))
        ok_N = new.rewards_N >= self.success_at
        ok_BK = ok_N.view(len(todo), k)
        bonus = self.bonus_at(ctx.step)
        new.rewards_N = torch.where(ok_N, new.rewards_N + bonus, new.rewards_N)
        rows, new_rows = [], []
        for j, g in enumerate(todo):
            kept = [i for i in range(k) if bool(ok_BK[j, i]) or not self.reject_wrong]
            for slot, i in enumerate(kept):
                rows.append(g * G + G - 1 - slot)
                new_rows.append(j * k + i)
        if rows:
            batch = replace_rows(batch, new, rows, new_rows, ctx.pad_token_id)
            for r in rows:
                levels[r] = 1
        batch.extra["hint_level"] = levels
        metrics["icpo/kept_frac"] = float(ok_BK.float().mean())
        metrics["icpo/expert_rows"] = float(len(rows))
        return batch, metrics


def append_rows(batch: ScoredBatch, new: ScoredBatch, pad: int) -> ScoredBatch:
    """`batch` with `new`'s rows appended to its groups: new holds the same number of rows
    per group (k), which follow each group's own rows; the group size becomes G + k."""
    B, G = batch.num_groups, batch.rollouts.group_size
    N, M = batch.rollouts.num_rollouts, new.rollouts.num_rollouts
    k = M // B
    both = concat_rollouts([batch.rollouts, new.rollouts], pad)
    order = [
        i for g in range(B) for i in [*range(g * G, g * G + G), *range(N + g * k, N + g * k + k)]
    ]
    idx = torch.tensor(order, dtype=torch.long)
    extra = {}
    for key in dict.fromkeys([*batch.extra, *new.extra]):
        joined = list(batch.extra.get(key, [None] * N)) + list(new.extra.get(key, [None] * M))
        extra[key] = [joined[i] for i in order]
    dev = batch.rewards_N.device
    return replace(
        batch,
        rollouts=replace(both.select(idx), group_size=G + k),
        rewards_NK=torch.cat([batch.rewards_NK, new.rewards_NK.to(dev)])[idx],
        rewards_N=torch.cat([batch.rewards_N, new.rewards_N.to(dev)])[idx],
        extra=extra,
    )


@ROLLOUT_STRATEGIES.register("expo")
class ExPO(Strategy):
    """ExPO: each prompt gets one self-explanation, sampled with the gold answer in the prompt
    and trained by likelihood without it, next to the unchanged GRPO group.

    "ExPO: Unlocking Hard Reasoning with Self-Explanation-Guided Reinforcement Learning",
    arXiv 2507.02834 (from a detailed summary of v3: a reading). ExP-GRPO:

        J = GRPO over the G rollouts o_i ~ π_old(· | q)           (unchanged)
          + β · log π_θ(c̃ | q),   c̃ ~ π_θ(· | q, a*)               (regularizer sft_rows)

    c̃ is sampled from prompt + explain_template.format(answer = a*) (a* from
    `answer_column`) and appended to its group as a demonstration row (`Rollouts.sft_N`:
    NaN reward, no advantage, no policy term) with the plain prompt. With `require_correct`
    (our choice, default on) a c̃ whose own reward is below `success_at` is not trained
    (its tokens are masked out). Needs `regularizers: [{name: sft_rows, beta: 0.04}]`.
    """

    makes_sft_rows = True

    def __init__(
        self,
        *,
        answer_column: str = "answer",
        explain_template: str = "\n\nThe answer is {answer}. Explain how to reach it.\n",
        require_correct: bool = True,
        warmup_steps: int = 0,
        success_at: float = 1.0,
    ) -> None:
        if "{answer}" not in explain_template:
            raise ValueError("rollout.strategy.explain_template: must contain {answer}")
        self.answer_column, self.explain_template = answer_column, explain_template
        self.require_correct = require_correct
        self.warmup_steps, self.success_at = warmup_steps, success_at

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B = batch.num_groups
        if ctx.step < self.warmup_steps:
            return batch, {}
        examples = batch.examples
        texts = []
        for ex in examples:
            answer = ex.columns.get(self.answer_column)
            if answer is None:
                raise ValueError(
                    f"rollout.strategy (expo): row {ex.row} has no {self.answer_column!r} "
                    "column (the gold answer the self-explanation is sampled with)"
                )
            texts.append(
                ctx.render(append_to_prompt(ex.prompt, self.explain_template.format(answer=answer)))
            )
        new = ctx.sample(examples, texts, 1)
        ro: Rollouts = new.rollouts
        ids, mask = plain_prompts(batch, list(range(B)), 1)
        ok_N = new.rewards_N >= self.success_at
        keep_N = ok_N if self.require_correct else torch.ones_like(ok_N)
        keep_N1 = keep_N.to(ro.loss_mask_NT.device, ro.loss_mask_NT.dtype)[:, None]
        ro = replace(
            ro,
            prompt_ids_NP=ids.to(ro.prompt_ids_NP.device),
            prompt_mask_NP=mask.to(ro.prompt_mask_NP.device),
            loss_mask_NT=ro.loss_mask_NT * keep_N1,
            sft_N=torch.ones(ro.num_rollouts, dtype=torch.bool),
            # sampled in the answer's context: no sampler log-probs for the plain one
            sampling_logp_NT=None
            if ro.sampling_logp_NT is None or batch.rollouts.sampling_logp_NT is None
            else torch.full_like(ro.sampling_logp_NT, float("nan")),
        )
        demo = replace(
            new,
            rollouts=ro,
            rewards_NK=torch.full_like(new.rewards_NK, float("nan")),
            rewards_N=torch.full_like(new.rewards_N, float("nan")),
        )
        out = append_rows(batch, demo, ctx.pad_token_id)
        metrics = {
            "expo/explained_correct_frac": float(ok_N.float().mean()),
            "expo/trained_rows": float(keep_N.sum()),
        }
        return out, metrics
