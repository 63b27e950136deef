"""Hinted re-sampling: strategies that sample failed groups again with more in the prompt
(a dataset hint, a hint the policy writes, solved exemplars, the group's best draft)."""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from grouprl.data.datasets import PromptExample
from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import (
    ROLLOUT_STRATEGIES,
    Strategy,
    _hint_levels,
    _level_metrics,
    append_to_prompt,
    failed_groups,
    replace_rows,
    replace_solved_groups,
    with_hint,
)


@ROLLOUT_STRATEGIES.register("scaf_hints")
class ScafHints(Strategy):
    """Scaf-GRPO: failed groups get one rollout sampled with the lowest hint that works.

    "Scaf-GRPO: Scaffolded Group Relative Policy Optimization for Enhancing LLM Reasoning",
    arXiv 2510.19807 (authors' code: dvlab-research/Scaf-GRPO `hint_mix_grpo`).

        after `warmup_steps`: for each group where no rollout succeeds,
        for level = 1, 2, ..., len(hints): sample `replace_num` rollouts from
            prompt + hint_template.format(hint = hints[level − 1])
        at the first level with a success, the successful hinted rollouts replace the
        group's last rollouts (at most replace_num); the hint stays in their prompt

    Hints come from the dataset column `hint_column`: a list of strings in increasing
    detail (the paper's 12 levels in three tiers: knowledge, planning, solution chunks), or
    one string. A group whose hints all fail is kept as it was (no signal).
    """

    def __init__(
        self,
        *,
        hint_column: str = "hints",
        warmup_steps: int = 50,
        replace_num: int = 1,
        hint_template: str = "\n\nHint: {hint}\n",
        success_at: float = 1.0,
    ) -> None:
        self.success_at = success_at
        if warmup_steps < 0:
            raise ValueError(f"rollout.strategy.warmup_steps: must be >= 0, got {warmup_steps}")
        if replace_num < 1:
            raise ValueError(f"rollout.strategy.replace_num: must be >= 1, got {replace_num}")
        if "{hint}" not in hint_template:
            raise ValueError("rollout.strategy.hint_template: must contain {hint}")
        self.hint_column, self.warmup_steps = hint_column, warmup_steps
        self.replace_num, self.hint_template = replace_num, hint_template

    def hints_of(self, ex: PromptExample) -> list[str]:
        value = ex.columns.get(self.hint_column)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
            raise ValueError(
                f"rollout.strategy.hint_column: row {ex.row}'s {self.hint_column!r} must be a "
                f"string or a list of strings, got {type(value).__name__}"
            )
        return value

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        failed = failed_groups(batch.rewards_N.view(B, G), self.success_at)
        pending = [g for g in failed if self.hints_of(batch.examples[g])]
        levels = _hint_levels(batch)
        k = min(self.replace_num, G)
        rescued, calls, level = 0, 0, 0
        while pending:
            level += 1
            todo = [g for g in pending if len(self.hints_of(batch.examples[g])) >= level]
            if not todo:
                break
            examples = [batch.examples[g] for g in todo]
            texts = [
                ctx.render(with_hint(ex.prompt, self.hints_of(ex)[level - 1], self.hint_template))
                for ex in examples
            ]
            new = ctx.sample(examples, texts, k)
            calls += 1
            ok_BK = new.rewards_N.view(len(todo), k) >= self.success_at
            rows, new_rows, solved = [], [], []
            for j, g in enumerate(todo):
                wins = [i for i in range(k) if bool(ok_BK[j, i])]
                if not wins:
                    continue
                solved.append(g)
                for slot, i in enumerate(wins):  # the group's last rollouts are replaced
                    rows.append(g * G + G - 1 - slot)
                    new_rows.append(j * k + i)
            if rows:
                batch = replace_rows(batch, new, rows, new_rows, ctx.pad_token_id)
                for r in rows:
                    levels[r] = level
                rescued += len(solved)
            pending = [g for g in pending if g not in solved]
        batch.extra["hint_level"] = levels
        return batch, _level_metrics(levels, len(failed), rescued, calls)


SAGE_TUTOR = (
    "You are a tutor. Read the problem and its reference solution, then write three hints "
    "for a student, from minimal (level_1) to detailed (level_3). Never reveal the final "
    'answer. Reply with JSON only: {{"level_1": "...", "level_2": "...", "level_3": "..."}}'
    "\n\nProblem:\n{question}\n\nReference solution:\n{solution}\n"
)
SAGE_QUESTION = "Question:\n{question}\n\nHere is a hint to help you:\n{hint}"


def parse_hint_json(text: str, levels: int = 3) -> list[str] | None:
    """The hints `level_1..level_<levels>` of the first JSON object in `text`, or None."""
    for match in re.finditer(r"\{.*?\}", text, flags=re.S):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            hints = [obj.get(f"level_{i}") for i in range(1, levels + 1)]
            if all(isinstance(h, str) and h.strip() for h in hints):
                return [h.strip() for h in hints]  # type: ignore[union-attr]
    return None


@ROLLOUT_STRATEGIES.register("sage_hints")
class SageHints(Strategy):
    """SAGE: the policy writes hints from the reference solution for the groups it fails.

    "Self-Hinting Language Models Enhance Reinforcement Learning" (SAGE), arXiv 2602.03143
    (authors' code: BaohaoLiao/SAGE `recipe/hint`, method `sage`).

        for each group with no successful rollout:
          the policy itself writes {"level_1", "level_2", "level_3"} from (question,
          reference solution) with a tutoring prompt (`tutor_prompt`; up to `retries`
          tries to get parseable JSON)
          for level = 1, 2, 3: sample the whole group again (G rollouts) from
            "Question:\\n{q}\\n\\nHere is a hint to help you:\\n{hint}"
          the first level with a success replaces the group, trained as sampled (the
          hint stays in the prompt); a group no level rescues is kept as it was

    The reference solution comes from the dataset column `solution_column`; the question
    is the row's prompt (its last user message for chat prompts).
    """

    def __init__(
        self,
        *,
        solution_column: str = "solution",
        retries: int = 3,
        hint_tokens: int = 256,
        tutor_prompt: str = SAGE_TUTOR,
        question_template: str = SAGE_QUESTION,
        warmup_steps: int = 0,
        success_at: float = 1.0,
    ) -> None:
        self.success_at = success_at
        if retries < 1:
            raise ValueError(f"rollout.strategy.retries: must be >= 1, got {retries}")
        if hint_tokens < 1:
            raise ValueError(f"rollout.strategy.hint_tokens: must be >= 1, got {hint_tokens}")
        for key, tmpl, fields in (
            ("tutor_prompt", tutor_prompt, ("{question}", "{solution}")),
            ("question_template", question_template, ("{question}", "{hint}")),
        ):
            missing = [f for f in fields if f not in tmpl]
            if missing:
                raise ValueError(f"rollout.strategy.{key}: must contain {', '.join(missing)}")
        self.solution_column, self.retries, self.hint_tokens = solution_column, retries, hint_tokens
        self.tutor_prompt, self.question_template = tutor_prompt, question_template
        self.warmup_steps = warmup_steps

    @staticmethod
    def question(prompt: str | list[dict]) -> str:
        if isinstance(prompt, str):
            return prompt
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1]) if users else ""

    def write_hints(
        self, examples: list[PromptExample], ctx: StrategyContext
    ) -> list[list[str] | None]:
        """Three hints per example written by the policy, None where it never gave JSON."""
        assert ctx.write is not None, "sage_hints needs the collector's text generator"
        out: list[list[str] | None] = [None] * len(examples)
        for _ in range(self.retries):
            todo = [i for i, h in enumerate(out) if h is None]
            if not todo:
                break
            texts = [
                ctx.render(
                    self.tutor_prompt.format(
                        question=self.question(examples[i].prompt),
                        solution=examples[i].columns.get(self.solution_column, ""),
                    )
                )
                for i in todo
            ]
            for i, reply in zip(todo, ctx.write(texts, self.hint_tokens), strict=True):
                out[i] = parse_hint_json(reply)
        return out

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        failed = [
            g
            for g in failed_groups(batch.rewards_N.view(B, G), self.success_at)
            if batch.examples[g].columns.get(self.solution_column) is not None
        ]
        levels = _hint_levels(batch)
        if not failed:
            batch.extra["hint_level"] = levels
            return batch, _level_metrics(levels, 0, 0, 0)
        hints = dict(
            zip(failed, self.write_hints([batch.examples[g] for g in failed], ctx), strict=True)
        )
        pending = [g for g in failed if hints[g] is not None]
        unparsed = len(failed) - len(pending)
        rescued = calls = 0
        for level in (1, 2, 3):
            if not pending:
                break
            examples = [batch.examples[g] for g in pending]
            texts = [
                ctx.render(
                    self.question_template.format(
                        question=self.question(batch.examples[g].prompt),
                        hint=hints[g][level - 1],  # type: ignore[index]
                    )
                )
                for g in pending
            ]
            new = ctx.sample(examples, texts, G)
            calls += 1
            batch, solved = replace_solved_groups(
                batch, new, pending, levels, level, self.success_at, ctx.pad_token_id
            )
            rescued += len(solved)
            pending = [g for g in pending if g not in solved]
        batch.extra["hint_level"] = levels
        metrics = _level_metrics(levels, len(failed), rescued, calls)
        metrics["hint/unparsed_hints"] = float(unparsed)
        return batch, metrics


def char_ngrams(text: str, n: int = 3) -> set[str]:
    """The set of character n-grams of `text` (lower-cased, whitespace collapsed)."""
    t = " ".join(text.lower().split())
    return {t[i : i + n] for i in range(max(len(t) - n + 1, 1))}


def similarity(a: set[str], b: set[str]) -> float:
    """Jaccard similarity of two n-gram sets (0 when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@ROLLOUT_STRATEGIES.register("icl_seed")
class ICLSeed(Strategy):
    """XRPO's in-context seeding: all-fail groups are sampled again with solved problems in
    the prompt, retrieved from a growing corpus of verified successes.

    "XRPO: Pushing the limits of GRPO with Targeted Exploration and Exploitation", arXiv
    2510.06672 (from its reviews; no code: a reading). Every scored group with a success
    adds (question, first successful completion) to the corpus (one entry per prompt,
    the latest kept, at most `corpus_size`, oldest dropped). After `warmup_steps`, each
    group with no success gets the `k` most similar corpus entries of *other* prompts as
    exemplars (`exemplar_template` each, completions cut at `max_exemplar_chars`) before
    its prompt, and the whole group is sampled again; a group with a success replaces the
    original (trained with the exemplars in its prompt), one without is kept. No entry
    similar enough (`min_similarity`) -> the group is left as it was (zero-shot).

    Similarity: Jaccard of character 3-grams of the questions (XRPO uses an 8B embedding
    model; ours is a stand-in with no model). The corpus is saved in checkpoints.
    """

    def __init__(
        self,
        *,
        k: int = 2,
        corpus_size: int = 1000,
        warmup_steps: int = 0,
        exemplar_template: str = "{question}{answer}\n\n",
        max_exemplar_chars: int = 2000,
        min_similarity: float = 0.0,
        success_at: float = 1.0,
    ) -> None:
        if k < 1:
            raise ValueError(f"rollout.strategy.k: must be >= 1, got {k}")
        if corpus_size < 1:
            raise ValueError(f"rollout.strategy.corpus_size: must be >= 1, got {corpus_size}")
        missing = [f for f in ("{question}", "{answer}") if f not in exemplar_template]
        if missing:
            raise ValueError(
                f"rollout.strategy.exemplar_template: must contain {', '.join(missing)}"
            )
        self.k, self.corpus_size, self.warmup_steps = k, corpus_size, warmup_steps
        self.template, self.max_chars = exemplar_template, max_exemplar_chars
        self.min_similarity, self.success_at = min_similarity, success_at
        self.corpus: dict[str, tuple[str, str]] = {}  # prompt key -> (question, answer)

    @staticmethod
    def question(ex: PromptExample) -> str:
        return SageHints.question(ex.prompt)

    def remember(self, batch: ScoredBatch) -> int:
        """Add the batch's solved prompts to the corpus; returns how many were added."""
        B, G = batch.num_groups, batch.rollouts.group_size
        ok_BG = batch.rewards_N.view(B, G) >= self.success_at
        added = 0
        for g in range(B):
            wins = [j for j in range(G) if bool(ok_BG[g, j])]
            if not wins:
                continue
            ex = batch.examples[g]
            key = f"{ex.row}:{self.question(ex)}"
            answer = batch.rollouts.completions[g * G + wins[0]][: self.max_chars]
            self.corpus.pop(key, None)  # re-inserted last: the newest
            self.corpus[key] = (self.question(ex), answer)
            added += 1
        while len(self.corpus) > self.corpus_size:
            self.corpus.pop(next(iter(self.corpus)))
        return added

    def exemplars(self, ex: PromptExample) -> list[tuple[str, str]]:
        """The k corpus entries most similar to ex's question (other prompts only)."""
        own = f"{ex.row}:{self.question(ex)}"
        q = char_ngrams(self.question(ex))
        scored = [
            (similarity(q, char_ngrams(question)), key, (question, answer))
            for key, (question, answer) in self.corpus.items()
            if key != own
        ]
        scored = [x for x in scored if x[0] >= self.min_similarity]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [entry for _, _, entry in scored[: self.k]]

    def seeded(self, ex: PromptExample, shots: list[tuple[str, str]]) -> str | list[dict]:
        prefix = "".join(self.template.format(question=q, answer=a) for q, a in shots)
        if isinstance(ex.prompt, str):
            return prefix + ex.prompt
        messages = [dict(m) for m in ex.prompt]
        for m in messages:
            if m.get("role") == "user":
                m["content"] = prefix + str(m.get("content", ""))
                break
        return messages

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        added = self.remember(batch)
        levels = _hint_levels(batch)
        metrics = {"icl/corpus_size": float(len(self.corpus)), "icl/added": float(added)}
        if ctx.step < self.warmup_steps:
            return batch, metrics
        failed = failed_groups(batch.rewards_N.view(B, G), self.success_at)
        shots = {g: self.exemplars(batch.examples[g]) for g in failed}
        todo = [g for g in failed if shots[g]]
        rescued = 0
        if todo:
            examples = [batch.examples[g] for g in todo]
            texts = [ctx.render(self.seeded(batch.examples[g], shots[g])) for g in todo]
            new = ctx.sample(examples, texts, G)
            batch, solved = replace_solved_groups(
                batch, new, todo, levels, 1, self.success_at, ctx.pad_token_id
            )
            rescued = len(solved)
        batch.extra["hint_level"] = levels
        metrics.update(_level_metrics(levels, len(failed), rescued, int(bool(todo))))
        metrics["icl/seeded_groups"] = float(len(todo))
        return batch, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"corpus": [[k, q, a] for k, (q, a) in self.corpus.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.corpus = {str(k): (str(q), str(a)) for k, q, a in state.get("corpus", [])}


@ROLLOUT_STRATEGIES.register("igrpo")
class IGRPO(Strategy):
    """iGRPO: the group's best draft goes into the prompt and the policy trains on
    refinements of it.

    "iGRPO: Self-Feedback-Driven LLM Reasoning", arXiv 2602.09000 (abstract only: a
    reading). Stage 1: the G sampled completions are drafts, scored with the same rewards;
    the highest-reward draft of each group (ties: the first) is appended to the prompt
    with `refine_template`. Stage 2: G refinements are sampled from that prompt and scored;
    they replace the drafts and are what the update trains on (the draft stays in their
    prompt). Groups whose best draft is not finite (every reward NaN) keep their drafts.
    The step samples 2·G rollouts per prompt (drafts are not trained): halve
    rollout.num_generations to compare with GRPO at an equal rollout budget.
    """

    def __init__(
        self,
        *,
        refine_template: str = "\n\nA previous attempt:\n{draft}\n\nImprove it.\n",
        warmup_steps: int = 0,
    ) -> None:
        if "{draft}" not in refine_template:
            raise ValueError("rollout.strategy.refine_template: must contain {draft}")
        self.refine_template, self.warmup_steps = refine_template, warmup_steps

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        r_BG = batch.rewards_N.view(B, G)
        todo, drafts = [], []
        for g in range(B):
            finite = [j for j in range(G) if bool(torch.isfinite(r_BG[g, j]))]
            if not finite:
                continue
            best = max(finite, key=lambda j: (float(r_BG[g, j]), -j))
            todo.append(g)
            drafts.append(batch.rollouts.completions[g * G + best])
        metrics = {"igrpo/draft_reward_mean": float(r_BG[torch.isfinite(r_BG)].mean())}
        if not todo:
            return batch, metrics
        examples = [batch.examples[g] for g in todo]
        texts = [
            ctx.render(append_to_prompt(ex.prompt, self.refine_template.format(draft=d)))
            for ex, d in zip(examples, drafts, strict=True)
        ]
        new = ctx.sample(examples, texts, G)
        rows = [g * G + j for g in todo for j in range(G)]
        batch = replace_rows(batch, new, rows, list(range(len(rows))), ctx.pad_token_id)
        levels = _hint_levels(batch)
        for r in rows:
            levels[r] = 1
        batch.extra["hint_level"] = levels
        refined = new.rewards_N[torch.isfinite(new.rewards_N)]
        metrics["igrpo/refined_reward_mean"] = float(refined.mean()) if refined.numel() else 0.0
        return batch, metrics
