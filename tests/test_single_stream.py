"""single_stream (SPO) in the trainer: the offline start from a probe pass of the initial
policy, the log-prob-drift forgetting factor, and a resume that continues both exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.training.trainer import Trainer


def coin_reward(prompts, completions, **kw):
    """1 when the completion starts with an even digit: a reward with signal on the tiny model."""
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def spo_run(out, model_dir, *, steps, resume=False, offline=2):
    cfg = base_config(out, model_dir, max_steps=steps, save_every=2, resume=resume)
    cfg["rollout"]["num_generations"] = 1
    cfg["advantage"] = {
        "name": "single_stream",
        "rho_mode": "logprob_drift",
        "offline_init": offline,
        "rho_min": 0.5,
    }
    cfg["rewards"] = [coin_reward]
    tr = Trainer(cfg, train_dataset=arith_rows(12), reward_funcs=[coin_reward])
    est = tr.components.advantage.instance
    probed = {}
    init = est.init_offline
    est.init_offline = lambda k, s, n: probed.update(zip(k, s, strict=True)) or init(k, s, n)  # type: ignore[method-assign]
    res = tr.train()
    state = est.state_dict()
    weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.close()
    return res, state, weights, probed


def test_offline_start_then_drift_and_an_exact_resume(tmp_path, tiny_model_dir):
    res, state, weights, probed = spo_run(tmp_path / "a", tiny_model_dir, steps=4)
    # the probe drew 2 samples of each of the 12 prompts before the first step
    assert sorted(probed, key=int) == [str(i) for i in range(12)]
    assert all(0 <= s <= 2 for s in probed.values())
    # every prompt has a tracker (offline start), prompts visited have a stored completion
    assert len(state["alpha"]) == 12 and state["stored"]
    for p_ids, c_ids, mask, logp in state["stored"].values():
        assert len(c_ids) == len(mask) == len(logp) and p_ids
        assert all(x <= 0 for x in logp)
    assert res.steps == 4
    # resumed at step 2: the probe is not drawn again, and the run ends where the
    # uninterrupted one did
    spo_run(tmp_path / "b", tiny_model_dir, steps=2)
    _, state_b, weights_b, probed_b = spo_run(tmp_path / "b", tiny_model_dir, steps=4, resume=True)
    assert probed_b == {}
    assert state_b == state
    for k in weights:
        torch.testing.assert_close(weights_b[k], weights[k], msg=k)


def test_constant_mode_draws_no_probe_and_stores_nothing(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "c", tiny_model_dir, max_steps=1)
    cfg["advantage"] = {"name": "single_stream"}
    cfg["rollout"]["num_generations"] = 1
    tr = Trainer(cfg, train_dataset=arith_rows(12), reward_funcs=[coin_reward])
    tr.train()
    est = tr.components.advantage.instance
    tr.close()
    assert est.stored == {} and len(est.alpha) <= 12


def test_bad_drift_parameters_name_the_key(tmp_path, tiny_model_dir):
    from grouprl.config import ConfigError

    cfg = base_config(tmp_path / "d", tiny_model_dir, max_steps=1)
    cfg["advantage"] = {"name": "single_stream", "rho_mode": "kl"}
    cfg["rollout"]["num_generations"] = 1
    with pytest.raises(ConfigError, match="advantage"):
        Trainer(cfg, train_dataset=arith_rows(12))
