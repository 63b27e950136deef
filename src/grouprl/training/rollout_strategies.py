"""Rollout strategies (`rollout.strategy`): what the collector does with a scored batch before
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

import json
import math
import re
from dataclasses import replace
from typing import Any

import torch

from grouprl.data.datasets import PromptExample
from grouprl.registry import Registry
from grouprl.rollout.base import rollouts_from_rows
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


@ROLLOUT_STRATEGIES.register("plain")
class Plain(Strategy):
    """Sample once, train on what was sampled (the default)."""

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        return batch, {}


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


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@ROLLOUT_STRATEGIES.register("dataset_reset")
class DatasetReset(Strategy):
    """Dataset Reset Policy Optimization: some rollouts start from a prefix of a reference
    solution instead of the bare prompt.

    "Dataset Reset Policy Optimization for RLHF" (DR-PO), arXiv 2404.08495 (abstract: the
    policy is reset to states of the offline data; the rule below is a reading). For each
    group, the last `reset_num` rollouts are replaced: h ~ U{1, ..., ⌊max_frac·L⌋} tokens of
    the row's `solution_column` (L its length in tokens) are appended to the prompt, and
    the policy continues from there. The prefix is context (in the row's prompt, never
    trained); the rewards read prefix + continuation. Rows without a solution keep their
    rollouts. Needs an engine that continues token ids (hf, vllm).
    """

    needs_continuation = True

    def __init__(
        self,
        *,
        solution_column: str = "solution",
        reset_num: int = 4,
        max_frac: float = 0.5,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        if reset_num < 1:
            raise ValueError(f"rollout.strategy.reset_num: must be >= 1, got {reset_num}")
        if not 0.0 < max_frac < 1.0:
            raise ValueError(f"rollout.strategy.max_frac: must be in (0, 1), got {max_frac}")
        self.solution_column, self.reset_num = solution_column, reset_num
        self.max_frac, self.warmup_steps, self.seed = max_frac, warmup_steps, seed

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        if ctx.continue_ids is None or ctx.tokenizer is None or ctx.score is None:
            raise ValueError(
                "rollout.strategy: dataset_reset continues from token ids; use an engine "
                "that declares it (rollout.engine hf or vllm)"
            )
        tok = ctx.tokenizer
        k = min(self.reset_num, G)
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        todo, contexts, prefixes, prompts = [], [], [], []
        for g in range(B):
            sol = batch.examples[g].columns.get(self.solution_column)
            if not isinstance(sol, str) or not sol:
                continue
            sol_ids = tok(sol, add_special_tokens=False)["input_ids"]
            cap = int(self.max_frac * len(sol_ids))
            if cap < 1:
                continue
            row = g * G  # the group's prompt ids, unpadded
            p_mask = batch.rollouts.prompt_mask_NP[row].bool()
            prompt = batch.rollouts.prompt_ids_NP[row][p_mask].tolist()
            for _ in range(k):
                h = int(torch.randint(1, cap + 1, (1,), generator=rng))
                prefixes.append(sol_ids[:h])
                contexts.append(prompt + sol_ids[:h])
                prompts.append(prompt)
            todo.append(g)
        metrics: dict[str, float] = {"reset/groups": float(len(todo))}
        if not todo:
            return batch, metrics
        outs = ctx.continue_ids(contexts, 1)
        texts = [
            tok.decode(pre, skip_special_tokens=True) + tok.decode(ids, skip_special_tokens=True)
            for pre, (ids, _) in zip(prefixes, outs, strict=True)
        ]
        ro = rollouts_from_rows(
            contexts,  # the prefix is context: in the row's prompt
            [ids for ids, _ in outs],
            texts=texts,
            group_size=k,
            pad_token_id=ctx.pad_token_id,
            eos_ids=_eos_ids(tok),
        )
        new = ctx.score([batch.examples[g] for g in todo], ro)
        rows = [g * G + G - k + j for g in todo for j in range(k)]
        batch = replace_rows(batch, new, rows, list(range(len(rows))), ctx.pad_token_id)
        levels = _hint_levels(batch)
        for r in rows:
            levels[r] = 1
        batch.extra["hint_level"] = levels
        metrics["reset/prefix_tokens_mean"] = sum(map(len, prefixes)) / len(prefixes)
        ok = new.rewards_N[torch.isfinite(new.rewards_N)]
        metrics["reset/reward_mean"] = float(ok.mean()) if ok.numel() else 0.0
        return batch, metrics


def decay_exit_rewards(correct_G: list[bool]) -> list[float]:
    """S-GRPO's serial reward, the group ordered from the earliest exit to the full answer:
    walking early -> late and counting the correct answers so far (N_right), a correct
    answer gets 1 / 2^(N_right − 1), a wrong one 0."""
    out, n_right = [], 0
    for ok in correct_G:
        if ok:
            n_right += 1
            out.append(1.0 / 2 ** (n_right - 1))
        else:
            out.append(0.0)
    return out


EXIT_TEXT = "Time is limited, stop thinking and start answering.\n</think>\n\n"


@ROLLOUT_STRATEGIES.register("serial_exit")
class SerialExit(Strategy):
    """S-GRPO: a serial group of early exits from one chain of thought, rewarded more for
    answering correctly earlier.

    "S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models", arXiv 2505.07686
    (the form of a secondary analysis; no code: a reading). For each prompt, one sampled
    rollout is the full chain of thought; G − 1 exit
    positions P_j are drawn without repeats from the thinking tokens (those before
    `think_end`, else the whole completion); at each, `exit_text` is appended and the
    policy writes the answer. The group, ordered from the earliest exit to the full
    answer, is rewarded by `decay_exit_rewards` on the correctness the rewards give
    (combined reward >= success_at): 1, 1/2, 1/4, ... for the correct answers in that
    order, 0 for wrong ones. Trained tokens: the thinking prefix and the answer (the
    injected exit text is context). Pair it with `advantage: {name: grpo, scale: none}`
    (the paper's A = r − mean). Needs an engine that continues token ids (hf, vllm).
    Only one completion per prompt is sampled first (`samples_per_prompt`); the group of
    G = rollout.num_generations rows is built from it.
    """

    needs_continuation = True
    samples_per_prompt = 1

    def __init__(
        self,
        *,
        exit_text: str = EXIT_TEXT,
        think_end: str = "</think>",
        answer_tokens: int = 0,
        success_at: float = 1.0,
        seed: int = 0,
    ) -> None:
        if answer_tokens < 0:
            raise ValueError(f"rollout.strategy.answer_tokens: must be >= 0, got {answer_tokens}")
        self.exit_text, self.think_end = exit_text, think_end
        self.answer_tokens, self.success_at, self.seed = answer_tokens, success_at, seed

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        if ctx.continue_ids is None or ctx.tokenizer is None or ctx.score is None:
            raise ValueError(
                "rollout.strategy: serial_exit continues from token ids; use an engine that "
                "declares it (rollout.engine hf or vllm)"
            )
        tok, ro = ctx.tokenizer, batch.rollouts
        B, first = batch.num_groups, ro.group_size  # first: the chains sampled per prompt
        G = ctx.group_size or first
        exit_ids = tok(self.exit_text, add_special_tokens=False)["input_ids"]
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        plan: list[tuple[int, list[int], list[int], list[int]]] = []  # (g, prompt, cot, exits)
        for g in range(B):
            row = g * first
            prompt = ro.prompt_ids_NP[row][ro.prompt_mask_NP[row].bool()].tolist()
            cot = ro.completion_ids_NT[row][ro.attention_mask_NT[row].bool()].tolist()
            text = ""
            n_think = len(cot)
            for k, tid in enumerate(cot):  # thinking ends where think_end starts
                text += tok.decode([tid])
                if self.think_end and self.think_end in text:
                    n_think = k
                    break
            m = min(G - 1, max(n_think - 1, 0))
            cand = torch.randperm(max(n_think - 1, 0), generator=rng)[:m] + 1  # P in 1..n−1
            plan.append((g, prompt, cot, sorted(int(x) for x in cand)))
        contexts = [pr + cot[:pj] + exit_ids for _, pr, cot, exits in plan for pj in exits]
        answers = ctx.continue_ids(contexts, 1) if contexts else []
        # rows per group: the exits, then the full answer; groups short of exits (thinking
        # too short) repeat the full answer, counted once in the reward walk
        prompts, comps, masks, texts, sources = [], [], [], [], []
        it = iter(answers)
        cap = self.answer_tokens
        for g, pr, cot, exits in plan:
            for pj in exits:
                ans = next(it)[0]
                ans = ans[:cap] if cap else ans
                ids = cot[:pj] + exit_ids + ans
                prompts.append(pr)
                comps.append(ids)
                masks.append([1.0] * pj + [0.0] * len(exit_ids) + [1.0] * len(ans))
                texts.append(tok.decode(ids, skip_special_tokens=True))
                sources.append(("exit", g))
            for _ in range(G - len(exits)):
                prompts.append(pr)
                comps.append(cot)
                masks.append([1.0] * len(cot))
                texts.append(ro.completions[g * first])
                sources.append(("full", g))
        new = ctx.score(
            batch.examples,
            rollouts_from_rows(
                prompts,
                comps,
                texts=texts,
                loss_masks=masks,
                group_size=G,
                pad_token_id=ctx.pad_token_id,
                eos_ids=_eos_ids(tok),
            ),
        )
        correct = (new.rewards_N >= self.success_at).tolist()
        decayed: list[float] = []
        for g, (_, _, _, exits) in enumerate(plan):
            rows = correct[g * G : (g + 1) * G]
            walk = decay_exit_rewards(rows[: len(exits) + 1])
            # repeats of the full answer (a short chain of thought) share its reward
            decayed += walk + [walk[-1]] * (G - len(exits) - 1)
        rewards_N = torch.tensor(decayed, dtype=new.rewards_N.dtype)
        rewards_N = torch.where(torch.isnan(new.rewards_N), new.rewards_N, rewards_N)
        out = replace(
            batch,
            rollouts=new.rollouts,
            rewards_NK=new.rewards_NK,
            rewards_N=rewards_N,
            extra={**new.extra, "exit": [kind == "exit" for kind, _ in sources]},
        )
        n_exits = sum(len(e) for *_, e in plan)
        metrics = {
            "serial_exit/exits_per_group": n_exits / max(B, 1),
            "serial_exit/correct_exit_frac": sum(
                c for c, (kind, _) in zip(correct, sources, strict=True) if kind == "exit"
            )
            / max(n_exits, 1),
        }
        return out, metrics


@ROLLOUT_STRATEGIES.register("segment_mc")
class SegmentMC(Strategy):
    """Segment Policy Optimization (SPO-chain): Monte-Carlo values at cut points of each
    completion, for the `segment` advantage.

    "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large
    Language Models", arXiv 2505.23564 (authors' code: AIFrameResearch/SPO,
    `math_episode_generator_with_mc_advantages.py`). Cut points: the positions t − 1 whose
    sampled token had probability < `prob_cut` under the sampler (every `every`-th of
    them), when the engine reports its log-probs; otherwise every `interval` tokens (ours).
    V(cut) = the mean reward of `mc_rollouts` continuations of prompt + completion[:cut]
    (scored on prefix + continuation); V at the end is the completion's own reward; V at
    the start is its group's mean reward (ours: the code values the prompt only when it has
    a prompt value). Each row gets `extra["segment_values"]`: [[position, value], ...].
    Needs an engine that continues token ids (hf, vllm).
    """

    needs_continuation = True

    def __init__(
        self,
        *,
        mc_rollouts: int = 9,
        interval: int = 5,
        prob_cut: float = 0.9,
        every: int = 5,
        max_cuts: int = 16,
    ) -> None:
        for key, v in (
            ("mc_rollouts", mc_rollouts),
            ("interval", interval),
            ("every", every),
            ("max_cuts", max_cuts),
        ):
            if v < 1:
                raise ValueError(f"rollout.strategy.{key}: must be >= 1, got {v}")
        if not 0.0 < prob_cut <= 1.0:
            raise ValueError(f"rollout.strategy.prob_cut: must be in (0, 1], got {prob_cut}")
        self.mc, self.interval, self.prob_cut = mc_rollouts, interval, prob_cut
        self.every, self.max_cuts = every, max_cuts

    def cut_points(self, n: int, logp_T: list[float] | None) -> list[int]:
        """Cut positions in 1..n−1 (a prefix of that many tokens is valued)."""
        if logp_T is not None:
            low = [t for t in range(1, n) if math.exp(logp_T[t - 1]) < self.prob_cut]
            cuts = low[self.every - 1 :: self.every]
        else:
            cuts = list(range(self.interval, n, self.interval))
        return cuts[: self.max_cuts]

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        if ctx.continue_ids is None or ctx.tokenizer is None or ctx.score is None:
            raise ValueError(
                "rollout.strategy: segment_mc continues from token ids; use an engine that "
                "declares it (rollout.engine hf or vllm)"
            )
        tok, ro = ctx.tokenizer, batch.rollouts
        B, G = batch.num_groups, ro.group_size
        r_BG = batch.rewards_N.view(B, G).double()
        contexts, owners, prefixes = [], [], []
        cuts_N: list[list[int]] = []
        for i in range(ro.num_rollouts):
            real = ro.attention_mask_NT[i].bool()
            comp = ro.completion_ids_NT[i][real].tolist()
            logp = None
            if ro.sampling_logp_NT is not None:
                logp = ro.sampling_logp_NT[i][real].tolist()
            cuts = self.cut_points(len(comp), logp)
            cuts_N.append(cuts)
            prompt = ro.prompt_ids_NP[i][ro.prompt_mask_NP[i].bool()].tolist()
            for c in cuts:
                contexts.append(prompt + comp[:c])
                prefixes.append(comp[:c])
                owners.append(i)
        values: dict[tuple[int, int], float] = {}
        if contexts:
            outs = ctx.continue_ids(contexts, self.mc)
            K = len(contexts)
            texts = [
                tok.decode(prefixes[k] + outs[k * self.mc + j][0], skip_special_tokens=True)
                for k in range(K)
                for j in range(self.mc)
            ]
            examples = [batch.examples[owners[k] // G] for k in range(K)]
            mc = ctx.score(
                examples,
                rollouts_from_rows(
                    [contexts[k] for k in range(K) for _ in range(self.mc)],
                    [outs[k * self.mc + j][0] for k in range(K) for j in range(self.mc)],
                    texts=texts,
                    group_size=self.mc,
                    pad_token_id=ctx.pad_token_id,
                    eos_ids=_eos_ids(tok),
                ),
            )
            v_K = torch.nanmean(mc.rewards_N.view(K, self.mc).double(), dim=1)
            k = 0
            for i, cuts in enumerate(cuts_N):
                for c in cuts:
                    values[(i, c)] = float(v_K[k])
                    k += 1
        seg: list[list[list[float]]] = []
        for i, cuts in enumerate(cuts_N):
            g = i // G
            v0 = float(torch.nanmean(r_BG[g])) if bool(torch.isfinite(r_BG[g]).any()) else 0.0
            n = int(ro.attention_mask_NT[i].sum())
            row = [[0.0, v0]] + [[float(c), values[(i, c)]] for c in cuts]
            r = float(batch.rewards_N[i])
            row.append([float(n), r if math.isfinite(r) else v0])
            seg.append(row)
        batch.extra["segment_values"] = seg
        n_cuts = sum(map(len, cuts_N))
        return batch, {
            "segment/cuts_per_row": n_cuts / max(ro.num_rollouts, 1),
            "segment/mc_rollouts": float(n_cuts * self.mc),
        }


def build_strategy(spec: dict[str, Any] | None) -> Any:
    """The `rollout.strategy` named by spec ({name: ..., params...})."""
    spec = dict(spec or {"name": "plain"})
    name = spec.pop("name", "plain")
    ROLLOUT_STRATEGIES.check_params(name, spec, "rollout.strategy")
    return ROLLOUT_STRATEGIES.get(name)(**spec)
