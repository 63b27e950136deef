"""Difficulty-aware augmentation: groups harder than the recent average are sampled again
with part of an answer-guided trace in the prompt, easier ones with distractors in it."""

from __future__ import annotations

import math
from typing import Any

import torch

from grouprl.data.datasets import PromptExample
from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import (
    ROLLOUT_STRATEGIES,
    Strategy,
    _hint_levels,
    append_to_prompt,
    replace_rows,
)

DISTRACTORS = (
    "Note: the weather was sunny that day.",
    "Note: a cup of tea was cooling on the table.",
    "Note: the room had a blue door.",
)


def _ceil(x: float) -> int:
    """⌈x⌉, forgiving float noise (0.3·10 is 3, not 4)."""
    return math.ceil(x - 1e-9)


@ROLLOUT_STRATEGIES.register("difficulty_aug")
class DifficultyAug(Strategy):
    """DeepVideo-R1's difficulty-aware augmentation, text analogue: a group much harder than
    the recent average is made easier with part of an answer-guided trace in its prompt, a
    group much easier is made harder with distractor sentences.

    "DeepVideo-R1: Video Reinforcement Fine-Tuning via Difficulty-aware Regressive GRPO",
    arXiv 2506.07464 §3.3, App. C.1 (video: hard inputs get reasoning cues, easy ones
    frame noise scaled by |ΔR|; the text forms below are ours).

        buffer: the last `window` finite rewards sampled (before this batch's)
        ΔR(x) = mean(buffer) − mean(finite rewards of x's group)    (empty buffer: no ΔR)
        ΔR > threshold (hard, made easier):
            sample `guide_samples` completions of x ⊕ answer_template(answer); keep the
            highest-reward one, y* (ties: the first)
            hint = y*[:⌈min(1, ΔR)·max_hint_frac·|y*|⌉]                (characters)
            the group is replaced by G samples of x ⊕ hint_template(hint) (hint kept)
        ΔR < −threshold (easy, made harder):
            k = ⌈min(1, |ΔR|)·max_distractors⌉ sentences of `distractors` (cyclic, from
            (step + prompt index) mod len) appended with distractor_template;
            the group is replaced by G samples of that prompt
        then the batch's own finite rewards join the buffer (the last `window` kept)

    The answer comes from the dataset column `answer_column`; a group without one is left
    alone. Rewards are always scored against the plain example. Replaced rows are trained
    with the prompt they were sampled from; `extra["aug"]` says "easier", "harder" or "",
    and made-easier rows get hint level 1. min(1, ·) assumes rewards in [0, 1]. The buffer
    is saved in checkpoints. Before `warmup_steps` the buffer only fills.
    """

    def __init__(
        self,
        *,
        window: int = 100,
        threshold: float = 0.1,
        guide_samples: int = 4,
        max_hint_frac: float = 0.5,
        max_distractors: int = 2,
        answer_column: str = "answer",
        answer_template: str = "\n\n(The answer is {answer}.)\n",
        hint_template: str = "\n\nPartial solution: {hint}",
        distractors: list[str] | tuple[str, ...] = DISTRACTORS,
        distractor_template: str = "\n\n{distractors}",
        warmup_steps: int = 0,
    ) -> None:
        for key, v in (("window", window), ("guide_samples", guide_samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"rollout.strategy.{key}: must be an integer >= 1, got {v!r}")
        for key, v in (("max_distractors", max_distractors), ("warmup_steps", warmup_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"rollout.strategy.{key}: must be an integer >= 0, got {v!r}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"rollout.strategy.threshold: must be >= 0, got {threshold}")
        if not 0.0 < max_hint_frac <= 1.0:
            raise ValueError(
                f"rollout.strategy.max_hint_frac: must be in (0, 1], got {max_hint_frac}"
            )
        for key, tmpl, field in (
            ("answer_template", answer_template, "{answer}"),
            ("hint_template", hint_template, "{hint}"),
            ("distractor_template", distractor_template, "{distractors}"),
        ):
            if field not in tmpl:
                raise ValueError(f"rollout.strategy.{key}: must contain {field}")
        if isinstance(distractors, str) or not all(isinstance(d, str) for d in distractors):
            raise ValueError("rollout.strategy.distractors: must be a list of strings")
        if max_distractors > 0 and not distractors:
            raise ValueError(
                "rollout.strategy.distractors: empty, but max_distractors > 0 asks for some"
            )
        self.window, self.threshold, self.guide_samples = window, float(threshold), guide_samples
        self.max_hint_frac, self.max_distractors = float(max_hint_frac), max_distractors
        self.answer_column, self.answer_template = answer_column, answer_template
        self.hint_template, self.distractor_template = hint_template, distractor_template
        self.distractors = list(distractors)
        self.warmup_steps = warmup_steps
        self.buffer: list[float] = []  # the last `window` finite rewards, oldest first

    # ------------------------------------------------------------------ the rule
    def buffer_mean(self) -> float | None:
        return sum(self.buffer) / len(self.buffer) if self.buffer else None

    def delta(self, rewards_G: torch.Tensor) -> float | None:
        """ΔR of one group's rewards against the buffer: None with an empty buffer or no
        finite reward in the group."""
        mean = self.buffer_mean()
        finite = rewards_G[torch.isfinite(rewards_G)]
        if mean is None or finite.numel() == 0:
            return None
        return mean - float(finite.double().mean())

    def hint_chars(self, delta: float, n: int) -> int:
        """How many characters of an n-character guided trace a group with ΔR = delta gets."""
        return min(n, max(1, _ceil(min(1.0, delta) * self.max_hint_frac * n))) if n else 0

    def distractor_count(self, delta: float) -> int:
        """How many distractor sentences a group with ΔR = delta (< 0) gets."""
        k = _ceil(min(1.0, abs(delta)) * self.max_distractors)
        return min(self.max_distractors, max(1, k)) if self.max_distractors else 0

    def push(self, rewards: list[float]) -> None:
        self.buffer = (self.buffer + [float(r) for r in rewards])[-self.window :]

    def answer_of(self, ex: PromptExample) -> str | None:
        value = ex.columns.get(self.answer_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return str(value)

    def with_distractors(self, prompt: str | list[dict], k: int, start: int) -> str | list[dict]:
        n = len(self.distractors)
        chosen = " ".join(self.distractors[(start + i) % n] for i in range(k))
        return append_to_prompt(prompt, self.distractor_template.format(distractors=chosen))

    # ------------------------------------------------------------------ the strategy
    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        r_BG = batch.rewards_N.view(B, G)
        own = [float(x) for x in batch.rewards_N[torch.isfinite(batch.rewards_N)].tolist()]
        mean = self.buffer_mean()
        metrics: dict[str, float] = {"aug/easier_groups": 0.0, "aug/harder_groups": 0.0}
        if mean is not None:
            metrics["aug/buffer_mean"] = mean
        if ctx.step < self.warmup_steps or mean is None:
            self.push(own)
            return batch, metrics
        deltas: list[float] = []
        hard: list[tuple[int, float, str]] = []
        easy: list[tuple[int, float]] = []
        skipped = 0
        for g in range(B):
            d = self.delta(r_BG[g])
            if d is None:
                continue
            deltas.append(d)
            if abs(d) <= self.threshold or (d < 0 and not self.max_distractors):
                continue
            answer = self.answer_of(batch.examples[g])
            if answer is None:
                skipped += 1
            elif d > 0:
                hard.append((g, d, answer))
            else:
                easy.append((g, d))
        plan: list[tuple[int, str, Any]] = []  # (group, "easier" | "harder", prompt)
        if hard:
            K = self.guide_samples
            examples = [batch.examples[g] for g, _, _ in hard]
            texts = [
                ctx.render(append_to_prompt(ex.prompt, self.answer_template.format(answer=a)))
                for ex, (_, _, a) in zip(examples, hard, strict=True)
            ]
            guides = ctx.sample(examples, texts, K)
            r_HK = guides.rewards_N.view(len(hard), K)
            best_rewards = []
            for j, (g, d, _) in enumerate(hard):
                finite = [k for k in range(K) if bool(torch.isfinite(r_HK[j, k]))]
                if not finite:
                    skipped += 1
                    continue
                best = max(finite, key=lambda k: (float(r_HK[j, k]), -k))
                trace = guides.rollouts.completions[j * K + best]
                if not trace:
                    skipped += 1
                    continue
                best_rewards.append(float(r_HK[j, best]))
                hint = trace[: self.hint_chars(d, len(trace))]
                prompt = append_to_prompt(
                    batch.examples[g].prompt, self.hint_template.format(hint=hint)
                )
                plan.append((g, "easier", prompt))
            if best_rewards:
                metrics["aug/guide_reward_mean"] = sum(best_rewards) / len(best_rewards)
        for g, d in easy:
            start = (ctx.step + max(batch.indices[g], 0)) % len(self.distractors)
            prompt = self.with_distractors(
                batch.examples[g].prompt, self.distractor_count(d), start
            )
            plan.append((g, "harder", prompt))
        N = batch.rollouts.num_rollouts
        aug = list(batch.extra.get("aug") or [""] * N)
        if plan:
            plan.sort(key=lambda p: p[0])
            new = ctx.sample(
                [batch.examples[g] for g, _, _ in plan], [ctx.render(p) for _, _, p in plan], G
            )
            rows = [g * G + j for g, _, _ in plan for j in range(G)]
            batch = replace_rows(batch, new, rows, list(range(len(rows))), ctx.pad_token_id)
            levels = _hint_levels(batch)
            for g, kind, _ in plan:
                for r in range(g * G, (g + 1) * G):
                    aug[r] = kind
                    if kind == "easier":
                        levels[r] = 1
            batch.extra["hint_level"] = levels
        batch.extra["aug"] = aug
        self.push(own)
        metrics["aug/easier_groups"] = float(sum(k == "easier" for _, k, _ in plan))
        metrics["aug/harder_groups"] = float(sum(k == "harder" for _, k, _ in plan))
        metrics["aug/skipped_groups"] = float(skipped)
        if deltas:
            metrics["aug/delta_mean"] = sum(deltas) / len(deltas)
        return batch, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state.get("buffer", [])][-self.window :]
