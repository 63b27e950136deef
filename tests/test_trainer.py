"""End-to-end trainer behaviour on a tiny model: updates, metrics, checkpoints, resume,
failing rewards, NaN gradients, micro-batch invariance and the first-iteration ratio."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import arith_rows, base_config

import grouprl
from grouprl.algorithms import LOSSES
from grouprl.training.checkpoint import latest_checkpoint
from grouprl.training.trainer import Trainer

REQUIRED_METRICS = [
    "reward",
    "reward_std",
    "rewards/exact_match/mean",
    "frac_reward_zero_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/clipped_ratio",
    "time/collect",
    "time/plan",
    "time/train",
    "tokens_per_second",
    "loss",
    "grad_norm",
    "learning_rate",
]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_three_steps_update_log_and_checkpoint(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "run", tiny_model_dir)
    cfg["regularizers"] = [{"name": "kl", "beta": 0.1, "estimator": "k3"}]
    # exact_match is 0 everywhere for a random model; a length reward gives the groups spread
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", length_reward])
    before = params_of(tr.model)
    res = tr.train()
    after = params_of(tr.model)
    assert res.steps == 3
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for key in REQUIRED_METRICS + ["kl"]:
        assert key in lines[0], key
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference at step 1
    assert lines[-1]["kl"] > 0
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_0000003"
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "trainer_state.json",
    ]:
        assert (ckpt / f).is_file(), f
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data_cursor"]["pos"] == 9


class Killed(Exception):
    pass


def test_resume_is_exact(tmp_path, tiny_model_dir):
    """6 uninterrupted steps == 3 steps, a kill, a resume and 3 more steps."""
    rows = arith_rows(10)  # 10 prompts, 3 per step: the cursor crosses an epoch boundary
    kl = [{"name": "kl", "beta": 0.05, "estimator": "k3"}]

    def config(out, **kw):
        cfg = base_config(
            out,
            tiny_model_dir,
            max_steps=6,
            lr_schedule="cosine",
            warmup_steps=2,
            save_every=3,
            **kw,
        )
        cfg["regularizers"] = kl
        return cfg

    full = Trainer(config(tmp_path / "full"), train_dataset=rows)
    full.train()

    first = Trainer(config(tmp_path / "half"), train_dataset=rows)

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    first.callbacks.append(kill_after_3)
    with pytest.raises(Killed):
        first.train()
    assert latest_checkpoint(tmp_path / "half").name == "step_0000003"
    second = Trainer(config(tmp_path / "half", resume=True), train_dataset=rows)
    second.train()
    assert second.step == 6
    a, b = params_of(full.model), params_of(second.model)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_failing_reward_does_not_stop_the_run(tmp_path, tiny_model_dir):
    calls = {"n": 0}

    def flaky(prompts, completions, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("reward server down")
        return [float(len(c)) for c in completions]

    def half_none(prompts, completions, **kw):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    cfg = base_config(tmp_path / "run", tiny_model_dir)
    res = grouprl.train(cfg, train_dataset=arith_rows(), reward_funcs=[flaky, half_none])
    assert res.steps == 3
    h = res.history
    assert h[1]["rewards/flaky/errors"] == 1 and h[0]["rewards/flaky/errors"] == 0
    # flaky's column is NaN that step: skipped (TRL's nansum), so the samples half_none
    # scored keep a reward and the others are unscorable (advantage 0)
    assert h[1]["reward/nan_frac"] == 0.5
    assert h[0]["rewards/half_none/nan_count"] == 6  # 12 rollouts, every second one None
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in h)


def test_nan_gradient_skips_the_update(tmp_path, tiny_model_dir, monkeypatch):
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    tr = Trainer(cfg, train_dataset=arith_rows())
    real = tr.components.loss

    def poisoned(inp):
        out = real(inp)
        out.per_token_NT = out.per_token_NT * float("nan")
        return out

    tr.components.loss = poisoned
    before = params_of(tr.model)
    res = tr.train()
    after = params_of(tr.model)
    assert res.steps == 2
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.history[0]["train/skipped_updates"] == 1


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "token_sum"]
)
def test_micro_batching_keeps_the_gradient(tmp_path, tiny_model_dir, aggregation):
    grads = []
    for mbs in (12, 5, 1):
        cfg = base_config(
            tmp_path / f"r{mbs}",
            tiny_model_dir,
            micro_batch_size=mbs,
            learning_rate=0.0,
            max_steps=1,
        )
        cfg["loss"]["aggregation"] = aggregation
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        tr = Trainer(cfg, train_dataset=arith_rows())
        torch.manual_seed(0)
        tr.train()
        grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        )
    assert grads[0]
    for other in grads[1:]:
        for n, g in grads[0].items():
            assert torch.allclose(g, other[n], atol=1e-6, rtol=1e-5), n


def test_first_iteration_ratio_is_exactly_one(tmp_path, tiny_model_dir, monkeypatch):
    seen = []
    real = LOSSES.get("ppo_clip")

    def spy(inp, **kw):
        seen.append((inp.logp_NT.detach() - inp.old_logp_NT).abs().max().item())
        return real(inp, **kw)

    cfg = base_config(
        tmp_path / "run", tiny_model_dir, max_steps=1, num_iterations=2, micro_batch_size=4
    )
    # a reward with spread, so the advantage (and the first update) is non-zero
    tr = Trainer(
        cfg,
        train_dataset=arith_rows(),
        reward_funcs=[lambda prompts, completions, **kw: [float(len(c)) for c in completions]],
    )
    tr.components.loss = lambda inp: spy(inp)
    tr.train()
    n_mb = 3  # 12 rollouts in micro-batches of 4
    assert len(seen) == 2 * n_mb
    assert all(x == 0.0 for x in seen[:n_mb])  # iteration 1: same forward, ratio exactly 1
    assert any(x > 0 for x in seen[n_mb:])  # iteration 2: the policy has moved


def test_no_reference_model_without_kl(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "run", tiny_model_dir)
    assert Trainer(cfg, train_dataset=arith_rows()).learner.ref_model is None
    cfg["regularizers"] = [{"name": "kl", "beta": 0.0}]
    assert Trainer(cfg, train_dataset=arith_rows()).learner.ref_model is None
    cfg["regularizers"] = [{"name": "kl", "beta": 0.01}]
    assert Trainer(cfg, train_dataset=arith_rows()).learner.ref_model is not None


def test_builtin_task_eval_and_tensorboard(tmp_path, tiny_model_dir):
    cfg = base_config(
        tmp_path / "run",
        tiny_model_dir,
        max_steps=2,
        eval_every=2,
        eval_limit=5,
        eval_samples=2,
        tensorboard=True,
    )
    cfg["data"] = {"task": "arith"}
    cfg["rewards"] = []  # the task brings its own (exact_match)
    res = Trainer(cfg).train()
    last = res.history[-1]
    assert "rewards/exact_match/mean" in last
    assert 0.0 <= last["eval/pass@1"] <= last["eval/pass@2"] <= 1.0
    assert "eval/maj@2" in last and "eval/pass@1" not in res.history[0]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_every_needs_eval_data(tmp_path, tiny_model_dir):
    from grouprl.components import load_config
    from grouprl.config import ConfigError

    cfg = base_config(tmp_path / "run", tiny_model_dir, eval_every=2)
    with pytest.raises(ConfigError, match="train.eval_every: set data.eval_path"):
        load_config(cfg)


def test_collapse_warning_is_logged_and_can_stop_the_run(tmp_path, tiny_model_dir):
    cfg = base_config(
        tmp_path / "run", tiny_model_dir, max_steps=3, collapse_monitor="on", stop_on_collapse=True
    )
    tr = Trainer(cfg, train_dataset=arith_rows())
    assert tr.monitor is not None
    # force the monitor's verdict on step 2: the run must log it, save and stop there
    real = tr.monitor.check
    tr.monitor.check = lambda m: (
        real(m) + (["collapse: forced for the test"] if tr.step == 2 else [])
    )
    res = tr.train()
    assert res.steps == 2 and res.stopped_early
    assert res.history[-1]["collapse/warning"] == 1.0 and "collapse/warning" not in res.history[0]
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    off = base_config(tmp_path / "off", tiny_model_dir)
    assert Trainer(off, train_dataset=arith_rows()).monitor is None  # auto: only with majority_vote


def test_token_budget_slices_by_padded_tokens():
    from grouprl.training.batching import token_micro_batches

    # units of 2 rows each, lengths 10, 4, 7, 30, 3; repeated layout: 2 rows per unit
    got = token_micro_batches([10, 4, 7, 30, 3], 2, 2, 45)
    # [10,4]: 2*2*10=40 fits; +7: 3*2*10=60 no -> [7]: 14, +30: 2*2*30=120 no -> [30] alone
    # (over budget) ; [3]
    assert got == [slice(0, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    # packed layout: one row per group of 4
    assert token_micro_batches([10, 4, 7], 1, 4, 20) == [slice(0, 8), slice(8, 12)]
    assert token_micro_batches([], 1, 4, 20) == []


@pytest.mark.parametrize("shared_prefix", ["off", "on"])
def test_token_budgets_keep_the_gradient(tmp_path, tiny_model_dir, shared_prefix):
    grads, counts = [], []
    for tokens in (0, 60, 1):  # one forward; a few; every unit alone
        cfg = base_config(
            tmp_path / f"r{tokens}",
            tiny_model_dir,
            micro_batch_size=64,
            learning_rate=0.0,
            max_steps=1,
        )
        cfg["train"]["micro_batch_tokens"] = tokens
        cfg["model"]["shared_prefix"] = shared_prefix
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        tr = Trainer(cfg, train_dataset=arith_rows())
        real = tr.learner.micro_batches
        tr.learner.micro_batches = lambda ro, real=real: counts.append(len(real(ro))) or real(ro)
        torch.manual_seed(0)
        tr.train()
        grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        )
    counts = counts[:: len(counts) // 3]  # each run asks the same number of times
    assert counts[0] == 1 and counts[2] > counts[1] > 1, counts
    for other in grads[1:]:
        for n, g in grads[0].items():
            assert torch.allclose(g, other[n], atol=1e-6, rtol=1e-5), n
