"""Sampler/trainer mismatch: the importance weights on hand-computed numbers, their config,
and the learner applying them to the policy term."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.algorithms.mismatch import MISMATCH_CORRECTIONS, mismatch_stats
from grouprl.components import load_config
from grouprl.config import ConfigError
from grouprl.registry import BoundComponent
from grouprl.training.plan import make_train_batch
from grouprl.training.trainer import Trainer

# trainer log π_old and sampler log μ of 3 positions, the third padding:
# log ρ = [0.5, -1.0]; ρ = [e^0.5, e^-1] = [1.6487, 0.3679]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
SAMPLED = torch.tensor([[-1.5, -1.0, -0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def weights(name: str, **params) -> torch.Tensor:
    return MISMATCH_CORRECTIONS.get(name)(LOGP, SAMPLED, MASK, **params)


def test_token_truncated_is():
    # min(ρ, 1.5) = [1.5, 0.3679], padding 0
    torch.testing.assert_close(weights("tis", cap=1.5), torch.tensor([[1.5, math.exp(-1), 0.0]]))


def test_sequence_truncated_is():
    # Π ρ = e^(0.5 - 1) = e^-0.5 = 0.6065 < C: every token of the row gets it
    w = math.exp(-0.5)
    torch.testing.assert_close(weights("seq_tis", cap=1.5), torch.tensor([[w, w, 0.0]]))
    # a product above C is cut at C
    up = MISMATCH_CORRECTIONS.get("seq_tis")(SAMPLED, LOGP, MASK, cap=1.5)  # Π ρ = e^0.5
    torch.testing.assert_close(up, torch.tensor([[1.5, 1.5, 0.0]]))


def test_sequence_masking_by_geometric_mean():
    # geometric mean ρ = e^(-0.5 / 2) = 0.7788: inside [1/1.5, 1.5], outside [1/1.2, 1.2]
    torch.testing.assert_close(weights("seq_mask", cap=1.5), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(weights("seq_mask", cap=1.2), torch.zeros(1, 3))


def test_none_and_bad_caps():
    assert torch.equal(weights("none"), torch.ones(1, 3))
    for bad in (1.0, 0.5, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="cap must be"):
            weights("tis", cap=bad)


def test_mismatch_metrics_by_hand():
    stats = mismatch_stats(LOGP, SAMPLED, MASK)
    # k3 of x = log μ − log π_old = [-0.5, 1.0]: e^{-x} + x − 1 = [e^0.5 − 1.5, e^-1]
    torch.testing.assert_close(
        stats["mismatch/kl"], torch.tensor([[math.exp(0.5) - 1.5, math.exp(-1.0), 0.0]])
    )
    assert stats["mismatch/ratio_min"] == pytest.approx(math.exp(-1.0))
    assert stats["mismatch/ratio_max"] == pytest.approx(math.exp(0.5))


def test_config_key_and_refusals(tmp_path, tiny_model_dir):
    cfg = load_config({"rollout": {"mismatch_correction": {"name": "tis", "cap": 3.0}}})
    assert cfg.rollout.mismatch_correction == {"name": "tis", "cap": 3.0}
    with pytest.raises(ConfigError, match=r"^rollout.mismatch_correction: .*cap must be"):
        load_config({"rollout": {"mismatch_correction": {"name": "tis", "cap": 0.5}}})
    with pytest.raises(ConfigError, match=r'rollout.mismatch_correction: .*did you mean "tis"'):
        load_config({"rollout": {"mismatch_correction": {"name": "tiss"}}})
    with pytest.raises(ConfigError, match="auto takes no parameters"):
        load_config({"rollout": {"mismatch_correction": {"name": "auto", "cap": 2}}})
    with pytest.raises(ConfigError, match="normalizes itself over whole groups"):
        load_config({"recipe": "disco", "rollout": {"mismatch_correction": {"name": "tis"}}})
    # the HF engine samples with the trainer's own forward: nothing to correct
    run = base_config(tmp_path / "run", tiny_model_dir)
    run["rollout"]["mismatch_correction"] = {"name": "seq_mask"}
    with pytest.raises(ConfigError, match="'seq_mask' weights need the sampler's own log-probs"):
        Trainer(run, train_dataset=arith_rows())
    assert Trainer(base_config(tmp_path / "b", tiny_model_dir), train_dataset=arith_rows())


def _rollouts(tok):
    from grouprl.rollout.base import Rollouts

    prompt = torch.tensor(tok("12+34=", add_special_tokens=False)["input_ids"])
    ids = torch.tensor([[5, 6, 7, 8], [4, 4, 5, 0], [7, 8, 0, 0]])
    att = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    return Rollouts(
        prompt_ids_NP=prompt.repeat(3, 1),
        prompt_mask_NP=torch.ones(3, len(prompt)),
        completion_ids_NT=ids,
        attention_mask_NT=att,
        loss_mask_NT=att.clone(),
        truncated_N=torch.zeros(3, dtype=torch.bool),
        completions=["", "", ""],
        group_size=3,
        sampling_logp_NT=torch.zeros(3, 4),
    )


def test_the_learner_weights_the_policy_term_and_logs_the_mismatch(tmp_path, tiny_model_dir):
    from grouprl.models.forward import completion_logprobs

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=1, max_grad_norm=1e9)
    tr = Trainer(cfg, train_dataset=arith_rows())
    opt = torch.optim.SGD(tr.model.parameters(), lr=0.0)
    tr.learner.optimizer = opt
    tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    adv = torch.tensor([1.0, -0.5, -0.5])
    ro = _rollouts(tr.tokenizer)
    with torch.no_grad():
        logp, _ = completion_logprobs(
            tr.model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
        )
    ro.sampling_logp_NT = (logp + torch.tensor([[0.3, -0.4, 0.1, 0.2]])) * ro.attention_mask_NT

    def grads_with(correction):
        tr.components.mismatch = correction
        tr.model.zero_grad(set_to_none=True)
        stats = tr.learner.update(make_train_batch(ro, adv, max_new_tokens=4), step=0)
        return stats, {n: p.grad.clone() for n, p in tr.model.named_parameters()}

    stats, plain = grads_with(None)
    m = ro.loss_mask_NT
    kl = mismatch_stats(logp, ro.sampling_logp_NT, m)["mismatch/kl"]
    assert stats["mismatch/kl"] == pytest.approx(float(kl.sum() / m.sum()), rel=1e-5)
    assert "mismatch/weight_mean" not in stats
    tis = BoundComponent.build(MISMATCH_CORRECTIONS, "tis", {"cap": 1.2})
    stats, weighted = grads_with(tis)
    w = MISMATCH_CORRECTIONS.get("tis")(logp, ro.sampling_logp_NT, m, cap=1.2)
    assert stats["mismatch/weight_mean"] == pytest.approx(float((w * m).sum() / m.sum()), rel=1e-5)
    # ppo_clip at ratio 1, token_mean: L = -(1/Σm) Σ A_n w_nt m_nt logπ_nt
    tr.model.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(
        tr.model, ro.prompt_ids_NP, ro.prompt_mask_NP, ro.completion_ids_NT, ro.attention_mask_NT
    )
    (-(adv[:, None] * w * m * lp).sum() / m.sum()).backward()
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(weighted[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert any(not torch.allclose(weighted[n], plain[n]) for n in plain)


def test_rows_without_sampler_log_probs_weigh_one_and_leave_the_stats(tmp_path, tiny_model_dir):
    """A strategy's inserted rows (an expert anchor) have NaN sampler log-probs: under a
    correction they train with weight 1 and the mismatch metrics cover the other rows."""
    from grouprl.models.forward import completion_logprobs

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=1, max_grad_norm=1e9)
    tr = Trainer(cfg, train_dataset=arith_rows())
    opt = torch.optim.SGD(tr.model.parameters(), lr=0.0)
    tr.learner.optimizer = opt
    tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ro = _rollouts(tr.tokenizer)
    with torch.no_grad():
        logp, _ = completion_logprobs(
            tr.model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
        )
    sampled = (logp + torch.tensor([[0.3, -0.4, 0.1, 0.2]])) * ro.attention_mask_NT
    sampled[2] = float("nan")
    ro.sampling_logp_NT = sampled
    m = ro.loss_mask_NT
    tr.components.mismatch = BoundComponent.build(MISMATCH_CORRECTIONS, "tis", {"cap": 1.2})
    tr.model.zero_grad(set_to_none=True)
    adv = torch.tensor([1.0, -0.5, 0.8])
    stats = tr.learner.update(make_train_batch(ro, adv, max_new_tokens=4), step=0)
    got = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    w = MISMATCH_CORRECTIONS.get("tis")(logp[:2], sampled[:2], m[:2], cap=1.2)
    w = torch.cat([w, torch.ones(1, 4)])
    kl = mismatch_stats(logp[:2], sampled[:2], m[:2])["mismatch/kl"]
    assert stats["mismatch/kl"] == pytest.approx(float(kl.sum() / m[:2].sum()), rel=1e-5)
    tr.model.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(
        tr.model, ro.prompt_ids_NP, ro.prompt_mask_NP, ro.completion_ids_NT, ro.attention_mask_NT
    )
    (-(adv[:, None] * w * m * lp).sum() / m.sum()).backward()
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
