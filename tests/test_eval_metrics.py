"""Tests for grouprl.eval: pass@k, maj@k, confidence intervals and answer extraction."""

import itertools
import math

import pytest

from grouprl.eval import (
    extract_answer,
    extract_boxed,
    maj_at_k,
    majority_answer,
    mean_ci95,
    normalize_answer,
    pass_at_k,
    summarize_samples,
)

# ---- pass@k --------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k
    assert pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0


def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of size-k subsets of n samples (first c correct) with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_n():
    n, c, k = 200, 13, 10
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---- majority vote ---------------------------------------------------------------------


def test_majority_answer_counts_ties_and_none():
    assert majority_answer(["1", "2", "2", None, None, None]) == "2"
    assert majority_answer(["3", "1", "1", "3"]) == "3"  # tie: first seen wins
    assert majority_answer([None, "7", "5", "5", "7"]) == "7"
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_maj_at_k():
    answers = ["4", "5", "5", None, "4", "4"]
    correct = [True, False, False, False, True, True]
    assert maj_at_k(answers, correct, 1) == 1.0  # "4"
    assert maj_at_k(answers, correct, 3) == 0.0  # "5" twice
    assert maj_at_k(answers, correct, 4) == 0.0  # None does not vote
    assert maj_at_k(answers, correct, 5) == 1.0  # tie "4"/"5": "4" came first
    assert maj_at_k(answers, correct, 6) == 1.0
    # The verdict is the first sample's with the majority answer.
    assert maj_at_k(["a", "a", "b"], [False, True, True], 3) == 0.0
    assert maj_at_k([None, None, "x"], [False, False, True], 2) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["a"], [True], 2)
    with pytest.raises(ValueError):
        maj_at_k(["a", "b"], [True], 1)


# ---- confidence interval ---------------------------------------------------------------


def test_mean_ci95_hand_computed():
    # mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3, s/sqrt(4) = sqrt(5/3)/2
    mean, low, high = mean_ci95([1.0, 2.0, 3.0, 4.0])
    half = 1.96 * math.sqrt(5 / 3) / 2
    assert mean == pytest.approx(2.5)
    assert low == pytest.approx(2.5 - half)
    assert high == pytest.approx(2.5 + half)


def test_mean_ci95_binary_nan_and_edges():
    # p = 0.5 over 4 binary values: s = sqrt(1/3), half width = 1.96*sqrt(1/3)/2
    mean, low, high = mean_ci95([1, 0, 1, 0, math.nan])
    assert mean == pytest.approx(0.5)
    assert high - mean == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean - low == pytest.approx(high - mean)
    assert mean_ci95([0.3]) == (0.3, 0.3, 0.3)
    assert all(math.isnan(v) for v in mean_ci95([]))
    assert all(math.isnan(v) for v in mean_ci95([math.nan]))


# ---- summarize_samples -----------------------------------------------------------------


def test_summarize_samples():
    correct = [
        [True, False, False, False],  # c=1
        [True, True, True, False],  # c=3
        [False, False, False, False],  # c=0
    ]
    answers = [
        ["1", "2", "2", "3"],  # majority "2": wrong
        ["9", "9", "9", "8"],  # majority "9": right
        [None, None, None, None],  # no answer
    ]
    out = summarize_samples(correct, answers, ks=[1, 2, 4, 8])
    per_problem_p1 = [0.25, 0.75, 0.0]
    assert out["pass@1"] == pytest.approx(1 / 3)
    # pass@2: 1 - C(3,2)/C(4,2) = 0.5 ; 1 - C(1,2)/C(4,2) = 1 ; 0
    assert out["pass@2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in out and "maj@8" not in out  # k > N
    assert out["maj@4"] == pytest.approx(1 / 3)
    assert out["maj@1"] == pytest.approx(2 / 3)  # first answers "1" (right), "9" (right)
    _, low, high = mean_ci95(per_problem_p1)
    assert out["pass@1_ci_low"] == pytest.approx(low)
    assert out["pass@1_ci_high"] == pytest.approx(high)
    assert out["num_problems"] == 3
    assert out["samples_per_problem"] == 4


def test_summarize_samples_without_answers_and_empty():
    out = summarize_samples([[True, False]], None, ks=[1, 2])
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1.0)
    assert not any(k.startswith("maj@") for k in out)
    assert out["pass@1_ci_low"] == out["pass@1_ci_high"] == pytest.approx(0.5)
    empty = summarize_samples([], None, ks=[1])
    assert empty["num_problems"] == 0
    assert math.isnan(empty["pass@1"])


# ---- answer extraction ----------------------------------------------------------------


def test_extract_boxed_nested_and_last():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{{a}+{b}}") == "{a}+{b}"
    assert extract_boxed(r"$\boxed 5$") == "5"
    assert extract_boxed("no box here") is None
    # A box cut off by truncation falls back to the earlier complete one.
    assert extract_boxed(r"\boxed{3} and finally \boxed{\frac{1}{") == "3"
    assert extract_boxed(r"\boxed{\frac{1}{") is None


def test_extract_answer_order_of_preference():
    assert extract_answer(r"<answer>7</answer> but \boxed{ 8 }") == "8"
    assert extract_answer("think 3 4 <answer>\n  x = 12 \n</answer>") == "x = 12"
    assert extract_answer("<answer>1</answer><answer>2</answer> 99") == "2"
    assert extract_answer("we get -3, so the total is 2.5 apples") == "2.5"
    assert extract_answer("half is 1/2.") == "1/2"
    assert extract_answer("it costs 1,000 dollars") == "1,000"
    assert extract_answer("the result is -3") == "-3"
    assert extract_answer("5-3 equals two") == "3"
    assert extract_answer("no numbers at all") is None
    assert extract_answer(r"\boxed{ }") is None


def test_normalize_answer():
    assert normalize_answer("  $1,000$. ") == "1000"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("2.0") == "2.0"
    assert normalize_answer("x  =\n 3.") == "x = 3"
    assert normalize_answer("$$\\frac{1}{2}$$") == "\\frac{1}{2}"
    assert normalize_answer("1, 2") == "1, 2"  # not a thousands separator
