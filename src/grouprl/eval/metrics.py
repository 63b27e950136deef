"""Evaluation metrics over sampled answers: pass@k, maj@k and confidence intervals.

Pure functions of Python lists; no models, no I/O. Shapes use P problems × N samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["maj_at_k", "majority_answer", "mean_ci95", "pass_at_k", "summarize_samples"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct.

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv 2107.03374):

        pass@k = 1 - C(n-c, k) / C(n, k)
               = 1 - prod_{i=n-c+1}^{n} (1 - k / i)

    The product form avoids the huge binomials of the first line. When ``n - c < k`` every
    size-k subset holds a correct sample, so the estimate is exactly 1.0.

    Raises ValueError when ``k < 1``, ``k > n`` or ``c`` is outside ``[0, n]``.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k} > n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """Most common non-None answer; ties go to the answer seen first. All None -> None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    # Counter keeps insertion (first-occurrence) order and max() returns the first maximum.
    return max(counts, key=counts.__getitem__)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """maj@k: 1.0 if the majority answer of the first ``k`` samples is correct, else 0.0.

    The majority answer's correctness is taken from the first sample that gave it (samples
    with the same answer string share one verdict). No answer among the k samples -> 0.0.
    Answers should already be normalized (see ``grouprl.rewards.answers.normalize_answer``).
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= {len(answers)} samples, got k={k}")
    majority = majority_answer(answers[:k])
    if majority is None:
        return 0.0
    first = list(answers[:k]).index(majority)
    return 1.0 if correct[first] else 0.0


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% confidence interval ``(mean, low, high)`` by the normal approximation.

        mean ± 1.96 · s / sqrt(n),   s = unbiased (n-1) sample standard deviation

    NaN values are ignored. Binary (0/1) values use the same formula, which for a mean p is
    the Wald interval with the n/(n-1) correction; it can reach below 0 or above 1 and is
    not clipped. One value -> (v, v, v); no values -> (nan, nan, nan).
    """
    vals = [float(v) for v in values if not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(vals) / n
    if n == 1:
        return (mean, mean, mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = 1.96 * std / math.sqrt(n)
    return (mean, mean - half, mean + half)


def summarize_samples(
    correct_PN: Sequence[Sequence[bool]],
    answers_PN: Sequence[Sequence[str | None]] | None,
    ks: Sequence[int],
) -> dict[str, float]:
    """Summarize P problems × N samples into pass@k / maj@k averages over problems.

    Returns ``pass@1`` (always), ``pass@k`` for each k in ``ks`` with k ≤ N, ``maj@k`` for
    each such k when ``answers_PN`` is given, ``pass@1_ci_low`` / ``pass@1_ci_high`` (the
    ``mean_ci95`` of the per-problem pass@1 values), ``num_problems`` and
    ``samples_per_problem``. Problems may have different sample counts; N is then the
    smallest count, so every reported k is defined for every problem. No problems -> NaN
    metrics.
    """
    if answers_PN is not None and len(answers_PN) != len(correct_PN):
        raise ValueError(
            f"answers_PN has {len(answers_PN)} problems, correct_PN has {len(correct_PN)}"
        )
    num = len(correct_PN)
    n_min = min((len(row) for row in correct_PN), default=0)
    if num and n_min == 0:
        raise ValueError("every problem needs at least one sample")
    out: dict[str, float] = {}
    k_list = sorted({1, *(k for k in ks if 1 <= k <= n_min)}) if num else [1]
    for k in k_list:
        vals = [pass_at_k(len(row), sum(map(bool, row)), k) for row in correct_PN]
        out[f"pass@{k}"] = sum(vals) / num if num else math.nan
        if k == 1:
            _, low, high = mean_ci95(vals)
            out["pass@1_ci_low"], out["pass@1_ci_high"] = low, high
    if answers_PN is not None:
        for k in k_list:
            vals = [maj_at_k(a, c, k) for a, c in zip(answers_PN, correct_PN, strict=True)]
            out[f"maj@{k}"] = sum(vals) / num if num else math.nan
    out["num_problems"] = num
    out["samples_per_problem"] = n_min
    return out
