"""BRPO (algorithms/budgets.py) and the anytime_budget rollout strategy
(training/strategies/budgets.py): budget-relative advantages on hand-computed numbers, the
per-token layout, and the strategy's rows built by the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import arith_rows, base_config, record_collections

from grouprl.algorithms.budgets import brpo, brpo_advantages, budget_prior
from grouprl.training.strategies import build_strategy
from grouprl.training.trainer import Trainer


def coin_reward(prompts, completions, **kw):
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def test_budget_priors():
    assert budget_prior([2, 4, 6, 8], "uniform") == [0.25] * 4
    assert budget_prior([2, 4, 6, 8], "linear") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert budget_prior([2, 4, 6, 8], "base") == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="prior"):
        budget_prior([1], "exp")


def test_brpo_advantages_by_hand():
    """r = [[0, 1], [1, 1]], p = (.5, .5):
    R = [[.5, .5], [1, .5]]; V2 = (.75, .5); V1[1, 1] = 1·.5 = .5, else 0;
    A_think = R − (s·V1 + (S − s)·V2)/S = [[−.25, .25], [.25, 0]];
    A_summary = r − mean_g r = [[−.5, 0], [.5, 0]]."""
    think, summary = brpo_advantages(
        torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0])
    )
    torch.testing.assert_close(think, torch.tensor([[-0.25, 0.25], [0.25, 0.0]]))
    torch.testing.assert_close(summary, torch.tensor([[-0.5, 0.0], [0.5, 0.0]]))
    # the discounted mean of earlier scores (weights 2^k): r = [1, 0, x], s = 2: (1·1 + 0·2)/3
    think, _ = brpo_advantages(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([0.0, 0.0, 1.0]))
    # G = 1: V2 = 0; R[0, 2] = 1; V1 = (1/3)·1; A = 1 − 2·(1/3)/3
    assert float(think[0, 2]) == pytest.approx(1 - 2 * (1 / 3) / 3)


def test_brpo_puts_segment_advantages_on_thinking_tokens_and_one_per_summary():
    # one group: 2 chains (rows 0, 1) of 5 thinking tokens cut at 2 and 4, then the
    # summaries (g, s) = (0,0), (0,1), (1,0), (1,1) with scores 0, 1, 1, 1
    rows = [
        {"role": "think", "g": 0, "cuts": [2, 4], "p": [0.5, 0.5]},
        {"role": "think", "g": 1, "cuts": [2, 4], "p": [0.5, 0.5]},
        {"role": "summary", "g": 0, "s": 0},
        {"role": "summary", "g": 0, "s": 1},
        {"role": "summary", "g": 1, "s": 0},
        {"role": "summary", "g": 1, "s": 1},
    ]
    r = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, float("nan")]])  # NaN summary counts as 0
    mask = torch.ones(6, 5)
    mask[2:, 3:] = 0  # summaries are 3 tokens
    adv = brpo(r, rows, mask)
    # scores [[0, 1], [1, 0]]: R = [[.5, .5], [.5, 0]]; V2 = (.5, .25); V1[1, 1] = .5
    # A_think[0] = (.5 − .5, .5 − (0 + .25)/2) = (0, .375); A_think[1] = (0, 0 − (.5 + .25)/2)
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0.0, 0.375, 0.375, 0.0]))
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, -0.375, -0.375, 0.0]))
    # summaries: r − mean_g r at the same budget: s=0: (0 − .5, 1 − .5); s=1: (1 − .5, 0 − .5)
    torch.testing.assert_close(adv[2:, 0], torch.tensor([-0.5, 0.5, 0.5, -0.5]))
    assert float(adv[2:, 3:].abs().sum()) == 0.0


def anytime_run(out, model_dir, *, summary_tokens, mode="off", reward=coin_reward):
    """2 steps of anytime_budget (budgets 3 and 6 of 6 tokens, cue "=") + brpo: the trainer,
    the collected batches and the result."""
    cfg = base_config(out, model_dir, max_steps=2)
    cfg["train"]["async"] = mode
    cfg["rollout"]["max_new_tokens"] = 6
    cfg["rollout"]["strategy"] = {
        "name": "anytime_budget",
        "budgets": [0.5, 1.0],
        "summary_cue": "=",
        "think_end": "",
        "summary_tokens": summary_tokens,
    }
    cfg["advantage"] = {"name": "brpo"}
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[reward])
    seen = record_collections(tr)
    engine = tr.collector.engine
    real = engine.sample_token_ids
    tr.asked_tokens = []  # max_new_tokens of every continuation call

    def spy(contexts, params):
        tr.asked_tokens.append(params.max_new_tokens)
        return real(contexts, params)

    engine.sample_token_ids = spy
    res = tr.train()
    tr.close()
    return tr, seen, res


def test_anytime_budget_builds_thinking_and_summary_rows(tmp_path, tiny_model_dir):
    tr, seen, res = anytime_run(tmp_path / "a", tiny_model_dir, summary_tokens=3)
    batch, metrics = seen[-1]
    ro, info = batch.rollouts, batch.extra["budget"]
    G = tr.cfg.rollout.num_generations
    S, W = 2, G * 3
    assert ro.group_size == W and metrics["anytime/summaries"] == batch.num_groups * G * S
    eq = tr.tokenizer.convert_tokens_to_ids("=")
    for b in range(batch.num_groups):
        for g in range(G):
            n = b * W + g
            assert info[n] == {"role": "think", "g": g, "cuts": info[n]["cuts"], "p": [0.5, 0.5]}
            think = ro.completion_ids_NT[n][ro.attention_mask_NT[n].bool()].tolist()
            prompt = ro.prompt_ids_NP[n][ro.prompt_mask_NP[n].bool()].tolist()
            cuts = info[n]["cuts"]
            assert cuts == [min(3, len(think)), min(6, len(think))]
            for s in range(S):
                m = b * W + G + g * S + s
                assert info[m] == {"role": "summary", "g": g, "s": s}
                ctx = ro.prompt_ids_NP[m][ro.prompt_mask_NP[m].bool()].tolist()
                assert ctx == prompt + think[: cuts[s]] + [eq]  # prompt + thinking + cue
                assert int(ro.attention_mask_NT[m].sum()) <= 3
            # the thinking row carries its last summary's score
            last = b * W + G + g * S + S - 1
            assert batch.rewards_N[n] == batch.rewards_N[last]
    assert all(math.isfinite(h["loss"]) for h in res.history)
    # the summaries are generated to summary_tokens, not to max_new_tokens and then cut
    assert tr.asked_tokens and set(tr.asked_tokens) == {3}


def test_anytime_budget_checks_its_parameters():
    with pytest.raises(ValueError, match="rollout.strategy.budgets"):
        build_strategy({"name": "anytime_budget", "budgets": [0.5, 0.25]})
    with pytest.raises(ValueError, match="rollout.strategy.prior"):
        build_strategy({"name": "anytime_budget", "prior": "exp"})
    s = build_strategy({"name": "anytime_budget", "budgets": [0.1, 0.2, 1.0]})
    assert s.budgets(8) == [1, 2, 8]  # rounded, at least 1, kept increasing


def test_anytime_budget_keeps_the_sampler_log_probs_and_truncation(tmp_path, tiny_model_dir):
    """Under train.async one_step the HF engine reports its own log-probs: every thinking
    and summary row carries them (so the mismatch correction stays on)."""
    tr, seen, res = anytime_run(tmp_path / "b", tiny_model_dir, summary_tokens=2, mode="one_step")
    batch, _ = seen[-1]
    ro = batch.rollouts
    assert ro.sampling_logp_NT is not None
    real = ro.attention_mask_NT.bool()
    assert bool((ro.sampling_logp_NT[real] <= 0).all())
    assert "mismatch/kl" in res.history[-1]
    # a summary cut at summary_tokens (2) without EOS is truncated, one ending in EOS is not
    info, eos = batch.extra["budget"], tr.tokenizer.eos_token_id
    for n, row in enumerate(info):
        if row["role"] == "summary":
            ids = ro.completion_ids_NT[n][real[n]].tolist()
            assert bool(ro.truncated_N[n]) == (not ids or ids[-1] != eos)


@pytest.mark.parametrize("score", [0.0, 1.0, None])
def test_anytime_budget_warns_once_when_every_summary_scores_zero(
    score, tmp_path, tiny_model_dir, caplog
):
    """A reward that gives every summary 0 (as one that looks for the cue, which sits in the
    summary's prompt, would) is said once in a run, with the cue; any other is not, nor one
    that scores none of them (None: unscored, not 0)."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="grouprl"):
        anytime_run(
            tmp_path / "z",
            tiny_model_dir,
            summary_tokens=2,
            reward=lambda completions, **kw: [score] * len(completions),
        )
    said = [r.message for r in caplog.records if "every summary of this step scored 0" in r.message]
    if score == 0.0:
        assert len(said) == 1 and "'='" in said[0]
    else:
        assert not said
