"""Evaluation runs: sample n completions per problem, score them, report pass@k and maj@k."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from grouprl.config import RolloutConfig
from grouprl.eval.metrics import mean_ci95, summarize_samples
from grouprl.monitor.progress import ProgressBar
from grouprl.rewards.answers import extract_answer, normalize_answer
from grouprl.rewards.base import last_assistant_text
from grouprl.rewards.scoring import score_rollouts
from grouprl.rollout.base import RolloutEngine, SamplingParams, build_engine


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    rewards: Any,
    *,
    correct_reward: str | None = None,
    correct_threshold: float = 1.0,
    n: int = 4,
    ks: Sequence[int] = (1,),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_prompts: int = 64,
    seed: int = 0,
    progress: bool = False,
    engine: RolloutEngine | RolloutConfig | str | None = None,
    max_prompt_length: int | None = None,
    multi_turn: Any = None,
) -> dict[str, float]:
    """Sample `n` completions for each example and summarize.

    A sample is correct when reward `correct_reward` (default: the first one) is at least
    `correct_threshold`. Sampling runs under a forked RNG seeded with `seed`, so evaluating
    never changes a training run's random stream and two evaluations are comparable.
    Returns pass@1 (with its 95% interval), pass@k and maj@k for k in `ks` (k <= n), and the
    mean (and 95% interval) of every reward.

    `engine` samples: a RolloutEngine instance (used as is, left open: the caller owns it and
    keeps its weights in sync), or the registered name of one (`rollout.engine`; default
    "hf") or a `rollout` config section (engine settings such as `vllm`), which is built on
    `model` for this call and closed at the end; `max_prompt_length` sizes a vLLM engine's
    context (prompt budget + max_new_tokens). `multi_turn` (rollout/multiturn.py's
    `MultiTurn`, from `data.environment`): samples are trajectories; answers are their final
    model messages, and `tools/calls_mean` (tool calls per sample) and
    `tools/calls_per_correct` (tool calls of correct samples, per correct sample) are added.
    """
    name = correct_reward or rewards.names[0]
    if name not in rewards.names:
        raise ValueError(f"correct_reward {name!r} is not one of the rewards {rewards.names}")
    kcol = rewards.names.index(name)
    params = SamplingParams(
        num_generations=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    eng: RolloutEngine
    if engine is None or isinstance(engine, (str, RolloutConfig)):
        base = engine if isinstance(engine, RolloutConfig) else RolloutConfig(engine=engine or "hf")
        rollout_cfg = dataclasses.replace(
            base,
            num_generations=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        eng, owned = (
            build_engine(rollout_cfg, model, tokenizer, max_prompt_length=max_prompt_length),
            True,
        )
    else:
        eng, owned = engine, False
    correct: list[list[bool]] = []
    answers: list[list[str | None]] = []
    per_reward: dict[str, list[float]] = {r: [] for r in rewards.names}
    calls: list[tuple[int, bool]] = []  # (tool calls, correct) per multi-turn sample
    try:
        with (
            torch.random.fork_rng(devices=[]),
            ProgressBar(len(examples), description="eval", enabled=progress) as bar,
        ):
            torch.manual_seed(seed)
            for s in range(0, len(examples), batch_prompts):
                chunk = list(examples[s : s + batch_prompts])
                if multi_turn is not None:
                    ro = multi_turn.generate(eng, chunk, params)
                else:
                    ro = eng.generate([ex.text for ex in chunk], params)
                vals = score_rollouts(rewards, chunk, ro, max_new_tokens).rewards_NK
                for i in range(len(chunk)):
                    rows = range(i * n, (i + 1) * n)
                    correct.append([bool(vals[r, kcol] >= correct_threshold) for r in rows])
                    answers.append([_answer(_final_text(ro, r)) for r in rows])
                    if multi_turn is not None:
                        calls.extend(
                            (ro.meta[r]["tool_calls"], correct[-1][j]) for j, r in enumerate(rows)
                        )
                for k, r in enumerate(rewards.names):
                    per_reward[r].extend(vals[:, k].tolist())
                bar.update(min(s + batch_prompts, len(examples)), {})
    finally:
        if owned:
            eng.close()
    out = summarize_samples(correct, answers, [k for k in ks if k <= n])
    for r, values in per_reward.items():
        mean, lo, hi = mean_ci95(values)
        out[f"rewards/{r}/mean"] = mean
        out[f"rewards/{r}/ci_low"] = lo
        out[f"rewards/{r}/ci_high"] = hi
    if calls:
        out["tools/calls_mean"] = sum(c for c, _ in calls) / len(calls)
        right = [c for c, ok in calls if ok]
        out["tools/calls_per_correct"] = sum(right) / len(right) if right else float("nan")
    return out


def _final_text(ro: Any, r: int) -> str:
    """A sample's answer text: its completion, or a trajectory's final model message."""
    if ro.meta is not None and "messages" in ro.meta[r]:
        return last_assistant_text(ro.meta[r]["messages"])
    return ro.completions[r]


def _answer(completion: str) -> str | None:
    """The completion's normalized final answer (for maj@k), or None when it gives none."""
    a = extract_answer(completion)
    return normalize_answer(a) if a else None
