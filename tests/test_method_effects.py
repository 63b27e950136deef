"""Effect tests: each method's qualitative claim, against plain GRPO on the same budget.

Short runs or constructed batches on tiny models, fixed seeds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.algorithms import AGGREGATIONS, LOSSES, TOKEN_MASKS
from grouprl.algorithms.selection import forking_tokens
from grouprl.algorithms.types import BatchNorm, PolicyInputs
from grouprl.models.forward import completion_logprobs
from grouprl.training.plan import make_train_batch
from grouprl.training.trainer import Trainer


def even_first_digit(prompts, completions, **kw):
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def rare_first_digit(prompts, completions, **kw):
    return [1.0 if c[:1] in "02" and c[:1] else 0.0 for c in completions]


def recipe_trainer(tmp_path, model_dir, recipe: str, reward=even_first_digit, **train):
    cfg = base_config(tmp_path / recipe, model_dir, **train)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg["recipe"] = recipe
    cfg["rollout"]["num_generations"] = 4
    return Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[reward])


def test_forking_tokens_trains_on_about_a_fifth_of_the_tokens(tmp_path, tiny_model_dir):
    res = recipe_trainer(tmp_path, tiny_model_dir, "forking_tokens", max_steps=2).train()
    for h in res.history:
        assert 0.15 <= h["selection/kept_token_frac"] <= 0.35
    grpo = recipe_trainer(tmp_path, tiny_model_dir, "grpo", max_steps=1).train()
    assert "selection/kept_token_frac" not in grpo.history[0]  # plain GRPO trains on all tokens
    # and the policy gradient is exactly zero on the tokens left out
    torch.manual_seed(0)
    logp = torch.randn(4, 10, requires_grad=True)
    mask = torch.ones(4, 10)
    sel = forking_tokens(torch.rand(4, 10), mask, rho=0.2)
    inp = PolicyInputs(
        logp,
        logp.detach(),
        mask,
        torch.tensor([1.0, -1.0, 0.5, -0.5]),
        token_weight_NT=sel.token_weight_NT,
    )
    loss = AGGREGATIONS.get("token_mean")(
        LOSSES.get("ppo_clip")(inp).per_token_NT, mask, BatchNorm.of(mask, 10)
    )
    loss.backward()
    assert int(sel.token_weight_NT.sum()) == 8  # the top 20% of 40 tokens
    assert torch.all(logp.grad[sel.token_weight_NT == 0] == 0)
    assert torch.all(logp.grad[sel.token_weight_NT > 0] != 0)


def per_token_push(aggregation: str) -> tuple[float, float]:
    """|d loss / d logp| per token of a short (2-token) and a long (8-token) wrong answer."""
    T = 8
    mask = torch.zeros(4, T)
    mask[0, :2] = mask[1, :8] = mask[2, :4] = mask[3, :4] = 1  # rows 0, 1 wrong; 2, 3 right
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    logp = torch.zeros(4, T, requires_grad=True)
    inp = PolicyInputs(logp, logp.detach(), mask, adv)
    loss = AGGREGATIONS.get(aggregation)(
        LOSSES.get("ppo_clip")(inp).per_token_NT, mask, BatchNorm.of(mask, T)
    )
    loss.backward()
    return float(logp.grad[0, 0].abs()), float(logp.grad[1, 0].abs())


def test_dr_grpo_penalizes_long_wrong_answers_as_much_per_token():
    # GRPO's per-sequence mean: the long wrong answer's tokens get 1/8 instead of 1/2 (x4 less)
    short, long = per_token_push("seq_mean_token_mean")
    assert short == pytest.approx(4 * long)
    # Dr. GRPO's constant normalizer: the same push per token whatever the length
    short, long = per_token_push("seq_mean_token_sum_norm")
    assert short == pytest.approx(long)


def test_dapo_trains_only_on_groups_with_signal(tmp_path, tiny_model_dir):
    # a reward the start earns ~1 time in 5: groups of 4 with all-equal rewards are common
    grpo = recipe_trainer(tmp_path, tiny_model_dir, "grpo", rare_first_digit, max_steps=4).train()
    dapo = recipe_trainer(tmp_path, tiny_model_dir, "dapo", rare_first_digit, max_steps=4).train()
    assert max(h["frac_reward_zero_std"] for h in grpo.history) > 0  # the budget had dead groups
    assert all(h["frac_reward_zero_std"] == 0 for h in dapo.history)
    assert sum(h["dynamic_sampling/dropped_groups"] for h in dapo.history) > 0


def _constructed(trainer: Trainer, prompt: str, completions: list[str]):
    """A hand-made group: `completions` of `prompt` (EOS appended), as rollouts."""
    from grouprl.rollout.base import Rollouts
    from grouprl.training.sft import encode_pairs

    n = len(completions)
    pid, pmask, cid, cmask = encode_pairs(trainer.tokenizer, [prompt] * n, completions)
    return Rollouts(
        prompt_ids_NP=pid,
        prompt_mask_NP=pmask,
        completion_ids_NT=cid,
        attention_mask_NT=cmask,
        loss_mask_NT=cmask.clone(),
        truncated_N=torch.zeros(n, dtype=torch.bool),
        completions=completions,
        group_size=n,
    )


def _logp(trainer, ro):
    with torch.no_grad():
        return completion_logprobs(
            trainer.model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
        )[0]


def _update(trainer, ro, adv, rewards, weight=None, denominator="all"):
    """One learner update on hand-made rollouts (what the trainer does after planning)."""
    tb = make_train_batch(
        ro,
        adv,
        rewards_N=rewards,
        token_weight_NT=weight,
        denominator=denominator,
        max_new_tokens=trainer.sampling.max_new_tokens,
    )
    return trainer.learner.update(tb, step=0)


def test_gtpo_leaves_conflict_tokens_of_negative_completions_alone(tmp_path, tiny_model_dir):
    # one long right answer and four short wrong ones, all starting with "2" (a conflict token):
    # GRPO's per-sequence mean pushes that shared token down (net 1.79/5 - 4 x 0.45/2 < 0)
    results = {}
    for recipe in ("grpo", "gtpo"):
        tr = recipe_trainer(tmp_path, tiny_model_dir, recipe, max_steps=1)
        if tr.components.token_mask is not None:  # a random tiny model's entropy is high: keep A
            tr.components.token_mask = type(tr.components.token_mask).build(
                TOKEN_MASKS, "gtpo_conflict", {"entropy_threshold": 100.0}
            )
        opt = torch.optim.SGD(tr.model.parameters(), lr=0.05)  # first order, small step
        tr.learner.optimizer = opt
        tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ro = _constructed(tr, "12+14=", ["2666", "2", "2", "2", "2"])
        rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
        adv = tr.components.advantage({"rewards_BG": rewards.view(1, 5)}).reshape(-1)
        weight, den = None, "all"
        if tr.components.token_mask is not None:
            sel = tr.components.token_mask(
                {
                    "entropy_NT": completion_logprobs(
                        tr.model,
                        ro.prompt_ids_NP,
                        ro.prompt_mask_NP,
                        ro.completion_ids_NT,
                        ro.attention_mask_NT,
                        with_entropy=True,
                    )[1].detach(),
                    "mask_NT": ro.loss_mask_NT,
                    "adv_N": adv,
                    "completion_ids_NT": ro.completion_ids_NT,
                    "group_N": torch.zeros(5, dtype=torch.long),
                    "step": 0,
                    "max_steps": 1,
                }
            )
            weight, den = sel.token_weight_NT, sel.denominator
            assert (
                float(weight[1, 0]) == 0 and float(weight[2, 0]) == 0 and float(weight[0, 0]) == 2
            )
            if sel.adv_N is not None:
                adv = sel.adv_N
        before = _logp(tr, ro)
        _update(tr, ro, adv, rewards, weight, den)
        results[recipe] = float(_logp(tr, ro)[1, 0] - before[1, 0])  # "2" in a negative completion
    assert results["gtpo"] >= 0, results  # protected: its log-prob does not fall
    assert results["grpo"] < 0, results  # plain GRPO pushes the shared first token down


def test_llds_keeps_positive_responses_likely(tmp_path, tiny_model_dir):
    drops = {}
    for recipe in ("grpo", "llds"):
        tr = recipe_trainer(
            tmp_path, tiny_model_dir, recipe, max_steps=1, learning_rate=3e-2, num_iterations=6
        )
        ro = _constructed(tr, "12+14=", ["26", "2", "29", "3", "26", "21"])
        rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        adv = tr.components.advantage({"rewards_BG": rewards.view(1, 6)}).reshape(-1)
        before = _logp(tr, ro)
        stats = _update(tr, ro, adv, rewards)
        after = _logp(tr, ro)
        pos = adv > 0
        drops[recipe] = float(((before - after) * ro.loss_mask_NT)[pos].sum())
        if recipe == "llds":
            assert stats["llds/penalized_mean"] > 0  # it had likelihood drops to act on
    assert drops["llds"] < drops["grpo"], drops
