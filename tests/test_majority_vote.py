"""TTRL's majority-vote reward on hand-written groups, with hand-computed metrics."""

from __future__ import annotations

import pytest

from grouprl.rewards import REWARDS
from grouprl.rewards.majority import MajorityVote, majority_answer_classes


def box(x: str) -> str:
    return f"so the answer is \\boxed{{{x}}}."


def exact(a: str, b: str) -> bool:
    return a == b


# ---------------------------------------------------------------- the pure helper


def test_classes_plain_majority():
    # counts: "3" x3, "5" x1 -> class 0 ("3") wins; no-answer samples get class None
    maj, ids = majority_answer_classes(["3", None, "5", "3", "3", None], exact)
    assert maj == 0
    assert ids == [0, None, 1, 0, 0, None]


def test_classes_tie_goes_to_first_seen_class():
    # "7" x2 and "4" x2: a tie; "7" appears first (index 0) -> class 0
    maj, ids = majority_answer_classes(["7", "4", "4", "7"], exact)
    assert (maj, ids) == (0, [0, 1, 1, 0])
    # the same counts in the other order: "4" first -> class 0 is now "4"
    maj, ids = majority_answer_classes(["4", "7", "7", "4"], exact)
    assert (maj, ids) == (0, [0, 1, 1, 0])
    # a later, larger class still wins: "1" x1, "2" x2
    assert majority_answer_classes(["1", "2", "2"], exact)[0] == 1


def test_classes_all_none():
    assert majority_answer_classes([None, None], exact) == (None, [None, None])
    assert majority_answer_classes([], exact) == (None, [])


def test_classes_merge_equivalent_strings_and_call_equivalence_sparingly():
    calls: list[tuple[str, str]] = []

    def same_parity(a: str, b: str) -> bool:
        calls.append((a, b))
        return int(a) % 2 == int(b) % 2

    answers = ["1", "2", "3", "1", "2", "3", "5"] * 10  # 70 samples, 4 distinct strings
    maj, ids = majority_answer_classes(answers, same_parity)
    # odd class {1, 3, 5}: 40 samples; even class {2}: 20 -> odd (class 0) wins
    assert maj == 0 and ids[:7] == [0, 1, 0, 0, 1, 0, 0]
    # "2" vs rep "1"; "3" vs "1" (joins class 0 at once); "5" vs "1" -> 3 calls in all,
    # not one per pair of samples
    assert calls == [("1", "2"), ("1", "3"), ("1", "5")]


# ---------------------------------------------------------------- the reward


def test_registered_and_params_checked():
    assert REWARDS.get("majority_vote") is MajorityVote
    with pytest.raises(ValueError, match="auto, math, choice"):
        MajorityVote(mode="vote")


def test_math_majority_no_answer_and_tie():
    mv = MajorityVote(mode="math")
    completions = [
        box("12"),  # 0: class "12"
        "I give up",  # 1: no answer (no box, no tag, no number)
        box("7"),  # 2: class "7"
        box("12"),  # 3: "12"
        "\\boxed{7}",  # 4: "7"
    ]
    # "12" x2, "7" x2: tie -> "12" (first member at index 0 comes before index 2)
    assert mv(["p"] * 5, completions) == [1.0, 0.0, 0.0, 1.0, 0.0]
    # majority 2 of 5 samples (the no-answer one counts); 4 of 5 answered
    assert mv.last_metrics == pytest.approx(
        {"ttrl/majority_ratio": 2 / 5, "ttrl/answered_frac": 4 / 5}
    )


def test_math_equivalent_forms_vote_together():
    mv = MajorityVote(mode="math")
    completions = [
        box("3"),
        box("1/2"),
        box("0.5"),
        box("\\frac{1}{2}"),
        box("3"),
        "The answer is $\\dfrac12$. \\boxed{\\dfrac{1}{2}}",
    ]
    # {1/2, 0.5, \frac{1}{2}, \dfrac{1}{2}}: 4 votes > "3": 2 votes
    assert mv(["p"] * 6, completions) == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert mv.last_metrics["ttrl/majority_ratio"] == pytest.approx(4 / 6)


def test_all_no_answer_group_gets_zero():
    mv = MajorityVote(mode="math")
    assert mv(["p", "p", "p"], ["no idea", "", "\\boxed{"]) == [0.0, 0.0, 0.0]
    assert mv.last_metrics == {"ttrl/majority_ratio": 0.0, "ttrl/answered_frac": 0.0}


def test_choice_letters():
    mv = MajorityVote(mode="choice")
    completions = [
        "\\boxed{B}",  # B
        "<answer>b</answer>",  # B (case-insensitive, from the tag)
        "\\boxed{C}",  # C
        "\\boxed{\\text{B}}",  # not a bare letter: no answer
        "The answer is 42",  # no letter: no answer
        "<answer> C </answer>",  # C
        "<answer>B</answer>",  # B
    ]
    # B x3, C x2
    assert mv(["q"] * 7, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert mv.last_metrics == pytest.approx(
        {"ttrl/majority_ratio": 3 / 7, "ttrl/answered_frac": 5 / 7}
    )


def test_auto_mode_picks_choice_or_math_per_completion():
    mv = MajorityVote()  # mode="auto"
    assert mv.extract("\\boxed{D}") == "D"  # boxed upper-case letter: choice
    assert mv.extract("\\boxed{0.5}") == "0.5"  # math
    assert mv.extract("it is 41 then 42") == "42"  # math fallback: the last number
    # a choice letter never equals a math answer; math answers still merge by math-verify
    completions = [box("D"), box("1/2"), box("0.5"), box("D"), box("D")]
    assert mv(["p"] * 5, completions) == [1.0, 0.0, 0.0, 1.0, 1.0]
    completions = [box("1/2"), box("D"), box("0.5"), box("D"), box("\\frac{1}{2}")]
    assert mv(["p"] * 5, completions) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_conversational_completions():
    mv = MajorityVote(mode="math")
    conv = [[{"role": "assistant", "content": box(x)}] for x in ["5", "5", "6"]]
    assert mv([["m"]] * 3, conv) == [1.0, 1.0, 0.0]


def test_several_groups_in_one_call():
    mv = MajorityVote(mode="math")
    prompts = ["a", "a", "a", "b", "b", "c", "c", "c", "c"]
    completions = [
        box("1"),  # a: "1" x2, "2" x1 -> majority "1"
        box("2"),
        box("1"),
        "nothing",  # b: nobody answers -> all 0
        "still nothing",
        box("4"),  # c: "4" x1, "9" x2, one no-answer -> majority "9"
        box("9"),
        "pass",
        box("9"),
    ]
    assert mv(prompts, completions) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    # majority_ratio: a 2/3, b 0, c 2/4 -> (2/3 + 0 + 1/2) / 3 = 0.3888889
    # answered_frac:  a 3/3, b 0, c 3/4 -> (1 + 0 + 0.75) / 3 = 0.5833333
    assert mv.last_metrics == pytest.approx(
        {"ttrl/majority_ratio": (2 / 3 + 0.5) / 3, "ttrl/answered_frac": 1.75 / 3}
    )


def test_same_prompt_later_in_batch_is_a_new_group():
    mv = MajorityVote(mode="math")
    # runs: ["x","x"] | ["y"] | ["x","x"]: the second "x" run votes on its own
    prompts = ["x", "x", "y", "x", "x"]
    completions = [box("1"), box("1"), box("3"), box("2"), box("2")]
    assert mv(prompts, completions) == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_label_metrics_hand_computed():
    mv = MajorityVote(mode="math")
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    completions = [
        # a: label 0.5; answers 1/2, 0.5, 3, none -> majority {1/2, 0.5} (2 of 4), correct
        box("1/2"),
        box("0.5"),
        box("3"),
        "no answer",
        # b: label 7; answers 5, 5, 7, 6 -> majority "5" (2 of 4), wrong
        box("5"),
        box("5"),
        box("7"),
        box("6"),
        # c: no label (None): counted in majority_ratio/answered_frac only
        box("8"),
        box("8"),
    ]
    labels = ["0.5"] * 4 + ["7"] * 4 + [None] * 2
    rewards = mv(prompts, completions, answer=labels)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # a: pseudo [1,1,0,0], true [1,1,0,0] -> reward_acc 4/4, gt_ratio 2/4, label_acc 1
    # b: pseudo [1,1,0,0], true [0,0,1,0] -> reward_acc 1/4 (the "6": a lucky 0 = 0),
    #    gt_ratio 1/4, label_acc 0
    # label metrics average over the 2 labelled groups:
    #   label_accuracy (1 + 0)/2 = 0.5; reward_accuracy (1 + 0.25)/2 = 0.625;
    #   ground_truth_ratio (0.5 + 0.25)/2 = 0.375
    # majority_ratio over all 3 groups: (2/4 + 2/4 + 2/2)/3 = 0.6666667
    # answered_frac: (3/4 + 1 + 1)/3 = 0.9166667
    assert mv.last_metrics == pytest.approx(
        {
            "ttrl/majority_ratio": 2 / 3,
            "ttrl/answered_frac": 2.75 / 3,
            "ttrl/label_accuracy": 0.5,
            "ttrl/reward_accuracy": 0.625,
            "ttrl/ground_truth_ratio": 0.375,
        }
    )


def test_label_column_name_and_choice_labels():
    mv = MajorityVote(mode="choice", label_column="gold")
    completions = ["\\boxed{A}", "\\boxed{A}", "\\boxed{B}"]
    # the default column "answer" is ignored when label_column is "gold"
    mv(["p"] * 3, completions, answer=["B"] * 3)
    assert "ttrl/label_accuracy" not in mv.last_metrics
    mv(["p"] * 3, completions, gold=["b"] * 3)  # label "b" -> "B"
    # majority A (wrong): label_acc 0; pseudo [1,1,0] vs true [0,0,1] -> reward_acc 0;
    # gt_ratio 1/3
    assert mv.last_metrics["ttrl/label_accuracy"] == 0.0
    assert mv.last_metrics["ttrl/reward_accuracy"] == 0.0
    assert mv.last_metrics["ttrl/ground_truth_ratio"] == pytest.approx(1 / 3)


def test_labels_never_change_rewards():
    mv = MajorityVote(mode="math")
    prompts = ["a"] * 4 + ["b"] * 3
    completions = [box("2"), box("2"), box("3"), "none", box("1/2"), box("0.5"), box("9")]
    no_label = mv(prompts, completions)
    right = mv(prompts, completions, answer=["2"] * 4 + ["0.5"] * 3)
    assert mv.last_metrics["ttrl/label_accuracy"] == 1.0
    wrong = mv(prompts, completions, answer=["3"] * 4 + ["9"] * 3)
    assert mv.last_metrics["ttrl/label_accuracy"] == 0.0
    assert no_label == right == wrong == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 prompts for 3"):
        MajorityVote()(["p", "p"], ["a", "b", "c"])


def test_large_group_is_fast_and_calls_verify_per_class(monkeypatch):
    import math_verify

    calls = []
    real = math_verify.verify

    def counting_verify(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(math_verify, "verify", counting_verify)
    mv = MajorityVote(mode="math")
    # 64 samples, 4 distinct strings: "1/2" "0.5" "\frac{1}{2}" "3/4"
    forms = [box("1/2"), box("0.5"), box("\\frac{1}{2}"), box("3/4")]
    rewards = mv(["p"] * 64, forms * 16)
    assert rewards == [1.0, 1.0, 1.0, 0.0] * 16
    # "0.5" vs "1/2"; "\frac{1}{2}" vs "1/2"; "3/4" vs "1/2" and vs nothing else -> 3 calls
    assert len(calls) == 3


def test_leave_one_out_compares_each_sample_with_the_others_majority():
    """[A, A, B, B, C]: the plain vote's tie goes to A (seen first): [1, 1, 0, 0, 0]. Leave
    one out: an A sample sees A 1, B 2 -> B; a B sample sees A 2, B 1 -> A; the C sample
    sees A 2, B 2 -> A: every reward 0. [A, A, B]: an A sample sees A 1, B 1 -> A (first):
    1; the B sample sees A 2 -> 0. A lone answer among no-answers has no one to agree with."""
    plain = MajorityVote(mode="math", timeout_seconds=None)
    loo = MajorityVote(mode="math", timeout_seconds=None, leave_one_out=True)
    group = [box(x) for x in "11223"]
    assert plain(["q"] * 5, group) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert loo(["q"] * 5, group) == [0.0] * 5
    assert loo(["q"] * 3, [box("1"), box("1"), box("2")]) == [1.0, 1.0, 0.0]
    assert loo(["q"] * 3, [box("7"), "no answer here", "none"]) == [0.0, 0.0, 0.0]
