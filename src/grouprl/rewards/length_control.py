r"""Length-control rewards (registered in `REWARDS`): `format_length`, `budget_length` and
`grpo_lambda_length`.

- `format_length`: a label-free surrogate, a parseable answer plus a length shape that peaks
  at half the max length (Xin et al., "Surrogate Signals from Format and Length: Reinforcement
  Learning for Solving Mathematical Problems without Ground Truth Answers", arXiv 2505.19439;
  insightLLM/rl-without-gt ``rl/verl/lib/src/rewards/math_reward.py``).
- `budget_length`: a triangular (or band) reward around a token budget B(t) that a schedule
  (`length_budget`) tightens over training (Hammoud et al., "Train Long, Think Short:
  Curriculum Learning for Efficient Reasoning", arXiv 2508.08940, §3.3-3.4).
- `grpo_lambda_length`: 0/1 correctness, with an efficiency reward for correct answers only
  in the batch's most accurate groups (Dai, Liu and Si, "Stable Reinforcement Learning for
  Efficient Reasoning", arXiv 2505.18086, §3: GRPO-λ).

The math is in pure functions (`format_length_shape`, `format_length_value`,
`length_budget`, `budget_length_value`, `grpo_lambda_rewards`); the registered classes
check their parameters when the run builds its rewards (an error names the key, e.g.
``rewards.budget_length.start_budget``), read the columns and report metrics.

Lengths are token counts from the `completion_ids` column (the trainer passes it, as TRL
does); without it, characters. Groups: the rows of one prompt are consecutive with equal
prompts, so a group is a maximal run of equal consecutive prompts (the rule of
`majority_vote`; two groups of the same prompt placed next to each other would merge).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from grouprl.rewards.answers import extract_answer, extract_boxed
from grouprl.rewards.base import REWARDS, completion_text
from grouprl.rewards.builtins import _math_verify_timeout, _parse_gold
from grouprl.rewards.outcome import accepted

__all__ = [
    "BUDGET_SCHEDULES",
    "BudgetLength",
    "FormatLength",
    "GrpoLambdaLength",
    "budget_length_value",
    "format_length_shape",
    "format_length_value",
    "grpo_lambda_rewards",
    "group_ids",
    "length_budget",
    "token_lengths",
]

BUDGET_SCHEDULES = ("step", "linear", "exponential", "constant")
LENGTH_SHAPES = ("triangular", "band")
ANSWER_SOURCES = ("boxed", "any")
STD_FLOOR = 1e-4  # GRPO-λ: the std of a group's correct lengths when they are all equal


# ---------------------------------------------------------------- shared helpers


def token_lengths(completions: Sequence[Any], completion_ids: Sequence[Any] | None) -> list[int]:
    """L_N: each completion's token count from `completion_ids` (one id list per row), or
    its character count when the caller passed no ids."""
    if completion_ids is not None:
        if len(completion_ids) != len(completions):
            raise ValueError(
                f"completion_ids has {len(completion_ids)} rows for {len(completions)} completions"
            )
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


def group_ids(prompts: Sequence[Any]) -> list[int]:
    """g_N: the group of each row, counting from 0, a group being a maximal run of equal
    consecutive prompts (the rows of a prompt's group are contiguous)."""
    out: list[int] = []
    for i, p in enumerate(prompts):
        out.append(0 if i == 0 else out[-1] + (p != prompts[i - 1]))
    return out


def _bad(reward: str, key: str, need: str, value: Any) -> ValueError:
    return ValueError(f"rewards.{reward}.{key}: must be {need}, got {value!r}")


def _check_int(reward: str, key: str, value: Any, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        need = f"an integer >= {low}" + (" or null" if optional else "")
        raise _bad(reward, key, need, value)


def _check_choice(reward: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(reward, key, f"one of {', '.join(choices)}", value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------- format_length (A7)


def format_length_shape(x: float, peak: float = 0.5) -> float:
    """ℓ(x) of Format-Length (arXiv 2505.19439, §3; the authors' ``length_reward_func_v3``),
    with x = L / L_max the completion's length as a fraction of the max length:

        ℓ(x) = 1 − (1 − x/p)²              for x ≤ p   (0 at x = 0, rising to 1 at x = p)
        ℓ(x) = 1 − 2·((x − p)/(1 − p))²    for x > p   (falling to −1 at x = 1)

    p = `peak` (0.5 in the paper). Continuous at p; not clipped beyond x = 1 (as the code).
    """
    if x <= peak:
        return 1.0 - (1.0 - x / peak) ** 2
    return 1.0 - 2.0 * ((x - peak) / (1.0 - peak)) ** 2


def format_length_value(
    length_frac: float, has_think: bool, has_answer: bool, peak: float = 0.5
) -> float:
    """Format-Length's reward of one completion (arXiv 2505.19439, §3, "Format-Length"):

        R = 0.5·(soft_format + answer_format) + ℓ(x)   if an answer is present
        R = min(0, ℓ(x))                               otherwise

    with soft_format = 1 for a ``<think>…</think>`` span, answer_format = 1 for a valid
    answer, x = `length_frac` and ℓ = `format_length_shape`. Without an answer the length
    term can only take reward away.
    """
    shape = format_length_shape(length_frac, peak)
    if not has_answer:
        return min(0.0, shape)
    return 0.5 * (float(has_think) + 1.0) + shape


def _has_think(text: str) -> bool:
    """A ``<think>`` followed later by ``</think>`` (the regex ``<think>.*?</think>``, DOTALL)."""
    start = text.find("<think>")
    return start != -1 and text.find("</think>", start + len("<think>")) != -1


@REWARDS.register("format_length")
class FormatLength:
    r"""Format-Length, a label-free surrogate reward (Xin et al., "Surrogate Signals from
    Format and Length: Reinforcement Learning for Solving Mathematical Problems without Ground
    Truth Answers", arXiv 2505.19439; insightLLM/rl-without-gt math_reward.py).

    Rule (`format_length_value`): R = 0.5·(think + answer) + ℓ(L/L_max) when the completion
    holds an answer, else min(0, ℓ(L/L_max)); ℓ = `format_length_shape` peaks (1) at
    L = p·L_max and reaches −1 at L_max. No gold answer is read.

    answer_from: "boxed" (the authors' rule): the last complete ``\boxed{…}``, non-empty,
                 that math-verify parses (their "sympy-valid" check); "any": the answer of
                 `extract_answer` (last box, else last ``<answer>``, else last number) that
                 parses, for plain-answer tasks such as `arith`.
    max_length:  L_max in tokens; null: the run's max completion length (the
                 `max_completion_length` column; the paper's 3072 was its max response
                 length).
    peak:        p, in (0, 1) (paper: 0.5).
    timeout_seconds: math-verify's parsing timeout (main thread only, as math_accuracy).

    Lengths are tokens (`completion_ids`), else characters. `last_metrics`:
    format_length/answer_frac and format_length/think_frac (shares of the call's rows).
    """

    def __init__(
        self,
        *,
        answer_from: str = "boxed",
        max_length: int | None = None,
        peak: float = 0.5,
        timeout_seconds: int | None = 5,
    ) -> None:
        _check_choice("format_length", "answer_from", answer_from, ANSWER_SOURCES)
        _check_int("format_length", "max_length", max_length, 1, optional=True)
        if not _is_number(peak) or not 0.0 < peak < 1.0:
            raise _bad("format_length", "peak", "a number in (0, 1)", peak)
        self.answer_from = answer_from
        self.max_length = max_length
        self.peak = float(peak)
        self.timeout_seconds = timeout_seconds
        self.last_metrics: dict[str, float] = {}
        self.__name__ = "format_length"

    def has_answer(self, text: str) -> bool:
        """Whether `text` holds an answer under `answer_from` that math-verify parses."""
        found = extract_boxed(text) if self.answer_from == "boxed" else extract_answer(text)
        if found is None or not found.strip():
            return False
        try:
            return bool(_parse_gold(found, _math_verify_timeout(self.timeout_seconds)))
        except Exception:  # a parse failure or timeout: not a valid answer
            return False

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list | None = None,
        max_completion_length: list | None = None,
        **columns: Any,
    ) -> list[float]:
        lengths = token_lengths(completions, completion_ids)
        out: list[float] = []
        n_answer = n_think = 0
        for i, (c, length) in enumerate(zip(completions, lengths, strict=True)):
            limit = self.max_length or (max_completion_length[i] if max_completion_length else 0)
            if not limit:
                raise ValueError(
                    "format_length: set params.max_length (no max_completion_length column)"
                )
            text = completion_text(c)
            think, answer = _has_think(text), self.has_answer(text)
            n_answer += answer
            n_think += think
            out.append(format_length_value(length / limit, think, answer, self.peak))
        n = max(len(completions), 1)
        self.last_metrics = {
            "format_length/answer_frac": n_answer / n,
            "format_length/think_frac": n_think / n,
        }
        return out


# ---------------------------------------------------------------- budget_length (A8)


def length_budget(
    step: int,
    *,
    start_budget: int = 256,
    final_budget: int = 87,
    num_decays: int = 3,
    total_steps: int = 0,
    schedule: str = "step",
    decay_factor: float | None = None,
    decay_every: float | None = None,
) -> int:
    """B(t): the token budget at optimizer step `step` (0-based), from "Train Long, Think
    Short" (arXiv 2508.08940, §3.4), rounded to whole tokens and at least 1.

    With S0 = `start_budget`, S_f = `final_budget`, n = `num_decays`, T_total = `total_steps`
    and the decay interval I = `decay_every`, else T_total / (n + 1):

        step:        S_k = S0·d^k,  d = (S_f/S0)^(1/n),  k = min(⌊t / I⌋, n)   (S_n = S_f)
        linear:      S_k = S0 − k·(S0 − S_f)/n,           k = min(⌊t / I⌋, n)
        exponential: B(t) = max(1, B0·γ^⌊t / I⌋),  γ = `decay_factor`, else d   (no floor at S_f)
        constant:    B(t) = S0 (the fixed-budget baseline)

    Defaults: the paper's S0 = 256 → S_f = 87 in n = 3 decays (d ≈ 0.70, every 150 steps of
    600). Without a horizon (T_total = 0 and no `decay_every`) the budget stays at S0.
    """
    if schedule == "constant":
        return max(1, round(start_budget))
    d = (final_budget / start_budget) ** (1.0 / num_decays)
    interval = decay_every if decay_every is not None else total_steps / (num_decays + 1)
    k = math.floor(step / interval) if interval > 0 else 0
    if schedule == "exponential":
        gamma = d if decay_factor is None else decay_factor
        return max(1, round(start_budget * gamma**k))
    k = min(k, num_decays)
    if schedule == "step":
        value = final_budget if k == num_decays else start_budget * d**k
    elif schedule == "linear":
        value = start_budget - k * (start_budget - final_budget) / num_decays
    else:
        raise ValueError(f"length_budget: schedule must be one of {', '.join(BUDGET_SCHEDULES)}")
    return max(1, round(value))


def budget_length_value(
    length: float, budget: float, *, max_reward: float = 1.0, shape: str = "triangular"
) -> float:
    """R_len(ℓ) of "Train Long, Think Short" (arXiv 2508.08940, §3.3) for a completion of
    ℓ = `length` tokens and the budget L = `budget`:

        triangular: R_max·ℓ/L for 0 ≤ ℓ ≤ L;  R_max·(1 − (ℓ − L)/L) for L < ℓ ≤ 2L;  0 beyond
        band:       R_max for ℓ ≤ L;  then as triangular (falling to 0 at 2L)

    The paper states the band's flat part (R_max within the budget); the fall above L is
    shared with the triangular shape here (ours), so the two differ only below the budget.
    """
    if length > 2 * budget:
        return 0.0
    if length > budget:
        return max_reward * (1.0 - (length - budget) / budget)
    if shape == "band":
        return max_reward
    return max_reward * length / budget


@REWARDS.register("budget_length")
class BudgetLength:
    """A length reward around a token budget that tightens during training ("Train Long,
    Think Short: Curriculum Learning for Efficient Reasoning", arXiv 2508.08940, §3.3-3.4).

    r_i = R_len(ℓ_i; B(t)) (`budget_length_value`), with B(t) from `length_budget` at the
    run's step (`trainer_state.global_step`, horizon `total_steps` or
    `trainer_state.max_steps`). The paper's reward is λ_c·c_i + λ_ℓ·R_len + λ_f·format:
    pair this with the task's accuracy reward and set the weights (λ_c 0.6, λ_ℓ 0.3: weight
    0.5 here against 1.0 on accuracy, the `budget_length` recipe); it does not depend on
    correctness.

    Parameters: start_budget S0 and final_budget S_f (tokens), num_decays n, schedule
    (step | linear | exponential | constant), decay_factor γ and decay_every I (exponential;
    I also for step/linear), total_steps (null: the run's max_steps), shape (triangular |
    band), max_reward R_max. Lengths are tokens (`completion_ids`), else characters. Outside
    a training run (no `trainer_state`) the budget is B(0). `last_metrics`:
    budget_length/budget (B(t) of this call) and budget_length/over_budget_frac.
    """

    def __init__(
        self,
        *,
        start_budget: int = 256,
        final_budget: int = 87,
        num_decays: int = 3,
        schedule: str = "step",
        decay_factor: float | None = None,
        decay_every: int | None = None,
        total_steps: int | None = None,
        shape: str = "triangular",
        max_reward: float = 1.0,
    ) -> None:
        name = "budget_length"
        _check_int(name, "start_budget", start_budget, 1)
        _check_int(name, "final_budget", final_budget, 1)
        if final_budget > start_budget:
            raise _bad(name, "final_budget", f"at most start_budget ({start_budget})", final_budget)
        _check_int(name, "num_decays", num_decays, 1)
        _check_choice(name, "schedule", schedule, BUDGET_SCHEDULES)
        if decay_factor is not None and (not _is_number(decay_factor) or not 0 < decay_factor <= 1):
            raise _bad(name, "decay_factor", "a number in (0, 1] or null", decay_factor)
        _check_int(name, "decay_every", decay_every, 1, optional=True)
        _check_int(name, "total_steps", total_steps, 1, optional=True)
        _check_choice(name, "shape", shape, LENGTH_SHAPES)
        if not _is_number(max_reward) or max_reward <= 0:
            raise _bad(name, "max_reward", "a number > 0", max_reward)
        self.start_budget, self.final_budget = start_budget, final_budget
        self.num_decays, self.schedule = num_decays, schedule
        self.decay_factor, self.decay_every = decay_factor, decay_every
        self.total_steps, self.shape = total_steps, shape
        self.max_reward = float(max_reward)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def budget(self, trainer_state: Any = None) -> int:
        """B(t) at the run's step (`trainer_state.global_step`; 0 without a trainer state)."""
        step = int(getattr(trainer_state, "global_step", 0) or 0)
        total = self.total_steps or int(getattr(trainer_state, "max_steps", 0) or 0)
        return length_budget(
            step,
            start_budget=self.start_budget,
            final_budget=self.final_budget,
            num_decays=self.num_decays,
            total_steps=total,
            schedule=self.schedule,
            decay_factor=self.decay_factor,
            decay_every=self.decay_every,
        )

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list | None = None,
        trainer_state: Any = None,
        **columns: Any,
    ) -> list[float]:
        budget = self.budget(trainer_state)
        lengths = token_lengths(completions, completion_ids)
        out = [
            budget_length_value(n, budget, max_reward=self.max_reward, shape=self.shape)
            for n in lengths
        ]
        self.last_metrics = {
            "budget_length/budget": float(budget),
            "budget_length/over_budget_frac": sum(n > budget for n in lengths)
            / max(len(lengths), 1),
        }
        return out


# ---------------------------------------------------------------- grpo_lambda_length (A9)


def grpo_lambda_rewards(
    correct_N: Sequence[bool | None],
    lengths_N: Sequence[float],
    group_N: Sequence[int],
    *,
    lam: float = 0.2,
    alpha: float = 0.6,
) -> tuple[list[float | None], list[int]]:
    """GRPO-λ's rewards of one batch ("Stable Reinforcement Learning for Efficient
    Reasoning", arXiv 2505.18086, §3) and the groups given the efficiency reward.

    correct_N: per row, True / False, or None (cannot score: the row's reward is None and
    it counts as not correct); lengths_N: token counts; group_N: group ids (rows of a group
    need not be contiguous). With B groups, p_k the share of group k's rows that are
    correct, the ⌈λ·B⌉ groups of highest p_k (ties: the earlier group first) get

        r_i = 1 − α·sigmoid((L_i − mean_k) / std_k)   if o_i is correct,   0 if wrong,

    mean_k and std_k (population std, at least 1e-4 so equal lengths give sigmoid(0)) over
    the group's correct rows only; every other group gets plain 0/1. Wrong answers get 0 in
    every group (a third-party implementation also penalizes them: not the paper's rule).
    """
    n = len(correct_N)
    if len(lengths_N) != n or len(group_N) != n:
        raise ValueError(
            f"grpo_lambda_rewards: {n} correctness values, {len(lengths_N)} lengths and "
            f"{len(group_N)} group ids"
        )
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(group_N):
        rows.setdefault(g, []).append(i)
    order = list(rows)  # groups in order of first appearance
    ratio = {g: sum(bool(correct_N[i]) for i in rows[g]) / len(rows[g]) for g in order}
    n_top = math.ceil(round(lam * len(order), 9))  # round: 0.28·25 is 7.000000000000001
    top = sorted(order, key=lambda g: -ratio[g])[:n_top]  # stable: ties keep group order
    out: list[float | None] = [None if c is None else float(c) for c in correct_N]
    for g in top:
        good = [i for i in rows[g] if correct_N[i]]
        if not good:
            continue
        mean = sum(lengths_N[i] for i in good) / len(good)
        std = math.sqrt(sum((lengths_N[i] - mean) ** 2 for i in good) / len(good))
        std = max(std, STD_FLOOR)
        for i in good:
            z = (lengths_N[i] - mean) / std
            out[i] = 1.0 - alpha * _sigmoid(z)
    return out, top


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@REWARDS.register("grpo_lambda_length")
class GrpoLambdaLength:
    """GRPO-λ: a length penalty only for the batch's most accurate groups (Dai, Liu and Si,
    "Stable Reinforcement Learning for Efficient Reasoning", arXiv 2505.18086, §3).

    Correctness c_i comes from the `accuracy` reward (a registered reward function, run on
    the same prompts, completions and columns, so it reads the gold `answer` column):
    correct when it scores >= 1, None where it gives None. Groups are runs of equal
    consecutive prompts; the ⌈`lam`·B⌉ groups with the highest correctness ratio get
    1 − `alpha`·sigmoid((L_i − mean)/std) for correct answers (mean, std over the group's
    correct lengths) and 0 for wrong ones, the others 0/1 (`grpo_lambda_rewards`). The
    batch is what one reward call sees: the step's batch on one process, each refill round
    on its own (dynamic sampling), and each process's share under several processes.

    lam: λ in [0, 1] (0: plain 0/1 rewards; 1: every group penalized), default 0.2;
    alpha: α in [0, 1], default 0.6 (a third-party implementation's value; the paper's is
    unseen). Lengths are tokens (`completion_ids`), else characters. `last_metrics`:
    grpo_lambda/accuracy (share of correct rows) and grpo_lambda/penalized_groups.
    """

    def __init__(
        self, *, accuracy: str = "math_accuracy", lam: float = 0.2, alpha: float = 0.6
    ) -> None:
        name = "grpo_lambda_length"
        if not isinstance(accuracy, str) or accuracy not in REWARDS:
            known = ", ".join(n for n in REWARDS.names() if not isinstance(REWARDS.get(n), type))
            raise _bad(name, "accuracy", f"a registered reward function ({known})", accuracy)
        if isinstance(REWARDS.get(accuracy), type):
            raise _bad(name, "accuracy", "a reward function, not a stateful reward", accuracy)
        if not _is_number(lam) or not 0.0 <= lam <= 1.0:
            raise _bad(name, "lam", "a number in [0, 1]", lam)
        if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise _bad(
                name,
                "alpha",
                "a number in [0, 1] (above 1 a long correct answer would score below a wrong one)",
                alpha,
            )
        self.accuracy = accuracy
        self.lam, self.alpha = float(lam), float(alpha)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def correctness(self, prompts: list, completions: list, **columns: Any) -> list[bool | None]:
        """c_N from the `accuracy` reward: True when it scores >= 1, None where it cannot."""
        judge = REWARDS.get(self.accuracy)
        kwargs = accepted({**columns, "prompts": prompts, "completions": completions}, judge)
        scores = judge(**kwargs)
        if len(scores) != len(completions):
            raise ValueError(
                f"grpo_lambda_length: accuracy reward {self.accuracy!r} returned "
                f"{len(scores)} values for {len(completions)} completions"
            )
        return [
            None if s is None or not math.isfinite(float(s)) else float(s) >= 1.0 for s in scores
        ]

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list | None = None,
        group_index: list | None = None,
        **columns: Any,
    ) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"grpo_lambda_length: {len(prompts)} prompts for {n} completions")
        # the trainer passes each row's group (rewards/scoring.py); a direct call without it
        # falls back to runs of equal prompts
        groups = list(group_index) if group_index is not None else group_ids(prompts)
        correct = self.correctness(prompts, completions, completion_ids=completion_ids, **columns)
        lengths = token_lengths(completions, completion_ids)
        out, top = grpo_lambda_rewards(correct, lengths, groups, lam=self.lam, alpha=self.alpha)
        self.last_metrics = {
            "grpo_lambda/accuracy": sum(bool(c) for c in correct) / max(n, 1),
            "grpo_lambda/penalized_groups": float(len(top)),
        }
        return out
