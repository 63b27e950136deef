"""Built-in reward functions (registered in `REWARDS`), each with its exact rule and source.

All take TRL's signature ``f(prompts, completions, **columns)``; options are keyword-only
parameters, set in a config under ``params``. A built-in that needs a gold column and
gets none raises (RewardSet turns that into a NaN column and a warning).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from grouprl.rewards.base import REWARDS, completion_text
from grouprl.rewards.scan import brace_pairs

_BOXED = "\\boxed"
_SPACES = re.compile(r"\s*")  # \s is str.isspace() for str patterns


def _gold(reward: str, column: str, values: list | None) -> list:
    if values is None:
        raise ValueError(
            f"reward {reward!r} needs a gold column {column} in the dataset, and none was passed"
        )
    return values


def find_boxes(text: str) -> list[tuple[int, int, str | None]]:
    r"""Every ``\boxed`` in `text` as (start, end, content); content is None when no
    balanced ``{...}`` follows. Braces nest, so ``\boxed{\frac{1}{2}}`` holds ``\frac{1}{2}``.

    A box's content is skipped when searching for the next box. Linear in the text: the
    braces are paired once (`brace_pairs`), not rescanned from every box.
    """
    boxes = []
    pairs: dict[int, int] | None = None
    start = text.find(_BOXED)
    while start != -1:
        i = _SPACES.match(text, start + len(_BOXED)).end()
        content, end = None, start + len(_BOXED)
        if i < len(text) and text[i] == "{":
            if pairs is None:
                pairs = brace_pairs(text)
            j = pairs.get(i)
            if j is not None:
                content, end = text[i + 1 : j], j + 1
        boxes.append((start, end, content))
        start = text.find(_BOXED, end)
    return boxes


# ---------------------------------------------------------------- math


def _math_verify_timeout(seconds: int | None) -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


def _parse_gold(gold: Any, timeout: int | None) -> list:
    from math_verify import parse

    text = str(gold).strip()
    if not text:
        return []
    # A bare answer ("0.5", "x^2+1", "(0, 1]", "10\%") is read as LaTeX inside a box: parsed
    # raw, math-verify drops "^" expressions and reads "(0, 1]" as 1 and "10\%" as 10.
    if not any(d in text for d in ("$", _BOXED, "\\(", "\\[", "\n")):
        parsed = parse("\\boxed{" + text + "}", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout)


@REWARDS.register("math_accuracy")
def math_accuracy(
    prompts: list,
    completions: list,
    answer: list | None = None,
    solution: list | None = None,
    *,
    timeout_seconds: int | None = 5,
    **kw: Any,
) -> list[float | None]:
    r"""1.0 if the completion's answer is mathematically equal to the gold, else 0.0.

    Rule (TRL ``accuracy_reward``, with the completion parsed boxed-first):
    ``verify(parse(gold), parse(completion, [LatexExtractionConfig(boxed_match_priority=0),
    ExprExtractionConfig()], extraction_mode="first_match"))`` using math-verify.
    The gold is the `answer` column, else `solution`. A bare gold answer (no ``$``,
    ``\boxed``, ``\(``, ``\[`` or newline) is wrapped in ``\boxed{}`` before parsing, so
    "0.5", "x^2+1" and "(0, 1]" mean what they say. A gold that does not parse gives None.

    What math-verify does with the completion (v0.9, checked in tests): a ``\boxed{}``
    wins over any other text ("\boxed{\frac{1}{2}}" = gold "0.5"; "\boxed{41}, then 42"
    scores 0 against "42"); several boxes parse as a set, so two different boxes score
    0. Without a box the *last* number or expression is taken, and simple arithmetic is
    evaluated: "the answer is 42" scores 1 against "42", "42 apples, then 43" scores 0,
    "42 ... 6*7" scores 1. Percentages are lenient: "\boxed{10}" and "\boxed{0.1}"
    both equal gold "10\%". Timeouts (seconds, for parsing and for verifying) are
    used only in the main thread, since math-verify implements them with signals; a
    RewardSet runs the reward in its worker's main thread (unless its timeout is 0).
    """
    # Imported here: math-verify pulls in sympy, which makes `import grouprl` slow.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    golds = (
        answer if answer is not None else _gold("math_accuracy", "'answer' or 'solution'", solution)
    )
    timeout = _math_verify_timeout(timeout_seconds)
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    rewards: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        gold_parsed = _parse_gold(gold, timeout) if gold is not None else []
        if not gold_parsed:
            rewards.append(None)
            continue
        pred = parse(
            completion_text(completion),
            extraction_config=config,
            extraction_mode="first_match",
            parsing_timeout=timeout,
        )
        rewards.append(float(verify(gold_parsed, pred, timeout_seconds=timeout)))
    return rewards


# ---------------------------------------------------------------- multiple choice


@REWARDS.register("choice_accuracy")
def choice_accuracy(
    prompts: list, completions: list, answer: list | None = None, **kw: Any
) -> list[float | None]:
    r"""Multiple-choice accuracy from a single ``\boxed{letter}`` (Clinical-R1 rule).

    With k the number of ``\boxed`` in the completion:
      k == 1, content a letter A-Z:        1.0 if it equals the gold letter, else 0.0;
      k == 1, content not a single letter: -0.5  (e.g. ``\boxed{\text{A}}``, ``\boxed{AB}``);
      k == 1, no ``{...}`` after it:       -1.0;
      k != 1:                              -k    (no box gives 0.0).
    Source: Clinical-R1 ``calculate_accuracy_reward`` in
    ``verl/utils/reward_score/medical_rule_based.py`` (repo BoyangGu1/Clinical-R1-3B).
    Unlike the original, the letter and the gold are compared case-insensitively with
    whitespace stripped, and box content may nest braces. A gold that is not a single
    letter gives None.
    """
    golds = _gold("choice_accuracy", "'answer'", answer)
    rewards: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        gold_letter = str(gold).strip().upper() if gold is not None else ""
        if not _is_letter(gold_letter):
            rewards.append(None)
            continue
        boxes = find_boxes(completion_text(completion))
        if len(boxes) != 1:
            rewards.append(float(-len(boxes)))
            continue
        content = boxes[0][2]
        if content is None:
            rewards.append(-1.0)
        elif _is_letter(content.strip().upper()):
            rewards.append(1.0 if content.strip().upper() == gold_letter else 0.0)
        else:
            rewards.append(-0.5)
    return rewards


def _is_letter(s: str) -> bool:
    return len(s) == 1 and "A" <= s <= "Z"


# ---------------------------------------------------------------- format


def think_answer(text: str) -> str | None:
    r"""The answer group of ``^<think>.*?</think>\s*<answer>(.*?)</answer>$`` (DOTALL) on a
    stripped `text`, or None when it does not match.

    The same result as that regex, in one pass: it backtracks over every ``</think>`` and,
    for each, rescans to the end (quadratic on a run of ``</think><answer></answer>x``).
    As `text` is stripped, ``$`` is its end, so the answer runs to the final ``</answer>``;
    the lazy ``.*?`` picks the first ``</think>`` that whitespace and ``<answer>`` follow.
    """
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return None
    last = len(text) - len("</answer>")
    p = text.find("</think>", len("<think>"))
    while p != -1:
        q = _SPACES.match(text, p + len("</think>")).end()
        if text.startswith("<answer>", q) and q + len("<answer>") <= last:
            return text[q + len("<answer>") : last]
        p = text.find("</think>", p + 1)
    return None


@REWARDS.register("format")
def format_reward(prompts: list, completions: list, **kw: Any) -> list[float | None]:
    r"""1.0 for the ``<think>...</think><answer>...</answer>`` shape, +0.5 for a summarized box.

    Rule: the completion, stripped of surrounding whitespace, must match
    ``^<think>.*?</think>\s*<answer>(.*?)</answer>$`` (DOTALL) to get 1.0, else 0.0.
    Add 0.5 when the answer holds exactly one ``\boxed{...}`` and some other non-blank
    text (a summary). Maximum 1.5.
    Source: Clinical-R1 ``calculate_format_reward`` and
    ``answer_with_summary_and_answer_box`` in ``verl/utils/reward_score/medical_rule_based.py``
    (repo BoyangGu1/Clinical-R1-3B). Unlike the original (non-nesting regex
    ``\\boxed\{.*?\}``), box braces nest here, so a lone ``\boxed{\frac{1}{2}}`` earns no
    bonus.
    """
    rewards: list[float | None] = []
    for completion in completions:
        answer = think_answer(completion_text(completion).strip())
        if answer is None:
            rewards.append(0.0)
            continue
        answer_text = answer.strip()
        boxes = find_boxes(answer_text)
        bonus = 0.0
        if len(boxes) == 1 and boxes[0][2] is not None:
            start, end, _ = boxes[0]
            if (answer_text[:start] + answer_text[end:]).strip():
                bonus = 0.5
        rewards.append(1.0 + bonus)
    return rewards


# ---------------------------------------------------------------- exact match


@REWARDS.register("exact_match")
def exact_match(
    prompts: list,
    completions: list,
    answer: list | None = None,
    *,
    normalize: bool = True,
    after: str = "",
    **kw: Any,
) -> list[float | None]:
    """1.0 if the completion equals the gold answer, else 0.0 (ours; a common baseline).

    Both sides are stripped of surrounding whitespace; with `normalize` (default) they
    are also casefolded and inner whitespace runs collapse to one space. `after` (e.g.
    "</think>"): only the text after its last occurrence is compared, a completion without
    it scores 0 (the answer of a think-then-answer format). A None gold gives None.
    """
    golds = _gold("exact_match", "'answer'", answer)

    def norm(s: str) -> str:
        s = s.strip()
        return " ".join(s.casefold().split()) if normalize else s

    def answer_of(text: str) -> str | None:
        if not after:
            return text
        return text.rsplit(after, 1)[1] if after in text else None

    out: list[float | None] = []
    for c, gold in zip(completions, golds, strict=True):
        got = answer_of(completion_text(c))
        out.append(
            None if gold is None else float(got is not None and norm(got) == norm(str(gold)))
        )
    return out


# ---------------------------------------------------------------- length shaping


@REWARDS.register("overlong_penalty")
def overlong_penalty(
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    max_completion_length: list | None = None,
    *,
    max_length: int | None = None,
    buffer: int | None = None,
    buffer_fraction: float = 0.2,
    **kw: Any,
) -> list[float | None]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).

    With L the completion's token count, L_max the max completion length and L_c the
    buffer: R = 0 if L <= L_max - L_c; R = ((L_max - L_c) - L) / L_c inside the buffer;
    R = -1 beyond L_max. L_max is `max_length`, or the trainer's max completion length
    (passed as the `max_completion_length` column); L_c is `buffer`, or
    `buffer_fraction` * L_max (DAPO: 4096 of 20480 = 0.2). Lengths come from the
    `completion_ids` column (token ids, as TRL passes them); without it, characters.
    """
    out: list[float | None] = []
    for i, c in enumerate(completions):
        L_max = max_length or (max_completion_length[i] if max_completion_length else None)
        if not L_max:
            raise ValueError(
                "overlong_penalty: set params.max_length (no max_completion_length column)"
            )
        L_c = buffer if buffer is not None else max(1, int(round(buffer_fraction * L_max)))
        L = len(completion_ids[i]) if completion_ids is not None else len(completion_text(c))
        if L <= L_max - L_c:
            out.append(0.0)
        elif L <= L_max:
            out.append(((L_max - L_c) - L) / L_c)
        else:
            out.append(-1.0)
    return out
