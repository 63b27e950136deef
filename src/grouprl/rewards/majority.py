r"""`majority_vote`: TTRL's label-free reward (arXiv 2504.16084).

The N_vote completions of one prompt vote with their final answers; the most common
answer (up to equivalence) is taken as the pseudo-label and each completion is rewarded
1.0 when its answer is equivalent to it, else 0.0. Labels, when the dataset has them, are
read for metrics only and never change a reward.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from grouprl.rewards.answers import answer_tags, extract_answer, extract_boxed, normalize_answer
from grouprl.rewards.base import REWARDS, completion_text
from grouprl.rewards.builtins import _math_verify_timeout, _parse_gold

__all__ = ["MajorityVote", "majority_answer_classes"]

MODES = ("auto", "math", "choice")
_INTEGER = re.compile(r"-?\d+")


def majority_answer_classes(
    answers: list[str | None], equivalent: Callable[[str, str], bool]
) -> tuple[int | None, list[int | None]]:
    """Group answers into equivalence classes and pick the majority class.

    Returns (majority class id or None, class id of each sample). Class ids count from 0
    in order of first appearance; a None answer (no answer) gets class None and does not
    vote. Identical strings always share a class without calling `equivalent`; a new
    distinct string is compared with the first member (representative) of each existing
    class, in class order, as ``equivalent(representative, answer)``, and joins the first
    class it is equivalent to, else opens a new class. So `equivalent` is called at most
    once per (distinct string, class) pair, never once per pair of samples.
    Majority: the class with the most samples; ties go to the class whose first member
    comes first (the lowest id). All answers None: majority None.
    """
    class_of: dict[str, int] = {}
    reps: list[str] = []
    counts: list[int] = []
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        cid = class_of.get(answer)
        if cid is None:
            cid = next((k for k, rep in enumerate(reps) if equivalent(rep, answer)), None)
            if cid is None:
                cid = len(reps)
                reps.append(answer)
                counts.append(0)
            class_of[answer] = cid
        counts[cid] += 1
        ids.append(cid)
    if not reps:
        return None, ids
    # max keeps the first maximum, i.e. the lowest class id among ties.
    return max(range(len(counts)), key=counts.__getitem__), ids


def _integer_key(s: str) -> str:
    """A canonical form of an integer string: int(a) == int(b) iff the keys are equal.

    Compared as strings, not with int(): Python refuses int() of more than 4300 digits
    (CPython's int_max_str_digits, a guard against its quadratic conversion), which a
    completion can write.
    """
    digits = s.lstrip("-").lstrip("0") or "0"
    return digits if digits == "0" or not s.startswith("-") else "-" + digits


def _single_letter(s: str | None, *, upper_only: bool) -> str | None:
    if s is None:
        return None
    s = s.strip()
    if len(s) != 1 or not ("A" <= s.upper() <= "Z"):
        return None
    if upper_only and not ("A" <= s <= "Z"):
        return None
    return s.upper()


def _choice_answer(text: str) -> str | None:
    r"""The letter of the last complete ``\boxed{X}``, else of the last ``<answer>X</answer>``
    (case-insensitive, returned upper-case), else None."""
    letter = _single_letter(extract_boxed(text), upper_only=False)
    if letter is None:
        tags = answer_tags(text)
        letter = _single_letter(tags[-1], upper_only=False) if tags else None
    return letter


def _math_answer(text: str) -> str | None:
    answer = extract_answer(text)
    if answer is None:
        return None
    return normalize_answer(answer) or None


@REWARDS.register("majority_vote", collapse_risk=True)
class MajorityVote:
    r"""TTRL's majority-vote pseudo-reward (Zuo et al., "TTRL: Test-Time Reinforcement
    Learning", arXiv 2504.16084; PRIME-RL/TTRL verl/workers/reward_manager/ttrl.py).

    Groups: the rows of one prompt are consecutive with equal prompts, so a group is a
    maximal run of consecutive equal prompts (two groups of the same prompt placed next
    to each other would merge). Per group:
      1. each completion's answer is extracted (below); samples with none do not vote;
      2. answers are clustered into equivalence classes (`majority_answer_classes`);
         the majority is the largest class, ties to the class seen first;
      3. r_i = 1.0 if sample i is in the majority class, else 0.0 (no answer: 0.0; a group
         where nobody answered: all 0.0).
    `leave_one_out: true` (SPINE's option, arXiv 2511.17938): sample i is compared with
    the majority of the *other* samples, y*_{−i} (its own vote removed; ties again to the
    class seen first), so a sample cannot make itself right.

    Modes (`mode`):
      math:   the answer of `grouprl.rewards.answers.extract_answer` (last ``\boxed{}``, else
              last ``<answer>``, else last number), normalized by `normalize_answer`
              (identical normalized strings vote together at once); distinct strings
              are compared with math-verify, ``verify(parse(rep), parse(answer))`` with
              both parsed as ``\boxed{...}`` like a bare gold in `math_accuracy`, so "1/2",
              "0.5" and "\frac{1}{2}" vote together. Two integers are compared as
              integers without math-verify. Each distinct string is parsed once per call.
      choice: a letter A-Z (case-insensitive) from the last ``\boxed{X}``, else from the
              last ``<answer>X</answer>``; letters compare exactly.
      auto:   per completion: choice if its last box holds a single upper-case letter,
              else math. A single upper-case letter then only equals itself.
    TTRL's parser (Qwen math eval) and grader differ in detail from math-verify.

    `label_column` (default "answer") is read, when present and not None, for metrics
    only (a group's label is its first row's value). After each call `self.last_metrics`
    holds, averaged over the call's groups:
      ttrl/majority_ratio      majority class size / group size (no-answer samples count)
      ttrl/answered_frac       samples with an answer / group size
    and, over the groups that have a label:
      ttrl/label_accuracy      1[majority ≡ label]
      ttrl/reward_accuracy     fraction of samples whose pseudo-reward equals their true
                               reward 1[answer ≡ label] (no answer: true reward 0)
      ttrl/ground_truth_ratio  fraction of samples whose answer ≡ label
    math-verify timeouts (`timeout_seconds`, for parsing and verifying) apply only in the
    main thread, since math-verify implements them with signals; a RewardSet runs the
    reward in its worker's main thread (unless its timeout is 0).
    """

    def __init__(
        self,
        *,
        mode: str = "auto",
        label_column: str = "answer",
        timeout_seconds: int | None = 5,
        leave_one_out: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"majority_vote.mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.leave_one_out = bool(leave_one_out)
        self.label_column = label_column
        self.timeout_seconds = timeout_seconds
        self.last_metrics: dict[str, float] = {}
        self.__name__ = "majority_vote"

    # ------------------------------------------------------------ answers and equivalence

    def extract(self, completion: Any) -> str | None:
        """The answer of one completion under `mode`, as the string that votes, or None."""
        text = completion_text(completion)
        if self.mode == "choice":
            return _choice_answer(text)
        if self.mode == "auto":
            letter = _single_letter(extract_boxed(text), upper_only=True)
            if letter is not None:
                return letter
        return _math_answer(text)

    def _label_key(self, label: Any) -> str | None:
        text = str(label).strip()
        if not text:
            return None
        if self.mode == "choice":
            return text.upper()
        if self.mode == "auto" and _single_letter(text, upper_only=False) is not None:
            return text.upper()
        return normalize_answer(text) or None

    def _equivalence(self) -> Callable[[str, str], bool]:
        """An equivalence test for one call, caching math-verify parses per string."""
        timeout = _math_verify_timeout(self.timeout_seconds)
        parsed: dict[str, list] = {}

        def parse(s: str) -> list:
            if s not in parsed:
                try:
                    parsed[s] = _parse_gold(s, timeout)
                except Exception:  # a parse failure or timeout: only exact matches
                    parsed[s] = []
            return parsed[s]

        def equivalent(a: str, b: str) -> bool:
            if a == b:
                return True
            if self.mode == "choice":
                return False
            if self.mode == "auto" and (
                _single_letter(a, upper_only=True) or _single_letter(b, upper_only=True)
            ):
                return False
            if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):
                return _integer_key(a) == _integer_key(b)
            pa, pb = parse(a), parse(b)
            if not pa or not pb:
                return False
            from math_verify import verify

            try:
                return bool(verify(pa, pb, timeout_seconds=timeout))
            except Exception:
                return False

        return equivalent

    # ------------------------------------------------------------ the reward

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"majority_vote: {len(prompts)} prompts for {n} completions")
        labels = columns.get(self.label_column)
        equivalent = self._equivalence()
        rewards: list[float] = [0.0] * n
        sums: dict[str, float] = {}
        n_groups = n_labelled = 0
        start = 0
        while start < n:
            end = start + 1
            while end < n and prompts[end] == prompts[start]:
                end += 1
            group = self._score_group(
                completions[start:end],
                labels[start] if labels is not None else None,
                equivalent,
                rewards,
                start,
            )
            n_groups += 1
            n_labelled += "ttrl/label_accuracy" in group
            for k, v in group.items():
                sums[k] = sums.get(k, 0.0) + v
            start = end
        self.last_metrics = {
            k: v / (n_labelled if k in _LABEL_METRICS else n_groups) for k, v in sums.items()
        }
        return rewards

    def _score_group(
        self,
        completions: list,
        label: Any,
        equivalent: Callable[[str, str], bool],
        rewards: list[float],
        offset: int,
    ) -> dict[str, float]:
        """Write the group's rewards into rewards[offset:], return its metrics."""
        answers = [self.extract(c) for c in completions]
        majority, ids = majority_answer_classes(answers, equivalent)
        size = len(completions)
        for i, cid in enumerate(ids):
            rewards[offset + i] = 1.0 if cid is not None and cid == majority else 0.0
        if self.leave_one_out:
            counts: dict[int, int] = {}
            for cid in ids:
                if cid is not None:
                    counts[cid] = counts.get(cid, 0) + 1
            for i, cid in enumerate(ids):
                if cid is None:
                    continue
                others = {c: n - (c == cid) for c, n in counts.items()}
                best = max(others.values())
                # ties to the lowest class id (the class seen first), as the plain vote
                loo = min(c for c, n in others.items() if n == best) if best > 0 else None
                rewards[offset + i] = 1.0 if loo == cid else 0.0
        answered = sum(cid is not None for cid in ids)
        majority_count = sum(cid == majority for cid in ids) if majority is not None else 0
        metrics = {
            "ttrl/majority_ratio": majority_count / size,
            "ttrl/answered_frac": answered / size,
        }
        label_key = self._label_key(label) if label is not None else None
        if label_key is None:
            return metrics
        reps: dict[int, str] = {}  # class id -> its first member's answer
        for answer, cid in zip(answers, ids, strict=True):
            if cid is not None and answer is not None:
                reps.setdefault(cid, answer)
        correct = {cid: equivalent(label_key, rep) for cid, rep in reps.items()}  # per class
        true = [1.0 if cid is not None and correct[cid] else 0.0 for cid in ids]
        pseudo = rewards[offset : offset + size]
        metrics["ttrl/label_accuracy"] = 1.0 if majority is not None and correct[majority] else 0.0
        metrics["ttrl/reward_accuracy"] = (
            sum(p == t for p, t in zip(pseudo, true, strict=True)) / size
        )
        metrics["ttrl/ground_truth_ratio"] = sum(true) / size
        return metrics


_LABEL_METRICS = ("ttrl/label_accuracy", "ttrl/reward_accuracy", "ttrl/ground_truth_ratio")
