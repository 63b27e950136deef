"""Built-in rewards on hand-written completions, and RewardSet's handling of failures."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from grouprl.registry import RegistryError
from grouprl.rewards import (
    REWARDS,
    RewardSet,
    RewardSpec,
    choice_accuracy,
    completion_text,
    exact_match,
    find_boxes,
    format_reward,
    load_reward_fn,
    math_accuracy,
)


def conv(text: str) -> list[dict]:
    """A TRL conversational completion."""
    return [{"role": "assistant", "content": text}]


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert (
        completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]) == "x"
    )
    assert completion_text(None) == ""
    with pytest.raises(TypeError):
        completion_text(3)


def test_find_boxes_nests_braces():
    assert [b[2] for b in find_boxes(r"a \boxed{\frac{1}{2}} b \boxed {C} \boxed x")] == [
        r"\frac{1}{2}",
        "C",
        None,
    ]


# ---------------------------------------------------------------- choice_accuracy


@pytest.mark.parametrize(
    "completion,expected",
    [
        (r"so \boxed{B}", 1.0),
        (r"so \boxed{ b }", 1.0),  # case-insensitive, whitespace stripped
        (r"so \boxed{C}", 0.0),
        (r"\boxed{\text{B}}", -0.5),  # not a bare letter
        (r"\boxed{AB}", -0.5),
        (r"\boxed{42}", -0.5),
        (r"\boxed B", -1.0),  # a box with no braces cannot be read
        ("no box at all", 0.0),
        (r"\boxed{B} or \boxed{B}", -2.0),
        (r"\boxed{A} \boxed{B} \boxed{C}", -3.0),
        (conv(r"I pick \boxed{B}"), 1.0),
        (conv("none"), 0.0),
    ],
)
def test_choice_accuracy(completion, expected):
    out = choice_accuracy(["q"], [completion], answer=["B"])
    assert out == [expected]
    assert not math.copysign(1.0, out[0]) < 0 or expected < 0  # no box gives 0.0, not -0.0


def test_choice_accuracy_gold_not_a_letter_is_none_and_missing_column_raises():
    assert choice_accuracy(["q", "q"], [r"\boxed{A}"] * 2, answer=["AB", None]) == [None, None]
    assert choice_accuracy(["q"], [r"\boxed{a}"], answer=[" a "]) == [1.0]
    with pytest.raises(ValueError, match="'answer'"):
        choice_accuracy(["q"], [r"\boxed{A}"])


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>hmm</think><answer>B</answer>", 1.0),
        ("  <think>a\nb</think>\n <answer>\nThe answer is \\boxed{B}.\n</answer>\n", 1.5),
        ("<think>x</think><answer>\\boxed{B}</answer>", 1.0),  # box but no summary text
        ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", 1.0),  # nested braces
        ("<think>x</think><answer>A \\boxed{B} \\boxed{C}</answer>", 1.0),  # two boxes
        ("<think>x</think><answer>B</answer> trailing", 0.0),
        ("<answer>B</answer>", 0.0),
        ("text <think>x</think><answer>B</answer>", 0.0),
        (conv("<think>x</think><answer>so \\boxed{B}</answer>"), 1.5),
    ],
)
def test_format(completion, expected):
    assert format_reward(["q"], [completion]) == [expected]


def test_format_is_registered_as_format():
    assert REWARDS.get("format") is format_reward


# ---------------------------------------------------------------- exact_match


def test_exact_match():
    comps = ["  Paris ", "paris", "New   York", "Paris", conv("Paris")]
    gold = ["Paris", "Paris", "new york", None, "Paris"]
    assert exact_match([""] * 5, comps, answer=gold) == [1.0, 1.0, 1.0, None, 1.0]
    assert exact_match([""] * 3, comps[:3], answer=gold[:3], normalize=False) == [1.0, 0.0, 0.0]
    assert exact_match([""], ["42"], answer=[42]) == [1.0]
    # after a think marker: the text after its last occurrence; none: 0
    thought = ["7+8=15</think> 15", "</think>1</think>15", "15", "15</think>16", "</think>"]
    assert exact_match([""] * 5, thought, answer=["15"] * 5, after="</think>") == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]


# ---------------------------------------------------------------- math_accuracy

MATH_CASES = [
    ("42", r"\boxed{42}", 1.0),
    ("42", "the answer is 42", 1.0),  # no box: the last number is taken
    ("42", "42 apples, then 43", 0.0),
    ("42", r"\boxed{41}, then 42", 0.0),  # a box wins over other text
    ("42", r"\boxed{41} and \boxed{42}", 0.0),  # two boxes parse as a set
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    (r"\frac{1}{2}", r"\boxed{0.5}", 1.0),
    ("x^2+1", r"\boxed{1+x^2}", 1.0),  # bare gold is read as LaTeX
    ("(0, 1]", r"\boxed{(0,1]}", 1.0),
    ("(0, 1]", r"\boxed{1}", 0.0),  # unwrapped, math-verify would read this gold as 1
    ("7", conv(r"so \boxed{7}"), 1.0),
    (42, "42", 1.0),
    ("", "42", None),  # gold that cannot be parsed
    (None, "42", None),
]


def test_math_accuracy():
    gold = [g for g, _, _ in MATH_CASES]
    comps = [c for _, c, _ in MATH_CASES]
    expected = [e for _, _, e in MATH_CASES]
    assert math_accuracy([""] * len(gold), comps, answer=gold) == expected


def test_math_accuracy_solution_column_and_missing_gold():
    assert math_accuracy([""], [r"\boxed{3}"], solution=[r"so $x = 3$, \boxed{3}"]) == [1.0]
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        math_accuracy([""], ["3"])


def test_math_accuracy_off_the_main_thread():
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(math_accuracy([""], ["1/2"], answer=["0.5"])))
    t.start()
    t.join()
    assert out == [[1.0]]


# ---------------------------------------------------------------- RewardSet


def constant(prompts, completions, **kw):
    return [1.0] * len(completions)


def boom(prompts, completions, **kw):
    raise RuntimeError("judge offline")


@pytest.fixture
def extra_rewards(monkeypatch):
    """Register throwaway rewards for one test; monkeypatch removes them afterwards."""
    return lambda name, fn: monkeypatch.setitem(REWARDS._items, name, fn)


def test_reward_set_failing_function_gives_nan_column_and_continues(extra_rewards, caplog):
    extra_rewards("test_boom", boom)
    rs = RewardSet([{"name": "exact_match", "weight": 2.0}, "test_boom"])
    assert rs.names == ["exact_match", "test_boom"]
    assert torch.equal(rs.weights_K, torch.tensor([2.0, 1.0]))
    with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
        res = rs(["q", "q"], ["a", "b"], {"answer": ["a", "a"]})
        res2 = rs(["q", "q"], ["a", "b"], {"answer": ["a", "a"]})
    assert res.rewards_NK.dtype == torch.float32 and res.rewards_NK.shape == (2, 2)
    assert res.rewards_NK[:, 0].tolist() == [1.0, 0.0]
    assert torch.isnan(res.rewards_NK[:, 1]).all()
    assert res.errors == {"exact_match": 0, "test_boom": 1}
    assert res2.errors["test_boom"] == 1  # per call, not cumulative
    failures = [r for r in caplog.records if "test_boom" in r.getMessage()]
    assert len(failures) == 2 and "judge offline" in failures[0].getMessage()
    # the traceback text (from the worker process) once per function
    assert "Traceback" in failures[0].getMessage() and "in boom" in failures[0].getMessage()
    assert "Traceback" not in failures[1].getMessage()


def test_reward_set_none_and_non_finite_become_nan(extra_rewards):
    extra_rewards("test_some_none", lambda prompts, completions, **kw: [None, 0.5, float("inf")])
    res = RewardSet(["test_some_none"])(["q"] * 3, ["a", "b", "c"], {})
    assert torch.isnan(res.rewards_NK[[0, 2], 0]).all() and res.rewards_NK[1, 0] == 0.5
    assert res.nones == {"test_some_none": 2} and res.errors == {"test_some_none": 0}


@pytest.mark.parametrize(
    "output,message",
    [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, "good"], "entry 1 is str"),
        ("11", "expected a list of 2 numbers, got str"),
    ],
)
def test_reward_set_bad_output_is_an_error(extra_rewards, caplog, output, message):
    extra_rewards("test_bad_output", lambda prompts, completions, **kw: output)
    rs = RewardSet(["test_bad_output", "format"])
    with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
        res = rs(["q", "q"], ["a", "b"], {})
    assert torch.isnan(res.rewards_NK[:, 0]).all()
    assert res.rewards_NK[:, 1].tolist() == [0.0, 0.0]  # the other function still ran
    assert res.errors["test_bad_output"] == 1
    assert message in caplog.text


def test_reward_set_builtin_without_gold_column_is_nan_not_a_crash(caplog):
    with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
        res = RewardSet(["choice_accuracy"])(["q"], [r"\boxed{A}"], {})
    assert torch.isnan(res.rewards_NK).all() and res.errors == {"choice_accuracy": 1}
    assert "needs a gold column 'answer'" in caplog.text


@pytest.mark.parametrize("timeout", [0, 30])  # in-process, and in the worker process
def test_reward_set_passes_columns_and_accepts_tensor_output(extra_rewards, timeout):
    seen = {}

    def spy(prompts, completions, level, **kw):
        seen.update(prompts=prompts, level=level)  # seen by this process only in-process
        assert prompts == ["p1", "p2"]
        return torch.tensor([float(x) for x in level])

    extra_rewards("test_spy", spy)
    with RewardSet([{"name": "test_spy", "timeout": timeout}]) as rs:
        res = rs(["p1", "p2"], ["a", "b"], {"level": [1, 2]})
    if not timeout:
        assert seen == {"prompts": ["p1", "p2"], "level": [1, 2]}
    assert res.errors == {"test_spy": 0}
    assert res.rewards_NK[:, 0].tolist() == [1.0, 2.0]


def test_reward_set_rejects_mismatched_batch():
    rs = RewardSet(["format"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        rs(["q", "q"], ["a", "b"], {"answer": ["x"]})


# ---------------------------------------------------------------- specs and loading


def test_unknown_builtin_name_did_you_mean():
    with pytest.raises(
        RegistryError, match=r'unknown reward \'math_acuracy\' \(did you mean "math_accuracy"\?\)'
    ):
        RewardSet(["math_acuracy"])


def test_unknown_spec_key_did_you_mean():
    with pytest.raises(ValueError, match=r'unknown key \'wieght\' \(did you mean "weight"\?\)'):
        RewardSet([{"name": "format", "wieght": 2.0}])


def test_spec_needs_exactly_one_of_name_or_path():
    with pytest.raises(ValueError, match="exactly one"):
        RewardSpec()
    with pytest.raises(ValueError, match="exactly one"):
        RewardSpec(name="format", path="r.py:f")


def test_duplicate_names_need_an_alias():
    with pytest.raises(ValueError, match="two rewards are named 'format'"):
        RewardSet(["format", {"name": "format", "weight": 0.5}])
    rs = RewardSet(["format", {"name": "format", "alias": "format_half", "weight": 0.5}])
    assert rs.names == ["format", "format_half"]
    assert rs.weights_K.tolist() == [1.0, 0.5]


def test_builtin_params_are_checked_and_bound():
    fn = load_reward_fn(RewardSpec(name="exact_match", params={"normalize": False}))
    assert fn(["q"], ["paris"], answer=["Paris"]) == [0.0]
    with pytest.raises(
        RegistryError, match=r'no parameter \'normalise\' \(did you mean "normalize"\?\)'
    ):
        load_reward_fn(RewardSpec(name="exact_match", params={"normalise": False}))
    with pytest.raises(
        RegistryError, match="no parameter 'scale'; accepted: after, answer, normalize"
    ):
        load_reward_fn(RewardSpec(name="exact_match", params={"scale": 2}))


USER_REWARDS = """
def length_bonus(prompts, completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]

def strict(prompts, completions, factor=2.0):
    return [factor] * len(completions)
"""


def test_load_from_file_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the current directory
    rs = RewardSet.from_config(
        [
            "my_rewards.py:length_bonus",
            {"path": str(tmp_path / "my_rewards.py:strict"), "params": {"factor": 3.0}},
        ]
    )
    assert rs.names == ["length_bonus", "strict"]
    res = rs(["q", "q"], ["ab", "abcd"], {})
    assert res.rewards_NK.tolist() == [[2.0, 3.0], [4.0, 3.0]]


def test_load_from_file_errors_name_file_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=r'my_rewards\.py: no function \'lenght_bonus\' \(did you mean "length_bonus"\?\)',
    ):
        load_reward_fn(RewardSpec(path="my_rewards.py:lenght_bonus"))
    with pytest.raises(ValueError, match=r"missing\.py: reward file not found"):
        load_reward_fn(RewardSpec(path="missing.py:f"))
    with pytest.raises(ValueError, match=r"broken\.py: error while importing: ModuleNotFoundError"):
        load_reward_fn(RewardSpec(path="broken.py:f"))
    with pytest.raises(ValueError, match=r"my_rewards\.py:strict: no parameter 'factr'"):
        load_reward_fn(RewardSpec(path="my_rewards.py:strict", params={"factr": 1}))
    with pytest.raises(ValueError, match="must look like"):
        load_reward_fn(RewardSpec(path="my_rewards.py"))


def test_overlong_penalty_dapo_shape():
    from grouprl.rewards.builtins import overlong_penalty

    # L_max = 10, buffer 4: free up to 6 tokens, then (6 - L)/4, then -1 past 10
    ids = [[1] * n for n in (3, 6, 7, 8, 10, 11)]
    got = overlong_penalty(["p"] * 6, ["c"] * 6, completion_ids=ids, max_length=10, buffer=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # L_max from the trainer's column, buffer as a fraction (0.2 * 10 = 2): 9 tokens -> (8-9)/2
    got = overlong_penalty(["p"], ["c"], completion_ids=[[1] * 9], max_completion_length=[10])
    assert got == [-0.5]
