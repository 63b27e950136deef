"""TON (think or not, arXiv 2505.16854): thought dropout for the SFT stage, the `ton` recipe."""

from __future__ import annotations

import re

import pytest
import torch

import grouprl.training.sft as sft_module
from grouprl.components import build_rewards, load_config
from grouprl.registry import RegistryError
from grouprl.rewards import REWARDS
from grouprl.training.sft import sft
from grouprl.training.sft_transforms import (
    EMPTY_THOUGHT,
    SFT_TRANSFORMS,
    TON_FORMAT,
    apply_sft_transforms,
    build_sft_transform,
    is_empty_thought,
    parse_sft_transform,
    thought_dropout,
)


def _rows(n: int) -> tuple[list[str], list[str]]:
    prompts = [f"{i}+{i + 1}=" for i in range(n)]
    comps = [
        f"<think>{i} plus {i + 1}\nis {2 * i + 1}</think><answer>{2 * i + 1}</answer>"
        for i in range(n)
    ]
    return prompts, comps


def _dropped(before: list[str], after: list[str]) -> list[bool]:
    return [a != b for a, b in zip(after, before, strict=True)]


def test_registered_with_the_papers_defaults():
    assert SFT_TRANSFORMS.get("thought_dropout") is thought_dropout
    import inspect

    params = inspect.signature(thought_dropout).parameters
    assert params["ratio"].default == 0.5 and params["seed"].default == 0
    assert params["empty"].default == "<think>\n\n</think>" == EMPTY_THOUGHT


@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.9])
def test_share_of_emptied_rows_follows_the_ratio(ratio):
    n = 4000
    P, C = _rows(n)
    _, out = apply_sft_transforms(P, C, [{"name": "thought_dropout", "ratio": ratio}])
    share = sum(_dropped(C, out)) / n
    # Binomial(4000, p): sd <= 0.008, so 0.03 is > 3.7 sd
    assert abs(share - ratio) < 0.03, share


def test_ratio_zero_and_one_are_exact():
    P, C = _rows(300)
    assert apply_sft_transforms(P, C, [{"name": "thought_dropout", "ratio": 0.0}])[1] == C
    _, out = apply_sft_transforms(P, C, [{"name": "thought_dropout", "ratio": 1.0}])
    assert all(c.startswith(EMPTY_THOUGHT + "<answer>") for c in out)


def test_deterministic_per_row_and_seeded():
    P, C = _rows(500)
    spec = [{"name": "thought_dropout", "seed": 7}]
    first = apply_sft_transforms(P, C, spec)
    assert apply_sft_transforms(P, C, spec) == first  # same call, same data
    # a row's draw depends on its index and the seed only, not on the other rows
    head = apply_sft_transforms(P[:100], C[:100], spec)
    assert head[1] == first[1][:100]
    other = apply_sft_transforms(P, C, [{"name": "thought_dropout", "seed": 8}])
    assert _dropped(C, other[1]) != _dropped(C, first[1])
    assert first[0] == P  # prompts never change


def test_only_the_trace_is_replaced_and_the_answer_kept():
    P = ["q1", "q2"]
    C = [
        "Plan: <think>step 1\nstep 2</think>  <answer>\\boxed{B}</answer> done",
        "no thought here <answer>7</answer>",
    ]
    _, out = apply_sft_transforms(P, C, [{"name": "thought_dropout", "ratio": 1.0}])
    assert out[0] == "Plan: <think>\n\n</think>  <answer>\\boxed{B}</answer> done"
    assert out[1] == C[1]  # nothing to drop
    # a custom empty thought is used verbatim (no regex escapes in it)
    fn = build_sft_transform(
        {"name": "thought_dropout", "ratio": 1.0, "empty": "<think>\\1</think>"}
    )
    assert (
        fn(0, "q", "<think>x</think><answer>1</answer>")[1]
        == "<think>\\1</think><answer>1</answer>"
    )


def test_multi_turn_traces_change_only_trained_segments():
    fn = thought_dropout(ratio=1.0)
    trace = [
        ("<think>call</think>tool(1)", True),
        ("<think>ctx</think>", False),
        ("<think>b</think>2", True),
    ]
    _, out = fn(3, "q", trace)
    assert out == [
        (EMPTY_THOUGHT + "tool(1)", True),
        ("<think>ctx</think>", False),
        (EMPTY_THOUGHT + "2", True),
    ]


def test_bad_parameters_fail_naming_them():
    with pytest.raises(RegistryError, match="rate"):
        build_sft_transform({"name": "thought_dropout", "rate": 0.5})
    with pytest.raises(ValueError, match="ratio"):
        thought_dropout(ratio=1.5)
    with pytest.raises(ValueError, match="ratio"):
        thought_dropout(ratio=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        thought_dropout(seed=0.5)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="thought_dropout"):
        build_sft_transform("thought_drop")
    with pytest.raises(ValueError, match="list"):
        apply_sft_transforms(["a"], ["b"], "thought_dropout")  # type: ignore[arg-type]


def test_parse_command_line_spec():
    assert parse_sft_transform("thought_dropout") == {"name": "thought_dropout"}
    assert parse_sft_transform("thought_dropout:ratio=0.25, seed=3") == {
        "name": "thought_dropout",
        "ratio": 0.25,
        "seed": 3,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_sft_transform("thought_dropout:ratio")


def test_skip_detection():
    assert is_empty_thought("<think>\n\n</think><answer>3</answer>")
    assert is_empty_thought("<think></think><answer>3</answer>")
    assert not is_empty_thought("<think>1+2</think><answer>3</answer>")
    assert not is_empty_thought("<answer>3</answer>")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>\n\n</think><answer>42</answer>", True),  # TON's empty thought
        ("<think></think>\n<answer>42</answer>", True),
        ("<think>6*7</think> <answer>42</answer>", True),
        ("<think>\n\n</think>42", False),  # no answer tag
        ("<think>\n\n</think><answer>42", False),  # unclosed answer
        ("<answer>42</answer>", False),  # no think at all
    ],
)
def test_format_rule_accepts_an_empty_thought_and_needs_the_answer_tag(text, ok):
    assert bool(TON_FORMAT.fullmatch(text)) is ok
    # the recipe's `format` reward: the same rule (on the stripped text), 1.0 or 0.0 here
    assert REWARDS.get("format")(["p"], [text]) == [1.0 if ok else 0.0]
    assert bool(re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL)) is ok


def test_sft_applies_the_transforms_once_before_training(monkeypatch):
    seen: list = []

    def fake_loss(model, tokenizer, prompts, completions, device):
        seen.extend(completions)
        return sum(p.sum() for p in model.parameters()) * 0.0

    monkeypatch.setattr(sft_module, "_loss", fake_loss)
    P, C = _rows(64)
    spec = [{"name": "thought_dropout", "ratio": 0.5, "seed": 1}]
    expected = set(apply_sft_transforms(P, C, spec)[1])
    model = torch.nn.Linear(1, 1)
    sft(model, None, P, C, steps=5, batch_size=16, progress=False, transforms=spec)
    assert seen and set(seen) <= expected
    assert any(EMPTY_THOUGHT in c for c in seen) and any(EMPTY_THOUGHT not in c for c in seen)
    seen.clear()
    sft(model, None, P, C, steps=2, batch_size=16, progress=False)  # no transforms: untouched
    assert set(seen) <= set(C)


def test_ton_recipe_is_grpo_on_accuracy_and_format():
    cfg = load_config({"recipe": "ton"})
    assert [r["name"] for r in cfg.rewards] == ["math_accuracy", "format"]
    assert build_rewards(cfg).names == ["math_accuracy", "format"]
    assert cfg.advantage == {"name": "grpo", "scale": "group", "eps": 1e-4}
    assert cfg.loss["name"] == "ppo_clip" and cfg.loss["aggregation"] == "seq_mean_token_mean"
    assert cfg.regularizers == [{"name": "kl", "beta": 0.04, "estimator": "k3"}]
    assert cfg.rollout.num_generations == 8 and cfg.train.learning_rate == 1e-6


def test_clinical_sft_traces_keep_their_rewards_after_dropout():
    """The built-in clinical task's SFT traces (<think> s1. s2. </think><answer>\\boxed{X}
    </answer>): about half lose their thought, and `format` and `choice_accuracy` score the
    new targets as the old ones (the task's own rewards are TON's accuracy + format)."""
    from grouprl.data.tasks import get_task

    task = get_task("clinical")
    P, C = task.sft_data(0)
    P, C = P[:400], C[:400]
    _, out = apply_sft_transforms(P, C, ["thought_dropout"])
    emptied = [is_empty_thought(c) for c in out]
    assert 0.4 < sum(emptied) / len(out) < 0.6
    assert not any(is_empty_thought(c) for c in C)
    fmt = REWARDS.get("format")
    assert fmt(P, out) == fmt(P, C)
    golds = [re.search(r"\\boxed\{(\w)\}", c).group(1) for c in C]  # type: ignore[union-attr]
    acc = REWARDS.get("choice_accuracy")
    assert acc(P, out, answer=golds) == acc(P, C, answer=golds) == [1.0] * len(C)
    assert sum(map(len, out)) < 0.8 * sum(map(len, C))  # shorter targets


def test_other_think_tags():
    """A format whose thought sits between other tags ("|" ends it here): the tags are
    parameters, matched literally (a regex character in them means itself)."""
    fn = thought_dropout(ratio=1.0, empty="[]|", think_start="[", think_end="]|")
    _, out = fn(0, "q", "[1+2 is 3]|3 [x]|")
    assert out == "[]|3 []|"
    assert is_empty_thought("[ ]|3", start="[", end="]|")
    assert not is_empty_thought("[a]|3", start="[", end="]|")
    assert not is_empty_thought("<think></think>3", start="[", end="]|")
    with pytest.raises(ValueError, match="non-empty"):
        thought_dropout(think_end="")
