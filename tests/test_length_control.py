"""Length-control rewards: format_length (arXiv 2505.19439), budget_length and its schedule
(arXiv 2508.08940), grpo_lambda_length (arXiv 2505.18086). Values computed by hand."""

from __future__ import annotations

import math

import pytest
from conftest import arith_rows, base_config

from grouprl.components import load_config
from grouprl.rewards import RewardSet, TrainerState
from grouprl.rewards.length_control import (
    BudgetLength,
    FormatLength,
    GrpoLambdaLength,
    budget_length_value,
    format_length_shape,
    format_length_value,
    group_ids,
    grpo_lambda_rewards,
    length_budget,
)
from grouprl.training.trainer import Trainer


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- format_length


def test_format_length_shape_hand_values():
    assert format_length_shape(0.0) == 0.0
    assert format_length_shape(0.5) == 1.0
    assert format_length_shape(1.0) == -1.0
    assert format_length_shape(0.25) == pytest.approx(0.75)  # 1 − (1 − 0.5)²
    assert format_length_shape(0.75) == pytest.approx(0.5)  # 1 − 2·0.5²
    for p in (0.5, 0.3, 0.8):  # continuous at the peak, where it is 1
        assert format_length_shape(p, p) == pytest.approx(1.0)
        assert format_length_shape(p - 1e-9, p) == pytest.approx(1.0, abs=1e-6)
        assert format_length_shape(p + 1e-9, p) == pytest.approx(1.0, abs=1e-6)
        assert format_length_shape(1.0, p) == pytest.approx(-1.0)


def test_format_length_value_answer_and_no_answer_branches():
    # an answer: 0.5·(think + 1) + ℓ
    assert format_length_value(0.5, has_think=True, has_answer=True) == 2.0
    assert format_length_value(0.5, has_think=False, has_answer=True) == 1.5
    assert format_length_value(1.0, has_think=False, has_answer=True) == pytest.approx(-0.5)
    # no answer: min(0, ℓ): a good length earns nothing, a bad one still costs
    assert format_length_value(0.5, has_think=True, has_answer=False) == 0.0
    assert format_length_value(0.25, has_think=False, has_answer=False) == 0.0
    assert format_length_value(1.0, has_think=True, has_answer=False) == -1.0
    assert format_length_value(0.75, has_think=False, has_answer=False) == pytest.approx(0.0)
    assert format_length_value(0.875, has_think=False, has_answer=False) == pytest.approx(
        1 - 2 * 0.75**2
    )


def test_format_length_reward_reads_boxes_think_tags_and_token_lengths():
    fl = FormatLength()
    comps = [
        "<think>12+3</think> so \\boxed{15}",  # think + a boxed answer, 4 of 8 tokens
        "so \\boxed{15}",  # a boxed answer, no think, 8 of 8 tokens
        "<think>no box</think> 15",  # a number but no box (boxed mode: no answer)
        "\\boxed{}",  # an empty box is no answer
    ]
    ids = [[0] * 4, [0] * 8, [0] * 2, [0] * 6]
    out = fl(["q"] * 4, comps, completion_ids=ids, max_completion_length=[8] * 4)
    assert out == pytest.approx([2.0, -0.5, 0.0, 0.0])
    assert fl.last_metrics == {"format_length/answer_frac": 0.5, "format_length/think_frac": 0.5}
    # "any": the last number of a plain answer (the arith task) counts
    anyf = FormatLength(answer_from="any", max_length=4)
    assert anyf(["1+2="] * 2, ["3", "+="], completion_ids=[[0, 0], [0, 0]]) == [1.5, 0.0]


def test_format_length_bad_parameters_name_their_key():
    with pytest.raises(ValueError, match=r"rewards\.format_length\.peak"):
        FormatLength(peak=1.0)
    with pytest.raises(ValueError, match=r"rewards\.format_length\.answer_from"):
        FormatLength(answer_from="last")
    with pytest.raises(ValueError, match=r"rewards\.format_length\.max_length"):
        FormatLength(max_length=0)
    with pytest.raises(ValueError, match="set params.max_length"):
        FormatLength()(["q"], ["\\boxed{1}"], completion_ids=[[1]])


# ---------------------------------------------------------------- budget_length


def test_budget_length_triangular_and_band_values():
    L = 80
    assert budget_length_value(L, L) == 1.0
    assert budget_length_value(2 * L, L) == 0.0
    assert budget_length_value(L // 2, L) == 0.5
    assert budget_length_value(0, L) == 0.0
    assert budget_length_value(1.5 * L, L) == 0.5
    assert budget_length_value(3 * L, L) == 0.0
    assert budget_length_value(L, L, max_reward=2.0) == 2.0
    # band: R_max anywhere within the budget, the same fall above it
    assert budget_length_value(0, L, shape="band") == 1.0
    assert budget_length_value(L // 2, L, shape="band") == 1.0
    assert budget_length_value(L, L, shape="band") == 1.0
    assert budget_length_value(1.5 * L, L, shape="band") == 0.5
    assert budget_length_value(2 * L, L, shape="band") == 0.0


def test_length_budget_step_schedule_hits_the_final_budget_at_the_last_decay():
    kw = {"start_budget": 256, "final_budget": 87, "num_decays": 3, "total_steps": 600}
    d = (87 / 256) ** (1 / 3)  # ≈ 0.698, applied every 600 / 4 = 150 steps
    assert length_budget(0, **kw) == 256
    assert length_budget(149, **kw) == 256
    assert length_budget(150, **kw) == round(256 * d) == 179
    assert length_budget(300, **kw) == round(256 * d * d) == 125
    assert length_budget(449, **kw) == 125
    assert length_budget(450, **kw) == 87  # the last decay index: exactly S_f
    assert length_budget(599, **kw) == 87
    assert length_budget(10_000, **kw) == 87  # never below S_f
    # linear: equal decrements (256 − 169/3 per decay)
    lin = [length_budget(t, schedule="linear", **kw) for t in (0, 150, 300, 450, 599)]
    assert lin == [256, 200, 143, 87, 87]
    # constant: the fixed-budget baseline; no horizon: the start budget
    assert length_budget(500, schedule="constant", **kw) == 256
    assert length_budget(500, start_budget=256, final_budget=87, total_steps=0) == 256


def test_length_budget_exponential_floors_at_one():
    kw = {"start_budget": 4, "schedule": "exponential", "decay_factor": 0.5, "decay_every": 1}
    assert [length_budget(t, **kw) for t in range(6)] == [4, 2, 1, 1, 1, 1]
    # B0·γ^⌊t/T⌋ with T = 150: 256 · 0.7^3 = 87.8 at t = 450, and it keeps decaying
    kw = {"start_budget": 256, "schedule": "exponential", "decay_factor": 0.7, "decay_every": 150}
    assert length_budget(450, **kw) == round(256 * 0.7**3) == 88
    assert length_budget(600, **kw) == round(256 * 0.7**4) == 61
    assert length_budget(150 * 40, **kw) == 1


def test_budget_length_reads_the_step_and_reports_its_budget():
    bl = BudgetLength(start_budget=8, final_budget=2, num_decays=2)  # 8, 4, 2 over thirds
    ids = [[0] * 2, [0] * 4, [0] * 6, [0] * 9]
    early = bl(["q"] * 4, ["a"] * 4, completion_ids=ids, trainer_state=TrainerState(0, 30))
    assert early == pytest.approx([0.25, 0.5, 0.75, 1 - 1 / 8])
    assert bl.last_metrics == {"budget_length/budget": 8.0, "budget_length/over_budget_frac": 0.25}
    late = bl(["q"] * 4, ["a"] * 4, completion_ids=ids, trainer_state=TrainerState(20, 30))
    assert late == [1.0, 0.0, 0.0, 0.0]
    assert bl.last_metrics["budget_length/budget"] == 2.0
    # through a RewardSet: the trainer's state reaches it and the budget becomes a metric
    rs = RewardSet(
        [{"name": "budget_length", "timeout": 0, "params": {"start_budget": 8, "final_budget": 2}}]
    )
    rs.trainer_state = TrainerState(global_step=0, max_steps=10)
    res = rs(["q"], ["abcd"], {"completion_ids": [[1, 2, 3, 4]]})
    assert res.rewards_NK[0, 0].item() == 0.5
    assert res.metrics["budget_length/budget"] == 8.0


def test_budget_length_bad_parameters_name_their_key():
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.start_budget"):
        BudgetLength(start_budget=-5)
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.final_budget.*at most"):
        BudgetLength(start_budget=64, final_budget=128)
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.schedule"):
        BudgetLength(schedule="cosine")
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.decay_factor"):
        BudgetLength(decay_factor=1.5)
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.num_decays"):
        BudgetLength(num_decays=0)
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.shape"):
        BudgetLength(shape="square")
    with pytest.raises(ValueError, match=r"rewards\.budget_length\.start_budget"):
        RewardSet([{"name": "budget_length", "params": {"start_budget": 0}}])


# ---------------------------------------------------------------- grpo_lambda_length


def test_grpo_lambda_penalizes_only_the_top_groups_correct_answers():
    # 5 groups of 4: correctness ratios 0.5, 1.0, 0.25, 0.75, 0.0; λ = 0.2 → ⌈1⌉ group (#1)
    correct = [1, 0, 1, 0] + [1, 1, 1, 1] + [1, 0, 0, 0] + [1, 1, 0, 1] + [0, 0, 0, 0]
    lengths = [5, 9, 7, 3] + [2, 4, 2, 4] + [8, 1, 1, 1] + [3, 3, 9, 3] + [4, 4, 4, 4]
    groups = [g for g in range(5) for _ in range(4)]
    out, top = grpo_lambda_rewards([bool(c) for c in correct], lengths, groups, lam=0.2)
    assert top == [1]
    # group 1: correct lengths 2, 4, 2, 4 → mean 3, std 1
    lo, hi = 1 - 0.6 * sigmoid(-1.0), 1 - 0.6 * sigmoid(1.0)
    assert out[4:8] == pytest.approx([lo, hi, lo, hi])
    assert lo == pytest.approx(0.838635, abs=1e-6)
    # every other group: plain 0/1, however long
    rest = out[:4] + out[8:]
    assert rest == [float(c) for c in correct[:4] + correct[8:]]
    # λ = 0.4 → ⌈2⌉ groups: #1 and #3 (ratio 0.75); the wrong answer of #3 gets 0, not a
    # penalty-shaped value; its three correct answers all have length 3 → std guard → σ(0)
    out, top = grpo_lambda_rewards([bool(c) for c in correct], lengths, groups, lam=0.4)
    assert top == [1, 3]
    assert out[12:16] == pytest.approx([0.7, 0.7, 0.0, 0.7])
    assert out[:4] == [1.0, 0.0, 1.0, 0.0]


def test_grpo_lambda_one_correct_answer_ties_and_rounding():
    # a group with one correct answer: penalized only if it is among the top groups
    correct = [True, False, False, False] + [True, True, False, False]
    lengths = [50, 1, 1, 1] + [10, 30, 1, 1]
    groups = [0] * 4 + [1] * 4
    out, top = grpo_lambda_rewards(correct, lengths, groups, lam=0.5)  # ⌈1⌉: group 1 (0.5)
    assert top == [1] and out[0] == 1.0  # the lone correct answer of group 0 is not penalized
    assert out[4:6] == pytest.approx([1 - 0.6 * sigmoid(-1), 1 - 0.6 * sigmoid(1)])
    out, top = grpo_lambda_rewards(correct, lengths, groups, lam=1.0)
    assert out[0] == pytest.approx(0.7)  # std of one length is 0: the 1e-4 guard gives σ(0)
    # ties keep group order; λ·B rounds before the ceiling (0.28·25 is 7.000000000000001)
    n = 25
    correct = [g % 2 == 0 for g in range(n)] * 2  # rows g and g + 25 are group g
    _, top = grpo_lambda_rewards(correct, [1] * 2 * n, list(range(n)) * 2, lam=0.28)
    assert top == [0, 2, 4, 6, 8, 10, 12]
    # λ = 0: plain correctness; None stays None and counts as not correct
    out, top = grpo_lambda_rewards([True, None, False], [1, 2, 3], [0, 0, 0], lam=0.0)
    assert top == [] and out == [1.0, None, 0.0]
    out, _ = grpo_lambda_rewards([True, None, True], [2, 9, 4], [0, 0, 0], lam=1.0, alpha=1.0)
    assert out == pytest.approx([1 - sigmoid(-1), None, 1 - sigmoid(1)])


def test_group_ids_are_runs_of_equal_prompts():
    assert group_ids(["a", "a", "b", "b", "a", "a"]) == [0, 0, 1, 1, 2, 2]
    chat = [[{"role": "user", "content": "x"}]] * 2 + [[{"role": "user", "content": "y"}]]
    assert group_ids(chat) == [0, 0, 1]
    assert group_ids([]) == []


def test_grpo_lambda_reward_scores_correctness_from_the_gold_answer():
    # two arith prompts, G = 3, judged by exact_match against the `answer` column
    prompts = ["12+30="] * 3 + ["10+11="] * 3
    comps = ["42", "42", "43"] + ["21", "21", "21"]
    ids = [[0] * 2, [0] * 4, [0] * 2] + [[0] * 2, [0] * 3, [0] * 4]
    gold = ["42"] * 3 + ["21"] * 3
    r = GrpoLambdaLength(accuracy="exact_match", lam=0.5)  # ⌈1⌉ group: the second (3/3)
    out = r(prompts, comps, completion_ids=ids, answer=gold)
    sd = math.sqrt(2 / 3)  # lengths 2, 3, 4
    assert out == pytest.approx(
        [1.0, 1.0, 0.0] + [1 - 0.6 * sigmoid(-1 / sd), 0.7, 1 - 0.6 * sigmoid(1 / sd)]
    )
    assert r.last_metrics == {
        "grpo_lambda/accuracy": pytest.approx(5 / 6),
        "grpo_lambda/penalized_groups": 1.0,
    }
    # a row the judge cannot score (no gold) is None
    out = r(prompts[:3], comps[:3], completion_ids=ids[:3], answer=[None] * 3)
    assert out == [None, None, None]
    # math_accuracy (the default) reads plain numbers too
    assert GrpoLambdaLength(lam=0.0)(["1+2="] * 2, ["3", "4"], answer=["3", "3"]) == [1.0, 0.0]


def test_grpo_lambda_uses_the_trainers_group_index_over_prompt_runs():
    """Two groups of the same prompt side by side: runs of equal prompts would merge them;
    the `group_index` column the trainer passes keeps them apart. Group 0 is 1/2 correct,
    group 1 is 2/2: with λ = 0.5 only group 1 (⌈0.5·2⌉ = 1 group) gets the length term."""
    prompts = ["1+2="] * 4
    comps, gold = ["3", "4", "3", "3"], ["3"] * 4
    ids = [[0], [0], [0], [0, 0, 0]]
    r = GrpoLambdaLength(accuracy="exact_match", lam=0.5)
    out = r(prompts, comps, completion_ids=ids, answer=gold, group_index=[0, 0, 1, 1])
    # group 1: lengths 1 and 3, mean 2, std 1: 1 − 0.6·sigmoid(∓1)
    assert out == pytest.approx([1.0, 0.0, 1 - 0.6 * sigmoid(-1.0), 1 - 0.6 * sigmoid(1.0)])
    merged = r(prompts, comps, completion_ids=ids, answer=gold)  # one run: one group
    assert merged[0] != 1.0


def test_grpo_lambda_bad_parameters_name_their_key():
    with pytest.raises(ValueError, match=r"rewards\.grpo_lambda_length\.accuracy"):
        GrpoLambdaLength(accuracy="exact_matchh")
    with pytest.raises(ValueError, match=r"rewards\.grpo_lambda_length\.accuracy"):
        GrpoLambdaLength(accuracy="majority_vote")  # stateful: not a plain judge
    with pytest.raises(ValueError, match=r"rewards\.grpo_lambda_length\.lam"):
        GrpoLambdaLength(lam=1.5)
    with pytest.raises(ValueError, match=r"rewards\.grpo_lambda_length\.alpha"):
        GrpoLambdaLength(alpha=-0.1)


# ---------------------------------------------------------------- recipes


def recipe_config(tmp_path, model_dir, name: str, **train) -> dict:
    cfg = base_config(
        tmp_path / name, model_dir, **{"max_steps": 2, "micro_batch_size": 12, **train}
    )
    for key in ("rewards", "advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg["recipe"] = name
    cfg["rollout"]["num_generations"] = 4
    return cfg


@pytest.mark.parametrize(
    ("name", "metric"),
    [
        ("format_length", "format_length/answer_frac"),
        ("budget_length", "budget_length/budget"),
        ("grpo_lambda_length", "grpo_lambda/penalized_groups"),
    ],
)
def test_recipes_run_on_arith(tmp_path, tiny_model_dir, name, metric):
    cfg = recipe_config(tmp_path, tiny_model_dir, name)
    if name == "budget_length":  # the task's accuracy reward plus the recipe's length reward
        cfg["rewards"] = ["exact_match"]
    res = Trainer(load_config(cfg), train_dataset=arith_rows()).train()
    assert res.steps == 2
    last = res.history[-1]
    assert math.isfinite(last["loss"]) and metric in last
    if name == "grpo_lambda_length":
        assert last[metric] == 1.0  # ⌈0.2 · 3 prompts⌉


def test_budget_length_recipe_tightens_the_budget_over_the_run(tmp_path, tiny_model_dir):
    cfg = recipe_config(tmp_path, tiny_model_dir, "budget_length", max_steps=3)
    cfg["rewards"] = ["exact_match"]
    cfg["extra_rewards"] = [
        {"name": "budget_length", "weight": 0.5, "params": {"start_budget": 4, "final_budget": 1}}
    ]
    res = Trainer(load_config(cfg), train_dataset=arith_rows()).train()
    # 3 steps, 3 decays: a decay every 3/4 step → k = 0, 1, 2 at t = 0, 1, 2
    d = (1 / 4) ** (1 / 3)
    expected = [float(round(4 * d**k)) for k in range(3)]
    assert [h["budget_length/budget"] for h in res.history] == expected == [4.0, 3.0, 2.0]


def test_effect_completion_length_follows_the_shrinking_budget(tmp_path, tiny_model_dir):
    """Effect (arXiv 2508.08940's claim in small): with budget_length alone, an untrained
    model keeps its length while the budget is generous (8 tokens, the max) and shortens
    its completions as the budget decays to 2 tokens (8 → 5 → 3 → 2 over 16 steps)."""
    cfg = base_config(
        tmp_path / "curriculum",
        tiny_model_dir,
        max_steps=16,
        prompts_per_step=4,
        micro_batch_size=32,
    )
    cfg["rollout"].update(num_generations=8, max_new_tokens=8)
    cfg["rewards"] = [{"name": "budget_length", "params": {"start_budget": 8, "final_budget": 2}}]
    res = Trainer(load_config(cfg), train_dataset=arith_rows()).train()
    budgets = [h["budget_length/budget"] for h in res.history]
    assert budgets == [8.0] * 4 + [5.0] * 4 + [3.0] * 4 + [2.0] * 4
    lengths = [h["completions/mean_length"] for h in res.history]
    assert min(lengths[:4]) >= 6.5  # no pressure yet: near the 8-token max
    assert sum(lengths[-3:]) / 3 <= 3.0  # within 1.5x the final budget at the end
