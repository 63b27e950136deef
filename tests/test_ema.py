"""`train.ema_reference` (training/ema.py): GRPO-CARE's EMA copy of the policy, its answer
mask and consistency column, its updates, checkpoints and resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.config import ConfigError, load_config
from grouprl.models.tiny import build_char_tokenizer
from grouprl.rollout.base import Rollouts
from grouprl.training.ema import answer_mask_NT
from grouprl.training.trainer import Trainer


def test_answer_mask_covers_the_tokens_inside_the_tag():
    tok = build_char_tokenizer("ab12<>/answer")
    texts = [tok.decode([i]) for i in range(len(tok))]
    rows = ["ab<answer>12</answer>", "ab12"]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    T = max(map(len, ids))
    comp = torch.zeros(2, T, dtype=torch.long)
    att = torch.zeros(2, T)
    for i, x in enumerate(ids):
        comp[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
    ro = Rollouts(
        prompt_ids_NP=torch.zeros(2, 1, dtype=torch.long),
        prompt_mask_NP=torch.ones(2, 1),
        completion_ids_NT=comp,
        attention_mask_NT=att,
        loss_mask_NT=att,
        truncated_N=torch.zeros(2, dtype=torch.bool),
        completions=rows,
        group_size=2,
    )
    mask = answer_mask_NT(ro, texts, "<answer>")
    # row 0: "ab<answer>" is 10 characters (tokens 0-9); "12" are tokens 10 and 11
    assert mask[0].nonzero().squeeze(-1).tolist() == [10, 11]
    assert mask[1].tolist()[:4] == [1.0] * 4  # no tag: every token


def test_config_checks():
    with pytest.raises(ConfigError, match="train.ema_reference.every"):
        load_config({"train": {"ema_reference": {"every": 0}}})
    with pytest.raises(ConfigError, match="train.ema_reference.decy"):
        load_config({"train": {"ema_reference": {"decy": 0.9}}})
    with pytest.raises(ConfigError, match="train.async"):
        load_config({"train": {"ema_reference": {}, "async": "one_step"}})


def seen_consistency(store):
    def reward(prompts, completions, care_consistency=None, **kw):
        store.append(list(care_consistency))
        return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]

    return reward


def run(out, model_dir, steps, *, resume=False, every=2, store=None):
    cfg = base_config(out, model_dir, max_steps=steps, save_every=2, resume=resume)
    cfg["train"]["ema_reference"] = {"decay": 0.5, "every": every}
    store = [] if store is None else store
    reward = {"fn": seen_consistency(store), "timeout": 0}  # in-process: the test sees it
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[reward])
    start = {k: v.clone() for k, v in tr.ema.model.state_dict().items()}
    res = tr.train()
    ema = {k: v.clone() for k, v in tr.ema.model.state_dict().items()}
    policy = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.close()
    return res, start, ema, policy, store


def test_ema_reference_updates_scores_and_resumes(tmp_path, tiny_model_dir):
    res, start, ema, policy, store = run(tmp_path / "a", tiny_model_dir, 4)
    # the consistency column reached the reward: one value per completion, in (0, 0.95]
    assert store and all(len(v) == 12 and all(0 < x <= 0.95 for x in v) for v in store)
    assert sum("ema_reference/updated" in h for h in res.history) == 2  # steps 2 and 4
    key = next(k for k in ema if ema[k].is_floating_point() and ema[k].numel() > 1)
    assert not torch.equal(ema[key], start[key]) and not torch.equal(ema[key], policy[key])
    # 2 steps + resume + 2 steps: the same EMA weights as 4 steps
    run(tmp_path / "b", tiny_model_dir, 2)
    _, _, resumed, _, _ = run(tmp_path / "b", tiny_model_dir, 4, resume=True)
    for k in ema:
        torch.testing.assert_close(resumed[k], ema[k], atol=0, rtol=0)


def test_ema_update_is_the_lerp_of_the_policy(tmp_path, tiny_model_dir):
    """every = 1, decay 0.5: after one step EMA = (start + policy) / 2."""
    res, start, ema, policy, _ = run(tmp_path / "c", tiny_model_dir, 1, every=1)
    for k in ema:
        if ema[k].is_floating_point():
            torch.testing.assert_close(ema[k], 0.5 * start[k] + 0.5 * policy[k])
    assert math.isfinite(res.history[-1]["loss"])


def test_care_bonus_needs_the_ema_reference(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "d", tiny_model_dir)
    cfg["rewards"] = ["exact_match", {"name": "care_bonus"}]
    with pytest.raises(ConfigError, match="care_bonus reads the EMA reference"):
        Trainer(cfg, train_dataset=arith_rows())


def test_grpo_care_recipe_trains(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "e", tiny_model_dir, max_steps=2)
    for key in ("advantage", "loss", "regularizers", "rewards"):
        cfg.pop(key)
    cfg["recipe"] = "grpo_care"
    tr = Trainer(cfg, train_dataset=arith_rows())
    res = tr.train()
    tr.close()
    assert "rewards/care_bonus/mean" in res.history[-1] and math.isfinite(res.history[-1]["loss"])
