"""Rollout strategies that change what a group holds: DeepVideo-R1's difficulty-aware
augmentation (`difficulty_aug`) and DaGRPO's off-policy anchors (`offpolicy_anchors`).

The rules run in the real collector on `GuidedEngine`, a deterministic stand-in for the
policy (it echoes the partial solution in its prompt, cycles through known answers when
the answer is in its prompt), so every decision is known by hand; the trainer runs both
recipes end to end on the tiny model with the real HF engine."""

from __future__ import annotations

import json
import math
import re
import string

import pytest
import torch
from conftest import arith_rows, base_config, record_collections, strategy_collector, text_rollouts

from grouprl.models.tiny import build_char_tokenizer
from grouprl.rollout.base import Rollouts, SamplingParams
from grouprl.training.strategies import build_strategy
from grouprl.training.strategies.anchors import OffPolicyAnchors
from grouprl.training.strategies.augment import DifficultyAug
from grouprl.training.trainer import Trainer

TOK = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")


class GuidedEngine:
    """A prompt with "Partial solution: P" -> "P"; one with "(The answer is A.)" -> the j-th
    sample of the group is `guided[j % 3]` with "{a}" replaced by A; otherwise the j-th
    sample is `plain[j % len(plain)]`. `logps`: report sampler log-probs (-0.5 each)."""

    samples_from_policy = False

    def __init__(self, plain=("x",), guided=("zz", "{a}", "z"), logps=False, tokenizer=TOK):
        self.plain, self.guided, self.logps = plain, guided, logps
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def answer(self, prompt: str, j: int) -> str:
        hint = re.findall(r"Partial solution: (\S+)", prompt)
        if hint:
            return hint[-1]
        gold = re.findall(r"\(The answer is (\S+?)\.\)", prompt)
        if gold:
            return self.guided[j % len(self.guided)].replace("{a}", gold[-1])
        return self.plain[j % len(self.plain)]

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        self.calls.append(list(prompts))
        G = params.num_generations
        texts = [self.answer(p, j) for p in prompts for j in range(G)]
        return text_rollouts(TOK, prompts, texts, G, logp=-0.5 if self.logps else None)


def collector(rows, strategy, engine, G=3):
    return strategy_collector(TOK, rows, strategy, engine, G)


def prompts_of(batch) -> list[str]:
    return TOK.batch_decode(batch.rollouts.prompt_ids_NP, skip_special_tokens=True)


def coin_reward(prompts, completions, **kw):
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


AUG = {  # short templates the stand-in engine reads
    "answer_template": " (The answer is {answer}.)",
    "hint_template": " Partial solution: {hint}",
    "distractor_template": " {distractors}",
    "distractors": ["D0.", "D1.", "D2."],
    "guide_samples": 3,
    "max_hint_frac": 1.0,
    "max_distractors": 4,
}
ROWS = [{"prompt": "5+7=", "answer": "1234"}, {"prompt": "1+1=", "answer": "x"}]  # fail, solved


# ------------------------------------------------------------------ difficulty_aug: the rule
def test_delta_flips_sign_with_the_buffer_mean_and_the_buffer_keeps_the_last_w():
    s = DifficultyAug(window=4)
    group = torch.tensor([0.5, 0.5, float("nan")])  # NaN rewards are left out
    assert s.delta(group) is None  # empty buffer: no ΔR
    s.push([0.0, 0.0])
    assert s.delta(group) == pytest.approx(0.0 - 0.5)  # easier than the past: ΔR < 0
    s.push([1.0, 1.0, 1.0])
    assert s.buffer == [0.0, 1.0, 1.0, 1.0]  # the last W = 4
    assert s.delta(group) == pytest.approx(0.75 - 0.5)  # harder than the past: ΔR > 0
    assert s.delta(torch.tensor([float("nan")])) is None


def test_hint_length_and_distractor_count_grow_with_delta():
    s = DifficultyAug(max_hint_frac=0.5, max_distractors=4)
    # ⌈min(1, ΔR)·0.5·n⌉ characters, at least one
    assert [s.hint_chars(d, 8) for d in (0.01, 0.25, 0.75, 1.0, 3.0)] == [1, 1, 3, 4, 4]
    # ⌈min(1, |ΔR|)·4⌉ sentences
    assert [s.distractor_count(d) for d in (-0.1, -0.25, -0.3, -0.5, -1.0, -3.0)] == [
        1,
        1,
        2,
        2,
        4,
        4,
    ]


def test_bad_parameters_name_the_key():
    for bad, key in (
        ({"window": 0}, "window"),
        ({"threshold": -0.1}, "threshold"),
        ({"max_hint_frac": 0.0}, "max_hint_frac"),
        ({"guide_samples": 0}, "guide_samples"),
        ({"hint_template": "no slot"}, "hint_template"),
        ({"answer_template": "no slot"}, "answer_template"),
        ({"distractors": []}, "distractors"),
        ({"distractors": "one string"}, "distractors"),
    ):
        with pytest.raises(ValueError, match=f"rollout.strategy.{key}"):
            build_strategy({"name": "difficulty_aug", **bad})
    for bad, key in (({"num_anchors": 0}, "num_anchors"), ({"max_positives": -1}, "max_positives")):
        with pytest.raises(ValueError, match=f"rollout.strategy.{key}"):
            build_strategy({"name": "offpolicy_anchors", **bad})


# ------------------------------------------------------------------ difficulty_aug: collector
def test_hard_group_gets_a_partial_guided_trace_and_easy_group_a_distractor():
    """Buffer mean 0.75. Group 0 fails (mean 0): ΔR = 0.75 > 0.1, hard. Its guided samples
    ("zz", "1234", "z") score (0, 1, 0): the best, "1234", gives ⌈0.75·1.0·4⌉ = 3
    characters, "123", and the whole group is re-sampled from the hinted prompt. Group 1
    is solved (mean 1): ΔR = −0.25, easy: ⌈0.25·4⌉ = 1 distractor, from (step 0 + prompt
    index 1) mod 3 = "D1."."""
    aug = DifficultyAug(**AUG)
    aug.load_state_dict({"buffer": [1.0, 1.0, 1.0, 0.0]})
    eng = GuidedEngine()
    batch, metrics = collector(ROWS, aug, eng).collect(2)
    assert eng.calls[1] == ["5+7= (The answer is 1234.)"]  # the guide: answer in the prompt
    assert eng.calls[2] == ["5+7= Partial solution: 123", "1+1= D1."]  # one call, G each
    assert batch.rollouts.completions == ["123"] * 3 + ["x"] * 3
    assert prompts_of(batch) == ["5+7= Partial solution: 123"] * 3 + ["1+1= D1."] * 3
    assert batch.extra["aug"] == ["easier"] * 3 + ["harder"] * 3
    assert batch.extra["hint_level"] == [1, 1, 1, 0, 0, 0]
    assert metrics["aug/easier_groups"] == 1 and metrics["aug/harder_groups"] == 1
    assert metrics["aug/buffer_mean"] == pytest.approx(0.75)
    assert metrics["aug/delta_mean"] == pytest.approx((0.75 - 0.25) / 2)
    assert metrics["aug/guide_reward_mean"] == 1.0
    assert metrics["rollouts/sampled"] == 6 + 3 + 6


def test_distractor_count_grows_with_the_distance_below_the_buffer_mean():
    """Buffer mean 0: the solved group's ΔR = −1 -> ⌈1·4⌉ = 4 sentences (vs 1 at −0.25
    above), cyclic from D1; the failed group's ΔR = 0 is within the threshold: kept."""
    aug = DifficultyAug(**AUG)
    aug.load_state_dict({"buffer": [0.0] * 4})
    eng = GuidedEngine()
    batch, metrics = collector(ROWS, aug, eng).collect(2)
    assert eng.calls[1:] == [["1+1= D1. D2. D0. D1."]]
    assert batch.extra["aug"] == [""] * 3 + ["harder"] * 3
    assert prompts_of(batch)[:3] == ["5+7="] * 3
    assert metrics["aug/easier_groups"] == 0 and metrics["aug/harder_groups"] == 1


def test_a_full_hint_rescues_the_group_and_the_buffer_gets_the_sampled_rewards():
    """ΔR = 1 (buffer all 1, group all 0): the whole guided trace is the hint and the
    re-sampled group is right; the buffer gets the batch's *original* rewards (0, 0, 0 and
    1, 1, 1), not the re-sampled ones."""
    aug = DifficultyAug(**AUG)
    aug.load_state_dict({"buffer": [1.0] * 4})
    batch, _ = collector(ROWS, aug, GuidedEngine()).collect(2)
    assert batch.rollouts.completions[:3] == ["1234"] * 3
    assert batch.rewards_N.tolist() == [1.0] * 6
    assert aug.buffer == [1.0] * 4 + [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_state_round_trip_gives_the_same_decisions():
    a = DifficultyAug(**AUG, window=5)
    a.push([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # the last 5: 1, 1, 1, 0, 1 (mean 0.8)
    state = json.loads(json.dumps(a.state_dict()))
    assert state == {"buffer": [1.0, 1.0, 1.0, 0.0, 1.0]}
    b = DifficultyAug(**AUG, window=5)
    b.load_state_dict(state)
    runs = []
    for s in (a, b, DifficultyAug(**AUG, window=5)):  # the last one: no state
        eng = GuidedEngine()
        col = collector(ROWS, s, eng)
        batch, _ = col.collect(2)
        runs.append((eng.calls, batch.rollouts.completions, col.state_dict()["rollout_strategy"]))
    assert runs[0] == runs[1]
    assert runs[2][0] == [["5+7=", "1+1="]]  # an empty buffer only fills: no augmentation
    assert runs[0][0] != runs[2][0]


def test_warmup_only_fills_the_buffer_and_rows_without_an_answer_are_skipped():
    aug = DifficultyAug(**AUG, warmup_steps=2, answer_column="key")  # no row has "key"
    aug.load_state_dict({"buffer": [1.0] * 4})
    eng = GuidedEngine()
    col = collector(ROWS[:1], aug, eng)
    batch, metrics = col.collect(1, step=1)
    assert len(eng.calls) == 1 and "aug" not in batch.extra and aug.buffer == [1.0] * 4 + [0] * 3
    batch, metrics = col.collect(1, step=2)  # hard (ΔR > 0) but no answer to guide with
    assert len(eng.calls) == 2 and metrics["aug/skipped_groups"] == 1
    assert batch.extra["aug"] == [""] * 3


# ------------------------------------------------------------------ offpolicy_anchors
ANCHOR_ROWS = [
    {"prompt": "5+7=", "answer": "12", "solution": "12"},  # fails: anchor, right
    {"prompt": "1+1=", "answer": "x", "solution": "x"},  # solved: untouched
    {"prompt": "2+2=", "answer": "4", "solution": ["2+2 is 4", "4"]},  # fails: two anchors
    {"prompt": "3+3=", "answer": "6"},  # fails, no solution: untouched
]


def test_anchors_replace_the_last_rows_of_failed_groups_and_are_scored_by_the_rewards():
    strategy = OffPolicyAnchors(num_anchors=2)
    batch, metrics = collector(ANCHOR_ROWS, strategy, GuidedEngine()).collect(4)
    ro = batch.rollouts
    assert ro.completions == ["x", "x", "12"] + ["x"] * 3 + ["x", "2+2 is 4", "4"] + ["x"] * 3
    # exact_match's verdicts: "2+2 is 4" is not the answer "4" (a reward, not assumed)
    assert batch.rewards_N.tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    flags = [False] * 12
    flags[2] = flags[7] = flags[8] = True
    assert batch.extra["offpolicy"] == flags
    assert metrics["anchor/inserted"] == 3 and metrics["anchor/hard_groups"] == 3
    assert metrics["anchor/anchor_reward_mean"] == pytest.approx(2 / 3)
    # an anchor row: the group's own prompt ids, the solution's tokens + EOS, all trained
    assert prompts_of(batch)[2] == "5+7=" and prompts_of(batch)[8] == "2+2="
    real = ro.attention_mask_NT[2].bool()
    assert ro.completion_ids_NT[2][real].tolist() == TOK("12", add_special_tokens=False)[
        "input_ids"
    ] + [TOK.eos_token_id]
    assert ro.loss_mask_NT[2][real].tolist() == [1.0] * 3 and not bool(ro.truncated_N[2])
    assert ro.group_size == 3 and ro.num_rollouts == 12


def test_max_positives_counts_successes_and_keeps_them():
    """The group's samples are ("y", "y", "x") and the answer is "x": one positive, the last
    row. max_positives 0: not hard, untouched. max_positives 1: hard; the anchor replaces
    the last *failed* row (row 1), the positive stays."""
    rows = [{"prompt": "5+7=", "answer": "x", "solution": "x"}]
    eng = GuidedEngine(plain=("y", "y", "x"))
    batch, metrics = collector(rows, OffPolicyAnchors(), eng).collect(1)
    assert batch.rollouts.completions == ["y", "y", "x"] and metrics["anchor/hard_groups"] == 0
    assert batch.extra["offpolicy"] == [False] * 3
    batch, metrics = collector(rows, OffPolicyAnchors(max_positives=1), eng).collect(1)
    assert batch.extra["offpolicy"] == [False, True, False]
    assert batch.rewards_N.tolist() == [0.0, 1.0, 1.0]
    assert metrics["anchor/inserted"] == 1


def test_anchor_rows_have_no_sampler_logprobs_when_the_engine_reports_them():
    """NaN marks "no sampler probability" (the learner leaves such tokens out of the
    mismatch correction); the sampled rows keep theirs."""
    batch, _ = collector(ANCHOR_ROWS[:1], OffPolicyAnchors(), GuidedEngine(logps=True)).collect(1)
    ro = batch.rollouts
    assert ro.sampling_logp_NT is not None
    real = ro.attention_mask_NT.bool()
    assert torch.isnan(ro.sampling_logp_NT[2][real[2]]).all()
    assert ro.sampling_logp_NT[0][real[0]].tolist() == [-0.5] * int(real[0].sum())


def test_anchors_need_a_tokenizer_and_solutions_of_the_right_type():
    with pytest.raises(ValueError, match="offpolicy_anchors tokenizes"):
        collector(ANCHOR_ROWS[:1], OffPolicyAnchors(), GuidedEngine(tokenizer=None)).collect(1)
    rows = [{"prompt": "5+7=", "answer": "12", "solution": [1, 2]}]
    with pytest.raises(ValueError, match="solution_column: row 1's 'solution'"):
        collector(rows, OffPolicyAnchors(), GuidedEngine()).collect(1)
    batch, _ = collector(ANCHOR_ROWS[:1], OffPolicyAnchors(warmup_steps=1), GuidedEngine()).collect(
        1
    )
    assert batch.rollouts.completions == ["x"] * 3  # warm-up: nothing inserted


# ------------------------------------------------------------------ end to end
def recipe_config(tmp_path, tiny_model_dir, name):
    cfg = base_config(tmp_path / name, tiny_model_dir, max_steps=2, micro_batch_size=4)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)  # the recipe decides
    cfg["recipe"] = name
    return cfg


def test_trainer_runs_difficulty_aug_end_to_end(tmp_path, tiny_model_dir):
    """Step 1 fills the buffer; step 2 augments against it (a coin-like reward spreads the
    group means around the buffer's)."""
    tr = Trainer(
        recipe_config(tmp_path, tiny_model_dir, "difficulty_aug"),
        train_dataset=arith_rows(),
        reward_funcs=[coin_reward],
    )
    seen = record_collections(tr)
    res = tr.train()
    tr.close()
    first, last = res.history
    assert res.steps == 2 and "aug/buffer_mean" not in first
    assert last["aug/easier_groups"] + last["aug/harder_groups"] >= 1
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    batch, _ = seen[-1]
    texts = prompts_of_tok(tr.tokenizer, batch)
    for i, kind in enumerate(batch.extra["aug"]):
        ex = batch.examples[i // batch.rollouts.group_size]
        assert (texts[i] == ex.text) == (kind == "")  # augmented rows train their own prompt


def prompts_of_tok(tok, batch) -> list[str]:
    ro = batch.rollouts
    return [
        tok.decode(ro.prompt_ids_NP[i][ro.prompt_mask_NP[i].bool()].tolist())
        for i in range(ro.num_rollouts)
    ]


def test_trainer_runs_offpolicy_anchors_end_to_end(tmp_path, tiny_model_dir):
    """The tiny model never gets arith right: every group is hard and gets the solution
    (the answer itself) as its last row, rewarded 1 by exact_match."""
    rows = [{**r, "solution": r["answer"]} for r in arith_rows()]
    tr = Trainer(recipe_config(tmp_path, tiny_model_dir, "offpolicy_anchors"), train_dataset=rows)
    seen = record_collections(tr)
    res = tr.train()
    tr.close()
    last = res.history[-1]
    assert res.steps == 2 and last["anchor/inserted"] == last["anchor/hard_groups"] >= 1
    assert last["anchor/anchor_reward_mean"] == 1.0
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    batch, _ = seen[-1]
    G = batch.rollouts.group_size
    for i, off in enumerate(batch.extra["offpolicy"]):
        if off:
            assert i % G == G - 1
            assert batch.rollouts.completions[i] == batch.examples[i // G].columns["solution"]
