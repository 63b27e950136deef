"""`train.async: one_step` (training/pipeline.py): the next batch is sampled while this step
trains, from the weights before the update; its staleness is corrected by the mismatch
weights; runs are deterministic and resume exactly; failures keep what is done."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.config import ConfigError, load_config
from grouprl.models.forward import completion_logprobs
from grouprl.rollout.base import RolloutEngineError
from grouprl.training.checkpoint import latest_checkpoint
from grouprl.training.trainer import Trainer


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


REWARDS = ["exact_match", length_reward]


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def config(out, model_dir, mode="one_step", **train):
    cfg = base_config(out, model_dir, **{"learning_rate": 1e-2, **train})
    cfg["train"]["async"] = mode
    return cfg


class Recorder:
    """Wraps Learner.update: the weights each update starts from, and the batch it trains."""

    def __init__(self, trainer: Trainer) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.batches: list = []
        update = trainer.learner.update

        def wrapped(train_batch, *, step):
            self.weights.append(params_of(trainer.model))
            self.batches.append(train_batch.rollouts)
            return update(train_batch, step=step)

        trainer.learner.update = wrapped  # type: ignore[method-assign]


def logp_under(model, weights, ro):
    saved = params_of(model)
    model.load_state_dict(weights)
    try:
        with torch.no_grad():
            return completion_logprobs(
                model,
                ro.prompt_ids_NP,
                ro.prompt_mask_NP,
                ro.completion_ids_NT,
                ro.attention_mask_NT,
            )[0]
    finally:
        model.load_state_dict(saved)


def test_each_batch_is_sampled_from_the_weights_one_update_before(tmp_path, tiny_model_dir):
    """Batch k+1 (k >= 0) carries the log-probs of the weights step k started from (θ_k),
    not of the weights it trains (θ_k+1); the first batch is fresh."""
    tr = Trainer(
        config(tmp_path / "run", tiny_model_dir, max_steps=4, save_every=0),
        train_dataset=arith_rows(),
        reward_funcs=REWARDS,
    )
    rec = Recorder(tr)
    ahead: list[bool] = []  # did the step sample the next batch (the last one does not)
    tr.callbacks.append(lambda step, metrics: ahead.append(tr.pipeline.holds_next))
    res = tr.train()
    tr.close()
    assert res.steps == 4 and len(rec.batches) == 4
    assert ahead == [True, True, True, False]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["async/staleness"] for x in lines] == [0.0, 1.0, 1.0, 1.0]
    for k, ro in enumerate(rec.batches):
        mask = ro.loss_mask_NT.bool()
        assert ro.sampling_logp_NT is not None
        sampled_from = rec.weights[max(k - 1, 0)]
        behaviour = logp_under(tr.model, sampled_from, ro)
        assert (behaviour - ro.sampling_logp_NT)[mask].abs().max() < 1e-4, k
        if k >= 1:  # and not the weights this update starts from: they moved
            current = logp_under(tr.model, rec.weights[k], ro)
            assert (current - ro.sampling_logp_NT)[mask].abs().max() > 1e-3, k
    # the stale samples are weighed: the measured mismatch is zero only on the fresh batch
    assert lines[0]["mismatch/kl"] < 1e-8 and lines[2]["mismatch/kl"] > 1e-8


def test_async_runs_are_deterministic_and_resume_exactly(tmp_path, tiny_model_dir):
    """Two identical runs make the same weights (sampling never reads the global RNG the
    update shares); 6 steps == 3 steps + a kill + a resume + 3 steps (a checkpoint step is
    not prefetched, so the resumed step samples from the same weights)."""
    rows = arith_rows(10)

    def cfg(out, **kw):
        return config(out, tiny_model_dir, max_steps=6, save_every=3, **kw)

    full = Trainer(cfg(tmp_path / "full"), train_dataset=rows, reward_funcs=REWARDS)
    full.train()
    again = Trainer(cfg(tmp_path / "again"), train_dataset=rows, reward_funcs=REWARDS)
    again.train()

    class Killed(Exception):
        pass

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    first = Trainer(cfg(tmp_path / "half"), train_dataset=rows, reward_funcs=REWARDS)
    first.callbacks.append(kill_after_3)
    with pytest.raises(Killed):
        first.train()
    first.close()
    assert latest_checkpoint(tmp_path / "half").name == "step_0000003"
    second = Trainer(cfg(tmp_path / "half", resume=True), train_dataset=rows, reward_funcs=REWARDS)
    second.train()
    a, b, c = params_of(full.model), params_of(again.model), params_of(second.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.allclose(a[k], c[k], atol=1e-6, rtol=0), k
    for t in (full, again, second):
        t.close()


def test_off_is_the_synchronous_loop(tmp_path, tiny_model_dir):
    """train.async off: no sampler copy, no sampling log-probs, no async metrics."""
    tr = Trainer(
        config(tmp_path / "run", tiny_model_dir, mode="off"),
        train_dataset=arith_rows(),
        reward_funcs=REWARDS,
    )
    assert tr.engine.model is tr.model and not tr.engine.reports_sampling_logp
    rec = Recorder(tr)
    tr.train()
    tr.close()
    assert all(ro.sampling_logp_NT is None for ro in rec.batches)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "async/staleness" not in line


def test_a_stop_between_checkpoints_loses_no_prompt(tmp_path, tiny_model_dir):
    """A run stopped while a batch was collected ahead saves the cursor from before that
    batch: the resume draws those prompts again, and none is skipped."""
    rows = arith_rows(10)

    class Stop:
        def __init__(self, trainer):
            self.trainer = trainer

        def __call__(self, step, metrics):
            if step == 2:  # as SIGTERM would: the loop stops before step 3
                self.trainer.interrupted = "SIGTERM"
                raise SystemExit(0)

    tr = Trainer(
        config(tmp_path / "run", tiny_model_dir, max_steps=5, save_every=0),
        train_dataset=rows,
        reward_funcs=REWARDS,
    )
    tr.callbacks.append(Stop(tr))
    with pytest.raises(SystemExit):
        tr.train()
    ahead = tr.pipeline._pending
    assert ahead is not None and ahead.step == 2  # step 3's batch was being collected
    path = tr._save()  # what the loop saves on a stop
    tr.close()
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["data_cursor"]["pos"] == 2 * 3  # two steps of 3 prompts, not three


def test_a_failing_background_collection_keeps_the_finished_update(tmp_path, tiny_model_dir):
    """The engine fails while collecting step 3's batch in the background: step 2's update
    is kept, the checkpoint is at step 2 with the cursor before step 3's prompts."""
    tr = Trainer(
        config(tmp_path / "run", tiny_model_dir, max_steps=5, save_every=0),
        train_dataset=arith_rows(10),
        reward_funcs=REWARDS,
    )
    generate = tr.engine.generate
    calls = {"n": 0}

    def flaky(prompts, params):
        calls["n"] += 1
        if calls["n"] == 3:  # the collection for step 3 (steps 1, 2 were calls 1, 2)
            raise RolloutEngineError("sampler died")
        return generate(prompts, params)

    tr.engine.generate = flaky  # type: ignore[method-assign]
    with pytest.raises(RolloutEngineError, match="saved at step 2"):
        tr.train()
    tr.close()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_0000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["data_cursor"]["pos"] == 6


def test_refusals_name_the_key(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="train.async: 'two' is not one of off, one_step"):
        load_config(config(tmp_path / "a", tiny_model_dir, mode="two"))
    bad = config(tmp_path / "b", tiny_model_dir, strategy="fsdp2")
    with pytest.raises(ConfigError, match="train.async: one_step with train.strategy fsdp2"):
        load_config(bad)
    gen = config(tmp_path / "c", tiny_model_dir)
    gen["rollout"]["decoder"] = "generate"
    with pytest.raises(ConfigError, match="rollout.decoder shared"):
        Trainer(gen, train_dataset=arith_rows(), reward_funcs=REWARDS)
