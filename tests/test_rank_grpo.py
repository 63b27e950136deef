"""Rank-GRPO (arXiv 2510.20150): items from tokens, per-rank rewards and advantages, and the
per-item (segment) importance ratio, checked on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms import LOSSES
from grouprl.algorithms.losses import gspo, ppo_clip
from grouprl.algorithms.segments import (
    item_index_from_tokens,
    newline_counts,
    rank_grpo,
    rank_grpo_advantages,
    rank_rewards,
    segment_log_ratio,
    segment_ratio,
    segment_ratio_objective,
)
from grouprl.algorithms.types import PolicyInputs

NL, NL2, EOS, PAD = 9, 10, 2, 0
NAN = float("nan")


# ------------------------------------------------------------------ tokens -> items


def test_newline_counts_from_decoded_pieces():
    assert newline_counts(["a", "\n", "b\n\n", "c"]) == {1: 1, 2: 2}


def test_items_split_after_each_newline_token():
    ids = torch.tensor([[5, 6, NL, 7, NL, 8, EOS, PAD], [5, NL, NL, 6, EOS, PAD, PAD, PAD]])
    valid = (ids != PAD).float()
    items = item_index_from_tokens(ids, valid, {NL})
    # the newline belongs to the item it ends; padding has no item
    assert items.tolist() == [[0, 0, 0, 1, 1, 2, 2, -1], [0, 0, 1, 2, 2, -1, -1, -1]]
    no_eos = item_index_from_tokens(ids, valid, [NL], eos_id=EOS)
    assert no_eos.tolist() == [[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 1, 2, -1, -1, -1, -1]]
    top2 = item_index_from_tokens(ids, valid, {NL: 1}, max_items=2)
    assert top2.tolist() == [[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 1, -1, -1, -1, -1, -1]]


def test_a_double_newline_token_skips_an_item_as_the_authors_count():
    ids = torch.tensor([[5, NL2, 6, NL, 7]])
    items = item_index_from_tokens(ids, torch.ones(1, 5), {NL: 1, NL2: 2})
    assert items.tolist() == [[0, 0, 2, 2, 3]]


def test_items_reject_bad_shapes_and_counts():
    with pytest.raises(ValueError, match="valid_NT"):
        item_index_from_tokens(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), {NL})
    with pytest.raises(ValueError, match="max_items"):
        item_index_from_tokens(
            torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), {NL}, max_items=0
        )


# ------------------------------------------------------------------ per-rank rewards


def test_log_decay_by_hand():
    rel = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])  # B=1, G=2, K=3
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)  # discounts of ranks 2 and 3; rank 1: 1
    r = rank_rewards(rel, reward="log_decay")
    want = [[1 + d3, d3, d3], [d2 + d3, d2 + d3, d3]]
    assert torch.allclose(r[0], torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # the authors' form: total DCG minus the DCG strictly before rank k
    gains = rel[0, 0] * torch.tensor([1.0, d2, d3])
    authors = gains.sum() - torch.cat([torch.zeros(1), gains.cumsum(0)[:-1]])
    assert torch.allclose(r[0, 0].float(), authors)
    assert torch.equal(rank_rewards(rel, reward="exp_inf"), rel.double())


def test_log_decay_keeps_nan_at_unscored_ranks_and_counts_them_zero_above():
    rel = torch.tensor([[[1.0, NAN, 1.0]]])
    r = rank_rewards(rel, reward="log_decay")[0, 0]
    assert r[0].item() == pytest.approx(1 + 0.5) and math.isnan(r[1].item())
    assert r[2].item() == pytest.approx(0.5)


def test_rank_rewards_rejects_an_unknown_reward_and_bad_shapes():
    with pytest.raises(ValueError, match="reward"):
        rank_rewards(torch.zeros(1, 2, 3), reward="ndcg")
    with pytest.raises(ValueError, match="item_rel_BGK"):
        rank_rewards(torch.zeros(2, 3))


# ------------------------------------------------------------------ per-rank advantages


def _one_item_per_token(B: int, G: int, K: int) -> torch.Tensor:
    return torch.arange(K).repeat(B * G, 1)


def test_per_rank_z_scores_by_hand():
    # G = 3 lists of K = 3 items; rank 1: all relevant (they agree)
    rel = torch.tensor([[[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    adv = rank_grpo(rel, _one_item_per_token(1, 3, 3), reward="exp_inf")
    s = math.sqrt(1 / 3) + 1e-4  # unbiased std of {0, 1, 0} (and of {1, 0, 0}), + eps
    want = [
        [0.0, -1 / 3 / s, 2 / 3 / s],
        [0.0, 2 / 3 / s, -1 / 3 / s],
        [0.0, -1 / 3 / s, -1 / 3 / s],
    ]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    assert (adv[:, 0] == 0).all()


def test_advantage_is_exactly_zero_where_all_lists_agree():
    d = 1 / math.log2(3)
    # log_decay: ranks 2 and 3 agree in all 3 lists, rank 1 does not
    rel = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    r = rank_rewards(rel, reward="log_decay")
    assert torch.allclose(r[0, :, 1], torch.full((3,), d, dtype=torch.float64))
    adv = rank_grpo_advantages(r, _one_item_per_token(1, 3, 3))
    assert (adv[:, 1] == 0).all() and (adv[:, 2] == 0).all()
    assert (adv[:, 0] != 0).all()
    # agreement on a value whose mean rounds (0.1 · 3 / 3 != 0.1): still exactly 0
    r = torch.tensor([[[0.1, 1.0], [0.1, 0.0], [0.1, 0.0]]])
    assert (rank_grpo_advantages(r, _one_item_per_token(1, 3, 2))[:, 0] == 0).all()


def test_matches_the_authors_formula_on_random_lists():
    torch.manual_seed(0)
    rel = (torch.rand(4, 8, 5) < 0.4).double()
    r = rank_rewards(rel, reward="log_decay")
    authors = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    adv = rank_grpo_advantages(r, _one_item_per_token(4, 8, 5))
    agree = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    authors = torch.where(agree, 0.0, authors).reshape(32, 5).float()
    assert torch.allclose(adv, authors, atol=1e-6)


def test_advantages_are_broadcast_to_the_tokens_of_each_item():
    rel = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # B=1, G=2, K=2
    a = 1 / (math.sqrt(0.5) + 1e-4)  # |r - mean| = 0.5, unbiased std sqrt(0.5)
    items = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 1, 1, -1, -1, -1]])
    adv = rank_grpo(rel, items)
    want = [[0.5 * a, 0.5 * a, -0.5 * a, -0.5 * a, 0.0, 0.0], [-0.5 * a, 0.5 * a, 0.5 * a, 0, 0, 0]]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)  # item 2 >= K and -1: no advantage


def test_unscored_ranks_are_left_out_of_the_statistics():
    rel = torch.tensor([[[1.0], [0.0], [NAN]], [[1.0], [NAN], [NAN]]])  # B=2, G=3, K=1
    adv = rank_grpo(rel, torch.zeros(6, 1, dtype=torch.long))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(adv[:, 0], torch.tensor([a, -a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)


def test_unscaled_and_bad_inputs():
    rel = torch.tensor([[[1.0], [0.0]]])
    adv = rank_grpo(rel, torch.zeros(2, 1, dtype=torch.long), scale=False)
    assert adv[:, 0].tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="item_index_NT"):
        rank_grpo(rel, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        rank_grpo(rel, torch.zeros(2, 1, dtype=torch.long), eps=-1.0)


# ------------------------------------------------------------------ segment ratio


def _logps():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -2.0, -4.0]])  # log ρ = [0.5, 0, -1, 0]
    return logp, old


def test_segment_ratio_is_the_geometric_mean_over_the_items_tokens():
    logp, old = _logps()
    items = torch.tensor([[0, 0, 1, 1]])
    log_w = segment_log_ratio(logp, old, torch.ones(1, 4), items)
    assert torch.allclose(log_w, torch.tensor([[0.25, 0.25, -0.5, -0.5]]))
    # a masked token is left out of its item's mean, and gets log w = 0
    log_w = segment_log_ratio(logp, old, torch.tensor([[1.0, 1, 1, 0]]), items)
    assert torch.allclose(log_w, torch.tensor([[0.25, 0.25, -1.0, 0.0]]))
    # gradient of the mean: 1/|k| to each token of the item
    (g,) = torch.autograd.grad(segment_log_ratio(logp, old, torch.ones(1, 4), items)[0, 0], logp)
    assert g.tolist() == [[0.5, 0.5, 0.0, 0.0]]


def test_tokens_without_an_item_share_one_extra_segment_per_row():
    logp, old = _logps()
    log_w = segment_log_ratio(logp, old, torch.ones(1, 4), torch.tensor([[0, -1, 0, -1]]))
    assert torch.allclose(log_w, torch.tensor([[-0.25, 0.0, -0.25, 0.0]]))
    # rows do not mix
    two = segment_log_ratio(
        torch.tensor([[0.0, 0.0], [1.0, 1.0]]),
        torch.zeros(2, 2),
        torch.ones(2, 2),
        torch.zeros(2, 2),
    )
    assert two.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_segment_ratio_is_ppo_clipped_per_item():
    logp, old = _logps()
    items = torch.tensor([[0, 0, 1, 1]])
    w0, w1 = math.exp(0.25), math.exp(-0.5)  # 1.284 > 1.08 and 0.607 < 0.94
    for A, want in [
        (1.0, [1.08, 1.08, w1, w1]),  # A > 0: capped above at 1 + eps_high, not below
        (-1.0, [-w0, -w0, -0.94, -0.94]),  # A < 0: floored at 1 - eps_low, not above
    ]:
        adv = torch.full((1, 4), A)
        J, w, _ = segment_ratio_objective(logp, old, torch.ones(1, 4), adv, items)
        assert torch.allclose(w, torch.tensor([[w0, w0, w1, w1]]))
        assert torch.allclose(J, torch.tensor([want]), atol=1e-6)
        (g,) = torch.autograd.grad(J.sum(), logp)
        clipped = [0, 1] if A > 0 else [2, 3]  # the clipped branch carries no gradient
        assert (g[0, clipped] == 0).all() and (
            g[0, [i for i in range(4) if i not in clipped]] != 0
        ).all()


def _inputs(adv: torch.Tensor, items: torch.Tensor | None) -> PolicyInputs:
    torch.manual_seed(1)
    old = -torch.rand(2, 4) - 0.5
    logp = (old + 0.3 * torch.randn(2, 4)).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    inp = PolicyInputs(logp_NT=logp, old_logp_NT=old, mask_NT=mask, adv_N=adv)
    if items is not None:
        inp.item_index_NT = items  # type: ignore[attr-defined]  # not a PolicyInputs field yet
    return inp


def test_registered_loss_needs_the_items_and_reduces_to_ppo_and_gspo():
    assert LOSSES.get("segment_ratio") is segment_ratio
    adv = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="item_index_NT"):
        segment_ratio(_inputs(adv, None))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]]).bool()
    # one item per token: the per-token PPO clip
    own = segment_ratio(_inputs(adv, torch.arange(4).repeat(2, 1)), eps_low=0.2, eps_high=0.2)
    ppo = ppo_clip(_inputs(adv, None), eps_low=0.2, eps_high=0.2)
    assert torch.allclose(own.per_token_NT[mask], ppo.per_token_NT[mask], atol=1e-6)
    # one item per row: GSPO's sequence ratio (same values)
    whole = segment_ratio(
        _inputs(adv, torch.zeros(2, 4, dtype=torch.long)), eps_low=0.1, eps_high=0.1
    )
    seq = gspo(_inputs(adv, None), eps_low=0.1, eps_high=0.1)
    assert torch.allclose(whole.per_token_NT[mask], seq.per_token_NT[mask], atol=1e-6)
    assert set(whole.stats_NT) == {
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
    }


def test_registered_loss_takes_per_token_advantages():
    items = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1]])
    adv_NT = torch.tensor([[0.5, 0.5, -1.0, 0.0], [2.0, -0.5, -0.5, -0.5]])
    out = segment_ratio(_inputs(adv_NT, items))
    inp = _inputs(adv_NT, items)
    J, _, _ = segment_ratio_objective(inp.logp_NT, inp.old_logp_NT, inp.mask_NT, adv_NT, items)
    mask = inp.mask_NT.bool()
    assert torch.allclose(out.per_token_NT[mask], -J[mask])
    with pytest.raises(ValueError, match="eps_low"):
        segment_ratio(_inputs(adv_NT, items), eps_low=-0.1)


# ------------------------------------------------------------------ through the trainer
def test_rank_relevance_logs_one_relevance_per_rank():
    from grouprl.rewards.ranking import RankRelevance

    logged = {}
    r = RankRelevance(top_k=3)
    out = r(
        ["q", "q"],
        ["3\n6\n7", "9\n\n3\n6"],
        log_extra=lambda k, v: logged.setdefault(k, v),
        answer=[["3", "6", "9"], "3\n6\n9"],
    )
    assert out == [2.0, 2.0]  # the second list: 9, an empty item, 3 (its 6 is past top_k)
    assert logged["item_rel"] == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_rank_grpo_recipe_trains_with_items_from_newline_tokens(tmp_path):
    """A tiny model whose vocabulary has a newline: the trainer finds the newline token,
    plans per-token advantages from the logged relevance, and the per-item ratio loss
    trains. Tokens of one line share one advantage."""
    from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model
    from grouprl.training.trainer import Trainer

    tok = build_char_tokenizer("0123456789+=\n")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model_dir = save_model(model, tok, tmp_path / "model")
    rows = [{"prompt": f"{k}=", "answer": [str(k * j) for j in range(1, 4)]} for k in range(1, 9)]
    cfg = {
        "recipe": "rank_grpo",
        "model": {"name_or_path": str(model_dir)},
        "rollout": {"num_generations": 4, "max_new_tokens": 8, "temperature": 1.0},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "prompts_per_step": 2,
            "micro_batch_size": 3,
            "learning_rate": 1e-2,
            "progress": False,
        },
    }
    tr = Trainer(cfg, train_dataset=rows)
    seen = {}
    learner_update = tr.learner.update

    def update(tb, *, step):
        seen["tb"] = tb
        return learner_update(tb, step=step)

    tr.learner.update = update  # type: ignore[method-assign]
    res = tr.train()
    tr.close()
    assert res.steps == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    tb = seen["tb"]
    assert tb.adv_N.dim() == 2 and tb.item_index_NT is not None
    nl = tok.convert_tokens_to_ids("\n")
    ids, idx = tb.rollouts.completion_ids_NT, tb.item_index_NT
    for i in range(ids.shape[0]):  # the item number steps up after each newline token
        real = tb.rollouts.attention_mask_NT[i].bool()
        expect, item = [], 0
        for t in ids[i][real].tolist():
            expect.append(item)
            item += t == nl
        assert idx[i][real].tolist() == expect
        for k in set(expect):  # one advantage per item
            assert len(set(tb.adv_N[i][real][torch.tensor(expect) == k].tolist())) == 1


# ------------------------------------------------------------------ Segment PO (SPO-chain)
def test_segment_advantages_telescope_and_skip_confident_tokens():
    from grouprl.algorithms.segments import segment_advantages

    # 4 real tokens; values V_0 = 0.5 at 0, V_1 = 1.0 after 2 tokens, V_2 = 0 (the reward)
    # tokens 0, 1: +0.5; tokens 2, 3: −1.0; the segments add up to 0 − 0.5
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    vals = [[[0, 0.5], [2, 1.0], [4, 0.0]]]
    adv = segment_advantages(vals, mask, None)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, -1.0, -1.0, 0.0]]))
    # the sampler gave token 1 probability 0.95 > 0.9: no advantage there
    old = torch.log(torch.tensor([[0.5, 0.95, 0.5, 0.2, 1.0]]))
    adv = segment_advantages(vals, mask, old, prob_mask=0.9)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, -1.0, -1.0, 0.0]]))
    # a NaN value (no scorable continuation) keeps the previous one
    adv = segment_advantages([[[0, 0.5], [2, float("nan")], [4, 1.0]]], mask, None)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]]))


def test_segment_mc_values_cut_points_and_trains(tmp_path):
    """segment_mc on a tiny model: cut points every 2 tokens, 2 continuations each; the
    values reach the `segment` advantage and the step trains."""
    from conftest import arith_rows, base_config, record_collections

    from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model
    from grouprl.training.trainer import Trainer

    tok = build_char_tokenizer("0123456789+-=")
    model_dir = save_model(build_tiny_model(tok, hidden_size=32, num_layers=2), tok, tmp_path / "m")
    cfg = base_config(tmp_path / "r", model_dir, max_steps=1)
    cfg["rollout"]["max_new_tokens"] = 6
    cfg["rollout"]["strategy"] = {"name": "segment_mc", "interval": 2, "mc_rollouts": 2}
    cfg["advantage"] = {"name": "segment"}

    def coin(prompts, completions, **kw):
        return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]

    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[coin])
    seen = record_collections(tr)
    res = tr.train()
    tr.close()
    batch, stats = seen[-1]
    seg = batch.extra["segment_values"]
    n_cuts = 0
    for i, row in enumerate(seg):
        n = int(batch.rollouts.attention_mask_NT[i].sum())
        positions = [int(p) for p, _ in row]
        assert positions == [0, *range(2, n, 2), n]
        assert row[-1][1] == float(batch.rewards_N[i])
        n_cuts += len(positions) - 2
    assert stats["rollouts/sampled"] == batch.rollouts.num_rollouts + 2 * n_cuts
    assert math.isfinite(res.history[-1]["loss"])
